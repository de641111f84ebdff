// Tier and priority vocabulary shared by the index, the tiers and the public API.
#pragma once

#include <cstdint>
#include <limits>
#include <string_view>

namespace kvtier {

/// Storage tiers, fastest first. An entry may be resident in several at once.
enum class Tier : uint8_t { kHbm = 0, kHost = 1, kNvme = 2 };
inline constexpr int kNumTiers = 3;
inline constexpr Tier kAllTiers[kNumTiers] = {Tier::kHbm, Tier::kHost, Tier::kNvme};

constexpr uint8_t tier_bit(Tier t) noexcept { return static_cast<uint8_t>(1u << static_cast<int>(t)); }
constexpr std::string_view tier_name(Tier t) noexcept {
  switch (t) {
    case Tier::kHbm: return "hbm";
    case Tier::kHost: return "host";
    case Tier::kNvme: return "nvme";
  }
  return "unknown";
}

/// A tier's own handle for where a block lives (slot number, file offset, arena index).
using SlotId = uint64_t;
inline constexpr SlotId kNoSlot = std::numeric_limits<SlotId>::max();

/// Eviction priority classes, as TensorRT-LLM has them: lower classes are evicted first;
/// retained prefixes (system prompts, shared documents) outlive one-off turns.
enum class Priority : uint8_t {
  kLow = 0,       // one-off turns, speculative prefetches
  kNormal = 1,    // default
  kHigh = 2,      // frequently shared prefixes
  kRetained = 3,  // operator-pinned prefixes: system prompts, warmed documents
};
inline constexpr int kNumPriorities = 4;

constexpr std::string_view priority_name(Priority p) noexcept {
  switch (p) {
    case Priority::kLow: return "low";
    case Priority::kNormal: return "normal";
    case Priority::kHigh: return "high";
    case Priority::kRetained: return "retained";
  }
  return "unknown";
}

}  // namespace kvtier
