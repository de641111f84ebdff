// TierManager: ties the prefix index, the three tiers and the transfer engine together
// (DESIGN.md "Residency and eviction", "Persistence"). It owns the host arena, the HBM arena
// (CUDA or emulated), the NVMe tier and the transfer engine; the index records where each block
// lives. Under pressure it demotes HBM → host → NVMe (write-back) and finally drops, choosing
// victims with the index's eviction order; on a hit it can promote; in write-through mode every
// saved block is persisted before save returns. At open it rebuilds the index from the NVMe
// catalog, so the cache survives restarts.
//
// Ordering rules that keep readers safe:
//   - a residency is added to the index only after its bytes are complete in that tier;
//   - a slot is freed only after its residency left the index, and the index refuses to remove
//     a residency while the block is pinned (a leased match), so a load never reads a reused slot;
//   - on NVMe the catalog entry is written after the data, and erased before the slot is freed.
//
// NVMe stays prefix-closed: a block is committed to NVMe only together with, or after, its
// parent (write-back writes a chain's missing ancestors first and keeps them in memory as clean
// copies), and the index never drops a parent's NVMe copy while a child is on NVMe. So every
// block the catalog holds is reachable after a crash, whatever was in memory only. A block whose
// parent is missing at open (its parent's slot was found corrupt) is kept aside as an orphan,
// not erased: it is indexed again once a save indexes its parent (keys chain, so the same
// tokens give the same parent key), and orphans are the first blocks NVMe reclaim drops.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "api/store/eviction_log.h"
#include "api/store/reclaimer.h"
#include "api/store/restore_planner.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "prefix_index/frequency_sketch.h"
#include "prefix_index/prefix_index.h"
#include "tiers/memory_arena.h"
#include "tiers/nvme_tier.h"
#include "tiers/slot_allocator.h"
#include "transfer/transfer_engine.h"

