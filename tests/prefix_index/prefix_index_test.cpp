// PrefixIndex: longest-prefix match, collision safety, bad input, leases and pins.
#include <catch2/catch.hpp>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("Match returns the longest cached prefix with residency") {
  TestIndex t({.shards = 8});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(3);
  auto shared = random_tokens(rng, 40);  // 10 blocks
  auto keys = insert_prompt(*index, ns, shared, Tier::kHost);

  auto longer = shared;
  auto more = random_tokens(rng, 13);
  longer.insert(longer.end(), more.begin(), more.end());
  auto m = index->match(ns, longer);
  REQUIRE(m.is_ok());
  CHECK(m->blocks.size() == 10);
  CHECK(m->tokens == 40);
  CHECK(m->blocks[3].key == keys[3]);
  CHECK(m->blocks[3].resident_in(Tier::kHost));
  CHECK_FALSE(m->blocks[3].resident_in(Tier::kNvme));
  CHECK(m->blocks[3].byte_size == ns.layout.bytes_per_block());

  auto diverged = shared;
  diverged[17] ^= 1;  // block 4 differs: blocks 0..3 match
  CHECK(index->match(ns, diverged)->blocks.size() == 4);
  CHECK(index->match(ns, std::span(shared).first(3))->blocks.empty());  // less than one block

  // Residency in a second tier shows up in the match.
  REQUIRE(index->add_residency(keys[0], Tier::kNvme, 77).is_ok());
  auto again = index->match(ns, shared);
  CHECK(again->blocks[0].resident_in(Tier::kNvme));
  CHECK(again->blocks[0].slot(Tier::kNvme) == 77);
  CHECK(index->add_residency(keys[0], Tier::kNvme, 78).code() == StatusCode::kAlreadyExists);

  auto s = index->stats();
  CHECK(s.entries == 10);
  CHECK(s.lookups == 4);
  CHECK(s.hit_blocks == 10 + 4 + 0 + 10);
  CHECK(index->check_invariants().is_ok());
}

TEST_CASE("Different salts and layouts never share blocks") {
  KeyChain chain("secret");
  auto index = std::move(*PrefixIndex::create(chain));
  auto a = *chain.make_namespace({"m", small_layout(4), "tenant-a", ""});
  auto b = *chain.make_namespace({"m", small_layout(4), "tenant-b", ""});
  auto fp32 = *chain.make_namespace({"m", *KvLayout::standard(2, 2, 8, Dtype::kFp32, 4), "tenant-a", ""});
  std::mt19937_64 rng(4);
  auto prompt = random_tokens(rng, 32);
  insert_prompt(*index, a, prompt);
  CHECK(index->match(a, prompt)->blocks.size() == 8);
  CHECK(index->match(b, prompt)->blocks.empty());
  CHECK(index->match(fp32, prompt)->blocks.empty());
}

namespace {
// A deliberately weak hash: 2 bits of key. Nearly every block collides with another.
BlockKey weak_hash(const void* data, size_t len, const uint8_t*, size_t) {
  uint64_t h = 0;
  for (size_t i = 0; i < len; ++i) h += static_cast<const uint8_t*>(data)[i];
  return BlockKey{h & 3, 0};
}
}  // namespace

TEST_CASE("A forced hash collision never yields another prompt's block") {
  KeyChain chain("secret", &weak_hash);
  auto index = std::move(*PrefixIndex::create(chain, {.shards = 1}));
  auto ns = *chain.make_namespace({"m", small_layout(4), "", ""});
  std::mt19937_64 rng(5);
  std::vector<std::vector<TokenId>> stored;
  size_t collisions_seen = 0;
  for (int p = 0; p < 50; ++p) {
    auto prompt = random_tokens(rng, 4);
    std::vector<BlockKey> keys;
    REQUIRE(chain.chain(ns, prompt, {}, keys).is_ok());
    auto r = index->insert(ns, {.key = keys[0], .parent = ns.root, .tokens = prompt, .slot = SlotId(p)});
    if (r) {
      stored.push_back(prompt);
    } else {
      REQUIRE(r.status().code() == StatusCode::kCollision);
      ++collisions_seen;
      // The colliding prompt must not match the block that owns its key.
      CHECK(index->match(ns, prompt)->blocks.empty());
    }
  }
  CHECK(collisions_seen > 0);
  CHECK(index->stats().collisions == collisions_seen);
  for (const auto& p : stored) CHECK(index->match(ns, p)->blocks.size() == 1);
}

