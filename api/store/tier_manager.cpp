#include "api/store/tier_manager.h"

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
  // The background reclaimer (TierManagerOptions::background_reclaim).
  std::mutex bg_mu;
  std::condition_variable bg_cv;  // kicks, stop, and the end of a pass (wait_reclaim_idle)
  bool bg_kicked = false, bg_busy = false;
  std::atomic<bool> bg_stop{false};
  std::thread bg_thread;
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
};

namespace {

uint64_t wall_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

Status check_tenants(const std::vector<TenantShare>& tenants) {
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

Status check_limits(const TierLimits& l, const char* name) {
  if (!(l.low_watermark > 0 && l.low_watermark <= l.high_watermark && l.high_watermark <= 1.0)) {
    return invalid_argument(std::string(name) + " watermarks must satisfy 0 < low <= high <= 1");
  }
  return Status::ok();
}

/// The next tier down that exists, or nullopt. The host tier always exists.
std::optional<Tier> lower_of(Tier t, bool nvme) {
  if (t == Tier::kHbm) return Tier::kHost;
  if (t != Tier::kNvme && nvme) return Tier::kNvme;
  return std::nullopt;
}

/// The index insert of a block committed on NVMe, as its catalog entry describes it.
BlockInsert nvme_insert(const CatalogEntry& e, const BlockKey& parent) {
  return {.key = e.key, .parent = parent, .block_index = e.block_index, .tokens = e.tokens, .extras = e.extras,
          .byte_size = e.payload_bytes, .checksum = e.checksum, .tier = Tier::kNvme, .slot = e.slot,
          .priority = e.priority};
}

const TierLimits& limits_of(const TierManagerOptions& o, Tier t) {
  return t == Tier::kHbm ? o.hbm : t == Tier::kHost ? o.host : o.nvme_limits;
}

}  // namespace

TierManager::TierManager(const KeyChain& keys, TierManagerOptions options)
    : keys_(keys), options_(std::move(options)), counters_(std::make_unique<Counters>()) {}

TierManager::~TierManager() { close(); }

void TierManager::close() {
  {
    std::lock_guard lock(counters_->bg_mu);
    counters_->bg_stop = true;  // a running pass ends after its current round
  }
  counters_->bg_cv.notify_all();
  if (counters_->bg_thread.joinable()) counters_->bg_thread.join();
  if (engine_) engine_->shutdown();
}

bool TierManager::above_high(Tier t) const noexcept {
  const uint64_t cap = capacity_slots(t);
  const auto high = static_cast<uint64_t>(limits_of(options_, t).high_watermark * static_cast<double>(cap));
  return cap > 0 && used_slots(t) + 1 > std::max<uint64_t>(high, 1);
}

uint64_t TierManager::low_mark(Tier t) const noexcept {
  return static_cast<uint64_t>(limits_of(options_, t).low_watermark * static_cast<double>(capacity_slots(t)));
}

void TierManager::kick_reclaimer() {
  {
    std::lock_guard lock(counters_->bg_mu);
    counters_->bg_kicked = true;
  }
  counters_->bg_cv.notify_all();
}

void TierManager::wait_reclaim_idle() {
  std::unique_lock lock(counters_->bg_mu);
  counters_->bg_cv.wait(lock, [&] {
    return !options_.background_reclaim || counters_->bg_stop || (!counters_->bg_kicked && !counters_->bg_busy);
  });
}

void TierManager::reclaimer_loop() {
  Counters& c = *counters_;
  std::unique_lock lock(c.bg_mu);
  for (;;) {
    c.bg_cv.wait(lock, [&] { return c.bg_kicked || c.bg_stop; });
    if (c.bg_stop) break;
    c.bg_kicked = false;
    c.bg_busy = true;
    lock.unlock();
    // Top down: HBM's demotions land in the host tier, whose write-back lands on NVMe.
    for (Tier t : kAllTiers) {
      if (!has_tier(t) || !above_high(t)) continue;
      if (Status s = reclaim(t, low_mark(t), &c.bg_stop); !s) {
        // Everything pinned, or a failing disk: the next save that needs room reports it.
        spdlog::debug("background reclaim of the {} tier: {}", tier_name(t), s.to_string());
      }
    }
    lock.lock();
    c.bg_busy = false;
    c.bg_cv.notify_all();
  }
}

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
  if (m->options_.background_reclaim) {
    m->counters_->bg_thread = std::thread([tm = m.get()] { tm->reclaimer_loop(); });
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
      counters_->orphan_count++;
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
      counters_->recovered++;
    } else {
      counters_->recovery_dropped++;
      nvme_->erase(e.key).ignore();  // unreachable: give the slot back
    }
  }
  if (!entries.empty()) {
    spdlog::info("kvtier: recovered {} blocks from NVMe ({} kept whose parent is missing, {} without a namespace dropped)",
                 counters_->recovered.load(), counters_->orphan_count.load(), counters_->recovery_dropped.load());
  }
  return Status::ok();
}

size_t TierManager::adopt_orphans(const Namespace& ns, const BlockKey& parent) {
  if (counters_->orphan_count.load(std::memory_order_relaxed) == 0) return 0;
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
      counters_->orphan_count -= children.size();
    }
    for (const CatalogEntry& e : children) {
      // The index checks the key against parent, tokens and extras: an orphan that does not
      // chain from this parent is refused (and erased) rather than matched.
      auto r = index_->insert(ns, nvme_insert(e, e.parent));
      if (r) {
        // kAddedResidency: the block was saved again in memory meanwhile; this copy joins it.
        ++adopted;
        counters_->orphans_adopted++;
        parents.push_back(e.key);
      } else {
        spdlog::warn("kvtier: orphan block {} not indexed: {}", e.key.to_hex(), r.status().to_string());
        nvme_->erase(e.key).ignore();
        counters_->orphans_dropped++;
      }
    }
  }
  return adopted;
}

