// The tier manager: construction, slots, namespaces, block copies and stats
// (tier_manager_internals.h lists the other parts).
#include "api/store/tier_manager_internals.h"

namespace kvtier {

TierManager::TierManager(const KeyChain& keys, TierManagerOptions options)
    : keys_(keys),
      options_(std::move(options)),
      restore_(std::make_unique<RestorePlanner>(options_.restore)),
      counters_(std::make_unique<Counters>()) {
  counters_->evicted = std::make_unique<EvictionLog>(options_.eviction_log_entries);
}

TierManager::~TierManager() { close(); }

void TierManager::close() {
  if (reclaimer_) reclaimer_->stop();  // a running pass ends after its current round
  if (engine_) engine_->shutdown();
}

bool TierManager::has_tier(Tier t) const noexcept {
  switch (t) {
    case Tier::kHbm: return hbm_.arena != nullptr;
    case Tier::kHost: return true;
    case Tier::kNvme: return nvme_ != nullptr;
  }
  return false;
}

const MemoryArena* TierManager::arena(Tier t) const noexcept {
  if (t == Tier::kHbm) return hbm_.arena.get();
  if (t == Tier::kHost) return host_.arena.get();
  return nullptr;
}

TierManager::MemoryTier* TierManager::memory_tier(Tier t) noexcept {
  if (t == Tier::kHbm) return hbm_.arena ? &hbm_ : nullptr;
  if (t == Tier::kHost) return &host_;
  return nullptr;
}

uint64_t TierManager::capacity_slots(Tier t) const noexcept {
  if (t == Tier::kNvme) return nvme_ ? nvme_->slot_count() : 0;
  const MemoryTier& mt = t == Tier::kHbm ? hbm_ : host_;
  return mt.slots ? mt.slots->capacity() : 0;
}

uint64_t TierManager::used_slots(Tier t) const noexcept {
  if (t == Tier::kNvme) {
    if (!nvme_) return 0;
    auto s = nvme_->stats();
    return s.slots - s.free_slots;
  }
  const MemoryTier& mt = t == Tier::kHbm ? hbm_ : host_;
  return mt.slots ? mt.slots->used() : 0;
}

Result<SlotId> TierManager::allocate_slot(Tier t) {
  const uint64_t cap = capacity_slots(t);
  const uint64_t low = low_mark(t);
  const bool background = reclaimer_ != nullptr;  // background_reclaim, once open
  if (above_high(t)) {
    if (background) {
      reclaimer_->kick();  // down to the low watermark while this save goes on
    } else {
      reclaim(t, low).ignore();  // best effort
    }
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    Result<SlotId> s = t == Tier::kNvme ? nvme_->allocate() : memory_tier(t)->slots->allocate();
    if (s || s.status().code() != StatusCode::kResourceExhausted || attempt == 1) return s;
    // Full: the background reclaimer fell behind (or is off). Reclaim here, a whole round, so
    // write-back still goes in batches; a round the reclaimer is running is waited for.
    Status r = reclaim(t, background ? low : (cap ? cap - 1 : 0));
    if (!r) return r;
  }
  return internal_error("unreachable");
}

void TierManager::free_slot(Tier t, SlotId slot) {
  if (t == Tier::kNvme) return;  // NVMe slots are freed by NvmeTier::erase (catalog first)
  memory_tier(t)->slots->free(slot).ignore();  // a double free is a bug the allocator reports
}

Location TierManager::block_location(const BlockResidency& where, Tier t) {
  const SlotId slot = where.slot(t);
  if (t == Tier::kNvme) {
    return Location::storage(nvme_->location(slot).device, nvme_->location(slot).payload_offset);
  }
  std::byte* p = memory_tier(t)->arena->slot_ptr(slot);
  return t == Tier::kHbm ? Location::device_memory(p) : Location::host(p);
}

Result<Namespace> TierManager::add_namespace(const NamespaceSpec& spec, std::string_view tenant) {
  if (!(spec.layout == options_.layout)) {
    return Status(StatusCode::kLayoutMismatch, "namespace layout " + spec.layout.describe() +
                                                   " differs from the store's " + options_.layout.describe());
  }
  auto ns = keys_.make_namespace(spec);
  if (!ns) return ns.status();
  // The first tenant to open a namespace keeps its blocks (tenants with one salt share them);
  // a later one is counted under it, and the record names it again.
  GroupId g = group_of(tenant);
  if (Status s = index_->set_root_group(ns->root, g); !s) {
    if (s.code() != StatusCode::kAlreadyExists) return s;
    g = index_->root_group(ns->root).value_or(kNoGroup);
  }
  // The record's tenant is what counts the namespace's blocks again after a restart, and a block
  // whose namespace has no record is dropped then: every open writes it (the first opener's may
  // have failed). Only a listed tenant's name is kept (in-process, a tenant is named by its salt).
  const NamespaceRecord record{ns->root, ns->layout, spec.model_id,
                               g != kNoGroup ? options_.tenants[g - 1].name : std::string(), spec.adapter_id,
                               spec.revision};
  if (nvme_) KVTIER_RETURN_IF_ERROR(nvme_->put_namespace(record));
  std::lock_guard lock(counters_->ns_mu);
  counters_->namespaces.insert_or_assign(record.root, record);
  return ns;
}

std::optional<EvictionRecord> TierManager::evicted(const BlockKey& key) const { return counters_->evicted->find(key); }

std::vector<NamespaceRecord> TierManager::namespace_records() const {
  std::lock_guard lock(counters_->ns_mu);
  std::vector<NamespaceRecord> out;
  out.reserve(counters_->namespaces.size());
  for (const auto& [root, r] : counters_->namespaces) out.push_back(r);
  return out;
}

void TierManager::for_each_nvme_block(const std::function<void(const CatalogEntry&)>& fn) const {
  if (nvme_) nvme_->for_each(fn);
}

Status TierManager::copy_block(std::byte* dst, bool dst_is_device, const std::byte* src, bool src_is_device) {
  if (!dst_is_device && !src_is_device) {
    std::memcpy(dst, src, block_bytes_);
    return Status::ok();
  }
  JobSpec job;
  job.segments.push_back({.layer = 0, .bytes = block_bytes_,
                          .src = src_is_device ? Location::device_memory(src) : Location::host(src),
                          .dst = dst_is_device ? Location::device_memory(dst) : Location::host(dst)});
  auto h = engine_->submit(std::move(job));
  return h ? h->wait() : h.status();
}

TierManagerStats TierManager::stats() const {
  TierManagerStats s;
  for (Tier t : kAllTiers) {
    const int i = static_cast<int>(t);
    s.tiers[i].capacity_slots = capacity_slots(t);
    s.tiers[i].used_slots = used_slots(t);
    s.tiers[i].demotions_out = counters_->demotions_out[i]->value();
    s.tiers[i].promotions_in = counters_->promotions_in[i]->value();
    s.tiers[i].drops = counters_->drops[i]->value();
  }
  const Counters& c = *counters_;
  s.saved_blocks = c.saved.value();
  s.skipped_blocks = c.skipped.value();
  s.loaded_blocks = c.loaded.value();
  s.write_through_blocks = c.write_through.value();
  s.recovered_blocks = c.recovered.value();
  s.recovery_dropped = c.recovery_dropped.value();
  s.orphans = static_cast<uint64_t>(c.orphan_count.value());
  s.orphans_adopted = c.orphans_adopted.value();
  s.orphans_dropped = c.orphans_dropped.value();
  s.ancestor_writes = c.ancestor_writes.value();
  s.errors = c.errors.value();
  s.corrupt_blocks_found = c.corrupt_found;
  s.blocks_repaired = c.repaired.value();
  s.over_share_demotions = c.over_share_demotions;
  s.nvme_admitted = c.nvme_admitted.value();
  s.nvme_refused = c.nvme_refused.value();
  s.nvme_blocks_written = c.nvme_written_bytes.value() / block_bytes_;
  s.restore_offered_tokens = c.offered_tokens.value();
  s.restore_held_back_tokens = c.held_back_tokens.value();
  s.restore_seconds_saved = double(c.saved_ns.load()) * 1e-9;
  s.restore_probes = c.probes.value();
  for (Tier t : kAllTiers) s.restore_bytes_per_second[static_cast<int>(t)] = restore_->bytes_per_second(t);
  s.background_rounds = c.background_rounds.value();
  s.foreground_rounds = c.foreground_rounds.value();
  if (nvme_) s.nvme = nvme_->stats();
  s.transfer = engine_->stats();
  s.tenants.reserve(options_.tenants.size());
  for (size_t i = 0; i < options_.tenants.size(); ++i) {
    TenantResidency& r = s.tenants.emplace_back();
    r.name = options_.tenants[i].name;
    for (Tier t : kAllTiers) {
      r.resident_blocks[static_cast<int>(t)] = index_->group_resident(static_cast<GroupId>(i + 1), t);
      r.share_blocks[static_cast<int>(t)] = index_->group_limit(static_cast<GroupId>(i + 1), t);
    }
  }
  return s;
}

}  // namespace kvtier
