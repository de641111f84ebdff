// Eviction choice: lowest priority class first, then least recently used, leaves before parents,
// never a pinned block; per-tier residency.
#include <catch2/catch.hpp>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("Eviction drops leaves before parents and keeps every block reachable") {
  TestIndex t({.shards = 4});
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(10);
  auto prompt = random_tokens(rng, 40);
  auto keys = insert_prompt(*index, ns, prompt);
  for (size_t dropped = 1; dropped <= 10; ++dropped) {
    auto ev = index->evict(Tier::kHost, 1);
    REQUIRE(ev.size() == 1);
    CHECK(ev[0].key == keys[10 - dropped]);  // always the current last block
    CHECK(ev[0].left_index);
    CHECK(index->match(ns, prompt)->blocks.size() == 10 - dropped);
    REQUIRE(index->check_invariants().is_ok());
  }
  CHECK(index->stats().evictions[static_cast<int>(Tier::kHost)] == 10);
}

TEST_CASE("Eviction order: priority class, then recency") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(11);
  auto system = random_tokens(rng, 4), old_turn = random_tokens(rng, 4), new_turn = random_tokens(rng, 4);
  auto k_system = insert_prompt(*index, ns, system, Tier::kHost, Priority::kRetained);
  auto k_old = insert_prompt(*index, ns, old_turn);
  auto k_new = insert_prompt(*index, ns, new_turn);
  REQUIRE(index->match(ns, system).is_ok());  // recently used, but retained anyway
  REQUIRE(index->touch(k_new[0]).is_ok());    // newer than old_turn

  auto victims = index->pick_victims(Tier::kHost, 3, EvictPurpose::kDrop);
  REQUIRE(victims.size() == 3);
  CHECK(victims[0] == k_old[0]);
  CHECK(victims[1] == k_new[0]);
  CHECK(victims[2] == k_system[0]);
}

TEST_CASE("Match makes a prompt's root-most blocks the most recent") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(12);
  auto a = random_tokens(rng, 8), b = random_tokens(rng, 8);
  auto ka = insert_prompt(*index, ns, a);
  auto kb = insert_prompt(*index, ns, b);
  REQUIRE(index->match(ns, a).is_ok());  // a is now newer than b
  auto ev = index->evict(Tier::kHost, 2);
  REQUIRE(ev.size() == 2);
  CHECK(ev[0].key == kb[1]);
  CHECK(ev[1].key == kb[0]);
  CHECK(index->match(ns, a)->blocks.size() == 2);
}

TEST_CASE("Per-tier eviction keeps a block indexed while another tier holds it") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(13);
  auto prompt = random_tokens(rng, 12);
  auto keys = insert_prompt(*index, ns, prompt, Tier::kHost);
  for (size_t i = 0; i < keys.size(); ++i) REQUIRE(index->add_residency(keys[i], Tier::kNvme, 100 + i).is_ok());

  // A parent cannot leave a tier while its child is still resident there.
  CHECK(index->remove_residency(keys[0], Tier::kHost).status().code() == StatusCode::kBusy);
  auto ev = index->evict(Tier::kHost, 10);
  CHECK(ev.size() == 3);
  for (const auto& e : ev) CHECK_FALSE(e.left_index);
  auto m = index->match(ns, prompt);
  REQUIRE(m->blocks.size() == 3);
  for (const auto& b : m->blocks) {
    CHECK_FALSE(b.resident_in(Tier::kHost));
    CHECK(b.resident_in(Tier::kNvme));
  }
  // Demotion candidates may be non-leaves of the index, as long as no child is in that tier;
  // a parent follows once its children in the tier are victims, so the whole chain comes back,
  // leaf first: the order in which the caller can move them.
  auto demote = index->pick_victims(Tier::kNvme, 10, EvictPurpose::kDemote);
  REQUIRE(demote.size() == 3);
  CHECK(demote[0] == keys[2]);
  CHECK(demote[1] == keys[1]);
  CHECK(demote[2] == keys[0]);
  CHECK(index->pick_victims(Tier::kNvme, 2, EvictPurpose::kDemote).size() == 2);
  REQUIRE(index->pin(keys[1]).is_ok());  // a pinned parent stops the chain
  demote = index->pick_victims(Tier::kNvme, 10, EvictPurpose::kDemote);
  REQUIRE(demote.size() == 1);
  CHECK(demote[0] == keys[2]);
  REQUIRE(index->unpin(keys[1]).is_ok());
  CHECK(index->check_invariants().is_ok());
}

TEST_CASE("An insert can take its pin under the same lock: the new leaf is never evicted before unpin") {
  TestIndex t;
  auto& [chain, index, ns] = t;
  std::mt19937_64 rng(13);
  auto tokens = random_tokens(rng, 8);
  std::vector<BlockKey> keys;
  REQUIRE(chain.chain(ns, tokens, {}, keys).is_ok());
  for (uint32_t b = 0; b < 2; ++b) {
    BlockInsert ins{.key = keys[b], .parent = b ? keys[b - 1] : ns.root, .block_index = b,
                    .tokens = std::span(tokens).subspan(b * 4, 4), .slot = b, .pin = true};
    REQUIRE(index->insert(ns, ins).is_ok());
  }
  CHECK(index->evict(Tier::kHost, 2).empty());  // both pinned
  REQUIRE(index->unpin(keys[1]).is_ok());
  auto ev = index->evict(Tier::kHost, 2);
  REQUIRE(ev.size() == 1);  // the leaf; its parent is still pinned
  CHECK(ev[0].key == keys[1]);
  CHECK(index->unpin(keys[1]).code() == StatusCode::kNotFound);
  REQUIRE(index->unpin(keys[0]).is_ok());
  CHECK(index->unpin(keys[0]).code() == StatusCode::kBusy);  // exactly one pin was taken
  // A failed insert pins nothing: the same block again is kAlreadyExists.
  BlockInsert again{.key = keys[0], .parent = ns.root, .block_index = 0, .tokens = std::span(tokens).subspan(0, 4),
                    .slot = 9, .pin = true};
  CHECK(index->insert(ns, again).status().code() == StatusCode::kAlreadyExists);
  CHECK(index->evict(Tier::kHost, 1).size() == 1);
  REQUIRE(index->check_invariants().is_ok());
}
