// The tier manager's internals, shared by the files that implement it (one concept each):
//   tier_manager.cpp    construction, slots, namespaces, block copies, stats
//   tier_open.cpp       open and recovery from the catalog, tenant shares, orphans
//   tier_reclaimer.cpp  watermarks, the background reclaimer, demotion and eviction
//   tier_writeback.cpp  NVMe write-back (batched, prefix-closed), quarantine, flush
//   tier_save.cpp       save
//   tier_load.cpp       load and promotion
//   tier_metrics.cpp    the metrics mirrored from the index, the tiers and the transfer engine
// Not for other users: include api/store/tier_manager.h.
#pragma once

#include <spdlog/spdlog.h>
#include <xxhash.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "api/metrics/metrics.h"
#include "api/store/tier_manager.h"

namespace kvtier {

// Helps of the families whose series are registered in more than one place.
inline constexpr std::string_view kRecoveryDroppedHelp =
    "NVMe blocks dropped at open, by cause: corrupt (a slot header unreadable or disagreeing with the catalog), "
    "misplaced (a slot out of range or claimed twice), no_namespace (no namespace record).";
inline constexpr std::string_view kReclaimRoundsHelp =
    "Reclaim rounds (up to 64 blocks demoted or dropped), by who ran them: the background thread, or a save that "
    "found its tier full.";
inline constexpr std::string_view kAdmissionHelp =
    "Blocks demoted from host DRAM, by NVMe admission's decision: admitted (used often enough lately, or of class "
    "high or above) and written, or refused and dropped from memory.";

struct TierManager::Counters {
  // The tier manager's own counts, each registered once with its name and help: the stats and
  // kvtierd's /metrics both read these. The series mirrored from the index, the tiers and the
  // transfer engine are registered by register_metrics (tier_metrics.cpp).
  MetricsRegistry metrics;
  using PerTier = std::array<Counter*, kNumTiers>;
  PerTier per_tier(std::string_view name, std::string_view help) {
    PerTier out{};
    for (Tier t : kAllTiers) out[int(t)] = &metrics.counter(name, help, {{"tier", std::string(tier_name(t))}});
    return out;
  }
  PerTier demotions_out = per_tier("kvtier_tier_demotions_total", "Blocks copied down out of each tier under pressure.");
  PerTier promotions_in = per_tier("kvtier_tier_promotions_total", "Blocks copied up into each tier.");
  PerTier drops = per_tier("kvtier_tier_drops_total", "Blocks dropped from each tier with no copy kept below.");
  Counter& saved = metrics.counter("kvtier_saved_blocks_total", "Blocks written by save.");
  Counter& skipped = metrics.counter("kvtier_save_skipped_blocks_total", "Blocks a save found cached already.");
  Counter& loaded = metrics.counter("kvtier_loaded_blocks_total", "Blocks copied out by load.");
  Counter& write_through =
      metrics.counter("kvtier_write_through_blocks_total", "Blocks a save wrote to NVMe at once (write-through).");
  Counter& recovered = metrics.counter("kvtier_recovered_blocks_total", "Blocks indexed from the NVMe catalog at open.");
  Counter& recovery_dropped = metrics.counter("kvtier_recovery_dropped_blocks_total", kRecoveryDroppedHelp,
                                              {{"cause", "no_namespace"}});
  Counter& errors = metrics.counter("kvtier_store_errors_total", "Failed transfers and storage operations.");
  Counter& repaired =
      metrics.counter("kvtier_repaired_blocks_total", "Corrupt blocks replaced by a save of the same tokens.");
  Counter& background_rounds = metrics.counter("kvtier_reclaim_rounds_total", kReclaimRoundsHelp, {{"by", "background"}});
  Counter& foreground_rounds = metrics.counter("kvtier_reclaim_rounds_total", kReclaimRoundsHelp, {{"by", "foreground"}});
  Counter& ancestor_writes = metrics.counter(
      "kvtier_ancestor_writes_total",
      "Blocks written back to NVMe early, as the parents of a write-back (NVMe stays prefix-closed).");
  Gauge& orphan_count = metrics.gauge(
      "kvtier_orphan_blocks",
      "NVMe blocks kept at open whose parent is missing: indexed again once a save of their prefix indexes the "
      "parent; the first to go when NVMe needs room.");
  Counter& orphans_adopted =
      metrics.counter("kvtier_orphans_adopted_total", "Orphan blocks indexed again under a newly saved parent.");
  Counter& orphans_dropped = metrics.counter("kvtier_orphans_dropped_total", "Orphan blocks erased to make room on NVMe.");
  Counter& nvme_admitted = metrics.counter("kvtier_nvme_admission_total", kAdmissionHelp, {{"decision", "admitted"}});
  Counter& nvme_refused = metrics.counter("kvtier_nvme_admission_total", kAdmissionHelp, {{"decision", "refused"}});
  Counter& nvme_written_bytes = metrics.counter(
      "kvtier_nvme_written_bytes_total",
      "Payload bytes of the blocks committed to NVMe (write-back, write-through, flush, repair).");
  Counter& offered_tokens = metrics.counter(
      "kvtier_restore_offered_tokens_total",
      "Tokens lookups offered where the engine declared its prefill speed (restore or recompute).");
  Counter& held_back_tokens = metrics.counter("kvtier_restore_held_back_tokens_total",
                                              "Cached tokens lookups held back as slower to restore than to recompute.");
  Counter& probes = metrics.counter("kvtier_restore_probes_total",
                                    "Probe reads of a tier whose blocks were held back, so its estimate can recover.");
  // Parts of series that add another component's count, or that are not whole numbers: rendered by
  // register_metrics.
  std::atomic<uint64_t> corrupt_found{0}, over_share_demotions{0}, saved_ns{0};

