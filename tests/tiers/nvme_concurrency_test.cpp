// Several threads store, read, read layers and erase on one NvmeTier; every read returns the
// right bytes or "not found", and the books balance at the end. Run under ThreadSanitizer.
#include <catch2/catch.hpp>

#include <atomic>
#include <deque>
#include <random>
#include <thread>

#include "nvme_test_harness.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("NvmeTier stays consistent under concurrent writers, readers and erasers") {
  const std::string backing = GENERATE(as<std::string>{}, "memory", "file");
  INFO(backing);
  constexpr int kThreads = 4;
  constexpr int kOps = 60;
  constexpr size_t kMaxLivePerThread = 6;
  NvmeHarness h(backing == "file" ? NvmeHarness::Backing::kFile : NvmeHarness::Backing::kMemory,
                kThreads * kMaxLivePerThread + 4);
  auto options = h.options();
  options.durability = Durability::kNone;  // keep the file run fast; ordering is the same
  auto tier = h.open(options);
  const KvLayout layout = h.layout();
  const size_t n = layout.bytes_per_block();
  const size_t layer_bytes = layout.bytes_per_block_layer();

  std::atomic<int> failures{0};
  std::atomic<int> foreign_hits{0};
  std::vector<std::deque<uint64_t>> live(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      const uint64_t seed = 100 + t;
      std::mt19937_64 rng(seed);
      auto out = make_aligned_buffer(tier->payload_capacity());
      auto& mine = live[t];
      for (uint64_t i = 0; i < kOps; ++i) {
        if (mine.size() >= kMaxLivePerThread || (rng() % 4 == 0 && !mine.empty())) {
          if (!tier->erase(test_entry(seed, mine.front()).key).is_ok()) ++failures;
          mine.pop_front();
        }
        auto payload = test_payload(layout, seed, i);
        if (!tier->store(test_entry(seed, i), std::span<const std::byte>(payload.get(), n))
                 .is_ok()) {
          ++failures;
          continue;
        }
        mine.push_back(i);
        // One of mine, whole: must be exact.
        const uint64_t j = mine[rng() % mine.size()];
        auto want = test_payload(layout, seed, j);
        if (!tier->read_block(test_entry(seed, j).key, std::span(out.get(), n)).is_ok() ||
            !same_bytes(out.get(), want.get(), n)) {
          ++failures;
        }
        // One layer of someone else's recent block: exact or not found, never anything else.
        const uint64_t other = 100 + rng() % kThreads;
        const uint64_t k = i > 2 ? i - rng() % 3 : i;
        const uint32_t layer = static_cast<uint32_t>(rng() % layout.num_layers);
        Status s = tier->read_layer(test_entry(other, k).key, layer, std::span(out.get(), layer_bytes));
        if (s.is_ok()) {
          auto theirs = test_payload(layout, other, k);
          if (!same_bytes(out.get(), theirs.get() + layer * layer_bytes, layer_bytes)) ++failures;
          ++foreign_hits;
        } else if (s.code() != StatusCode::kNotFound) {
          ++failures;
        }
      }
    });
  }
  for (auto& th : threads) th.join();

  CHECK(failures == 0);
  CHECK(foreign_hits > 0);  // the cross-thread reads did find blocks, not only kNotFound
  size_t expected_blocks = 0;
  for (int t = 0; t < kThreads; ++t) {
    expected_blocks += live[t].size();
    for (uint64_t i : live[t]) CHECK(h.reads_back(*tier, 100 + t, i));
  }
  const NvmeTierStats s = tier->stats();
  CHECK(s.blocks == expected_blocks);
  CHECK(s.free_slots == s.slots - expected_blocks);
  CHECK(s.bytes_used == expected_blocks * n);
  CHECK(s.checksum_errors == 0);
  CHECK(s.io_errors == 0);
}
