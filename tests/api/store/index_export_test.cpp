// kvtier export through kvtierd, the store's side: the walk over a snapshot of the index lists
// every cached block depth first (a parent right before its subtree), per chosen namespace, and
// skips a block evicted meanwhile with its subtree; read_blocks hands out each block's bytes
// verified, from memory or NVMe, and names the block that is gone or corrupt.
#include "api/store/index_export.h"

#include <nlohmann/json.hpp>

#include <thread>
#include <unordered_map>

#include "api/vocab/sequence_point.h"

#include "tier_manager_fixture.h"

namespace kvtier::store_testing {
namespace {

std::vector<TokenId> branch(const std::vector<TokenId>& trunk, size_t keep_blocks, uint64_t seed, size_t more) {
  std::vector<TokenId> t(trunk.begin(), trunk.begin() + keep_blocks * 16);
  const auto tail = prompt(seed, more);
  t.insert(t.end(), tail.begin(), tail.end());
  return t;
}

/// Every page of a walk, in order.
std::vector<ExportedBlock> walk_all(IndexExport& walk, const PrefixIndex& index, size_t page, uint64_t& gone) {
  std::vector<ExportedBlock> out;
  while (!walk.done()) {
    auto p = walk.next(index, page, gone);
    REQUIRE(p.size() <= page);
    out.insert(out.end(), p.begin(), p.end());
  }
  return out;
}

/// Depth first: each block's parent (or its root, for block 0) came before it, and every block
/// between the two lies deeper than the parent, in the same namespace.
void check_depth_first(const std::vector<ExportedBlock>& blocks) {
  std::unordered_map<BlockKey, size_t> at;
  for (size_t i = 0; i < blocks.size(); ++i) {
    const ExportedBlock& b = blocks[i];
    INFO("block " << i << " index " << b.record.block_index);
    if (b.record.block_index == 0) {
      CHECK(b.record.parent == b.root);
    } else {
      auto p = at.find(b.record.parent);
      REQUIRE(p != at.end());
      for (size_t j = p->second + 1; j < i; ++j) {
        CHECK(blocks[j].root == b.root);
        CHECK(blocks[j].record.block_index > blocks[p->second].record.block_index);
      }
    }
    at[b.key] = i;
  }
}

}  // namespace

TEST_CASE("kvtier export's walk lists every cached block depth first, per chosen namespace", "[store][export]") {
  Fixture f(/*host_blocks=*/64);
  const auto a = prompt(1, 5);
  const auto b = branch(a, 2, 2, 3);   // shares a's first 2 blocks
  const auto c = branch(a, 4, 3, 1);   // shares 4
  for (const auto* t : {&a, &b, &c}) REQUIRE(f.tm->save(f.ns, *t, kv_for(*t, layout())).is_ok());
  auto other = f.tm->add_namespace({"other-model", layout(), "", ""});
  REQUIRE(other.is_ok());
  const auto d = prompt(4, 2);
  REQUIRE(f.tm->save(*other, d, kv_for(d, layout())).is_ok());

  uint64_t gone = 0;
  auto all = IndexExport::start(f.tm->index(), {});
  CHECK(all.size() == 5 + 3 + 1 + 2);
  const auto listed = walk_all(all, f.tm->index(), 3, gone);
  CHECK(gone == 0);
  REQUIRE(listed.size() == 11);
  check_depth_first(listed);
  // Each namespace's blocks come together, and each block's tokens are its own.
  size_t switches = 0;
  for (size_t i = 1; i < listed.size(); ++i) switches += listed[i].root != listed[i - 1].root;
  CHECK(switches == 1);
  std::unordered_map<BlockKey, std::vector<TokenId>> tokens_of;
  for (const auto& [ns, t] : {std::pair{f.ns, a}, std::pair{f.ns, b}, std::pair{f.ns, c}, std::pair{*other, d}}) {
    std::vector<BlockKey> keys;
    REQUIRE(f.tm->index().key_chain().chain(ns, t, {}, keys).is_ok());
    for (size_t k = 0; k < keys.size(); ++k) tokens_of[keys[k]].assign(t.begin() + k * 16, t.begin() + k * 16 + 16);
  }
  for (const ExportedBlock& e : listed) CHECK(e.record.tokens == tokens_of.at(e.key));

  // Only the namespaces asked for, in the order asked.
  const BlockKey roots[] = {other->root, f.ns.root};
  auto chosen = IndexExport::start(f.tm->index(), roots);
  const auto two = walk_all(chosen, f.tm->index(), 100, gone);
  REQUIRE(two.size() == 11);
  CHECK(two.front().root == other->root);
  CHECK(two.back().root == f.ns.root);
  auto one = IndexExport::start(f.tm->index(), std::span(roots, 1));
  CHECK(walk_all(one, f.tm->index(), 100, gone).size() == 2);

  // The page as kvtier export reads it.
  auto page_walk = IndexExport::start(f.tm->index(), std::span(roots, 1));
  uint64_t page_gone = 0;
  const auto page = page_walk.next(f.tm->index(), 1, page_gone);
  const auto j = nlohmann::json::parse(export_page_json(page_walk, page, page_gone));
  REQUIRE(j["blocks"].size() == 1);
  CHECK(j["blocks"][0]["key"] == page[0].key.to_hex());
  CHECK(j["blocks"][0]["root"] == other->root.to_hex());
  CHECK(j["blocks"][0]["block_index"] == 0);
  CHECK(j["blocks"][0]["tokens"].get<std::vector<TokenId>>() == std::vector<TokenId>(d.begin(), d.begin() + 16));
  CHECK(j["done"] == false);
  CHECK(j["total"] == 2);
}

TEST_CASE("A block evicted during the walk is left out with its subtree, and counted", "[store][export]") {
  Fixture f(/*host_blocks=*/64);
  const auto a = prompt(1, 3);
  const auto b = branch(a, 1, 2, 3);  // block 0 shared; b's blocks 1..3 are a chain of their own
  for (const auto* t : {&a, &b}) REQUIRE(f.tm->save(f.ns, *t, kv_for(*t, layout())).is_ok());
  auto walk = IndexExport::start(f.tm->index(), {});
  REQUIRE(walk.size() == 6);
  std::vector<BlockKey> keys;
  REQUIRE(f.tm->index().key_chain().chain(f.ns, b, {}, keys).is_ok());
  // b's last two blocks leave the index (leaf first, as eviction takes them) after the snapshot.
  REQUIRE(f.tm->index().erase(keys[3]).is_ok());
  REQUIRE(f.tm->index().erase(keys[2]).is_ok());
  uint64_t gone = 0;
  const auto listed = walk_all(walk, f.tm->index(), 2, gone);
  CHECK(gone == 2);
  CHECK(listed.size() == 4);
  check_depth_first(listed);
  for (const ExportedBlock& e : listed) CHECK((e.key != keys[2] && e.key != keys[3]));
}

TEST_CASE("read_blocks hands out each block's bytes verified, from memory or NVMe, and names the bad ones",
          "[store][export]") {
  Fixture f(/*host_blocks=*/64);
  const auto t = prompt(7, 4);
  const auto kv = kv_for(t, layout());
  REQUIRE(f.tm->save(f.ns, t, kv).is_ok());
  std::vector<BlockKey> keys;
  REQUIRE(f.tm->index().key_chain().chain(f.ns, t, {}, keys).is_ok());
  const uint64_t bb = layout().bytes_per_block();
  std::vector<std::byte> out(5 * bb);
  std::vector<std::byte*> dst;
  for (int i = 0; i < 5; ++i) dst.push_back(out.data() + i * bb);
  auto unknown = keys[0];
  unknown.lo ^= 1;
  std::vector<BlockKey> asked = keys;
  asked.push_back(unknown);

  SECTION("from the host tier") {
    const auto got = f.tm->read_blocks(asked, dst);
    REQUIRE(got.size() == 5);
    for (int i = 0; i < 4; ++i) CHECK(got[i].is_ok());
    CHECK(got[4].code() == StatusCode::kNotFound);
    CHECK(std::memcmp(out.data(), kv.data(), 4 * bb) == 0);
  }
  SECTION("from NVMe, one copy corrupt") {
    REQUIRE(*f.tm->flush() == 4);
    f.opts.promote_on_hit = false;
    f.reopen();  // the copies in memory are gone
    corrupt_payload(f.dir.path(), f.tm->index().get(keys[2])->slot(Tier::kNvme));
    const auto got = f.tm->read_blocks(asked, dst);
    CHECK(got[0].is_ok());
    CHECK(got[1].is_ok());
    CHECK(got[2].code() == StatusCode::kChecksumMismatch);
    CHECK(got[3].is_ok());
    CHECK(got[4].code() == StatusCode::kNotFound);
    CHECK(std::memcmp(out.data(), kv.data(), 2 * bb) == 0);
    CHECK(std::memcmp(out.data() + 3 * bb, kv.data() + 3 * bb, bb) == 0);
    // Quarantined as a load's bad read is: lookups stop before it.
    CHECK(f.tm->index().get(keys[2])->damaged);
    // Reading leaves no pin behind: the leaf can still leave the index.
    CHECK(f.tm->index().erase(keys[3]).is_ok());
  }
  SECTION("a destination list of another length is refused") {
    const auto got = f.tm->read_blocks(asked, std::span(dst).first(2));
    for (const Status& s : got) CHECK(s.code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("A block evicted while kvtier export reads it stays until the read is done", "[store][export]") {
  // The read is held by a sequence point after it pinned the blocks and chose their copies.
  Fixture f(/*host_blocks=*/64);
  const auto t = prompt(8, 3);
  const auto kv = kv_for(t, layout());
  REQUIRE(f.tm->save(f.ns, t, kv).is_ok());
  std::vector<BlockKey> keys;
  REQUIRE(f.tm->index().key_chain().chain(f.ns, t, {}, keys).is_ok());
  const uint64_t bb = layout().bytes_per_block();
  std::vector<std::byte> out(3 * bb);
  std::vector<std::byte*> dst{out.data(), out.data() + bb, out.data() + 2 * bb};
  std::vector<Status> got;
  {
    sequence::Hold hold("tier_manager.read_blocks.copy");
    std::thread reader([&] { got = f.tm->read_blocks(keys, dst); });
    hold.wait_reached();
    CHECK(f.tm->index().erase(keys[2]).status().code() == StatusCode::kBusy);  // pinned by the read
    hold.release();
    reader.join();
  }
  REQUIRE(got.size() == 3);
  for (const Status& s : got) CHECK(s.is_ok());
  CHECK(std::memcmp(out.data(), kv.data(), 3 * bb) == 0);
  CHECK(f.tm->index().erase(keys[2]).is_ok());  // unpinned once read
}

}  // namespace kvtier::store_testing