namespace kvtier {

class MetricsRegistry;

enum class WritePolicy : uint8_t {
  kWriteBack = 0,     // blocks reach NVMe when demoted from host (or on flush())
  kWriteThrough = 1,  // every saved block is stored on NVMe before save returns
};

struct TierLimits {
  /// Capacity in bytes; 0 disables the tier (HBM and NVMe only; the host tier is required).
  uint64_t capacity_bytes = 0;
  /// Reclaim starts when occupancy exceeds high_watermark × capacity (default 0.95) ...
  double high_watermark = 0.95;
  /// ... and stops once it is at or below low_watermark × capacity (default 0.85).
  double low_watermark = 0.85;
};

/// A tenant whose blocks the tiers count apart, with its share of every tier.
struct TenantShare {
  std::string name;  // as add_namespace names it; unique
  /// The fraction of each tier's slots the tenant may hold before its blocks are evicted ahead
  /// of every other tenant's, in (0, 1]. 1 (the default) counts the tenant's blocks and sets no
  /// share. Work-conserving: a tenant may fill a tier the others leave empty, and loses only its
  /// own blocks beyond its share when room is needed.
  double tier_share = 1.0;
};

/// What one tenant holds, as TierManagerStats reports it.
struct TenantResidency {
  std::string name;
  std::array<uint64_t, kNumTiers> resident_blocks{};
  std::array<uint64_t, kNumTiers> share_blocks{};  // its share of each tier in blocks; 0: none
};

struct TierManagerOptions {
  /// The KV layout of every namespace this manager serves (sets every slot size). Required.
  KvLayout layout;
  /// HBM tier (default disabled). Without a GPU an emulated arena in host memory stands in.
  TierLimits hbm;
  /// Host DRAM tier. Required: capacity_bytes > 0 (at least one block).
  TierLimits host;
  /// NVMe tier; enabled when nvme.dir is non-empty and nvme_limits.capacity_bytes > 0. The
  /// nvme.layout and nvme.capacity_bytes fields are filled in from `layout` and nvme_limits.
  NvmeTierOptions nvme;
  TierLimits nvme_limits;
  /// Back the host arena with a memfd so client processes can map it (default false).
  bool shared_host_arena = false;
  /// Default kWriteBack.
  WritePolicy write_policy = WritePolicy::kWriteBack;
  /// Copy a block up to the host tier when a load finds it only on NVMe (default true).
  bool promote_on_hit = true;
  /// Admission to NVMe: a block demoted from the host tier is written to NVMe only when it was
  /// used at least this many times lately — each save of its tokens and each load of it counts
  /// one, in a frequency sketch with aging (FrequencySketch), so a block dropped and saved again
  /// keeps its count — or when its class is kHigh or above. A block refused is dropped from
  /// memory instead. Write-through saves, flush() and blocks on NVMe already are not filtered.
  /// 0 or 1: every demoted block is written (default 2: a block saved once and never reused
  /// does not cost an NVMe write, as Dynamo's and vLLM's disk filters).
  uint32_t nvme_admission_min_uses = 2;
  /// Restore or recompute: the bandwidth priors and smoothing of each tier's restore estimate.
  RestorePlanner::Options restore;
  /// A lookup that held blocks back as slower to restore than to recompute probes their tier
  /// (a timed, verified read of up to 8 of them, off the lookup's path) when the tier's estimate
  /// is older than this, so an estimate that went slow can recover once the device does
  /// (default 1 s; 0: at every such lookup).
  uint64_t restore_probe_interval_ns = 1'000'000'000ull;
  /// A background thread brings each tier from above its high watermark down to its low one
  /// (write-back to NVMe included) while saves go on, so a save reclaims by itself only when its
  /// tier is full. false: the save that crosses the high watermark reclaims (default true).
  bool background_reclaim = true;
  /// How the background reclaimer runs (reclaimer.h): on its own thread (kThread, the default),
  /// or only when the owner calls reclaimer()->step() (kStepped, for tests that order it).
  Reclaimer::Mode reclaimer_mode = Reclaimer::Mode::kThread;
  /// Options of the transfer engine the manager creates.
  TransferEngineOptions transfer;
  /// Options of the prefix index.
  IndexOptions index;
  /// Tenants counted apart, with their tier shares (at most kMaxGroups − 1). Blocks of a
  /// namespace opened under no listed tenant are counted together and have no share.
  std::vector<TenantShare> tenants;
  /// Blocks remembered after they leave the index for good, with the tier of their last copy,
  /// for kvtier doctor's "evicted from host" (default 65536; 0: none).
  size_t eviction_log_entries = 65536;
};

struct TierCounters {
  uint64_t capacity_slots = 0;
  uint64_t used_slots = 0;
  uint64_t demotions_out = 0;  // blocks copied down out of this tier under pressure
  uint64_t promotions_in = 0;  // blocks copied up into this tier
  uint64_t drops = 0;          // blocks dropped from this tier (no lower copy kept)
};

struct TierManagerStats {
  std::array<TierCounters, kNumTiers> tiers{};
  uint64_t saved_blocks = 0;        // blocks written by save()
  uint64_t skipped_blocks = 0;      // save() blocks already cached
  uint64_t loaded_blocks = 0;
  uint64_t write_through_blocks = 0;
  uint64_t recovered_blocks = 0;    // indexed from the NVMe catalog at open
  uint64_t recovery_dropped = 0;    // catalog entries that could not be indexed (no namespace)
  uint64_t orphans = 0;             // NVMe blocks kept at open whose parent is missing, now
  uint64_t orphans_adopted = 0;     // orphans indexed again once a save indexed their parent
  uint64_t orphans_dropped = 0;     // orphans erased to make room on NVMe
  uint64_t ancestor_writes = 0;     // blocks written back early as the parents of a write-back
  uint64_t errors = 0;              // failed transfers and storage operations
  uint64_t corrupt_blocks_found = 0;  // NVMe copies that failed their checksum and were marked damaged
  uint64_t blocks_repaired = 0;       // damaged blocks whose tokens were saved again, replacing the copy
  uint64_t over_share_demotions = 0;  // blocks demoted early, their tenant over its tier share
  uint64_t nvme_admitted = 0;       // blocks demoted from host that admission let onto NVMe
  uint64_t nvme_refused = 0;        // blocks demoted from host that admission dropped instead
  uint64_t nvme_blocks_written = 0; // blocks committed to NVMe (write-back, write-through, repair)
  uint64_t restore_offered_tokens = 0;    // tokens lookups offered after restore-or-recompute
  uint64_t restore_held_back_tokens = 0;  // tokens held back as slower to restore than recompute
  double restore_seconds_saved = 0;       // estimated recompute minus restore time of those offered
  uint64_t restore_probes = 0;            // probe reads of a tier whose blocks were held back
  std::array<double, kNumTiers> restore_bytes_per_second{};  // the estimates now
  uint64_t background_rounds = 0;   // reclaim rounds (up to 64 blocks) run by the background thread
  uint64_t foreground_rounds = 0;   // reclaim rounds run inside a save, load or rebalance
  NvmeTierStats nvme{};
  TransferStats transfer{};
  std::vector<TenantResidency> tenants;  // one per TierManagerOptions::tenants entry, in order
};

class TierManager {
 public:
  /// Creates the arenas, opens (or creates) the NVMe tier and rebuilds the index from it.
  /// kInvalidArgument for a bad layout, capacity or watermark.
  static Result<std::unique_ptr<TierManager>> open(const KeyChain& keys, TierManagerOptions options);
  /// Waits for in-flight transfers. Host- and HBM-only blocks are not written back: call flush().
  ~TierManager();
  TierManager(const TierManager&) = delete;
  TierManager& operator=(const TierManager&) = delete;

