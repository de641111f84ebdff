// Catalog: the RocksDB map key → NVMe slot, plus namespace records, so the index can be rebuilt
// after a restart (DESIGN.md "Persistence"). A block's entry is written only after its data is
// durable, and deleted before its slot is freed; the catalog never decides that order, the
// NvmeTier does. Values are versioned binary records.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "tiers/block_header.h"

namespace rocksdb {
class DB;
class Status;
}

namespace kvtier {

/// One block on NVMe. Bump kCatalogValueVersion when the encoding of this record changes.
struct CatalogEntry {
  BlockKey key;
  SlotId slot = kNoSlot;
  uint64_t payload_bytes = 0;
  uint64_t checksum = 0;            // XXH3-64 of the payload (as in the slot header)
  uint64_t layout_fingerprint = 0;
  BlockKey ns_root;
  BlockKey parent;                  // zero for a prefix's first block
  uint32_t block_index = 0;
  std::vector<TokenId> tokens;
  std::vector<BlockKey> extras;
  Priority priority = Priority::kNormal;
  uint64_t created_ns = 0;          // wall clock, nanoseconds since the epoch
  uint64_t last_access_ns = 0;

  friend bool operator==(const CatalogEntry&, const CatalogEntry&) = default;
};

/// A namespace: enough to rebuild the index's view of a root after restart.
struct NamespaceRecord {
  BlockKey root;
  KvLayout layout;
  std::string model_id;
  std::string tenant;  // the tenant its blocks are counted under (tenant shares); "" for none
  std::string adapter_id;  // the LoRA adapter; "" for none
  std::string revision;    // the weights' revision; "" for none

  friend bool operator==(const NamespaceRecord&, const NamespaceRecord&) = default;
};

/// The namespace root of every entry whose chain reaches its block 0 through `entries`: key → root.
/// Block 0's parent is the root (records of older kvtiers name it in ns_root and leave the parent
/// zero); a later block's root is its parent's. An entry whose parent is not among them is left out.
std::unordered_map<BlockKey, BlockKey> chain_roots(std::span<const CatalogEntry> entries);

inline constexpr uint8_t kCatalogValueVersion = 1;
/// Namespace records: 2 adds the tenant, 3 the adapter id and the revision (for kvtier inspect and
/// kvtier doctor). A record is written at the lowest version that holds it (one with no tenant,
/// adapter or revision as version 1), so a kvtierd from before reads what it can; older versions
/// decode with those fields empty.
inline constexpr uint8_t kNamespaceRecordVersion = 3;

struct CatalogOptions {
  /// Sync every write to the RocksDB WAL before it returns (WriteOptions::sync; default true).
  /// The NvmeTier sets it from its durability mode.
  bool sync = true;
  /// Create the database when missing (default true).
  bool create = true;
  /// A file to hold an exclusive flock(2) on for the catalog's lifetime, created when missing,
  /// with the holder's pid written into it (default "": no lock). The NvmeTier locks DIR/LOCK,
  /// so a second kvtierd (or a second tier in one process) on the same directory is refused
  /// with kUnavailable naming the file and the holder, before RocksDB's own lock is reached.
  std::string lock_file;
  /// Free bytes the file system must have, beyond what RocksDB's memtables hold, before a write
  /// after a no-space failure asks RocksDB to resume (default 1 MiB).
  uint64_t resume_headroom_bytes = 1 << 20;
  /// Open for reading only (default false): nothing is written, not even at open; every write
  /// fails with kInvalidArgument. For tools that look at a data dir (kvtier fsck without
  /// --repair, kvtier inspect). `lock_file` still keeps a live kvtierd out.
  bool read_only = false;
};

class Catalog {
 public:
  /// Opens (creating when allowed) the RocksDB database in `dir`. kIoError with RocksDB's
  /// message (a damaged database among them); kUnavailable when `lock_file` or RocksDB's own
  /// lock is held by another opener. On a file system too full for RocksDB to open for writing
  /// (it writes a new MANIFEST and OPTIONS file at every open), the catalog opens read-only:
  /// reads serve what is committed, writes fail with kResourceExhausted, and the first write
  /// after space returns reopens it for writing. RocksDB's info log goes to spdlog (warnings and
  /// up; everything at debug level), never to a LOG file beside the data.
  static Result<std::unique_ptr<Catalog>> open(const std::string& dir, CatalogOptions options = {});
  ~Catalog();
  Catalog(const Catalog&) = delete;
  Catalog& operator=(const Catalog&) = delete;

