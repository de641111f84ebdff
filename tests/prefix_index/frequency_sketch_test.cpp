// FrequencySketch: counts of recent uses for NVMe admission — never below what was added,
// rarely above, fading with age, bounded, and safe to use from many threads.
#include <catch2/catch.hpp>

#include <random>
#include <thread>
#include <vector>

#include "prefix_index/frequency_sketch.h"

using namespace kvtier;

namespace {
BlockKey random_key(std::mt19937_64& rng) { return BlockKey{rng(), rng()}; }
}  // namespace

TEST_CASE("A sketch counts each key's uses and never undercounts one") {
  FrequencySketch sketch(1024);
  std::mt19937_64 rng(1);
  std::vector<BlockKey> keys;
  for (int i = 0; i < 200; ++i) keys.push_back(random_key(rng));
  for (size_t i = 0; i < keys.size(); ++i) {
    for (size_t n = 0; n < i % 5; ++n) sketch.add(keys[i]);
  }
  size_t exact = 0;
  for (size_t i = 0; i < keys.size(); ++i) {
    const uint32_t e = sketch.estimate(keys[i]);
    CHECK(e >= i % 5);
    exact += e == i % 5;
  }
  // 200 keys (≤ 800 uses) in 4 rows of 1024: nearly every estimate is exact.
  CHECK(exact >= 190);
}

TEST_CASE("A sketch tells unseen keys from seen ones") {
  FrequencySketch sketch(4096);
  std::mt19937_64 rng(2);
  for (int i = 0; i < 3000; ++i) sketch.add(random_key(rng));  // each once
  size_t look_reused = 0;
  for (int i = 0; i < 3000; ++i) look_reused += sketch.estimate(random_key(rng)) >= 2;
  // An unseen key looks used twice only when all 4 of its counters were shared: rare.
  CHECK(look_reused < 30);
}

TEST_CASE("Counters saturate at 15 and fade by half every 10 x width additions") {
  FrequencySketch sketch(64);  // the smallest: 640 additions between agings
  CHECK(sketch.width() == 64);
  const BlockKey hot{1, 2};
  for (int i = 0; i < 40; ++i) sketch.add(hot);
  CHECK(sketch.estimate(hot) == FrequencySketch::kMaxCount);
  CHECK(sketch.agings() == 0);
  std::mt19937_64 rng(3);
  for (int i = 0; i < 600; ++i) sketch.add(random_key(rng));  // 640 additions in all
  CHECK(sketch.agings() == 1);
  CHECK(sketch.estimate(hot) <= FrequencySketch::kMaxCount / 2 + 1);
  CHECK(sketch.estimate(hot) >= FrequencySketch::kMaxCount / 2);
}

TEST_CASE("A sketch's width is rounded up to a power of two") {
  CHECK(FrequencySketch(0).width() == 64);
  CHECK(FrequencySketch(1000).width() == 1024);
  CHECK(FrequencySketch(1024).width() == 1024);
}

TEST_CASE("Threads add to one sketch at once and every use of a key is counted") {
  FrequencySketch sketch(1 << 16);
  std::vector<BlockKey> keys;
  std::mt19937_64 rng(4);
  for (int i = 0; i < 8; ++i) keys.push_back(random_key(rng));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      // Each thread adds key t twice and key 4 + t once, over and over with the others' reads.
      for (int round = 0; round < 2; ++round) sketch.add(std::vector<BlockKey>{keys[t], keys[4 + t]});
      for (int i = 0; i < 100; ++i) (void)sketch.estimate(keys[(t + i) % 8]);
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) {
    CHECK(sketch.estimate(keys[t]) >= 2);
    CHECK(sketch.estimate(keys[4 + t]) >= 2);
  }
}