  PrefixIndex& index() noexcept { return *index_; }
  const KvLayout& layout() const noexcept { return options_.layout; }
  bool has_tier(Tier t) const noexcept;
  const MemoryArena* arena(Tier t) const noexcept;  // kHbm or kHost; null when disabled
  TransferEngine& transfer() noexcept { return *engine_; }

  /// Resolves a namespace and records it in the NVMe catalog so its blocks can be re-indexed
  /// after a restart. kLayoutMismatch when spec.layout is not this manager's layout. Its blocks
  /// are counted under `tenant` when options.tenants lists it (tenant shares; the catalog keeps
  /// the name, so the count survives a restart); a namespace keeps the first tenant it is
  /// opened under (tenants that share a salt share its blocks).
  Result<Namespace> add_namespace(const NamespaceSpec& spec, std::string_view tenant = {});

  /// Saves the full blocks of `tokens` whose KV is in `kv` (canonical layout, block after block;
  /// at least blocks × bytes_per_block bytes, host memory) into `tier` (kHost or kHbm). Blocks
  /// already cached are skipped. Returns the number of blocks newly saved. Makes room under the
  /// watermarks first; kResourceExhausted when everything resident is pinned.
  /// With first_block > 0, `kv` starts at that block and every earlier block must be cached
  /// already (kInvalidArgument otherwise): a long prompt can be saved in windows.
  Result<size_t> save(const Namespace& ns, std::span<const TokenId> tokens,
                      std::span<const std::byte> kv, Tier tier = Tier::kHost,
                      Priority priority = Priority::kNormal, std::span<const BlockExtra> extras = {},
                      size_t first_block = 0);
  /// save() from blocks anywhere: `blocks[i]` holds block first_block + i (canonical layout,
  /// bytes_per_block long), all of `src_kind`. Each block is copied once, straight into its slot
  /// (device memory by the copy engine, DMA into a host slot), with no gather into a contiguous
  /// buffer first. kInvalidArgument when blocks.size() is not the prompt's full blocks from
  /// first_block.
  Result<size_t> save_blocks(const Namespace& ns, std::span<const TokenId> tokens,
                             std::span<const std::byte* const> blocks, LocationKind src_kind, Tier tier,
                             Priority priority, std::span<const BlockExtra> extras, size_t first_block);

