// SlotFiles: an NVMe tier's slot files read (and, for repair, written) directly, for the tools
// that work on a data dir no kvtierd holds: kvtier fsck (tiers/nvme_check.h) and kvtier export
// (tiers/nvme_walk.h). The tier itself goes through StorageDevice and the transfer engine.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "tiers/block_header.h"
#include "tiers/catalog.h"

namespace kvtier {

/// The catalog's "geometry" record, as NvmeTier::check_geometry writes it:
/// "slot_format=1 layout=<fingerprint> slot_bytes=<n> files=<n>".
struct SlotGeometry {
  uint64_t fingerprint = 0;
  uint64_t slot_bytes = 0;
  uint32_t files = 0;
  /// kInvalidArgument for another slot format; kChecksumMismatch for a record that does not parse.
  static Result<SlotGeometry> parse(const std::string& text, const std::string& dir);
};

/// A slot's header, decoded, and the bytes its region takes.
struct SlotHeader {
  BlockHeaderInfo info;
  uint32_t header_bytes = 0;
};

class SlotFiles {
 public:
  /// Opens DIR/slots.<i> for every file of `g` (read-write when `writable`).
  static Result<SlotFiles> open(const std::string& dir, const SlotGeometry& g, bool writable);
  SlotFiles() = default;
  SlotFiles(SlotFiles&& o) noexcept;
  SlotFiles& operator=(SlotFiles&&) = delete;
  ~SlotFiles();

  /// Slots over all files: slot s lives in file s % files at (s / files) * slot_bytes.
  uint64_t count() const;
  bool in_range(SlotId s) const;
  /// `out.size()` bytes of slot s from `offset` in it.
  Status read(SlotId s, uint64_t offset, std::span<std::byte> out) const;
  /// The slot's header (kNotFound when it holds none: no magic; kChecksumMismatch when damaged).
  /// `bytes_read` grows by what was read; `buf` is scratch.
  Result<SlotHeader> read_header(SlotId s, std::vector<std::byte>& buf, uint64_t& bytes_read) const;
  /// Zeroes the slot's first page: its header no longer decodes, so the slot reads as free.
  Status wipe_header(SlotId s) const;
  Status sync() const;

 private:
  std::vector<int> fds_;
  std::vector<uint64_t> per_file_;
  uint64_t slot_bytes_ = 0;
};

/// The tier directory `dir` names: dir itself when it holds a catalog, else dir/nvme when that
/// does. kNotFound (naming both) otherwise.
Result<std::string> find_nvme_tier_dir(const std::string& dir);

/// An NVMe tier opened by a tool, as no kvtierd holds it.
struct OfflineCatalog {
  std::string dir;  // the tier directory
  std::unique_ptr<Catalog> catalog;
};
struct OfflineTier {
  std::string dir;
  std::unique_ptr<Catalog> catalog;
  SlotGeometry geometry;
  SlotFiles files;
};

/// The catalog of the tier in `path` (a kvtierd data dir or the tier directory), under the tier's
/// lock file: kUnavailable, naming the holder, while a kvtierd holds it. Read-only unless
/// `writable`; never created.
Result<OfflineCatalog> open_offline_catalog(const std::string& path, bool writable);
/// open_offline_catalog, then the tier's geometry and its slot files.
Result<OfflineTier> open_offline_tier(const std::string& path, bool writable);

/// Why the slot `header` does not serve `entry`: "" when it names that block, both are of the
/// tier's layout, it agrees with the entry (length, checksum, parent, tokens) and the payload fits
/// the slot. The payload itself is checked by verify_payload.
std::string header_mismatch(const SlotHeader& header, const CatalogEntry& entry, const SlotGeometry& geometry);

}  // namespace kvtier
