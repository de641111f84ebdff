// Property test: after any random sequence of insert / match / pin / lease / evict / erase, the
// prefix-closure invariant holds and no pinned block was ever evicted.
#include <catch2/catch.hpp>

#include <set>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("Random operation sequences keep the index invariants") {
  const uint64_t seed = GENERATE(1, 2, 3, 4, 5, 6, 7, 8);
  std::mt19937_64 rng(seed);
  KeyChain chain("secret");
  ManualClock clock;
  auto index = std::move(*PrefixIndex::create(chain, {.shards = 4, .clock_ns = clock.fn()}));
  auto ns = *chain.make_namespace({"m", small_layout(2), "", ""});

  // A small token alphabet makes prompts share prefixes often.
  std::vector<std::vector<TokenId>> prompts;
  for (int p = 0; p < 12; ++p) {
    std::vector<TokenId> t(2 * (1 + rng() % 8));
    for (auto& x : t) x = static_cast<TokenId>(rng() % 3);
    prompts.push_back(t);
  }
  std::multiset<BlockKey> pinned;  // explicit pins and live lease blocks
  std::vector<std::pair<LeaseId, std::vector<BlockKey>>> leases;

  for (int step = 0; step < 400; ++step) {
    const auto& prompt = prompts[rng() % prompts.size()];
    const Tier tier = kAllTiers[rng() % kNumTiers];
    switch (rng() % 8) {
      case 0:
      case 1:
        insert_prompt(*index, ns, prompt, tier, static_cast<Priority>(rng() % kNumPriorities));
        break;
      case 2: {
        auto m = index->match(ns, prompt, {}, {.take_lease = true, .lease_ns = 1 + rng() % 50});
        REQUIRE(m.is_ok());
        if (m->lease != kNoLease) {
          std::vector<BlockKey> ks;
          for (const auto& b : m->blocks) ks.push_back(b.key);
          leases.push_back({m->lease, ks});
        }
        break;
      }
      case 3:
        if (!leases.empty()) {
          auto l = leases.back();
          leases.pop_back();
          index->release(l.first).ignore();  // may have expired: either way the pins are gone
        }
        break;
      case 4: {
        auto m = index->match(ns, prompt);
        if (!m->blocks.empty()) {
          const auto& k = m->blocks[rng() % m->blocks.size()].key;
          if (pinned.count(k) && rng() % 2) {
            REQUIRE(index->unpin(k).is_ok());
            pinned.erase(pinned.find(k));
          } else {
            REQUIRE(index->pin(k).is_ok());
            pinned.insert(k);
          }
        }
        break;
      }
      case 5:
      case 6: {
        clock.advance(rng() % 20);
        index->expire_leases();
        // A lease pins its blocks only until it expires, which this test does not track: only
        // explicit pins, which never expire, are asserted on.
        for (const auto& ev : index->evict(tier, 1 + rng() % 6)) {
          INFO("evicted " << ev.key.to_hex());
          CHECK(pinned.count(ev.key) == 0);
        }
        break;
      }
      case 7: {
        auto m = index->match(ns, prompt, {}, {.touch = false});
        if (!m->blocks.empty()) {
          auto r = index->erase(m->blocks.back().key);
          if (!r) REQUIRE(r.status().code() == StatusCode::kBusy);
          else CHECK(pinned.count(m->blocks.back().key) == 0);
        }
        break;
      }
    }
    INFO("seed " << seed << " step " << step);
    REQUIRE(index->check_invariants().to_string() == "ok");
  }
  // Every block still pinned is still indexed (check_invariants above checked prefix closure).
  for (const auto& k : pinned) CHECK(index->get(k).has_value());
}