TEST_CASE("Bad input gives clear errors and leaves the index unchanged") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(6);
  auto prompt = random_tokens(rng, 8);
  auto keys = insert_prompt(*index, ns, prompt);
  const auto before = index->stats();

  auto tail = random_tokens(rng, 3);
  BlockInsert partial{.key = chain.block_key(keys[1], tail), .parent = keys[1], .block_index = 2,
                      .tokens = tail, .slot = 1};
  auto r = index->insert(ns, partial);
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find("partial") != std::string::npos);

  BlockInsert empty{.key = ns.root, .parent = ns.root, .tokens = {}, .slot = 1};
  CHECK(index->insert(ns, empty).status().code() == StatusCode::kInvalidArgument);

  auto next = random_tokens(rng, 4);
  BlockInsert wrong_size{.key = chain.block_key(keys[1], next), .parent = keys[1], .block_index = 2,
                         .tokens = next, .byte_size = 12345, .slot = 1};
  CHECK(index->insert(ns, wrong_size).status().code() == StatusCode::kLayoutMismatch);

  Namespace forged = ns;  // the root of one layout, the layout of another
  forged.layout = *KvLayout::standard(2, 2, 8, Dtype::kBf16, 4);
  BlockInsert child{.key = chain.block_key(keys[1], next), .parent = keys[1], .block_index = 2,
                    .tokens = next, .slot = 1};
  CHECK(index->insert(forged, child).status().code() == StatusCode::kLayoutMismatch);

  BlockInsert orphan{.key = chain.block_key(BlockKey{9, 9}, next), .parent = BlockKey{9, 9},
                     .block_index = 5, .tokens = next, .slot = 1};
  CHECK(index->insert(ns, orphan).status().code() == StatusCode::kNotFound);

  BlockInsert forged_key = child;
  forged_key.key = BlockKey{1, 2};
  CHECK(index->insert(ns, forged_key).status().code() == StatusCode::kInvalidArgument);
  BlockInsert no_slot = child;
  no_slot.slot = kNoSlot;
  CHECK(index->insert(ns, no_slot).status().code() == StatusCode::kInvalidArgument);

  KvLayout zero = ns.layout;
  zero.block_tokens = 0;
  Namespace bad_ns = ns;
  bad_ns.layout = zero;
  CHECK(index->match(bad_ns, prompt).status().code() == StatusCode::kInvalidArgument);
  CHECK_FALSE(KvLayout::standard(2, 2, 8, Dtype::kFp16, 100000).is_ok());

  const auto after = index->stats();
  CHECK(after.entries == before.entries);
  CHECK(after.inserts == before.inserts);
  CHECK(index->match(ns, prompt)->blocks.size() == 2);
  CHECK(index->check_invariants().is_ok());
  CHECK(PrefixIndex::create(chain, {.shards = 3}).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Leases pin matched blocks until released or expired") {
  KeyChain chain("secret");
  ManualClock clock;
  auto index = std::move(*PrefixIndex::create(chain, {.shards = 4, .clock_ns = clock.fn()}));
  auto ns = *chain.make_namespace({"m", small_layout(4), "", ""});
  std::mt19937_64 rng(7);
  auto prompt = random_tokens(rng, 16);
  auto keys = insert_prompt(*index, ns, prompt);

  auto m = index->match(ns, prompt, {}, {.take_lease = true, .lease_ns = 1000});
  REQUIRE(m->lease != kNoLease);
  CHECK(index->stats().leases_active == 1);
  CHECK(index->evict(Tier::kHost, 100).empty());  // everything is pinned
  CHECK(index->remove_residency(keys[3], Tier::kHost).status().code() == StatusCode::kBusy);

  REQUIRE(index->release(m->lease).is_ok());
  CHECK(index->release(m->lease).code() == StatusCode::kNotFound);

  auto m2 = index->match(ns, prompt, {}, {.take_lease = true, .lease_ns = 1000});
  clock.advance(999);
  CHECK(index->expire_leases() == 0);
  CHECK(index->evict(Tier::kHost, 100).empty());
  clock.advance(1);
  CHECK(index->evict(Tier::kHost, 100).size() == 4);  // evict() expires the lease first
  CHECK(index->stats().leases_expired == 1);
  CHECK(index->release(m2->lease).code() == StatusCode::kNotFound);
  CHECK(index->stats().entries == 0);
}

