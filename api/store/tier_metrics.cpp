// The tier manager's metrics mirrored from its parts: the index's counts, each tier's capacity
// and use, the NVMe tier's checks, the transfer and io engines' traffic, the tenants' residency.
// Each series is registered here once, read at every scrape (MetricsRegistry::counter_fn and
// gauge_fn); the manager's own counts are registered where they are declared (Counters in
// tier_manager_internals.h).
#include "api/store/tier_manager_internals.h"

namespace kvtier {

MetricsRegistry& TierManager::metrics() noexcept { return counters_->metrics; }

void TierManager::register_metrics() {
  MetricsRegistry& r = counters_->metrics;
  auto tier_label = [](Tier t) { return MetricLabels{{"tier", std::string(tier_name(t))}}; };
  // A count of the index's (each read takes its own snapshot of the index's stats).
  auto index_counter = [&](std::string_view name, std::string_view help, uint64_t IndexStats::*field) {
    r.counter_fn(name, help, {}, [this, field] { return double(index_->stats().*field); });
  };
  auto index_gauge = [&](std::string_view name, std::string_view help, uint64_t IndexStats::*field) {
    r.gauge_fn(name, help, {}, [this, field] { return double(index_->stats().*field); });
  };
  auto nvme_stat = [this](uint64_t NvmeTierStats::*field) {
    return [this, field] { return nvme_ ? double(nvme_->stats().*field) : 0.0; };
  };

  for (Tier t : kAllTiers) {
    if (!has_tier(t)) continue;
    r.gauge_fn("kvtier_tier_capacity_bytes", "Capacity of each tier in bytes.", tier_label(t),
               [this, t] { return double(capacity_slots(t) * block_bytes_); });
  }
  for (Tier t : kAllTiers) {
    if (!has_tier(t)) continue;
    r.gauge_fn("kvtier_tier_used_bytes", "Bytes of KV blocks held in each tier.", tier_label(t),
               [this, t] { return double(used_slots(t) * block_bytes_); });
  }
  for (Tier t : kAllTiers) {
    r.gauge_fn("kvtier_tier_blocks", "Blocks resident in each tier.", tier_label(t),
               [this, t] { return double(index_->stats().resident_blocks[int(t)]); });
  }
  for (Tier t : kAllTiers) {
    r.counter_fn("kvtier_tier_evictions_total", "Blocks evicted from each tier by the index.", tier_label(t),
                 [this, t] { return double(index_->stats().evictions[int(t)]); });
  }
  index_gauge("kvtier_index_entries", "Blocks in the prefix index.", &IndexStats::entries);
  index_counter("kvtier_lookups_total", "Prefix lookups.", &IndexStats::lookups);
  index_counter("kvtier_lookup_tokens_total", "Full-block tokens asked about by lookups.", &IndexStats::lookup_tokens);
  index_counter("kvtier_hit_tokens_total", "Tokens found cached by lookups.", &IndexStats::hit_tokens);
  index_counter("kvtier_hit_blocks_total", "Blocks found cached by lookups.", &IndexStats::hit_blocks);
  index_gauge("kvtier_leases_active", "Leases currently pinning matched blocks.", &IndexStats::leases_active);
  index_counter("kvtier_leases_expired_total", "Leases released by expiry.", &IndexStats::leases_expired);
  index_counter("kvtier_collisions_total", "Inserts refused because a key held another block.", &IndexStats::collisions);
  index_gauge("kvtier_damaged_blocks", "Blocks marked corrupt and not yet repaired or evicted.",
              &IndexStats::damaged_blocks);

  r.counter_fn("kvtier_checksum_errors_total", "NVMe reads refused for a bad checksum.", {},
               nvme_stat(&NvmeTierStats::checksum_errors));
  r.counter_fn("kvtier_io_errors_total", "NVMe device operations that failed.", {}, nvme_stat(&NvmeTierStats::io_errors));
  r.counter_fn("kvtier_corrupt_blocks_total",
               "Blocks whose only copy (on NVMe) failed its checksum, or whose slot header failed its check at open; "
               "lookups stop before them until repaired.",
               {}, [this, at_open = nvme_stat(&NvmeTierStats::corrupt_at_open)] {
                 return double(counters_->corrupt_found.load(std::memory_order_relaxed)) + at_open();
               });
  r.counter_fn("kvtier_recovery_dropped_blocks_total", kRecoveryDroppedHelp, {{"cause", "corrupt"}},
               nvme_stat(&NvmeTierStats::corrupt_at_open));
  r.counter_fn("kvtier_recovery_dropped_blocks_total", kRecoveryDroppedHelp, {{"cause", "misplaced"}},
               nvme_stat(&NvmeTierStats::misplaced_at_open));
  r.counter_fn("kvtier_over_share_evictions_total",
               "Blocks demoted or dropped ahead of the usual order because their tenant held more than its "
               "tier_share.",
               {}, [this] {
                 return double(index_->stats().over_share_evictions +
                               counters_->over_share_demotions.load(std::memory_order_relaxed));
               });

  for (int route = 0; route < kNumRoutes; ++route) {
    r.counter_fn("kvtier_transfer_bytes_total", "Bytes moved by the transfer engine, per route.",
                 {{"route", std::string(route_name(static_cast<Route>(route)))}},
                 [this, route] { return double(engine_->stats().bytes_per_route[route]); });
  }
  r.counter_fn("kvtier_transfer_jobs_failed_total", "Transfer jobs that failed.", {},
               [this] { return double(engine_->stats().jobs_failed); });
  r.counter_fn("kvtier_io_ops_total", "Reads and writes sent to the storage devices.", {},
               [this] { return double(engine_->io_engine().stats().ops); });
  r.counter_fn("kvtier_io_submit_calls_total", "System calls that sent them (io_uring_submit; fewer than ops when batched).",
               {}, [this] { return double(engine_->io_engine().stats().submit_calls); });

  for (size_t i = 0; i < options_.tenants.size(); ++i) {
    const auto group = static_cast<GroupId>(i + 1);
    for (Tier t : kAllTiers) {
      if (!has_tier(t)) continue;
      r.gauge_fn("kvtier_tenant_blocks", "Blocks each tenant's namespaces hold in each tier.",
                 {{"tenant", options_.tenants[i].name}, {"tier", std::string(tier_name(t))}},
                 [this, group, t] { return double(index_->group_resident(group, t)); });
    }
  }
  // Shares are set at open and fixed: a tenant without one in a tier has no series there.
  for (size_t i = 0; i < options_.tenants.size(); ++i) {
    const auto group = static_cast<GroupId>(i + 1);
    for (Tier t : kAllTiers) {
      if (index_->group_limit(group, t) == 0) continue;
      r.gauge_fn("kvtier_tenant_share_blocks",
                 "Each tenant's share of each tier in blocks (tier_share): beyond it, its blocks are evicted first. "
                 "Tenants without a share have no series.",
                 {{"tenant", options_.tenants[i].name}, {"tier", std::string(tier_name(t))}},
                 [this, group, t] { return double(index_->group_limit(group, t)); });
    }
  }

  r.counter_fn("kvtier_restore_seconds_saved_total", "Estimated recompute time minus restore time of the tokens offered.",
               {}, [this] { return double(counters_->saved_ns.load(std::memory_order_relaxed)) * 1e-9; });
  for (Tier t : kAllTiers) {
    if (!has_tier(t)) continue;
    r.gauge_fn("kvtier_restore_bandwidth_bytes_per_second",
               "Each tier's restore bandwidth as measured from loads (a moving estimate; the prior until a load).",
               tier_label(t), [this, t] { return restore_->bytes_per_second(t); });
  }
}

}  // namespace kvtier
