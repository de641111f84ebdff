// The tier manager, open and recovery: the tiers opened, the catalog read back into the index,
// tenant shares set, orphans adopted or dropped.
#include "api/store/tier_manager_internals.h"

namespace kvtier {

Result<std::unique_ptr<TierManager>> TierManager::open(const KeyChain& keys, TierManagerOptions options) {
  KVTIER_RETURN_IF_ERROR(options.layout.validate());
  if (options.host.capacity_bytes < options.layout.bytes_per_block()) {
    return invalid_argument("the host tier needs capacity for at least one block (" +
                            std::to_string(options.layout.bytes_per_block()) + " bytes)");
  }
  KVTIER_RETURN_IF_ERROR(check_limits(options.hbm, "HBM tier"));
  KVTIER_RETURN_IF_ERROR(check_limits(options.host, "host tier"));
  KVTIER_RETURN_IF_ERROR(check_limits(options.nvme_limits, "NVMe tier"));
  KVTIER_RETURN_IF_ERROR(check_tenants(options.tenants));
  std::unique_ptr<TierManager> m(new TierManager(keys, std::move(options)));
  KVTIER_RETURN_IF_ERROR(m->open_tiers());
  KVTIER_RETURN_IF_ERROR(m->set_tenant_shares());
  KVTIER_RETURN_IF_ERROR(m->recover());
  m->register_metrics();
  if (m->options_.background_reclaim) {
    m->reclaimer_ = std::make_unique<Reclaimer>(
        m->options_.reclaimer_mode, [tm = m.get()](const std::atomic<bool>& stop) { tm->reclaim_pass(stop); });
  }
  return m;
}

Status TierManager::open_tiers() {
  block_bytes_ = options_.layout.bytes_per_block();
  auto index = PrefixIndex::create(keys_, options_.index);
  if (!index) return index.status();
  index_ = std::move(*index);

  const uint64_t slot_bytes = align_up(block_bytes_, kIoAlignment);
  auto host = create_host_arena({.slot_bytes = block_bytes_,
                                 .slots = options_.host.capacity_bytes / slot_bytes,
                                 .shared = options_.shared_host_arena});
  if (!host) return host.status();
  host_.arena = std::move(*host);
  host_.slots = std::make_unique<SlotAllocator>(host_.arena->slots());
  host_.limits = options_.host;

  if (options_.hbm.capacity_bytes >= slot_bytes) {
    auto hbm = create_hbm_arena({.slot_bytes = block_bytes_, .slots = options_.hbm.capacity_bytes / slot_bytes});
    if (!hbm) return hbm.status();
    hbm_.arena = std::move(*hbm);
    hbm_.slots = std::make_unique<SlotAllocator>(hbm_.arena->slots());
    hbm_.limits = options_.hbm;
  }

  if (!options_.nvme.dir.empty() && options_.nvme_limits.capacity_bytes > 0) {
    NvmeTierOptions nvme = options_.nvme;
    nvme.layout = options_.layout;
    nvme.capacity_bytes = options_.nvme_limits.capacity_bytes;
    auto tier = NvmeTier::open(std::move(nvme));
    if (!tier) return tier.status();
    nvme_ = std::move(*tier);
  }

  // A counter per slot of every tier (at most 4M: 16 MiB): TinyLFU sizes its sketch to the cache.
  uint64_t slots = 0;
  for (Tier t : kAllTiers) slots += capacity_slots(t);
  uses_ = std::make_unique<FrequencySketch>(std::min<uint64_t>(slots, 4ull << 20));

  auto engine = TransferEngine::create(options_.transfer);
  if (!engine) return engine.status();
  engine_ = std::move(*engine);
  KVTIER_RETURN_IF_ERROR(engine_->register_host_memory(host_.arena->base(), host_.arena->size_bytes()));
  spdlog::info("kvtier: tiers: {}; {}; {}", host_.arena->describe(),
               hbm_.arena ? hbm_.arena->describe() : std::string("no HBM tier"),
               nvme_ ? "NVMe " + std::to_string(nvme_->slot_count()) + " slots in " + options_.nvme.dir
                     : std::string("no NVMe tier"));
  return Status::ok();
}

Status TierManager::set_tenant_shares() {
  for (size_t i = 0; i < options_.tenants.size(); ++i) {
    const double share = options_.tenants[i].tier_share;
    if (share == 1.0) continue;
    std::string shares;
    for (Tier t : kAllTiers) {
      if (!has_tier(t)) continue;
      const uint64_t blocks =
          std::max<uint64_t>(static_cast<uint64_t>(share * static_cast<double>(capacity_slots(t))), 1);
      KVTIER_RETURN_IF_ERROR(index_->set_group_limit(static_cast<GroupId>(i + 1), t, blocks));
      shares += fmt::format("{}{} {} blocks", shares.empty() ? "" : ", ", tier_name(t), blocks);
    }
    spdlog::info("kvtier: tenant \"{}\" keeps its blocks ahead of others' up to {:.0f}% of each tier: {}",
                 options_.tenants[i].name, share * 100, shares);
  }
  return Status::ok();
}

GroupId TierManager::group_of(std::string_view tenant) const noexcept {
  for (size_t i = 0; i < options_.tenants.size(); ++i) {
    if (options_.tenants[i].name == tenant) return static_cast<GroupId>(i + 1);
  }
  return kNoGroup;
}

// Re-indexes every catalog entry. Entries go in block order so a parent is indexed before its
// children. Write-back keeps NVMe prefix-closed, so a block whose parent is not indexed had its
// parent dropped at open (a corrupt slot) or comes from an older kvtier: it is kept as an orphan,
// neither indexed nor erased, so a corrupt block costs only itself, and restart time does not
// grow with erasures. Entries of a namespace without a record are unreachable and erased.
Status TierManager::recover() {
  if (!nvme_) return Status::ok();
  std::unordered_map<BlockKey, NamespaceRecord> namespaces;
  KVTIER_RETURN_IF_ERROR(nvme_->for_each_namespace([&](const NamespaceRecord& r) { namespaces.emplace(r.root, r); }));
  {
    std::lock_guard lock(counters_->ns_mu);
    counters_->namespaces = namespaces;
  }
  // Before the namespaces' blocks go in: each block takes its group when indexed.
  for (const auto& [root, record] : namespaces) {
    if (const GroupId g = group_of(record.tenant); g != kNoGroup) index_->set_root_group(root, g).ignore();
  }
  std::vector<CatalogEntry> entries = nvme_->entries();
  std::sort(entries.begin(), entries.end(),
            [](const CatalogEntry& a, const CatalogEntry& b) { return a.block_index < b.block_index; });
  std::unordered_map<BlockKey, BlockKey> root_of;  // block → its namespace root
  for (CatalogEntry& e : entries) {
    BlockKey root;
    if (e.block_index == 0) {
      root = e.parent.is_zero() ? e.ns_root : e.parent;
    } else if (auto it = root_of.find(e.parent); it != root_of.end()) {
      root = it->second;
    } else {
      counters_->orphans.emplace(e.parent, std::move(e));  // its parent is missing: kept aside
      counters_->orphan_count.add(1);
      continue;
    }
    auto ns_it = namespaces.find(root);
    bool indexed = false;
    if (ns_it != namespaces.end() && ns_it->second.layout == options_.layout) {
      Namespace ns{root, options_.layout};
      auto r = index_->insert(ns, nvme_insert(e, e.block_index == 0 ? root : e.parent));
      indexed = r.is_ok();
      if (!r) spdlog::warn("kvtier: recovery: block {} not indexed: {}", e.key.to_hex(), r.status().to_string());
    }
    if (indexed) {
      root_of.emplace(e.key, root);
      counters_->recovered.add();
    } else {
      counters_->recovery_dropped.add();
      nvme_->erase(e.key).ignore();  // unreachable: give the slot back
    }
  }
  if (!entries.empty()) {
    spdlog::info("kvtier: recovered {} blocks from NVMe ({} kept whose parent is missing, {} without a namespace dropped)",
                 counters_->recovered.value(), counters_->orphan_count.value(), counters_->recovery_dropped.value());
  }
  return Status::ok();
}

size_t TierManager::adopt_orphans(const Namespace& ns, const BlockKey& parent) {
  if (counters_->orphan_count.value() == 0) return 0;
  size_t adopted = 0;
  std::vector<BlockKey> parents{parent};
  while (!parents.empty()) {
    const BlockKey p = parents.back();
    parents.pop_back();
    std::vector<CatalogEntry> children;
    {
      std::lock_guard lock(counters_->orphan_mu);
      auto [begin, end] = counters_->orphans.equal_range(p);
      for (auto it = begin; it != end; ++it) children.push_back(std::move(it->second));
      counters_->orphans.erase(begin, end);
      counters_->orphan_count.add(-double(children.size()));
    }
    for (const CatalogEntry& e : children) {
      // The index checks the key against parent, tokens and extras: an orphan that does not
      // chain from this parent is refused (and erased) rather than matched.
      auto r = index_->insert(ns, nvme_insert(e, e.parent));
      if (r) {
        // kAddedResidency: the block was saved again in memory meanwhile; this copy joins it.
        ++adopted;
        counters_->orphans_adopted.add();
        parents.push_back(e.key);
      } else {
        spdlog::warn("kvtier: orphan block {} not indexed: {}", e.key.to_hex(), r.status().to_string());
        nvme_->erase(e.key).ignore();
        counters_->orphans_dropped.add();
      }
    }
  }
  return adopted;
}

size_t TierManager::drop_orphans(size_t n) {
  if (!nvme_ || counters_->orphan_count.value() == 0) return 0;
  std::vector<BlockKey> victims;
  {
    std::lock_guard lock(counters_->orphan_mu);
    for (auto it = counters_->orphans.begin(); it != counters_->orphans.end() && victims.size() < n;) {
      victims.push_back(it->second.key);
      it = counters_->orphans.erase(it);
    }
    counters_->orphan_count.add(-double(victims.size()));
  }
  size_t dropped = 0;
  for (const BlockKey& k : victims) {
    if (nvme_->erase(k).is_ok()) ++dropped;  // catalog first, then the slot
    counters_->orphans_dropped.add();
  }
  return dropped;
}

}  // namespace kvtier
