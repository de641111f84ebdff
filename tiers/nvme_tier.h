// NvmeTier: KV blocks in preallocated slot files, mapped by a RocksDB catalog (DESIGN.md
// "Persistence"). A block is visible only once its data is durable and its catalog entry is
// written; a slot is free again only after its catalog entry is gone; a read never returns bytes
// that fail their checksum. Thread-safe.
//
// Slot geometry: slot_bytes = header_bytes_for(layout) + align_up(layout.bytes_per_block(), 4096).
// Slots are striped over the files: slot s lives in file s % files at offset (s / files) *
// slot_bytes; its header comes first, its payload right after.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "tiers/block_header.h"
#include "tiers/catalog.h"
#include "tiers/slot_allocator.h"
#include "tiers/storage_device.h"

namespace kvtier {

enum class Durability : uint8_t {
  /// fdatasync the slot file before the catalog put, and sync the catalog write: a committed
  /// block survives power loss.
  kFdatasync = 0,
  /// No syncs: a committed block survives a process crash, not power loss. After power loss an
  /// erased entry may come back over a reused slot; its header or checksum then fails, so the
  /// block is dropped or refused, never served wrong.
  kNone = 1,
};

/// Opens the device backing slot file `file_index` at `path`, of at least `size` bytes.
using DeviceFactory = std::function<Result<std::unique_ptr<StorageDevice>>(
    int file_index, const std::string& path, uint64_t size)>;

struct NvmeTierOptions {
  /// Directory holding "slots.<i>" and "catalog/"; created when missing. Required (no default).
  std::string dir;
  /// Bytes of slots over all files, rounded down to whole slots. Required (default 0 is refused).
  uint64_t capacity_bytes = 0;
  /// Slot files to stripe over (default 1); one per NVMe drive spreads the load.
  uint32_t files = 1;
  /// The layout of every block stored here; sets the slot size. Required (must validate).
  KvLayout layout;
  /// Default kFdatasync.
  Durability durability = Durability::kFdatasync;
  /// Open slot files with O_DIRECT (default true; falls back to buffered where refused).
  bool direct = true;
  /// Opens each slot file's device (default: create_file_device with `direct`). Tests inject
  /// memory, shared or fault-injecting devices here.
  DeviceFactory device_factory;
  /// Test hook run by commit() after the data flush and before the catalog put (default none).
  /// An error return is treated as a crash at that point: commit fails and writes no entry.
  std::function<Status()> before_catalog_commit;
};

/// Where a slot's bytes are, for an I/O engine that moves them itself. Offsets and capacity are
/// kIoAlignment multiples.
struct SlotLocation {
  StorageDevice* device = nullptr;  // nullptr when the slot is out of range
  uint64_t header_offset = 0;
  uint64_t payload_offset = 0;
  uint64_t payload_capacity = 0;
};

struct NvmeTierStats {
  uint64_t blocks = 0;            // committed blocks
  uint64_t bytes_used = 0;        // their payload bytes
  uint64_t capacity_bytes = 0;    // slots × slot_bytes
  uint64_t slots = 0;
  uint64_t free_slots = 0;
  uint64_t checksum_errors = 0;   // reads refused because bytes failed a check
  uint64_t dropped_at_open = 0;   // catalog entries dropped at open, all causes:
  uint64_t corrupt_at_open = 0;   //   a slot header unreadable or disagreeing, an undecodable entry
  uint64_t misplaced_at_open = 0; //   a slot out of range or claimed by another entry, another layout
  uint64_t io_errors = 0;         // device operations that failed
};

class NvmeTier {
 public:
  /// Opens or creates the tier, checks every catalog entry against its slot header and drops
  /// (deletes from the catalog, counts in dropped_at_open) the ones whose header disagrees or
  /// cannot be read, whose slot is out of range, or whose slot another entry claimed. Payload
  /// checksums are checked on every read, not here. kLayoutMismatch when the directory holds a
  /// tier of another layout or file count.
  static Result<std::unique_ptr<NvmeTier>> open(NvmeTierOptions options);
  ~NvmeTier();
  NvmeTier(const NvmeTier&) = delete;
  NvmeTier& operator=(const NvmeTier&) = delete;

  const KvLayout& layout() const noexcept { return options_.layout; }
  uint64_t slot_bytes() const noexcept { return slot_bytes_; }
  uint64_t header_bytes() const noexcept { return header_bytes_; }
  uint64_t payload_capacity() const noexcept { return payload_capacity_; }
  uint64_t slot_count() const noexcept { return slot_count_; }

  // ---- writing: allocate → write_block (or the engine writes, then write_header) → commit ----

  /// Reserves a free slot. kResourceExhausted when the tier is full.
  Result<SlotId> allocate();
  /// Returns a reserved slot that never got a catalog entry (after a failed write or commit).
  Status release_uncommitted(SlotId slot);
  /// Where a slot lives (device nullptr when out of range).
  SlotLocation location(SlotId slot) const;

