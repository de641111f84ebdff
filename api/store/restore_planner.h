// RestorePlanner: restore or recompute, at run time (DESIGN.md "Cost model", docs/cost-model.md).
// It keeps a moving estimate of each tier's restore bandwidth from the loads the tier manager
// times, and given an engine's prefill speed it says how much of a match is worth restoring: the
// prefix whose blocks, restored from where they live, arrive sooner than the engine could compute
// them. Recompute is taken as linear in tokens at the engine's declared speed (the attention term
// grows with the prefix, so this undercounts a recompute, never a restore: a block is held back
// only when restoring it is slower than the cheapest recompute).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <span>

#include "kvtier/match.h"
#include "kvtier/tier.h"

namespace kvtier {

/// How much of a match a lookup offers.
struct RestoreOffer {
  size_t keep = 0;            // blocks offered: a prefix of the match
  size_t held_back = 0;       // blocks after it, slower to restore than to recompute
  double seconds_saved = 0;   // estimated recompute time minus restore time of the blocks offered
  /// The slowest tier a held-back block would have come from (kNumTiers when none was held back).
  int held_back_tier = kNumTiers;
};

class RestorePlanner {
 public:
  struct Options {
    /// Bandwidth assumed for each tier before a load measured it, bytes per second
    /// (defaults: HBM 50 GB/s, host 10 GB/s, NVMe 2 GB/s).
    std::array<double, kNumTiers> prior_bytes_per_second{50e9, 10e9, 2e9};
    /// Weight of each new measurement in the moving estimate, in (0, 1] (default 0.25: an
    /// estimate follows a change of device speed within about ten loads).
    double smoothing = 0.25;
  };

  explicit RestorePlanner(Options options);

  /// One timed restore: `bytes` read from tier `from` in `nanoseconds` (ignored when either is 0).
  void record(Tier from, uint64_t bytes, uint64_t nanoseconds);
  /// The estimate now, bytes per second.
  double bytes_per_second(Tier t) const;
  /// Restores measured from `t` so far.
  uint64_t samples(Tier t) const;
  /// When the last measurement of `t` was taken (steady clock, ns; 0: never).
  uint64_t last_sample_ns(Tier t) const;

  /// The longest-saving prefix of `blocks` for an engine that prefills `prefill_tokens_per_second`
  /// (block_tokens tokens per block): the k that maximises the sum over blocks [0, k) of
  /// recompute − restore time, each block restored from the fastest tier holding it. A speed of
  /// 0 or less declares nothing: every block is offered and nothing is estimated.
  RestoreOffer plan(std::span<const BlockResidency> blocks, double prefill_tokens_per_second,
                    uint32_t block_tokens) const;

 private:
  struct TierEstimate {
    double seconds_per_byte = 0;
    uint64_t samples = 0;
    uint64_t last_ns = 0;
  };
  Options options_;
  mutable std::mutex mu_;
  std::array<TierEstimate, kNumTiers> tiers_{};  // guarded by mu_
};

/// The tier a load reads `block` from: the fastest one holding it (NVMe for none).
Tier fastest_tier(const BlockResidency& block) noexcept;

/// Steady-clock nanoseconds, the clock RestorePlanner::last_sample_ns reads.
uint64_t steady_ns() noexcept;

}  // namespace kvtier