  /// Copies the blocks of a leased match (match.lease != kNoLease, else kInvalidArgument) into
  /// `destinations` — one pointer per matched block, canonical layout, each bytes_per_block
  /// long, all of `dst_kind` (kHost or kDevice) — one segment per layer per block, so
  /// wait_layer(l) returns as soon as layer l of every block has arrived. Blocks found only on
  /// NVMe are first restored (checksum verified) into the host tier, or, when the host tier is
  /// full, straight through staging; a corrupt block fails the load with kChecksumMismatch.
  ///
  /// `layers` restricts the load to layers [begin, begin + count) of every block (count 0: to the
  /// last layer); each destination then holds just those layers back to back, layer l at
  /// (l - begin) × bytes_per_block_layer, and the handle's layer i is layer begin + i.
  Result<TransferHandle> load(const Match& match, std::span<std::byte* const> destinations,
                              LocationKind dst_kind = LocationKind::kHost,
                              TransferCallback callback = {}, LayerRange layers = {});

  /// Copies `keys` up into `to` (kHost or kHbm) from the fastest tier holding them. NVMe → HBM
  /// runs as one pipelined job through staging. Blocks already there are skipped.
  Result<size_t> promote(std::span<const BlockKey> keys, Tier to);

  /// Copies each of `keys` whole into dsts[i] (host memory, bytes_per_block each) from its
  /// fastest copy for the host, each pinned while it is read and verified against its checksum
  /// whichever tier it came from: kvtier export never writes a block out unchecked. Per key: ok,
  /// kNotFound when it is not cached, kChecksumMismatch (a bad NVMe copy is quarantined, as a
  /// load's is), or the copy's error. Counts no hit, no use and no restore.
  std::vector<Status> read_blocks(std::span<const BlockKey> keys, std::span<std::byte* const> dsts);

  /// Erases `keys` from every tier in the order given (children before their parents), as an
  /// eviction does: slots freed, NVMe copies and their catalog entries erased. A key that is not
  /// indexed is skipped. The number erased; kBusy, and the rest kept, at the first one pinned
  /// (read, loaded, written back) or with other children.
  Result<size_t> erase(std::span<const BlockKey> keys);

  /// Restore or recompute: how much of `blocks` (a match, in order) a lookup by an engine that
  /// prefills `prefill_tokens_per_second` should offer (RestorePlanner::plan over this manager's
  /// measured restore bandwidths), counted in the stats. When blocks are held back and their
  /// tier's estimate is stale (restore_probe_interval_ns), probes that tier in the background.
  /// A speed of 0 or less: everything is offered.
  RestoreOffer plan_restore(std::span<const BlockResidency> blocks, double prefill_tokens_per_second);
  /// Waits until no probe plan_restore started is in flight.
  void wait_for_probes();
  const RestorePlanner& restore_planner() const noexcept { return *restore_; }
  /// Where `key`'s last copy was when it left the index, if it did lately (EvictionLog).
  std::optional<EvictionRecord> evicted(const BlockKey& key) const;
  /// Every namespace this manager knows: the NVMe catalog's records (earlier runs included) and
  /// those opened since, each once.
  std::vector<NamespaceRecord> namespace_records() const;
  /// Calls `fn` for every block on NVMe (a copy of its catalog entry).
  void for_each_nvme_block(const std::function<void(const CatalogEntry&)>& fn) const;
  /// Uses of `key` counted lately for NVMe admission (FrequencySketch::estimate).
  uint32_t recent_uses(const BlockKey& key) const { return uses_->estimate(key); }

  /// Brings every tier under its high watermark (down to its low watermark).
  Status rebalance();
  /// Writes every block resident only in memory tiers to NVMe (graceful shutdown).
  Result<size_t> flush();
  /// Stops the background reclaimer and waits for in-flight transfers (the engine is shut
  /// down; the manager then refuses work).
  void close();
  /// The background reclaimer (reclaimer.h); null without background_reclaim. Its wait_idle()
  /// waits out a thread's passes, its step() runs a stepped one.
  Reclaimer* reclaimer() noexcept { return reclaimer_.get(); }

