// Many threads inserting, matching (with leases), pinning and evicting at once. Run under the
// tsan preset to catch data races; the invariants must hold at the end.
#include <catch2/catch.hpp>

#include <thread>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("Concurrent insert, match, lease and evict keep the index consistent") {
  TestIndex t({.shards = 8});
  auto& [chain, index, ns] = t;
  // With a group and shares, every residency change is counted per group too (check_invariants
  // checks the counts), and evictions rank the group's excess first.
  const bool shares = GENERATE(false, true);
  constexpr GroupId kGroup = 3;
  if (shares) {
    REQUIRE(index->set_root_group(ns.root, kGroup).is_ok());
    REQUIRE(index->set_group_limit(kGroup, Tier::kHost, 8).is_ok());
    REQUIRE(index->set_group_limit(kGroup, Tier::kHbm, 4).is_ok());
  }
  std::mt19937_64 seed_rng(99);
  auto shared = random_tokens(seed_rng, 64);

  constexpr int kThreads = 4, kIterations = 2000;
  std::atomic<uint64_t> pinned_evictions{0};
  // Catch2 assertions are not thread-safe: workers count failures, the main thread asserts.
  std::atomic<uint64_t> unexpected_errors{0};
  auto expect = [&](bool ok) {
    if (!ok) unexpected_errors.fetch_add(1);
  };
  // Every match returns a prefix of the prompt's own chained keys, whatever runs it walked.
  auto right_keys = [&](const std::vector<TokenId>& prompt, const Match& m) {
    std::vector<BlockKey> keys;
    if (!chain.chain(ns, prompt, {}, keys).is_ok() || m.blocks.size() > keys.size()) return false;
    for (size_t b = 0; b < m.blocks.size(); ++b) {
      if (m.blocks[b].key != keys[b]) return false;
    }
    return true;
  };
  std::atomic<bool> done{false};
  std::atomic<uint64_t> checks{0}, failed_checks{0};
  std::vector<std::thread> threads;
  // The invariant check holds every key shard: it sees a consistent index at any moment.
  std::thread checker([&] {
    while (!done.load() || checks.load() == 0) {
      if (!index->check_invariants().is_ok()) failed_checks.fetch_add(1);
      checks.fetch_add(1);
    }
  });
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < kIterations; ++i) {
        auto prompt = shared;
        prompt.resize(4 * (1 + rng() % 16));
        auto tail = random_tokens(rng, 4 * (rng() % 4));
        prompt.insert(prompt.end(), tail.begin(), tail.end());
        switch (rng() % 4) {
          case 0: {
            std::vector<BlockKey> keys;
            expect(chain.chain(ns, prompt, {}, keys).is_ok());
            for (size_t b = 0; b < keys.size(); ++b) {
              auto r = index->insert(ns, {.key = keys[b], .parent = b ? keys[b - 1] : ns.root,
                                          .block_index = uint32_t(b),
                                          .tokens = std::span(prompt).subspan(b * 4, 4),
                                          .tier = kAllTiers[rng() % kNumTiers], .slot = b});
              // A concurrent eviction may drop the parent in between: stop at that point.
              if (!r && r.status().code() == StatusCode::kNotFound) break;
              if (!r) expect(r.status().code() == StatusCode::kAlreadyExists);
            }
            break;
          }
          case 1: {
            auto m = index->match(ns, prompt, {}, {.take_lease = true});
            expect(m.is_ok());
            if (!m) break;
            expect(right_keys(prompt, *m));
            // While the lease is held, none of these blocks may disappear.
            for (const auto& b : m->blocks) {
              if (!index->get(b.key)) pinned_evictions.fetch_add(1);
            }
            if (m->lease) expect(index->release(m->lease).is_ok());
            break;
          }
          case 2:
            index->evict(kAllTiers[rng() % kNumTiers], 1 + rng() % 8);
            break;
          case 3: {
            auto m = index->match(ns, prompt);
            expect(m.is_ok() && right_keys(prompt, *m));
            break;
          }
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  done = true;
  checker.join();
  CHECK(unexpected_errors.load() == 0);
  CHECK(failed_checks.load() == 0);
  CHECK(pinned_evictions.load() == 0);
  CHECK(index->stats().leases_active == 0);
  CHECK(index->check_invariants().to_string() == "ok");
  if (shares) {
    for (Tier tier : kAllTiers) CHECK(index->group_resident(kGroup, tier) == index->stats().resident_blocks[int(tier)]);
  }
}