TEST_CASE("A shortened lease keeps pinning its first blocks and gives back the rest, across runs") {
  for (size_t keep : {0, 2, 4, 6, 8}) {
    INFO("keep " << keep);
    TestIndex t({.shards = 4});
    auto& [chain, index, ns] = t;
    std::mt19937_64 rng(8);
    auto shared = random_tokens(rng, 16);  // 4 blocks
    auto a = shared, b = shared;
    auto a_more = random_tokens(rng, 16), b_more = random_tokens(rng, 16);
    a.insert(a.end(), a_more.begin(), a_more.end());
    b.insert(b.end(), b_more.begin(), b_more.end());
    insert_prompt(*index, ns, a);
    insert_prompt(*index, ns, b);  // b branches off after block 3: a's 8 blocks lie in two runs

    auto m = index->match(ns, a, {}, {.take_lease = true});
    REQUIRE(m->blocks.size() == 8);
    const uint64_t hits = index->stats().hit_blocks;
    REQUIRE(index->shorten(*m, keep).is_ok());
    CHECK(m->blocks.size() == keep);
    CHECK(m->tokens == keep * 4);
    CHECK(index->stats().hit_blocks == hits - (8 - keep));
    // Everything the lease gave back can go; exactly what it keeps stays (pinned, or the
    // parent of a pinned block).
    index->evict(Tier::kHost, 100);
    CHECK(index->stats().entries == keep);
    if (keep > 0) {
      REQUIRE(index->release(m->lease).is_ok());  // fails if the lease names a block it gave back
    } else {
      CHECK(m->lease == kNoLease);  // nothing kept: the lease is gone
      CHECK(index->stats().leases_active == 0);
    }
    index->evict(Tier::kHost, 100);
    CHECK(index->stats().entries == 0);
    REQUIRE(index->check_invariants().is_ok());
  }
  // A match with no lease is shortened too; keeping more than it has changes nothing.
  TestIndex t({.shards = 4});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(9);
  auto p = random_tokens(rng, 32);
  insert_prompt(*index, ns, p);
  auto plain = index->match(ns, p);
  REQUIRE(index->shorten(*plain, 9).is_ok());
  CHECK(plain->blocks.size() == 8);
  REQUIRE(index->shorten(*plain, 3).is_ok());
  CHECK(plain->blocks.size() == 3);
}

TEST_CASE("Explicit pins and priorities") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(8);
  auto keys = insert_prompt(*index, ns, random_tokens(rng, 8));
  REQUIRE(index->pin(keys[1]).is_ok());
  CHECK(index->erase(keys[1]).status().code() == StatusCode::kBusy);
  REQUIRE(index->unpin(keys[1]).is_ok());
  CHECK(index->unpin(keys[1]).code() == StatusCode::kBusy);
  CHECK(index->erase(keys[0]).status().code() == StatusCode::kBusy);  // has a child
  REQUIRE(index->set_priority(keys[0], Priority::kRetained).is_ok());
  CHECK(index->get(keys[0])->priority == Priority::kRetained);
  CHECK(index->pin(BlockKey{1, 1}).code() == StatusCode::kNotFound);
  auto erased = index->erase(keys[1]);
  REQUIRE(erased.is_ok());
  CHECK(erased->size() == 1);
  CHECK(index->check_invariants().is_ok());
}

