// FrequencySketch: how often a block was used lately, in a few bytes per cached block — a
// count-min sketch of 4-bit counters with aging, as TinyLFU (Einziger et al.) and Caffeine keep.
// It answers for blocks the index has forgotten too (a block dropped and saved again keeps its
// count), which a counter per indexed block cannot; and its size is fixed, where a counter per
// block ever seen grows without bound.
#pragma once

#include <cstdint>
#include <mutex>
#include <span>
#include <vector>

#include "kvtier/block_key.h"

namespace kvtier {

class FrequencySketch {
 public:
  /// The largest count estimate() returns: counters saturate at it (4 bits).
  static constexpr uint32_t kMaxCount = 15;

  /// `width` counters per row, rounded up to a power of two (at least 64); about the number of
  /// distinct blocks to tell apart (a tier manager passes its slots over all tiers). Every
  /// 10 × width additions all counters are halved, so old popularity fades.
  explicit FrequencySketch(uint64_t width);

  /// Counts one use of each key.
  void add(std::span<const BlockKey> keys);
  void add(const BlockKey& key) { add(std::span(&key, 1)); }
  /// Uses counted for `key` since they last faded: never fewer than were added (unless halved),
  /// sometimes more (another key's share of every counter it maps to).
  uint32_t estimate(const BlockKey& key) const;

  uint64_t width() const noexcept { return width_; }
  /// How many times the counters were halved.
  uint64_t agings() const;

 private:
  static constexpr int kRows = 4;
  uint64_t index_of(const BlockKey& key, int row) const noexcept;
  void age_locked();

  uint64_t width_;
  uint64_t sample_size_;  // additions between agings
  mutable std::mutex mu_;
  std::vector<uint8_t> counters_;  // kRows × width_, one 4-bit count per byte; guarded by mu_
  uint64_t additions_ = 0;         // since the last aging; guarded by mu_
  uint64_t agings_ = 0;            // guarded by mu_
};

}  // namespace kvtier