  // One corruption check or repair at a time: a repair switches a block's NVMe slot in the
  // catalog and then in the index, and neither a second repair nor a check may come between.
  std::mutex repair_mu;
  std::array<std::mutex, kNumTiers> reclaim_mu;  // one reclaim round per tier at a time
  // One write-back batch at a time (reclaim rounds, background or not, and flush): a block two
  // batches both found memory-only would otherwise be written and committed twice.
  std::mutex writeback_mu;
  std::mutex dirty_mu;
  std::unordered_set<BlockKey> dirty;  // in a memory tier, not yet on NVMe
  // NVMe blocks found at open whose parent is not indexed, by parent key (see the class comment).
  std::mutex orphan_mu;
  std::unordered_multimap<BlockKey, CatalogEntry> orphans;
  // One probe in flight at a time; wait_for_probes waits on probe_cv. The last probe's handle is
  // kept here, so the lookup that started it does not wait for it (a handle's destructor waits).
  std::mutex probe_mu;
  std::condition_variable probe_cv;
  bool probing = false;                      // guarded by probe_mu
  std::optional<TransferHandle> probe_job;   // guarded by probe_mu
  std::unique_ptr<EvictionLog> evicted;      // blocks that left the index, for kvtier doctor
  // Every namespace known (the catalog's records and those added since), for inspect and doctor.
  mutable std::mutex ns_mu;
  std::unordered_map<BlockKey, NamespaceRecord> namespaces;  // guarded by ns_mu
};

namespace tier_detail {

inline uint64_t wall_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

inline Status check_tenants(const std::vector<TenantShare>& tenants) {
  if (tenants.size() >= kMaxGroups) {
    return invalid_argument("at most " + std::to_string(kMaxGroups - 1) + " tenants, got " +
                            std::to_string(tenants.size()));
  }
  std::unordered_set<std::string_view> names;
  for (const TenantShare& tenant : tenants) {
    if (!names.insert(tenant.name).second) {
      return invalid_argument("tenant \"" + tenant.name + "\" is listed twice");
    }
    if (!(tenant.tier_share > 0.0 && tenant.tier_share <= 1.0)) {
      return invalid_argument("tenant \"" + tenant.name + "\": tier_share must be in (0, 1], got " +
                              std::to_string(tenant.tier_share));
    }
  }
  return Status::ok();
}

inline Status check_limits(const TierLimits& l, const char* name) {
  if (!(l.low_watermark > 0 && l.low_watermark <= l.high_watermark && l.high_watermark <= 1.0)) {
    return invalid_argument(std::string(name) + " watermarks must satisfy 0 < low <= high <= 1");
  }
  return Status::ok();
}

/// The next tier down that exists, or nullopt. The host tier always exists.
inline std::optional<Tier> lower_of(Tier t, bool nvme) {
  if (t == Tier::kHbm) return Tier::kHost;
  if (t != Tier::kNvme && nvme) return Tier::kNvme;
  return std::nullopt;
}

/// The index insert of a block committed on NVMe, as its catalog entry describes it.
inline BlockInsert nvme_insert(const CatalogEntry& e, const BlockKey& parent) {
  return {.key = e.key, .parent = parent, .block_index = e.block_index, .tokens = e.tokens, .extras = e.extras,
          .byte_size = e.payload_bytes, .checksum = e.checksum, .tier = Tier::kNvme, .slot = e.slot,
          .priority = e.priority};
}

inline const TierLimits& limits_of(const TierManagerOptions& o, Tier t) {
  return t == Tier::kHbm ? o.hbm : t == Tier::kHost ? o.host : o.nvme_limits;
}

}  // namespace tier_detail

using tier_detail::check_limits;
using tier_detail::check_tenants;
using tier_detail::limits_of;
using tier_detail::lower_of;
using tier_detail::nvme_insert;
using tier_detail::wall_ns;

}  // namespace kvtier