TEST_CASE("A priority pin holds a block's class while it lasts, and unpin restores it") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(9);
  const auto k = insert_prompt(*index, ns, random_tokens(rng, 4), Tier::kHost, Priority::kLow)[0];
  auto cls = [&] { return index->get(k)->priority; };
  REQUIRE(index->pin(k, Priority::kRetained).is_ok());
  CHECK(cls() == Priority::kRetained);
  REQUIRE(index->pin(k, Priority::kHigh).is_ok());
  CHECK(cls() == Priority::kRetained);  // the highest pin wins
  REQUIRE(index->unpin(k, Priority::kRetained).is_ok());
  CHECK(cls() == Priority::kHigh);
  // The block's own class changes underneath; the pin still holds it higher.
  REQUIRE(index->set_priority(k, Priority::kNormal).is_ok());
  CHECK(cls() == Priority::kHigh);
  CHECK(index->erase(k).status().code() == StatusCode::kBusy);  // still pinned
  REQUIRE(index->unpin(k, Priority::kHigh).is_ok());
  CHECK(cls() == Priority::kNormal);  // its own class, not the pin's and not the first kLow
  CHECK(index->unpin(k, Priority::kHigh).code() == StatusCode::kBusy);  // no such pin left
  // A pin below the block's own class never lowers it.
  REQUIRE(index->pin(k, Priority::kLow).is_ok());
  CHECK(cls() == Priority::kNormal);
  REQUIRE(index->unpin(k, Priority::kLow).is_ok());
  CHECK(index->check_invariants().is_ok());
  CHECK(index->evict(Tier::kHost, 10).size() == 1);  // no pin left behind
}

TEST_CASE("Long matches stop exactly at the first miss") {
  // Wherever a prompt diverges, the match ends exactly there, returns the right keys, and pins
  // exactly what it returns.
  TestIndex t({.shards = 8});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(21);
  auto prompt = random_tokens(rng, 4 * 300 + 2);  // 300 blocks and a partial tail
  auto keys = insert_prompt(*index, ns, prompt);
  REQUIRE(index->match(ns, prompt)->blocks.size() == 300);

  for (size_t k : {0, 1, 31, 32, 33, 95, 96, 97, 224, 299}) {
    INFO("diverging at block " << k);
    auto diverged = prompt;
    diverged[k * 4 + 2] ^= 0x40000;  // token ids are < 50000: this changes block k
    auto m = index->match(ns, diverged, {}, {.take_lease = true});
    REQUIRE(m.is_ok());
    CHECK(m->blocks.size() == k);
    CHECK(m->tokens == 4 * k);
    bool keys_right = true;
    for (size_t b = 0; b < m->blocks.size(); ++b) keys_right &= m->blocks[b].key == keys[b];
    CHECK(keys_right);
    if (k == 0) {
      CHECK(m->lease == kNoLease);
    } else {
      REQUIRE(index->release(m->lease).is_ok());
    }
  }
  // No pin was left behind: every block can be dropped, leaves first.
  CHECK(index->evict(Tier::kHost, 1000).size() == 300);
  CHECK(index->check_invariants().is_ok());
}

TEST_CASE("Extras anywhere in a long prompt are part of its match") {
  TestIndex t({.shards = 8});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(22);
  auto prompt = random_tokens(rng, 4 * 200);
  const std::vector<BlockExtra> extras{
      {0, BlockKey{1, 2}}, {40, BlockKey{3, 4}}, {150, BlockKey{5, 6}}, {150, BlockKey{7, 8}}};
  std::vector<BlockKey> keys;
  REQUIRE(chain.chain(ns, prompt, extras, keys).is_ok());
  for (size_t b = 0; b < keys.size(); ++b) {
    std::vector<BlockKey> mine;
    for (const auto& e : extras) {
      if (e.block_index == b) mine.push_back(e.item_hash);
    }
    BlockInsert ins{.key = keys[b], .parent = b ? keys[b - 1] : ns.root, .block_index = uint32_t(b),
                    .tokens = std::span(prompt).subspan(b * 4, 4), .extras = mine, .slot = b};
    REQUIRE(index->insert(ns, ins).is_ok());
  }
  CHECK(index->match(ns, prompt, extras)->blocks.size() == 200);
  CHECK(index->match(ns, prompt)->blocks.empty());  // block 0's image is part of its key
  auto other = extras;
  other[3].item_hash = BlockKey{7, 9};  // the second item of block 150 differs
  CHECK(index->match(ns, prompt, other)->blocks.size() == 150);
  CHECK(index->match(ns, std::span(prompt).first(4 * 150), std::span(extras).first(2))->blocks.size() == 150);
}