size_t TierManager::drop_orphans(size_t n) {
  if (!nvme_ || counters_->orphan_count.load(std::memory_order_relaxed) == 0) return 0;
  std::vector<BlockKey> victims;
  {
    std::lock_guard lock(counters_->orphan_mu);
    for (auto it = counters_->orphans.begin(); it != counters_->orphans.end() && victims.size() < n;) {
      victims.push_back(it->second.key);
      it = counters_->orphans.erase(it);
    }
    counters_->orphan_count -= victims.size();
  }
  size_t dropped = 0;
  for (const BlockKey& k : victims) {
    if (nvme_->erase(k).is_ok()) ++dropped;  // catalog first, then the slot
    counters_->orphans_dropped++;
  }
  return dropped;
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
  const bool background = options_.background_reclaim;
  if (above_high(t)) {
    if (background) {
      kick_reclaimer();  // down to the low watermark while this save goes on
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

Status TierManager::reclaim(Tier t, uint64_t target_used, const std::atomic<bool>* stop) {
  const std::optional<Tier> lower = lower_of(t, nvme_ != nullptr);
  for (;;) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) return Status::ok();
    std::lock_guard lock(counters_->reclaim_mu[static_cast<int>(t)]);
    if (used_slots(t) <= target_used) return Status::ok();
    // Orphans kept at open go first: no prefix reaches them until their parent is saved again.
    if (t == Tier::kNvme && drop_orphans(std::min<uint64_t>(used_slots(t) - target_used, 64)) > 0) continue;
    (stop != nullptr ? counters_->background_rounds : counters_->foreground_rounds)++;
    const size_t batch = std::min<uint64_t>(used_slots(t) - target_used, 64);
    size_t progressed = 0, failed = 0;
    bool raced = false;  // a victim was pinned between the pick and its move
    auto count = [&](const Status& moved) {
      if (moved.is_ok()) {
        ++progressed;
      } else if (moved.code() == StatusCode::kBusy) {
        raced = true;
      } else if (moved.code() != StatusCode::kNotFound) {  // not merely gone meanwhile
        ++failed;
      }
    };
    std::vector<uint8_t> over_share;  // per victim: chosen first for its tenant's tier share
    auto count_over = [&](size_t v, const Status& moved) {
      if (moved.is_ok() && over_share[v]) counters_->over_share_demotions++;
      count(moved);
    };
    if (lower == Tier::kNvme) {
      // Write-back: every victim's write in flight at once and one commit for all of them.
      const std::vector<BlockKey> victims = index_->pick_victims(t, batch, EvictPurpose::kDemote, &over_share);
      const std::vector<Status> stored = store_batch_to_nvme(victims);
      for (size_t v = 0; v < victims.size(); ++v) count_over(v, stored[v] ? drop_residency(victims[v], t) : stored[v]);
    } else if (lower) {
      const std::vector<BlockKey> victims = index_->pick_victims(t, batch, EvictPurpose::kDemote, &over_share);
      for (size_t v = 0; v < victims.size(); ++v) count_over(v, demote_block(victims[v], t));
    }
    // Drop, leaves first, only when there is no lower tier or it failed to take the victims
    // (full, failing disk). Not when the victims were merely pinned at the pick or pinned
    // meanwhile (a save extending them, a load, a flush): a block unpinned a moment later would
    // be dropped though the lower tier could take it — maybe its only copy.
    if (progressed == 0 && (!lower || failed > 0)) {
      for (const EvictedBlock& e : index_->evict(t, batch)) {
        if (t == Tier::kNvme) {
          nvme_->erase(e.key).ignore();  // already out of the index; a failure leaves a catalog orphan
        } else {
          free_slot(t, e.slot);
        }
        if (e.left_index) {
          std::lock_guard dl(counters_->dirty_mu);
          counters_->dirty.erase(e.key);
        }
        counters_->drops[static_cast<int>(t)]++;
        ++progressed;
      }
    }
    if (progressed == 0) {
      return Status(StatusCode::kResourceExhausted,
                    std::string(tier_name(t)) + (raced ? " tier is full and its victims are pinned right now"
                                                       : " tier is full and every resident block is pinned"));
    }
  }
}

Status TierManager::demote_block(const BlockKey& key, Tier from) {
  const std::optional<Tier> lower = lower_of(from, nvme_ != nullptr);
  if (!lower || *lower == Tier::kNvme) {
    return invalid_argument("no memory tier below " + std::string(tier_name(from)) +
                            " (write-back to NVMe goes through store_batch_to_nvme)");
  }
  auto where = index_->get(key);
  if (!where) return not_found("block left the index");
  if (!where->resident_in(*lower)) {
    auto slot = copy_into_memory_tier(*where, *lower);
    if (!slot) return slot.status();
    if (Status s = index_->add_residency(key, *lower, *slot); !s) {
      free_slot(*lower, *slot);
      return s;
    }
  }
  return drop_residency(key, from);
}

Status TierManager::drop_residency(const BlockKey& key, Tier from) {
  auto removed = index_->remove_residency(key, from);
  if (!removed) return removed.status();  // pinned meanwhile: both copies stay
  free_slot(from, removed->slot);
  counters_->demotions_out[static_cast<int>(from)]++;
  return Status::ok();
}

Result<CatalogEntry> TierManager::write_to_nvme(const CatalogEntry& entry, const std::byte* src,
                                                bool src_is_device, bool src_may_change, bool replace) {
  if (!nvme_) return Status(StatusCode::kUnavailable, "no NVMe tier");
  auto slot = allocate_slot(Tier::kNvme);
  if (!slot) return slot.status();
  Result<CatalogEntry> written = Status(StatusCode::kInternal, "not written");
  const bool aligned = reinterpret_cast<uintptr_t>(src) % kIoAlignment == 0;
  if (!src_is_device && aligned && !src_may_change) {
    // Aligned host bytes (an arena slot): the engine writes them straight from there.
    const SlotLocation loc = nvme_->location(*slot);
    JobSpec job;
    job.segments.push_back({.layer = 0, .bytes = block_bytes_, .src = Location::host(src),
                            .dst = Location::storage(loc.device, loc.payload_offset)});
    auto handle = engine_->submit(std::move(job));
    Status s = handle ? handle->wait() : handle.status();
    written = s ? nvme_->write_header(*slot, entry, std::span<const std::byte>(src, block_bytes_))
                : Result<CatalogEntry>(s);
  } else {
    // CUDA HBM, a caller's unaligned buffer, or bytes a client may change meanwhile (its shared
    // window): a private aligned host copy first, which both the write and the header's
    // checksums read (they are computed in host memory; O_DIRECT needs the alignment).
    AlignedBuffer tmp = make_aligned_buffer(align_up(block_bytes_, kIoAlignment));
    Status s;
    if (src_is_device) {
      JobSpec job;
      job.segments.push_back({.layer = 0, .bytes = block_bytes_, .src = Location::device_memory(src),
                              .dst = Location::host(tmp.get())});
      auto handle = engine_->submit(std::move(job));
      s = handle ? handle->wait() : handle.status();
    } else {
      std::memcpy(tmp.get(), src, block_bytes_);
    }
    written = s ? nvme_->write_block(*slot, entry, std::span<const std::byte>(tmp.get(), block_bytes_))
                : Result<CatalogEntry>(s);
  }
  Status s = !written ? written.status() : replace ? nvme_->replace(*written) : nvme_->commit(*written);
  if (!s) {
    nvme_->release_uncommitted(*slot).ignore();
    counters_->errors++;
    return s;
  }
  return written;
}

CatalogEntry TierManager::catalog_entry(const BlockKey& key, const BlockKey& parent, uint32_t block_index,
                                        std::span<const TokenId> tokens, std::span<const BlockKey> extras,
                                        Priority priority) {
  CatalogEntry entry;
  entry.key = key;
  entry.parent = parent;
  entry.ns_root = block_index == 0 ? parent : BlockKey{};
  entry.block_index = block_index;
  entry.tokens.assign(tokens.begin(), tokens.end());
  entry.extras.assign(extras.begin(), extras.end());
  entry.priority = priority;
  entry.created_ns = entry.last_access_ns = wall_ns();
  return entry;
}

std::vector<BlockKey> TierManager::with_ancestors(std::span<const BlockKey> keys) const {
  std::unordered_set<BlockKey> seen;
  std::vector<std::pair<uint32_t, BlockKey>> chain;
  for (const BlockKey& key : keys) {
    BlockKey k = key;
    // Up to the first ancestor on NVMe (included: it is pinned while its children are written,
    // so NVMe reclaim cannot take it from under them) or the chain's first block.
    while (seen.insert(k).second) {
      auto rec = index_->describe(k);
      if (!rec) break;  // left the index: its children fail their parent check
      chain.emplace_back(rec->block_index, k);
      if (rec->block_index == 0 || rec->residency.resident_in(Tier::kNvme)) break;
      k = rec->parent;
    }
  }
  // Parents before children: along a chain the block index grows by one per block.
  std::stable_sort(chain.begin(), chain.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<BlockKey> out;
  out.reserve(chain.size());
  for (const auto& [index, k] : chain) out.push_back(k);
  return out;
}

std::vector<Status> TierManager::store_batch_to_nvme(std::span<const BlockKey> keys) {
  std::vector<Status> result(keys.size(), Status::ok());
  if (!nvme_) {
    std::fill(result.begin(), result.end(), Status(StatusCode::kUnavailable, "no NVMe tier"));
    return result;
  }
  std::lock_guard writeback(counters_->writeback_mu);
  const std::vector<BlockKey> all = with_ancestors(keys);
  // Pinned for the whole call: nothing may free a memory copy while its write is in flight, and
  // an ancestor committed by one round must still be on NVMe when a later round commits its
  // children (an unpinned one with no NVMe child yet could be reclaimed in between).
  std::vector<BlockKey> pinned;
  std::unordered_map<BlockKey, Status> by_key;
  std::unordered_set<BlockKey> written_now;
  pinned.reserve(all.size());
  for (const BlockKey& k : all) {
    if (Status p = index_->pin(k); !p) {
      by_key.emplace(k, p);
    } else {
      pinned.push_back(k);
    }
  }
  // Rounds in block order: a round's parents are committed by an earlier round or in its own
  // batch (one catalog write, all or nothing).
  constexpr size_t kRound = 256;
  for (size_t first = 0; first < pinned.size(); first += kRound) {
    store_round_to_nvme(std::span(pinned).subspan(first, std::min(kRound, pinned.size() - first)), by_key,
                        written_now);
  }
  for (const BlockKey& k : pinned) index_->unpin(k).ignore();
  const std::unordered_set<BlockKey> asked(keys.begin(), keys.end());
  for (const BlockKey& k : written_now) {
    if (!asked.contains(k)) counters_->ancestor_writes++;
  }
  for (size_t i = 0; i < keys.size(); ++i) {
    auto it = by_key.find(keys[i]);
    result[i] = it == by_key.end() ? not_found("block left the index") : it->second;
  }
  return result;
}

void TierManager::store_round_to_nvme(std::span<const BlockKey> keys, std::unordered_map<BlockKey, Status>& result,
                                      std::unordered_set<BlockKey>& written_now) {
  struct Pending {
    BlockKey key;
    SlotId slot;
    AlignedBuffer copy;  // a private host copy (HBM or unaligned source), else null
    CatalogEntry entry;  // as write_header returned it
    TransferHandle handle;
    Status header_status;
  };
  std::vector<Pending> pending;
  const MemoryArena& host = *memory_tier(Tier::kHost)->arena;
  for (const BlockKey& key : keys) {
    auto rec = index_->describe(key);
    if (!rec) {
      result.insert_or_assign(key, not_found("block left the index"));
      continue;
    }
    if (rec->residency.resident_in(Tier::kNvme)) {  // stored already
      result.insert_or_assign(key, Status::ok());
      continue;
    }
    const BlockResidency& where = rec->residency;
    AlignedBuffer copy;
    const std::byte* src = where.resident_in(Tier::kHost) ? host.slot_ptr(where.slot(Tier::kHost)) : nullptr;
    if (src == nullptr || reinterpret_cast<uintptr_t>(src) % kIoAlignment != 0) {
      // HBM only (or an unaligned host slot): through a private aligned host copy, which both
      // the write and the header's checksums read.
      const Tier from = src != nullptr ? Tier::kHost : Tier::kHbm;
      if (!where.resident_in(from)) {
        result.insert_or_assign(key, not_found("block is in no memory tier"));
        continue;
      }
      const MemoryArena& arena = *memory_tier(from)->arena;
      copy = make_aligned_buffer(align_up(block_bytes_, kIoAlignment));
      if (Status s = copy_block(copy.get(), false, arena.slot_ptr(where.slot(from)), arena.is_device_memory()); !s) {
        counters_->errors++;
        result.insert_or_assign(key, s);
        continue;
      }
      src = copy.get();
    }
    auto slot = allocate_slot(Tier::kNvme);
    if (!slot) {
      result.insert_or_assign(key, slot.status());
      continue;
    }
    const SlotLocation loc = nvme_->location(*slot);
    JobSpec job;
    job.segments.push_back({.layer = 0, .bytes = block_bytes_, .src = Location::host(src),
                            .dst = Location::storage(loc.device, loc.payload_offset)});
    auto handle = engine_->submit(std::move(job));  // every write in flight at once
    if (!handle) {
      nvme_->release_uncommitted(*slot).ignore();
      counters_->errors++;
      result.insert_or_assign(key, handle.status());
      continue;
    }
    // The header (checksums of the source, then one 4 KiB write) while the payload write is in
    // flight: the CPU work overlaps the disk. Both are flushed before the commit, so their order
    // does not matter for crash safety.
    Result<CatalogEntry> header = nvme_->write_header(
        *slot, catalog_entry(key, rec->parent, rec->block_index, rec->tokens, rec->extras, where.priority),
        std::span<const std::byte>(src, block_bytes_));
    pending.push_back({key, *slot, std::move(copy),
                       header ? std::move(*header) : CatalogEntry{}, std::move(*handle), header.status()});
  }
  // Which written blocks may be committed: a parent on NVMe already, or committed in this batch
  // (pending is in block order, so a parent is decided before its children).
  std::unordered_set<BlockKey> in_batch;
  std::vector<CatalogEntry> written;
  std::vector<size_t> written_of;  // index into pending
  auto refuse = [&](Pending& w, Status why) {
    nvme_->release_uncommitted(w.slot).ignore();
    result.insert_or_assign(w.key, std::move(why));
  };
  for (size_t p = 0; p < pending.size(); ++p) {
    Pending& w = pending[p];
    Status s = w.handle.wait();
    if (s) s = w.header_status;
    if (!s) {
      counters_->errors++;
      refuse(w, s);
      continue;
    }
    if (w.entry.block_index > 0 && !in_batch.contains(w.entry.parent)) {
      auto parent = index_->get(w.entry.parent);
      if (!parent || !parent->resident_in(Tier::kNvme)) {
        // Its parent could not be stored: committing it would leave a block on NVMe that no
        // prefix reaches after a restart. It stays in memory, dirty, for a later write-back.
        auto why = result.find(w.entry.parent);
        refuse(w, why != result.end() && !why->second.is_ok()
                      ? why->second
                      : Status(StatusCode::kUnavailable, "its parent is not on NVMe"));
        continue;
      }
    }
    in_batch.insert(w.key);
    written.push_back(std::move(w.entry));
    written_of.push_back(p);
  }
  const std::vector<Status> committed = nvme_->commit_batch(written);
  for (size_t c = 0; c < written.size(); ++c) {
    Pending& w = pending[written_of[c]];
    if (!committed[c]) {
      counters_->errors++;
      refuse(w, committed[c]);
      continue;
    }
    Status indexed = index_nvme_copy(w.key, w.slot);
    if (indexed) written_now.insert(w.key);
    result.insert_or_assign(w.key, std::move(indexed));
  }
}

Status TierManager::index_nvme_copy(const BlockKey& key, SlotId slot) {
  if (Status a = index_->add_residency(key, Tier::kNvme, slot); !a) {
    nvme_->erase(key).ignore();  // the block left the index meanwhile (or was stored twice)
    return a.code() == StatusCode::kAlreadyExists ? Status::ok() : a;
  }
  std::lock_guard dl(counters_->dirty_mu);
  counters_->dirty.erase(key);
  return Status::ok();
}

Segment TierManager::copy_segment(const BlockResidency& where, Tier to, SlotId slot) {
  Tier src_tier = Tier::kNvme;  // the fastest tier holding the block, other than `to`
  for (Tier t : kAllTiers) {
    if (t != to && where.resident_in(t)) {
      src_tier = t;
      break;
    }
  }
  std::byte* dst = memory_tier(to)->arena->slot_ptr(slot);
  Segment seg{.layer = 0, .bytes = block_bytes_, .src = block_location(where, src_tier),
              .dst = to == Tier::kHbm ? Location::device_memory(dst) : Location::host(dst)};
  if (src_tier == Tier::kNvme) {  // storage is not trusted: verify on the way in
    seg.verify = true;
    seg.expected_xxh3_64 = where.checksum;
  }
  return seg;
}

Result<SlotId> TierManager::copy_into_memory_tier(const BlockResidency& from, Tier to) {
  auto slot = allocate_slot(to);
  if (!slot) return slot.status();
  JobSpec job;
  job.segments.push_back(copy_segment(from, to, *slot));
  auto handle = engine_->submit(std::move(job));
  Status s = handle ? handle->wait() : handle.status();
  if (!s) {
    free_slot(to, *slot);
    counters_->errors++;
    return s;
  }
  return *slot;
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
  if (nvme_) {
    KVTIER_RETURN_IF_ERROR(nvme_->put_namespace(
        {ns->root, ns->layout, spec.model_id, g != kNoGroup ? options_.tenants[g - 1].name : std::string()}));
  }
  return ns;
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

Result<size_t> TierManager::save(const Namespace& ns, std::span<const TokenId> tokens,
                                 std::span<const std::byte> kv, Tier tier, Priority priority,
                                 std::span<const BlockExtra> extras, size_t first_block) {
  const size_t full = tokens.size() / ns.block_tokens();
  // A first_block past the prompt is save_blocks' error to report; give it no blocks then.
  const size_t count = first_block <= full ? full - first_block : 0;
  if (kv.size() < count * block_bytes_) {
    return invalid_argument("kv holds " + std::to_string(kv.size()) + " bytes; " +
                            std::to_string(count) + " full blocks need " + std::to_string(count * block_bytes_));
  }
  std::vector<const std::byte*> blocks(count);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = kv.data() + i * block_bytes_;
  return save_blocks(ns, tokens, blocks, LocationKind::kHost, tier, priority, extras, first_block);
}

Result<size_t> TierManager::save_blocks(const Namespace& ns, std::span<const TokenId> tokens,
                                        std::span<const std::byte* const> blocks, LocationKind src_kind, Tier tier,
                                        Priority priority, std::span<const BlockExtra> extras, size_t first_block) {
  if (!(ns.layout == options_.layout)) {
    return Status(StatusCode::kLayoutMismatch, "namespace layout differs from the store's");
  }
  if (tier == Tier::kNvme || !memory_tier(tier)) {
    return invalid_argument("save goes to the host or HBM tier; " + std::string(tier_name(tier)) +
                            " is not a memory tier here");
  }
  std::vector<BlockKey> keys;
  KVTIER_RETURN_IF_ERROR(keys_.chain(ns, tokens, extras, keys));
  if (first_block > keys.size()) {
    return invalid_argument("first_block " + std::to_string(first_block) + " is past the prompt's " +
                            std::to_string(keys.size()) + " full blocks");
  }
  if (blocks.size() != keys.size() - first_block) {
    return invalid_argument("save: " + std::to_string(blocks.size()) + " blocks given; blocks " +
                            std::to_string(first_block) + ".." + std::to_string(keys.size()) + " of the prompt need " +
                            std::to_string(keys.size() - first_block));
  }
  if (src_kind == LocationKind::kStorage) return invalid_argument("save sources are memory");
  const bool src_on_device = src_kind == LocationKind::kDevice;
  // A device block whose bytes the host must checksum is read into this host block once.
  std::unique_ptr<std::byte[]> bounce;
  auto read_to_bounce = [&](const std::byte* device_block) -> Status {
    if (!bounce) bounce = std::make_unique<std::byte[]>(block_bytes_);
    return copy_block(bounce.get(), false, device_block, true);
  };
  const uint32_t bt = ns.block_tokens();
  size_t extra_pos = 0;
  size_t saved = 0;
  // Only the previous block stays pinned: it is the parent the next insert needs. Earlier blocks
  // of this prompt may be demoted meanwhile, so a prompt larger than the tier still fits.
  std::optional<BlockKey> pinned;
  auto pin_only = [&](const BlockKey& k) {
    if (pinned) index_->unpin(*pinned).ignore();
    pinned = k;
  };
  MemoryArena& arena = *memory_tier(tier)->arena;
  Status failure;
  // Write-through goes in batches like write-back: the blocks of up to 64 saves written together
  // and made visible by one commit (one flush per slot file, one synced catalog write), not two
  // syncs per block. Every block is on NVMe before save returns.
  constexpr size_t kWriteThroughBatch = 64;
  const bool write_through = options_.write_policy == WritePolicy::kWriteThrough && nvme_ != nullptr;
  std::vector<BlockKey> through;
  auto store_through = [&]() -> Status {
    const std::vector<Status> stored = store_batch_to_nvme(through);
    Status first_error;
    for (const Status& st : stored) {
      if (st.is_ok()) {
        counters_->write_through++;
      } else if (first_error.is_ok()) {
        first_error = st;
      }
    }
    through.clear();
    return first_error;
  };
  for (size_t b = 0; b < keys.size(); ++b) {
    std::vector<BlockKey> block_extras;
    while (extra_pos < extras.size() && extras[extra_pos].block_index == b) {
      block_extras.push_back(extras[extra_pos++].item_hash);
    }
    const BlockKey parent = b ? keys[b - 1] : ns.root;
    const auto block_tokens = tokens.subspan(b * bt, bt);
    if (index_->pin(keys[b]).is_ok()) {  // cached already
      pin_only(keys[b]);
      if (b < first_block) continue;
      // Unless its only copy was found corrupt: then these bytes replace it.
      auto repaired = index_->damaged_count() == 0
                          ? Result<bool>(false)
                          : repair(keys[b], [&] {
                              return catalog_entry(keys[b], parent, static_cast<uint32_t>(b), block_tokens,
                                                   block_extras, priority);
                            }, blocks[b - first_block], src_on_device);
      if (repaired && *repaired) {
        ++saved;
        counters_->saved++;
      } else {
        // A failed repair (NVMe full, a write error) leaves the block damaged for a later save;
        // the rest of this save goes on.
        if (!repaired) {
          counters_->errors++;
          spdlog::warn("kvtier: repair of block {} failed: {}", keys[b].to_hex(), repaired.status().to_string());
        }
        counters_->skipped++;
      }
      continue;
    }
    if (b < first_block) {
      failure = invalid_argument("block " + std::to_string(b) + " is before first_block " +
                                 std::to_string(first_block) + " but not cached: save the prompt from there");
      break;
    }
    const std::byte* src = blocks[b - first_block];
    BlockInsert ins{.key = keys[b],
                    .parent = parent,
                    .block_index = static_cast<uint32_t>(b),
                    .tokens = block_tokens,
                    .extras = block_extras,
                    .byte_size = block_bytes_,
                    .checksum = 0,  // set from the bytes as stored, below
                    .tier = tier,
                    .priority = priority,
                    // Pinned as it goes in: the background reclaimer must not evict the new leaf
                    // before the next block's insert needs it as a parent.
                    .pin = true};
    auto slot = allocate_slot(tier);
    bool on_nvme = false;
    if (!slot && slot.status().code() == StatusCode::kResourceExhausted && nvme_) {
      // The memory tier holds nothing it may give up (pinned, or parents of resident blocks):
      // the block goes straight to NVMe instead of failing the save. write_to_nvme copies it
      // into a private host block first (a device block by one DMA); the write and the
      // checksum recorded both come from that copy.
      // Its parent first (pinned: the previous block), so NVMe stays prefix-closed.
      const Status parent_stored = b == 0 ? Status::ok() : store_batch_to_nvme(std::span(&parent, 1))[0];
      auto written = !parent_stored ? Result<CatalogEntry>(parent_stored)
                                    : write_to_nvme(catalog_entry(keys[b], parent, ins.block_index, block_tokens,
                                                                  block_extras, priority),
                                                    src, src_on_device, /*src_may_change=*/true);
      if (written) {
        slot = written->slot;
        ins.checksum = written->checksum;
      } else {
        slot = written.status();
      }
      on_nvme = true;
      ins.tier = Tier::kNvme;
    }
    if (!slot) {
      failure = slot.status();
      break;
    }
    ins.slot = *slot;
    if (!on_nvme) {
      if (Status s = copy_block(arena.slot_ptr(*slot), arena.is_device_memory(), src, src_on_device); !s) {
        free_slot(tier, *slot);
        failure = s;
        break;
      }
      // The checksum of the copy the tier holds, not of `src`: a daemon client can change its
      // shared window while it is read, and a checksum of other bytes would fail every later load.
      const bool stored_in_host = !arena.is_device_memory();
      if (!stored_in_host && src_on_device) {
        // Device to HBM: the bytes are nowhere on the host. Read the stored copy back once.
        if (Status s = read_to_bounce(arena.slot_ptr(*slot)); !s) {
          free_slot(tier, *slot);
          failure = s;
          break;
        }
        src = bounce.get();
      }
      ins.checksum = XXH3_64bits(stored_in_host ? arena.slot_ptr(*slot) : src, block_bytes_);
    }
    auto release_slot = [&] {
      if (on_nvme) nvme_->erase(keys[b]).ignore();
      else free_slot(tier, *slot);
    };
    auto r = index_->insert(ns, ins);
    if (!r) {
      release_slot();
      if (r.status().code() == StatusCode::kAlreadyExists && index_->pin(keys[b]).is_ok()) {
        pin_only(keys[b]);  // another saver won the race: same bytes, keep theirs
        counters_->skipped++;
        continue;
      }
      failure = r.status();
      break;
    }
    pin_only(keys[b]);  // the insert took the pin
    ++saved;
    counters_->saved++;
    adopt_orphans(ns, keys[b]);  // blocks kept at open below it match again (the next ones skip)
    if (on_nvme) continue;
    {
      // Dirty until on NVMe; under write-through that is by the end of this save, and a block
      // reclaimed before its batch is written back on the way down.
      std::lock_guard dl(counters_->dirty_mu);
      counters_->dirty.insert(keys[b]);
    }
    if (write_through) {
      through.push_back(keys[b]);
      if (through.size() == kWriteThroughBatch && !(failure = store_through()).is_ok()) break;
    }
  }
  if (failure.is_ok() && !through.empty()) failure = store_through();
  if (pinned) index_->unpin(*pinned).ignore();
  // A reclaim pass that ran during the save may have found nothing to move: the save's own pin
  // held the only leaf. Now that it is released, ask again rather than wait for the next save.
  if (options_.background_reclaim && above_high(tier)) kick_reclaimer();
  if (!failure.is_ok()) return failure;
  return saved;
}

size_t TierManager::quarantine(std::span<const BlockKey> suspects) {
  if (!nvme_ || suspects.empty()) return 0;
  std::lock_guard lock(counters_->repair_mu);
  AlignedBuffer buf = make_aligned_buffer(align_up(block_bytes_, kIoAlignment));
  size_t found = 0;
  for (const BlockKey& key : suspects) {
    // Only a block whose NVMe copy is its only one: a copy in memory was checked on its way in,
    // and is what every load reads.
    auto where = index_->get(key);
    if (!where || where->damaged || where->tier_mask != tier_bit(Tier::kNvme)) continue;
    // read_block checks the slot header against the catalog and the payload against its
    // checksum, through the catalog's slot: a copy repaired meanwhile reads good.
    const Status s = nvme_->read_block(key, std::span(buf.get(), block_bytes_));
    if (s.code() != StatusCode::kChecksumMismatch) continue;
    if (auto marked = index_->mark_damaged(key, Tier::kNvme); marked && *marked) {
      ++found;
      counters_->corrupt_found++;
      spdlog::warn("kvtier: block {} is corrupt on NVMe ({}); lookups stop before it until a save of "
                   "its tokens replaces it", key.to_hex(), s.to_string());
    }
  }
  return found;
}

Result<bool> TierManager::repair(const BlockKey& key, const std::function<CatalogEntry()>& entry,
                                 const std::byte* src, bool src_is_device) {
  if (auto where = index_->get(key); !where || !where->damaged) return false;  // most blocks: no lock
  std::lock_guard lock(counters_->repair_mu);
  auto where = index_->get(key);
  if (!where || !where->damaged) return false;
  if (where->tier_mask != tier_bit(Tier::kNvme)) {
    return internal_error("damaged block " + key.to_hex() + " has a copy outside NVMe");
  }
  // A new slot, then the catalog switches to it (the old slot is freed), then the index. The
  // caller's pin keeps the block from being evicted in between; repair_mu keeps a second repair
  // or check out.
  auto written = write_to_nvme(entry(), src, src_is_device, /*src_may_change=*/true, /*replace=*/true);
  if (!written) return written.status();
  auto old = index_->repair(key, Tier::kNvme, written->slot, written->checksum);
  if (!old) return internal_error("repair of " + key.to_hex() + " left the index behind: " + old.status().to_string());
  counters_->repaired++;
  spdlog::info("kvtier: block {} repaired: NVMe slot {} replaces corrupt slot {}", key.to_hex(), written->slot, *old);
  return true;
}

Result<size_t> TierManager::promote(std::span<const BlockKey> keys, Tier to) {
  if (to == Tier::kNvme || !memory_tier(to)) return invalid_argument("promote goes to host or HBM");
  std::vector<BlockKey> pinned;
  std::vector<std::pair<BlockKey, SlotId>> moved;
  std::vector<BlockKey> from_nvme;  // suspects when the job fails its checksum
  JobSpec job;
  Status failure;
  for (const BlockKey& key : keys) {
    if (!index_->pin(key).is_ok()) continue;  // not indexed (any more)
    pinned.push_back(key);
    auto where = index_->get(key);
    if (!where || where->resident_in(to)) continue;
    auto slot = allocate_slot(to);
    if (!slot) {
      failure = slot.status();
      break;
    }
    job.segments.push_back(copy_segment(*where, to, *slot));
    moved.emplace_back(key, *slot);
    if (job.segments.back().verify) from_nvme.push_back(key);
  }
  size_t promoted = 0;
  if (!job.segments.empty()) {
    // One job: NVMe → staging → HBM segments pipeline the disk and the copy engine.
    auto h = engine_->submit(std::move(job));
    Status s = h ? h->wait() : h.status();
    if (!s) {
      counters_->errors++;
      for (auto& [key, slot] : moved) free_slot(to, slot);
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(from_nvme);
      failure = s;
    } else {
      for (auto& [key, slot] : moved) {
        if (index_->add_residency(key, to, slot).is_ok()) {
          ++promoted;
          counters_->promotions_in[static_cast<int>(to)]++;
        } else {
          free_slot(to, slot);
        }
      }
    }
  }
  for (const BlockKey& k : pinned) index_->unpin(k).ignore();
  if (!failure.is_ok()) return failure;
  return promoted;
}

Result<TransferHandle> TierManager::load(const Match& match, std::span<std::byte* const> destinations,
                                         LocationKind dst_kind, TransferCallback callback, LayerRange range) {
  if (match.lease == kNoLease) return invalid_argument("load needs a leased match (MatchOptions::take_lease)");
  if (destinations.size() != match.blocks.size()) {
    return invalid_argument("load: " + std::to_string(destinations.size()) + " destinations for " +
                            std::to_string(match.blocks.size()) + " matched blocks");
  }
  if (dst_kind == LocationKind::kStorage) return invalid_argument("load destinations are memory");
  const uint32_t all_layers = options_.layout.num_layers;
  const uint32_t layers = range.size(all_layers);
  if (layers == 0) {
    return invalid_argument("load: layers [" + std::to_string(range.begin) + ", +" + std::to_string(range.count) +
                            ") are outside the layout's " + std::to_string(all_layers));
  }
  const bool whole_blocks = layers == all_layers;
  const uint64_t layer_bytes = options_.layout.bytes_per_block_layer();
  auto dst_at = [&](size_t b, uint64_t off) {
    return dst_kind == LocationKind::kDevice ? Location::device_memory(destinations[b] + off)
                                             : Location::host(destinations[b] + off);
  };

  // Blocks only on NVMe: restore them into the host tier first (verified), so the layered copy
  // below reads memory. What the host tier cannot take is read whole straight into its
  // destination, or, for a load of some layers only, into a scratch block the layers come from.
  // Either way the read is verified: a block whose checksum fails is never handed to the caller
  // as good (the load fails with kChecksumMismatch, even when the destination is GPU memory).
  std::vector<BlockKey> nvme_only;
  for (const BlockResidency& r : match.blocks) {
    if (!r.resident_in(Tier::kHbm) && !r.resident_in(Tier::kHost)) nvme_only.push_back(r.key);
  }
  if (!nvme_only.empty() && options_.promote_on_hit) promote(nvme_only, Tier::kHost).ignore();

  JobSpec direct;  // whole-block, verified reads for blocks still only on NVMe
  std::vector<BlockKey> direct_keys;
  std::vector<std::pair<size_t, size_t>> from_scratch;  // (block, scratch index): partial loads
  std::vector<std::pair<size_t, Location>> from_memory;  // (block, its slot in HBM or host)
  JobSpec job;
  job.num_layers = layers;
  for (size_t b = 0; b < match.blocks.size(); ++b) {
    auto where = index_->get(match.blocks[b].key);
    if (!where) return not_found("block " + match.blocks[b].key.to_hex() + " left the index (lease expired?)");
    Tier src;
    if (where->resident_in(Tier::kHbm) && (dst_kind == LocationKind::kDevice || !where->resident_in(Tier::kHost))) {
      src = Tier::kHbm;
    } else if (where->resident_in(Tier::kHost)) {
      src = Tier::kHost;
    } else {
      Segment read{.layer = 0, .bytes = block_bytes_, .src = block_location(*where, Tier::kNvme),
                   .verify = true, .expected_xxh3_64 = where->checksum};
      if (whole_blocks) {
        read.dst = dst_at(b, 0);  // into device memory the engine hashes it in staging, in order
      } else {
        from_scratch.emplace_back(b, from_scratch.size());
      }
      direct.segments.push_back(read);
      direct_keys.push_back(match.blocks[b].key);
      continue;
    }
    from_memory.emplace_back(b, block_location(*where, src));
  }
  std::shared_ptr<std::byte[]> scratch;
  if (!from_scratch.empty()) {
    // Page-aligned, so the verified reads go straight from the disk into it.
    const size_t bytes = from_scratch.size() * block_bytes_;
    scratch = std::shared_ptr<std::byte[]>(new (std::align_val_t{4096}) std::byte[bytes],
                                           [](std::byte* p) { ::operator delete[](p, std::align_val_t{4096}); });
    for (size_t k = 0; k < direct.segments.size(); ++k) {  // all of them: none is whole_blocks
      direct.segments[k].dst = Location::host(scratch.get() + k * block_bytes_);
    }
    for (auto [b, k] : from_scratch) from_memory.emplace_back(b, Location::host(scratch.get() + k * block_bytes_));
    // The copies out of the scratch block run in `job`: it lives until the job is final.
    job.callback = [scratch, cb = std::move(callback)](const Status& s) {
      if (cb) cb(s);
    };
  } else {
    job.callback = std::move(callback);
  }
  // Layer-major: the engine issues segments in order, so layer 0 of every block lands first and
  // wait_layer(0) returns after 1/layers of the copy, not at its end.
  for (uint32_t i = 0; i < layers; ++i) {
    for (const auto& [b, base] : from_memory) {
      Location from = base;
      from.ptr += uint64_t(range.begin + i) * layer_bytes;
      job.segments.push_back({.layer = i, .bytes = layer_bytes, .src = from, .dst = dst_at(b, i * layer_bytes)});
    }
  }
  if (!direct.segments.empty()) {
    auto h = engine_->submit(std::move(direct));
    Status s = h ? h->wait() : h.status();
    if (!s) {
      counters_->errors++;
      // Which block: each is read again on its own. A corrupt one is marked so the next lookup
      // stops before it (and the engine's save of those tokens repairs it), instead of every
      // lookup matching it and every load failing on it.
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(direct_keys);
      return s;
    }
  }
  counters_->loaded += match.blocks.size();
  return engine_->submit(std::move(job));
}

Status TierManager::rebalance() {
  for (Tier t : kAllTiers) {
    if (!has_tier(t)) continue;
    const double cap = static_cast<double>(capacity_slots(t));
    if (static_cast<double>(used_slots(t)) > limits_of(options_, t).high_watermark * cap) {
      KVTIER_RETURN_IF_ERROR(reclaim(t, low_mark(t)));
    }
  }
  return Status::ok();
}

Result<size_t> TierManager::flush() {
  if (!nvme_) return size_t{0};
  std::vector<std::pair<uint32_t, BlockKey>> todo;
  {
    std::lock_guard dl(counters_->dirty_mu);
    for (const BlockKey& k : counters_->dirty) {
      if (auto rec = index_->describe(k)) todo.emplace_back(rec->block_index, k);
    }
  }
  std::sort(todo.begin(), todo.end());  // parents first: each batch commits after the one before
  size_t stored = 0;
  constexpr size_t kBatch = 64;
  std::vector<BlockKey> batch;
  for (size_t first = 0; first < todo.size(); first += kBatch) {
    batch.clear();
    for (size_t i = first; i < std::min(todo.size(), first + kBatch); ++i) batch.push_back(todo[i].second);
    const std::vector<Status> done = store_batch_to_nvme(batch);
    for (const Status& s : done) {
      if (s.code() == StatusCode::kNotFound) continue;  // left the index meanwhile
      if (!s) return s;
      ++stored;
    }
  }
  return stored;
}

TierManagerStats TierManager::stats() const {
  TierManagerStats s;
  for (Tier t : kAllTiers) {
    const int i = static_cast<int>(t);
    s.tiers[i].capacity_slots = capacity_slots(t);
    s.tiers[i].used_slots = used_slots(t);
    s.tiers[i].demotions_out = counters_->demotions_out[i];
    s.tiers[i].promotions_in = counters_->promotions_in[i];
    s.tiers[i].drops = counters_->drops[i];
  }
  s.saved_blocks = counters_->saved;
  s.skipped_blocks = counters_->skipped;
  s.loaded_blocks = counters_->loaded;
  s.write_through_blocks = counters_->write_through;
  s.recovered_blocks = counters_->recovered;
  s.recovery_dropped = counters_->recovery_dropped;
  s.orphans = counters_->orphan_count;
  s.orphans_adopted = counters_->orphans_adopted;
  s.orphans_dropped = counters_->orphans_dropped;
  s.ancestor_writes = counters_->ancestor_writes;
  s.errors = counters_->errors;
  s.corrupt_blocks_found = counters_->corrupt_found;
  s.blocks_repaired = counters_->repaired;
  s.over_share_demotions = counters_->over_share_demotions;
  s.background_rounds = counters_->background_rounds;
  s.foreground_rounds = counters_->foreground_rounds;
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