  Status put(const CatalogEntry& entry);
  /// Puts every entry in one atomic, synced write (one WAL sync for the batch): all or none.
  Status put_batch(std::span<const CatalogEntry> entries);
  /// Deleting a key that is not there is ok (RocksDB semantics).
  Status remove(const BlockKey& key);
  /// kNotFound when absent; kChecksumMismatch when the stored value does not decode.
  Result<CatalogEntry> get(const BlockKey& key) const;
  /// Calls `fn` for every block entry in key order; `fn` must not call into the catalog.
  /// Keys whose value does not decode are not
  /// passed to `fn`; they are appended to `undecodable` when given.
  Status for_each(const std::function<void(const CatalogEntry&)>& fn,
                  std::vector<BlockKey>* undecodable = nullptr) const;

  /// Writes nothing when the stored record is the same already (every open of a namespace puts
  /// its record; a full disk then still lets known namespaces open).
  Status put_namespace(const NamespaceRecord& record);
  Status for_each_namespace(const std::function<void(const NamespaceRecord&)>& fn) const;

  /// Small named strings for the tier's own bookkeeping (its geometry). kNotFound when absent.
  Status put_meta(std::string_view name, std::string_view value);
  Result<std::string> get_meta(std::string_view name) const;

  /// True after a write failed for lack of space (or the catalog opened read-only on a full
  /// file system), until a later write resumes. Writes meanwhile fail with kResourceExhausted;
  /// each first checks the file system's free space and asks RocksDB to resume (DB::Resume, or
  /// a read-write reopen) once there is room.
  bool out_of_space() const noexcept { return out_of_space_.load(std::memory_order_relaxed); }
  /// Writes that resumed the catalog after a no-space failure.
  uint64_t resumes() const noexcept { return resumes_.load(std::memory_order_relaxed); }

  /// Value encodings, exposed for tests.
  static std::string encode_entry(const CatalogEntry& entry);
  static Result<CatalogEntry> decode_entry(std::string_view value);
  static std::string encode_namespace(const NamespaceRecord& record);
  static Result<NamespaceRecord> decode_namespace(std::string_view value);

 private:
  Catalog(std::string dir, std::unique_ptr<rocksdb::DB> db, bool read_only, CatalogOptions options, int lock_fd);
  Status write(std::string_view key, std::string_view value);
  /// The common tail of put, put_batch and remove: resume first when out of space, then `op`
  /// (a RocksDB write); a no-space failure marks the catalog out of space.
  Status checked_write(const std::string& what, const std::function<rocksdb::Status(rocksdb::DB&)>& op);
  /// When out of space and the file system has room again: DB::Resume, or reopen read-write.
  void resume_if_room();
  Status error(const rocksdb::Status& s, const std::string& what) const;

  /// Serializes RocksDB calls in ThreadSanitizer builds only. Why: Debian's librocksdb is not
  /// instrumented, so TSan sees the libstdc++ and libc calls RocksDB makes (string appends in
  /// group commit, memcpy into the WAL buffer) but not the atomics and futexes that order them,
  /// and reports races that are not there; some of those stacks hold no RocksDB frame, so a
  /// suppression cannot name them. Other builds keep RocksDB's own concurrency and its group
  /// commit of synced writes.
  class TsanGuard;
  mutable std::mutex tsan_mu_;

  std::string dir_;
  /// Held shared by every call into db_, exclusively only to swap a read-only db_ for a
  /// read-write one (resume_if_room).
  mutable std::shared_mutex db_mu_;
  std::unique_ptr<rocksdb::DB> db_;
  bool read_only_ = false;  // guarded by db_mu_
  CatalogOptions options_;
  int lock_fd_ = -1;
  std::mutex resume_mu_;  // one resume attempt at a time
  std::atomic<bool> out_of_space_{false};
  std::atomic<uint64_t> resumes_{0};
};

}  // namespace kvtier