TEST_CASE("Matches walk runs: prompts longer than a run, branches inside a run, tails that shrink and grow") {
  // A run holds up to 1024 consecutive blocks of one chain; a match compares tokens along it
  // and keys a block only where the prompt leaves it. Every way of leaving a run gives the
  // same answer a block-by-block keyed match would.
  TestIndex t({.shards = 4});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(23);
  auto a = random_tokens(rng, 4 * 2500);  // three runs: 1024 + 1024 + 452 blocks
  auto a_keys = insert_prompt(*index, ns, a);
  auto branch = [&](const std::vector<TokenId>& base, size_t at_block, size_t total_blocks) {
    std::vector<TokenId> p(base.begin(), base.begin() + at_block * 4);
    auto tail = random_tokens(rng, (total_blocks - at_block) * 4);
    p.insert(p.end(), tail.begin(), tail.end());
    return p;
  };
  auto b = branch(a, 700, 1000);    // leaves the first run in its middle
  auto c = branch(a, 1024, 1100);   // leaves exactly where the first run ends
  auto d = branch(a, 1500, 1600);   // leaves the second run in its middle
  auto b_keys = insert_prompt(*index, ns, b);
  auto c_keys = insert_prompt(*index, ns, c);
  auto d_keys = insert_prompt(*index, ns, d);
  REQUIRE(index->check_invariants().is_ok());

  auto same_keys = [](const Match& m, const std::vector<BlockKey>& keys) {
    if (m.blocks.size() > keys.size()) return false;
    for (size_t i = 0; i < m.blocks.size(); ++i) {
      if (m.blocks[i].key != keys[i]) return false;
    }
    return true;
  };
  for (auto [prompt, keys] : {std::pair{&a, &a_keys}, {&b, &b_keys}, {&c, &c_keys}, {&d, &d_keys}}) {
    auto m = index->match(ns, *prompt);
    REQUIRE(m.is_ok());
    CHECK(m->blocks.size() == keys->size());
    CHECK(same_keys(*m, *keys));
  }
  // Diverging on either side of each run boundary, with a lease: exact length, exact pins.
  for (size_t k : {1023, 1024, 1025, 2047, 2048, 2049, 2499}) {
    INFO("diverging at block " << k);
    auto diverged = a;
    diverged[k * 4 + 1] ^= 0x40000;
    auto m = index->match(ns, diverged, {}, {.take_lease = true});
    REQUIRE(m.is_ok());
    CHECK(m->blocks.size() == k);
    CHECK(same_keys(*m, a_keys));
    REQUIRE(index->release(m->lease).is_ok());  // fails if any block it names lost its pin
  }
  // Every run's entries count their hits.
  CHECK(index->describe(a_keys[0])->hits >= 2);

  // The tail of a's last run shrinks, another prompt grows the same run from the new tail, and
  // a's own blocks come back as a branch: both prompts still match in full.
  for (size_t i = 2499; i >= 2400; --i) REQUIRE(index->erase(a_keys[i]).is_ok());
  CHECK(index->match(ns, a)->blocks.size() == 2400);
  auto e = branch(a, 2400, 2600);
  auto e_keys = insert_prompt(*index, ns, e);
  insert_prompt(*index, ns, a);
  CHECK(same_keys(*index->match(ns, a), a_keys));
  CHECK(index->match(ns, a)->blocks.size() == 2500);
  CHECK(index->match(ns, e)->blocks.size() == 2600);
  CHECK(same_keys(*index->match(ns, e), e_keys));
  REQUIRE(index->check_invariants().is_ok());

  // Everything drops, leaves first (no lease left a pin behind), and the index is empty and
  // consistent after.
  const uint64_t indexed = index->stats().entries;
  size_t dropped = 0;
  while (true) {
    auto ev = index->evict(Tier::kHost, 5000);
    if (ev.empty()) break;
    dropped += ev.size();
  }
  CHECK(dropped == indexed);
  CHECK(index->stats().entries == 0);
  CHECK(index->match(ns, a)->blocks.empty());
  CHECK(index->check_invariants().is_ok());
}

