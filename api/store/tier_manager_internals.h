// The tier manager's internals, shared by the files that implement it (one concept each):
//   tier_manager.cpp    construction, slots, namespaces, block copies, stats
//   tier_open.cpp       open and recovery from the catalog, tenant shares, orphans
//   tier_reclaimer.cpp  watermarks, the background reclaimer, demotion and eviction
//   tier_writeback.cpp  NVMe write-back (batched, prefix-closed), quarantine, flush
//   tier_save.cpp       save
//   tier_load.cpp       load and promotion
// Not for other users: include api/store/tier_manager.h.
#pragma once

#include <spdlog/spdlog.h>

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

#include "api/store/tier_manager.h"

namespace kvtier {

struct TierManager::Counters {
  std::array<std::atomic<uint64_t>, kNumTiers> demotions_out{}, promotions_in{}, drops{};
  std::atomic<uint64_t> saved{0}, skipped{0}, loaded{0}, write_through{0};
  std::atomic<uint64_t> recovered{0}, recovery_dropped{0}, errors{0};
  std::atomic<uint64_t> corrupt_found{0}, repaired{0}, over_share_demotions{0};
  // One corruption check or repair at a time: a repair switches a block's NVMe slot in the
  // catalog and then in the index, and neither a second repair nor a check may come between.
  std::mutex repair_mu;
  std::array<std::mutex, kNumTiers> reclaim_mu;  // one reclaim round per tier at a time
  std::atomic<uint64_t> background_rounds{0}, foreground_rounds{0};
  // One write-back batch at a time (reclaim rounds, background or not, and flush): a block two
  // batches both found memory-only would otherwise be written and committed twice.
  std::mutex writeback_mu;
  std::mutex dirty_mu;
  std::unordered_set<BlockKey> dirty;  // in a memory tier, not yet on NVMe
  std::atomic<uint64_t> ancestor_writes{0};
  // NVMe blocks found at open whose parent is not indexed, by parent key (see the class comment).
  std::mutex orphan_mu;
  std::unordered_multimap<BlockKey, CatalogEntry> orphans;
  std::atomic<uint64_t> orphan_count{0}, orphans_adopted{0}, orphans_dropped{0};
  std::atomic<uint64_t> nvme_admitted{0}, nvme_refused{0}, nvme_writes{0};
  std::atomic<uint64_t> offered_tokens{0}, held_back_tokens{0}, saved_ns{0}, probes{0};
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
