// NvmeCheck: kvtier fsck's engine. Checks an NVMe tier directory no kvtierd holds, slot by slot,
// against its catalog: every entry's slot header and payload checksum, chains whose parent is
// gone, blocks of namespaces without a record, and slots that hold a block no entry names. With
// repair, it removes what no restart could serve (the catalog entry first, as the tier does; the
// slot is free once no entry names it) and wipes the headers of slots without an entry.
//
// A restart already drops entries whose slot header disagrees (NvmeTier::open) and blocks of a
// namespace without a record (TierManager::recover), but reads no payload: a block whose bytes
// rotted is found only when a load fails its checksum. fsck reads every payload.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"

namespace kvtier {

struct NvmeCheckOptions {
  /// Remove entries that cannot be served and wipe the headers of slots without an entry
  /// (default false: nothing is written, the catalog is opened read-only).
  bool repair = false;
  /// Called now and then with the bytes read so far and the bytes the check will read.
  std::function<void(uint64_t done, uint64_t total)> progress;
  /// Problems listed one by one at most (default 1000); the counts are always exact.
  size_t max_listed = 1000;
};

/// One thing found wrong. `kind` is one of:
///   "undecodable_entry"  a catalog value that does not decode (its key is all that is known)
///   "bad_slot"           an entry whose slot is out of range, claimed twice, of another layout,
///                        has a header that does not decode or disagrees, or a payload that fails
///                        its checksum: the block cannot be served
///   "broken_chain"       an entry whose parent block is not stored (or was bad): unreachable by
///                        a prefix match until its parent is saved again
///   "no_namespace"       an entry whose chain starts at a root with no namespace record
///   "slot_without_entry" a slot whose header names a block no entry points at: the data of an
///                        erased block, or of a write a crash cut before its commit; the slot is
///                        free already, so this one is reported but is not an error
struct NvmeCheckProblem {
  std::string kind;
  BlockKey key;
  SlotId slot = kNoSlot;
  std::string detail;
  bool repaired = false;
};

struct NvmeCheckReport {
  std::string dir;
  std::string layout;          // the tier's layout, as the catalog names it
  uint64_t slot_bytes = 0;
  uint32_t files = 0;
  uint64_t slots = 0;
  uint64_t namespaces = 0;
  uint64_t entries = 0;        // catalog block entries, undecodable ones included
  uint64_t good_blocks = 0;    // entries that a restart serves
  uint64_t good_bytes = 0;     // their payload bytes
  uint64_t bytes_read = 0;
  uint64_t undecodable_entries = 0, bad_slots = 0, broken_chains = 0, no_namespace = 0;
  uint64_t slots_without_entry = 0;
  uint64_t repaired = 0;       // problems fixed (with repair)
  std::vector<NvmeCheckProblem> problems;  // at most max_listed

  /// Problems that cost a block (all but slots without an entry).
  uint64_t errors() const noexcept { return undecodable_entries + bad_slots + broken_chains + no_namespace; }
};

/// `dir` is an NVMe tier directory (it holds catalog/ and slots.<i>) or a kvtierd data dir
/// (with the tier in nvme/). kUnavailable when a live kvtierd holds it (the message names the
/// holder); kNotFound when it holds no tier; kIoError when the catalog or a slot file cannot be
/// read. A tier with problems is not an error: the report lists them.
Result<NvmeCheckReport> check_nvme_tier(const std::string& dir, const NvmeCheckOptions& options = {});

}  // namespace kvtier
