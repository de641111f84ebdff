// Groups and tier shares: every block is counted under its namespace root's group, and a group
// over its share of a tier loses its own blocks first, down to its share and no further.
#include <catch2/catch.hpp>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {

constexpr GroupId kA = 1, kB = 2;

struct TwoTenants {
  TestIndex t{{.shards = 4}};
  Namespace a = *t.chain.make_namespace({"m", small_layout(4), "salt-a", ""});
  Namespace b = *t.chain.make_namespace({"m", small_layout(4), "salt-b", ""});
  PrefixIndex& index = *t.index;
  std::mt19937_64 rng{77};

  TwoTenants() {
    REQUIRE(index.set_root_group(a.root, kA).is_ok());
    REQUIRE(index.set_root_group(b.root, kB).is_ok());
  }
  /// `n` one-block prompts of `ns`, oldest first: every one a leaf, so any may go.
  std::vector<BlockKey> leaves(const Namespace& ns, size_t n) {
    std::vector<BlockKey> keys;
    for (size_t i = 0; i < n; ++i) keys.push_back(insert_prompt(index, ns, random_tokens(rng, 4))[0]);
    return keys;
  }
};

std::vector<BlockKey> keys_of(const std::vector<EvictedBlock>& ev) {
  std::vector<BlockKey> keys;
  for (const auto& e : ev) keys.push_back(e.key);
  return keys;
}

std::vector<BlockKey> slice(const std::vector<BlockKey>& v, size_t begin, size_t end) {
  return {v.begin() + static_cast<std::ptrdiff_t>(begin), v.begin() + static_cast<std::ptrdiff_t>(end)};
}

}  // namespace

TEST_CASE("Every block is counted under its namespace root's group including branches") {
  TwoTenants s;
  auto prompt = random_tokens(s.rng, 40);  // 10 blocks, then a branch off block 5
  insert_prompt(s.index, s.a, prompt);
  auto branch = prompt;
  branch.resize(24);
  for (int i = 0; i < 12; ++i) branch.push_back(static_cast<TokenId>(60000 + i));
  insert_prompt(s.index, s.a, branch);  // 6 shared blocks, 3 new ones in a run of their own
  insert_prompt(s.index, s.b, random_tokens(s.rng, 8));
  TestIndex& t = s.t;
  insert_prompt(s.index, t.ns, random_tokens(s.rng, 12));  // a root with no group

  CHECK(s.index.group_resident(kA, Tier::kHost) == 13);
  CHECK(s.index.group_resident(kB, Tier::kHost) == 2);
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 3);
  CHECK(s.index.group_resident(kA, Tier::kNvme) == 0);

  // A second tier's copy is counted in that tier; dropping it, and evicting, count down.
  const auto a_keys = *s.index.match(s.a, prompt);
  REQUIRE(s.index.add_residency(a_keys.blocks[0].key, Tier::kNvme, 900).is_ok());
  CHECK(s.index.group_resident(kA, Tier::kNvme) == 1);
  REQUIRE(s.index.check_invariants().is_ok());
  REQUIRE(s.index.remove_residency(a_keys.blocks[0].key, Tier::kNvme).is_ok());
  CHECK(s.index.group_resident(kA, Tier::kNvme) == 0);
  while (!s.index.evict(Tier::kHost, 4).empty()) REQUIRE(s.index.check_invariants().is_ok());
  CHECK(s.index.group_resident(kA, Tier::kHost) == 0);
  CHECK(s.index.group_resident(kB, Tier::kHost) == 0);
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 0);
}

TEST_CASE("A group over its share of a tier is evicted first and only down to its share") {
  TwoTenants s;
  const auto b_keys = s.leaves(s.b, 5);   // the oldest blocks of the tier
  const auto a_keys = s.leaves(s.a, 10);  // then tenant a fills it

  // Without a share, least recently used goes first: b's blocks.
  CHECK(s.index.pick_victims(Tier::kHost, 2, EvictPurpose::kDrop) == slice(b_keys, 0, 2));

  REQUIRE(s.index.set_group_limit(kA, Tier::kHost, 4).is_ok());
  CHECK(s.index.group_limit(kA, Tier::kHost) == 4);
  // Demotion picks a's six blocks over its share (oldest first), then b's oldest.
  std::vector<BlockKey> expected = slice(a_keys, 0, 6);
  expected.push_back(b_keys[0]);
  std::vector<uint8_t> over;
  CHECK(s.index.pick_victims(Tier::kHost, 7, EvictPurpose::kDemote, &over) == expected);
  CHECK(over == std::vector<uint8_t>{1, 1, 1, 1, 1, 1, 0});

  // Eviction takes the same: a goes down to exactly its share, then plain recency resumes.
  expected.push_back(b_keys[1]);
  CHECK(keys_of(s.index.evict(Tier::kHost, 8)) == expected);
  CHECK(s.index.group_resident(kA, Tier::kHost) == 4);
  CHECK(s.index.group_resident(kB, Tier::kHost) == 3);
  CHECK(s.index.stats().over_share_evictions == 6);
  REQUIRE(s.index.check_invariants().is_ok());

  // At its share, a's blocks are ordinary candidates again.
  CHECK(s.index.pick_victims(Tier::kHost, 1, EvictPurpose::kDrop) == slice(b_keys, 2, 3));
  // A share in another tier does not touch this one.
  REQUIRE(s.index.set_group_limit(kB, Tier::kNvme, 1).is_ok());
  CHECK(s.index.pick_victims(Tier::kHost, 1, EvictPurpose::kDrop) == slice(b_keys, 2, 3));
}