  TierManagerStats stats() const;
  /// The manager's metrics, each series registered once (at open): its own counts and the series
  /// mirrored from the index, the tiers and the transfer engine. kvtierd's /metrics renders them.
  MetricsRegistry& metrics() noexcept;

 private:
  struct MemoryTier {
    std::unique_ptr<MemoryArena> arena;
    std::unique_ptr<SlotAllocator> slots;
    TierLimits limits;
  };

  TierManager(const KeyChain& keys, TierManagerOptions options);
  Status open_tiers();
  /// Gives the index each tenant's share of every tier, in blocks (checked by open()).
  Status set_tenant_shares();
  /// The index group of a tenant named in options.tenants; kNoGroup for any other name.
  GroupId group_of(std::string_view tenant) const noexcept;
  Status recover();
  /// Registers the series read from the index, the tiers and the transfer engine (tier_metrics.cpp).
  void register_metrics();
  /// Indexes the orphans kept at open whose parent is `parent` (just indexed in `ns`), then
  /// theirs in turn. The number indexed; an orphan the index refuses is erased.
  size_t adopt_orphans(const Namespace& ns, const BlockKey& parent);
  /// Erases up to `n` orphans from NVMe (catalog first); the number erased.
  size_t drop_orphans(size_t n);
  MemoryTier* memory_tier(Tier t) noexcept;
  uint64_t capacity_slots(Tier t) const noexcept;
  uint64_t used_slots(Tier t) const noexcept;
  Result<SlotId> allocate_slot(Tier t);
  void free_slot(Tier t, SlotId slot);
  /// Demotes or drops blocks of `t` until at most target_used slots are used, one round (at most
  /// 64 victims) per hold of the tier's reclaim lock; stops early, ok, once `stop` is set.
  Status reclaim(Tier t, uint64_t target_used, const std::atomic<bool>* stop = nullptr);
  /// Whether the next allocation in `t` would take it past its high watermark.
  bool above_high(Tier t) const noexcept;
  /// The slots in use at `t`'s low watermark: where a reclaim stops.
  uint64_t low_mark(Tier t) const noexcept;
  /// The reclaimer's pass: every tier above its high watermark down to its low one, top down.
  void reclaim_pass(const std::atomic<bool>& stop);
  /// Copies a block down to the memory tier below `from` (HBM → host) and drops `from`'s copy.
  /// Write-back to NVMe goes through store_batch_to_nvme instead (kInvalidArgument here).
  Status demote_block(const BlockKey& key, Tier from);
  /// Adds the NVMe residency of a block just committed to `slot` and clears its dirty mark; when
  /// the block left the index (or was stored twice) meanwhile, erases the NVMe copy instead.
  Status index_nvme_copy(const BlockKey& key, SlotId slot);
  /// Writes indexed blocks' memory copies to NVMe and adds their NVMe residency, keeping NVMe prefix-closed: each block's ancestors
  /// not yet on NVMe are written first (they keep their memory copies), in block order, and a
  /// block is committed only when its parent is on NVMe or committed with it. Every data write
  /// of a round is in flight together, then one NvmeTier::commit_batch (one flush per slot file,
  /// one synced catalog write, all or nothing). Blocks on NVMe already are ok. One status per
  /// key, in order. `written`, when given, gets the number of blocks this call wrote (ancestors
  /// included; not those stored already).
  std::vector<Status> store_batch_to_nvme(std::span<const BlockKey> keys, size_t* written = nullptr);
  /// The blocks to write for `keys`: theirs and their ancestors' keys up to (and including) the
  /// first ancestor on NVMe, deduplicated, parents before children.
  std::vector<BlockKey> with_ancestors(std::span<const BlockKey> keys) const;
  /// One round of store_batch_to_nvme over pinned keys in block order: a status per key into
  /// `result`, and the keys it wrote (not those stored already) into `written_now`.
  void store_round_to_nvme(std::span<const BlockKey> keys, std::unordered_map<BlockKey, Status>& result,
                           std::unordered_set<BlockKey>& written_now);
  /// Removes `from`'s residency of a block that has a lower copy, frees its slot and counts
  /// the demotion. kBusy when it was pinned meanwhile (both copies stay).
  Status drop_residency(const BlockKey& key, Tier from);
  /// Allocates an NVMe slot, writes `src` (block_bytes_) and commits `entry`; the slot.
  /// With `src_may_change` (a caller's buffer, not an arena slot) the bytes are first copied
  /// into a private buffer, so the write and the checksum see the same bytes. With `replace`,
  /// the block is on NVMe already and the new copy replaces it (NvmeTier::replace). The
  /// committed entry.
  Result<CatalogEntry> write_to_nvme(const CatalogEntry& entry, const std::byte* src, bool src_is_device,
                                     bool src_may_change = false, bool replace = false);
  /// After a verified read failed: reads each suspect whose only copy is on NVMe again on its own,
  /// and marks the corrupt ones damaged in the index. The number marked.
  size_t quarantine(std::span<const BlockKey> suspects);
  /// When `key` (pinned by the caller) is damaged, writes `src` as its new NVMe copy, switches
  /// the catalog and the index to it and returns true; false when it is not damaged.
  Result<bool> repair(const BlockKey& key, const std::function<CatalogEntry()>& entry, const std::byte* src,
                      bool src_is_device);
  /// After a residency left the index (evict, remove_residency): frees its slot (an NVMe copy
  /// through the catalog), forgets a block that left the index as dirty, counts the drop.
  void release_evicted(const EvictedBlock& e);
  /// Whether a block demoted from the host tier may be written to NVMe (nvme_admission_min_uses).
  bool admit_to_nvme(const BlockResidency& block) const;
  /// Write-back of one round of victims of `t` (the host tier, NVMe below it), in the order
  /// pick_victims gave them: the admitted ones (and those on NVMe already) are stored and their
  /// copy in `t` dropped; the refused ones are dropped from `t` (from the index, with their last
  /// copy). One status per victim.
  std::vector<Status> write_back_victims(Tier t, std::span<const BlockKey> victims);
  /// A timed, verified read of up to 8 of `blocks` (resident in `tier`) into scratch, recorded
  /// in the restore estimate; runs on the transfer engine, one probe at a time.
  void probe(std::span<const BlockResidency> blocks, Tier tier);
  /// Records the time of a restore job from one tier when it succeeded.
  void record_restore(Tier from, uint64_t bytes, uint64_t start_ns, const Status& s);
  /// One block between host and device memory (or host to host), waited for.
  Status copy_block(std::byte* dst, bool dst_is_device, const std::byte* src, bool src_is_device);
  static CatalogEntry catalog_entry(const BlockKey& key, const BlockKey& parent, uint32_t block_index,
                                    std::span<const TokenId> tokens, std::span<const BlockKey> extras,
                                    Priority priority);
  Result<SlotId> copy_into_memory_tier(const BlockResidency& from, Tier to);
  Location block_location(const BlockResidency& where, Tier t);
  /// One whole-block segment from the fastest tier holding `where` (other than `to`) into `slot`
  /// of memory tier `to`; verified when it comes from NVMe.
  Segment copy_segment(const BlockResidency& where, Tier to, SlotId slot);

  KeyChain keys_;
  TierManagerOptions options_;
  uint64_t block_bytes_ = 0;
  std::unique_ptr<PrefixIndex> index_;
  MemoryTier hbm_, host_;
  std::unique_ptr<NvmeTier> nvme_;
  std::unique_ptr<TransferEngine> engine_;
  std::unique_ptr<FrequencySketch> uses_;       // for NVMe admission; sized at open
  std::unique_ptr<RestorePlanner> restore_;

  struct Counters;
  std::unique_ptr<Counters> counters_;
  std::unique_ptr<Reclaimer> reclaimer_;  // after counters_: its pass counts there
};

}  // namespace kvtier