  /// Writes `payload` into a reserved slot, then its header. The payload's address must be
  /// kIoAlignment-aligned (kInvalidArgument otherwise); its size at most payload_capacity() and
  /// a multiple of num_layers. `entry` supplies key, parent, ns_root, block_index, tokens,
  /// extras, priority and times. Returns the entry to commit, with slot, payload_bytes,
  /// checksum and layout_fingerprint filled in. Nothing is visible until commit().
  Result<CatalogEntry> write_block(SlotId slot, const CatalogEntry& entry,
                                   std::span<const std::byte> payload);
  /// For an engine that wrote the payload through location(): computes the checksums from
  /// `payload` (the bytes it wrote) and writes only the header. Same rules and result.
  Result<CatalogEntry> write_header(SlotId slot, const CatalogEntry& entry,
                                    std::span<const std::byte> payload);
  /// Makes a written block visible: flush per durability, the test hook, then the catalog put.
  /// On failure nothing is visible and the slot stays reserved (release it or retry).
  /// kAlreadyExists when the key is committed already.
  Status commit(const CatalogEntry& entry);
  /// commit() for many written blocks at once: one flush per slot file and one synced catalog
  /// write for the batch (all entries or none), so a write-back of N blocks costs two syncs, not
  /// 2N. Returns one status per entry, in order; entries refused up front (not reserved, a slot
  /// or key twice, already stored) fail alone, the rest commit or fail together.
  std::vector<Status> commit_batch(std::span<const CatalogEntry> entries);
  /// commit() for a new copy of a block that is stored already, written into another reserved
  /// slot: the repair of a copy found corrupted. The catalog put switches the key to the new
  /// slot (a crash before it keeps the old entry, after it the new one), then the old slot is
  /// freed once unread. On failure the old copy stays and the new slot stays reserved.
  /// kNotFound when the key is not stored (or is being erased).
  Status replace(const CatalogEntry& entry);
  /// allocate + write_block + commit, releasing the slot on any failure.
  Result<CatalogEntry> store(const CatalogEntry& entry, std::span<const std::byte> payload);

  /// Deletes the catalog entry, then frees the slot. kNotFound when absent.
  Status erase(const BlockKey& key);

  // ---- reading ----

  /// Reads a committed block's payload into `out` (aligned address, size >= payload_bytes)
  /// after checking the slot header against the catalog and the payload against its checksum.
  /// kChecksumMismatch (counted; `out` zeroed) when anything disagrees; kNotFound when absent.
  Status read_block(const BlockKey& key, std::span<std::byte> out);
  /// The same for a slot the caller already knows; the header must name `expected`. Unlike
  /// read_block, nothing keeps the slot from being erased and reused meanwhile: the caller
  /// holds the block (the index pins it during a load). A reused slot fails the key check.
  Status read_slot(SlotId slot, const BlockKey& expected, std::span<std::byte> out);
  /// Reads one layer (payload_bytes / num_layers bytes) and checks its per-layer checksum.
  Status read_layer(const BlockKey& key, uint32_t layer, std::span<std::byte> out);

  bool contains(const BlockKey& key) const;
  Result<CatalogEntry> entry(const BlockKey& key) const;
  /// Every committed block (a copy), for rebuilding the index after restart.
  std::vector<CatalogEntry> entries() const;
  void for_each(const std::function<void(const CatalogEntry&)>& fn) const;

  Status put_namespace(const NamespaceRecord& record) { return catalog_->put_namespace(record); }
  Status for_each_namespace(const std::function<void(const NamespaceRecord&)>& fn) const {
    return catalog_->for_each_namespace(fn);
  }

  NvmeTierStats stats() const;

 private:
  enum class SlotState : uint8_t { kFree, kReserved, kCommitting, kCommitted, kFreeWhenUnread };
  struct Live {
    CatalogEntry entry;
    bool changing = false;
  };

  explicit NvmeTier(NvmeTierOptions options);
  Status open_devices();
  Status check_geometry();
  Status recover();  // open, open_devices, check_geometry, recover: nvme_tier_open.cpp

  StorageDevice& device_of(SlotId slot) const { return *devices_[slot % devices_.size()]; }
  uint64_t header_offset(SlotId slot) const { return (slot / devices_.size()) * slot_bytes_; }
  Status check_reserved(SlotId slot) const;
  /// Makes written entries durable and visible: one flush per slot file (per durability), the
  /// test hook, then one catalog write for them all.
  Status record(std::span<const CatalogEntry> entries);
  Status count_io(Status s);
  Status refuse(Status s, std::span<std::byte> out);
  Result<BlockHeaderInfo> read_header(SlotId slot, const BlockKey& expected);
  Result<CatalogEntry> pin(const BlockKey& key);
  void unpin(SlotId slot);
  void free_slot_locked(SlotId slot);

  NvmeTierOptions options_;
  uint64_t header_bytes_ = 0, payload_capacity_ = 0, slot_bytes_ = 0, slot_count_ = 0;
  std::vector<std::unique_ptr<StorageDevice>> devices_;
  std::unique_ptr<Catalog> catalog_;

  mutable std::mutex mu_;
  SlotAllocator allocator_;
  std::vector<SlotState> slot_state_;
  std::vector<uint32_t> readers_;  // read_block/read_layer calls in flight per slot
  std::unordered_map<BlockKey, Live> live_;
  std::unordered_set<BlockKey> committing_;
  uint64_t bytes_used_ = 0;

  std::atomic<uint64_t> checksum_errors_{0}, dropped_at_open_{0}, corrupt_at_open_{0}, misplaced_at_open_{0},
      io_errors_{0};
};

}  // namespace kvtier