TEST_CASE("A damaged block ends every match before it until a repair gives it a new copy") {
  TestIndex t({.shards = 4});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(21);
  const auto prompt = random_tokens(rng, 24);  // 6 blocks, one run
  auto keys = insert_prompt(*index, ns, prompt, Tier::kNvme);
  auto branch = prompt;
  branch.back() ^= 1;  // shares blocks 0..4, its own block 5 in another run
  auto branch_keys = insert_prompt(*index, ns, branch, Tier::kNvme);
  const SlotId old_slot = index->get(keys[3])->slot(Tier::kNvme);

  REQUIRE(*index->mark_damaged(keys[3], Tier::kNvme));
  CHECK_FALSE(*index->mark_damaged(keys[3], Tier::kNvme));  // twice is once
  CHECK(index->stats().damaged_blocks == 1);
  CHECK(index->damaged_count() == 1);
  CHECK(index->get(keys[3])->damaged);
  CHECK_FALSE(index->get(keys[2])->damaged);
  for (const std::vector<TokenId>& p : {prompt, branch}) {
    auto m = index->match(ns, p, {}, {.take_lease = true});
    REQUIRE(m.is_ok());
    CHECK(m->blocks.size() == 3);  // blocks 0..2: the children of the damaged block are unreachable
    for (const auto& b : m->blocks) CHECK_FALSE(b.damaged);
    REQUIRE(index->release(m->lease).is_ok());  // the lease pinned exactly the matched blocks
  }
  CHECK(index->mark_damaged(BlockKey{5, 5}, Tier::kNvme).status().code() == StatusCode::kNotFound);
  CHECK(index->check_invariants().is_ok());

  // A second copy (a promotion, verified on its way in) clears the mark: the block serves again.
  REQUIRE(index->add_residency(keys[3], Tier::kHost, 77).is_ok());
  CHECK(index->damaged_count() == 0);
  CHECK(index->match(ns, prompt, {}, {})->blocks.size() == 6);
  CHECK_FALSE(*index->mark_damaged(keys[3], Tier::kNvme));  // not its only copy: not marked
  REQUIRE(index->remove_residency(keys[3], Tier::kHost).is_ok());
  REQUIRE(*index->mark_damaged(keys[3], Tier::kNvme));
  CHECK(index->check_invariants().is_ok());

  // A repair needs the block damaged.
  CHECK(index->repair(keys[2], Tier::kNvme, 900, 1).status().code() == StatusCode::kBusy);
  CHECK(index->repair(keys[3], Tier::kNvme, kNoSlot, 1).status().code() == StatusCode::kInvalidArgument);

  auto old = index->repair(keys[3], Tier::kNvme, 900, 0xABCD);
  REQUIRE(old.is_ok());
  CHECK(*old == old_slot);
  CHECK(index->get(keys[3])->slot(Tier::kNvme) == 900);
  CHECK(index->get(keys[3])->checksum == 0xABCD);
  CHECK(index->damaged_count() == 0);
  CHECK(index->match(ns, prompt, {}, {})->blocks.size() == 6);
  CHECK(index->match(ns, branch, {}, {})->blocks.size() == 6);
  CHECK(index->check_invariants().is_ok());

  SECTION("a lease does not pin a damaged leaf, which leaves the index when evicted, its count with it") {
    REQUIRE(*index->mark_damaged(branch_keys[5], Tier::kNvme));
    auto m = index->match(ns, branch, {}, {.take_lease = true});
    CHECK(m->blocks.size() == 5);
    auto gone = index->erase(branch_keys[5]);  // refused (kBusy) were it pinned by the lease
    REQUIRE(gone.is_ok());
    CHECK(index->damaged_count() == 0);
    REQUIRE(index->release(m->lease).is_ok());
    CHECK(index->check_invariants().is_ok());
  }
}
