#include "api/store/restore_planner.h"

#include <chrono>

namespace kvtier {

Tier fastest_tier(const BlockResidency& block) noexcept {
  for (Tier t : kAllTiers) {
    if (block.resident_in(t)) return t;
  }
  return Tier::kNvme;
}

uint64_t steady_ns() noexcept {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
          .count());
}

RestorePlanner::RestorePlanner(Options options) : options_(options) {
  for (int t = 0; t < kNumTiers; ++t) {
    const double prior = options_.prior_bytes_per_second[t];
    tiers_[t].seconds_per_byte = prior > 0 ? 1.0 / prior : 0.0;
  }
  if (!(options_.smoothing > 0 && options_.smoothing <= 1)) options_.smoothing = 0.25;
}

void RestorePlanner::record(Tier from, uint64_t bytes, uint64_t nanoseconds) {
  if (bytes == 0 || nanoseconds == 0) return;
  const double sample = double(nanoseconds) * 1e-9 / double(bytes);
  std::lock_guard lock(mu_);
  TierEstimate& e = tiers_[static_cast<int>(from)];
  // The first measurement replaces the prior outright: the prior is a guess about hardware.
  e.seconds_per_byte = e.samples == 0 ? sample : e.seconds_per_byte + options_.smoothing * (sample - e.seconds_per_byte);
  ++e.samples;
  e.last_ns = steady_ns();
}

double RestorePlanner::bytes_per_second(Tier t) const {
  std::lock_guard lock(mu_);
  const double spb = tiers_[static_cast<int>(t)].seconds_per_byte;
  return spb > 0 ? 1.0 / spb : 0.0;
}

uint64_t RestorePlanner::samples(Tier t) const {
  std::lock_guard lock(mu_);
  return tiers_[static_cast<int>(t)].samples;
}

uint64_t RestorePlanner::last_sample_ns(Tier t) const {
  std::lock_guard lock(mu_);
  return tiers_[static_cast<int>(t)].last_ns;
}

RestoreOffer RestorePlanner::plan(std::span<const BlockResidency> blocks, double prefill_tokens_per_second,
                                  uint32_t block_tokens) const {
  RestoreOffer offer;
  offer.keep = blocks.size();
  if (!(prefill_tokens_per_second > 0) || blocks.empty()) return offer;
  std::array<double, kNumTiers> spb{};
  {
    std::lock_guard lock(mu_);
    for (int t = 0; t < kNumTiers; ++t) spb[t] = tiers_[t].seconds_per_byte;
  }
  const double recompute_s = double(block_tokens) / prefill_tokens_per_second;
  double saved = 0, best_saved = 0;
  size_t best = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    saved += recompute_s - double(blocks[b].byte_size) * spb[static_cast<int>(fastest_tier(blocks[b]))];
    if (saved > best_saved) {
      best_saved = saved;
      best = b + 1;
    }
  }
  offer.keep = best;
  offer.held_back = blocks.size() - best;
  offer.seconds_saved = best_saved;
  for (size_t b = best; b < blocks.size(); ++b) {
    const int fastest = static_cast<int>(fastest_tier(blocks[b]));
    offer.held_back_tier = offer.held_back_tier == kNumTiers ? fastest : std::max(offer.held_back_tier, fastest);
  }
  return offer;
}

}  // namespace kvtier