TEST_CASE("Over its share a group's own priority classes order its blocks and its pins hold") {
  TwoTenants s;
  const auto b_keys = s.leaves(s.b, 3);
  std::vector<BlockKey> a_keys;
  for (int i = 0; i < 4; ++i) {
    a_keys.push_back(insert_prompt(s.index, s.a, random_tokens(s.rng, 4), Tier::kHost, Priority::kHigh)[0]);
  }
  const auto a_low = s.leaves(s.a, 1);
  REQUIRE(s.index.pin(a_keys[0]).is_ok());
  REQUIRE(s.index.set_group_limit(kA, Tier::kHost, 2).is_ok());

  // a holds 5 with a share of 2: its low block, then its unpinned high ones, oldest first. Its
  // high class does not put it behind b's normal blocks; the pinned block stays.
  const auto ev = keys_of(s.index.evict(Tier::kHost, 4));
  CHECK(ev == std::vector<BlockKey>{a_low[0], a_keys[1], a_keys[2], b_keys[0]});
  CHECK(s.index.get(a_keys[0]).has_value());
  CHECK(s.index.group_resident(kA, Tier::kHost) == 2);
  REQUIRE(s.index.unpin(a_keys[0]).is_ok());
  REQUIRE(s.index.check_invariants().is_ok());
}

TEST_CASE("A namespace root keeps the first group it is given") {
  TwoTenants s;
  CHECK(s.index.set_root_group(s.a.root, kA).is_ok());  // the same group again: fine
  const Status other = s.index.set_root_group(s.a.root, kB);
  CHECK(other.code() == StatusCode::kAlreadyExists);
  CHECK(s.index.set_root_group(s.t.ns.root, static_cast<GroupId>(kMaxGroups)).code() == StatusCode::kInvalidArgument);
  CHECK(s.index.set_group_limit(static_cast<GroupId>(kMaxGroups), Tier::kHost, 1).code() ==
        StatusCode::kInvalidArgument);
  insert_prompt(s.index, s.a, random_tokens(s.rng, 8));
  CHECK(s.index.group_resident(kA, Tier::kHost) == 2);
  CHECK(s.index.group_resident(kB, Tier::kHost) == 0);
  CHECK(s.index.group_resident(static_cast<GroupId>(kMaxGroups), Tier::kHost) == 0);
}

TEST_CASE("Blocks indexed before their root had a group join it and so do their chains' new blocks") {
  TwoTenants s;
  // A namespace whose blocks came back from a catalog that named no tenant.
  const Namespace c = *s.t.chain.make_namespace({"m", small_layout(4), "salt-c", ""});
  auto prompt = random_tokens(s.rng, 40);
  insert_prompt(s.index, c, prompt);  // 10 blocks
  auto branch = prompt;
  branch.resize(16);
  const auto tail = random_tokens(s.rng, 8);
  branch.insert(branch.end(), tail.begin(), tail.end());
  insert_prompt(s.index, c, branch);  // 4 shared, 2 in a run of their own
  REQUIRE(s.index.add_residency(s.index.match(c, prompt)->blocks[0].key, Tier::kNvme, 901).is_ok());
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 12);
  const GroupId kC = 3;

  REQUIRE(s.index.set_root_group(c.root, kC).is_ok());
  CHECK(s.index.group_resident(kC, Tier::kHost) == 12);
  CHECK(s.index.group_resident(kC, Tier::kNvme) == 1);
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 0);
  CHECK(s.index.group_resident(kNoGroup, Tier::kNvme) == 0);
  REQUIRE(s.index.check_invariants().is_ok());

  // A new block extending the old chain, and a new branch off it, count under the group too.
  auto longer = prompt;
  const auto more = random_tokens(s.rng, 4);
  longer.insert(longer.end(), more.begin(), more.end());
  insert_prompt(s.index, c, longer);
  auto other_branch = prompt;
  other_branch.resize(8);
  const auto other_tail = random_tokens(s.rng, 4);
  other_branch.insert(other_branch.end(), other_tail.begin(), other_tail.end());
  insert_prompt(s.index, c, other_branch);
  CHECK(s.index.group_resident(kC, Tier::kHost) == 14);
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 0);
  // Other namespaces' blocks kept theirs.
  insert_prompt(s.index, s.a, random_tokens(s.rng, 4));
  CHECK(s.index.group_resident(kA, Tier::kHost) == 1);
  REQUIRE(s.index.check_invariants().is_ok());

  // A root explicitly left without a group keeps none.
  const Namespace d = *s.t.chain.make_namespace({"m", small_layout(4), "salt-d", ""});
  REQUIRE(s.index.set_root_group(d.root, kNoGroup).is_ok());
  CHECK(s.index.set_root_group(d.root, 4).code() == StatusCode::kAlreadyExists);
  insert_prompt(s.index, d, random_tokens(s.rng, 4));
  CHECK(s.index.group_resident(kNoGroup, Tier::kHost) == 1);
}
