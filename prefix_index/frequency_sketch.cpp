#include "prefix_index/frequency_sketch.h"

#include <algorithm>
#include <bit>

namespace kvtier {
namespace {

// Mixes a key half with a row's odd constant (splitmix64's finaliser): the key is a hash
// already, but the rows must not map it to the same column.
uint64_t mix(uint64_t x) noexcept {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ull;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

constexpr uint64_t kRowSeeds[4] = {0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full, 0x165667b19e3779f9ull,
                                   0x27d4eb2f165667c5ull};

}  // namespace

FrequencySketch::FrequencySketch(uint64_t width)
    : width_(std::bit_ceil(std::max<uint64_t>(width, 64))),
      sample_size_(10 * width_),
      counters_(static_cast<size_t>(kRows * width_), 0) {}

uint64_t FrequencySketch::index_of(const BlockKey& key, int row) const noexcept {
  const uint64_t h = mix(key.lo ^ kRowSeeds[row]) + mix(key.hi + kRowSeeds[row]);
  return uint64_t(row) * width_ + (h & (width_ - 1));
}

void FrequencySketch::add(std::span<const BlockKey> keys) {
  std::lock_guard lock(mu_);
  for (const BlockKey& key : keys) {
    // Conservative update: only the smallest counters grow, which keeps the overestimate of a
    // rare key small when it shares counters with a popular one.
    uint64_t at[kRows];
    uint8_t least = kMaxCount;
    for (int r = 0; r < kRows; ++r) {
      at[r] = index_of(key, r);
      least = std::min(least, counters_[at[r]]);
    }
    if (least < kMaxCount) {
      for (uint64_t i : at) {
        if (counters_[i] == least) ++counters_[i];
      }
    }
    if (++additions_ >= sample_size_) age_locked();
  }
}

uint32_t FrequencySketch::estimate(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  uint8_t least = kMaxCount;
  for (int r = 0; r < kRows; ++r) least = std::min(least, counters_[index_of(key, r)]);
  return least;
}

uint64_t FrequencySketch::agings() const {
  std::lock_guard lock(mu_);
  return agings_;
}

void FrequencySketch::age_locked() {
  for (uint8_t& c : counters_) c >>= 1;
  additions_ = 0;
  ++agings_;
}

}  // namespace kvtier
