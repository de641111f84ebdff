// NvmeTier opening: options checks, slot files, the catalog and its geometry, and recovery,
// which rebuilds the slot map from the catalog, trusting an entry only when its slot header
// agrees with it (DESIGN.md "Persistence").
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include <spdlog/spdlog.h>

#include "tiers/nvme_tier.h"

namespace kvtier {

namespace {

uint64_t slot_bytes_for(const KvLayout& layout) {
  return header_bytes_for(layout) + align_up(layout.bytes_per_block(), kIoAlignment);
}

uint64_t slot_count_for(const NvmeTierOptions& o) {
  if (!o.layout.validate().is_ok()) return 0;
  return o.capacity_bytes / slot_bytes_for(o.layout);
}

std::string slot_path(const NvmeTierOptions& o, uint32_t i) { return o.dir + "/slots." + std::to_string(i); }

uint64_t file_bytes_for(const NvmeTierOptions& o, uint32_t i) {
  const uint64_t slots = slot_count_for(o);
  return (slots - i + o.files - 1) / o.files * slot_bytes_for(o.layout);
}

std::string bytes_text(uint64_t bytes) { return std::to_string(bytes) + " bytes (" + std::to_string(bytes >> 20) + " MiB)"; }

/// Refuses slot files that do not fit their file system: the bytes still to preallocate must be
/// free. Checked before anything is created, so the message gives the sizes instead of a
/// preallocation failing half way.
Status check_free_space(const NvmeTierOptions& o) {
  uint64_t wanted = 0, allocated = 0, missing = 0;
  for (uint32_t i = 0; i < o.files; ++i) {
    const uint64_t bytes = file_bytes_for(o, i);
    struct stat st{};
    uint64_t have = 0;
    if (::stat(slot_path(o, i).c_str(), &st) == 0) {
      if (S_ISBLK(st.st_mode)) continue;  // a block device brings its own space
      have = static_cast<uint64_t>(st.st_blocks) * 512;
    }
    wanted += bytes;
    allocated += have;
    if (have < bytes) missing += bytes - have;
  }
  struct statvfs vfs{};
  if (::statvfs(o.dir.c_str(), &vfs) != 0) {
    return Status(StatusCode::kIoError, "statvfs " + o.dir + ": " + std::strerror(errno));
  }
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  if (missing <= free_bytes) return Status::ok();
  return Status(StatusCode::kResourceExhausted,
                "nvme tier in " + o.dir + ": its slot files of " + bytes_text(wanted) +
                    " do not fit the file system, which has " + bytes_text(free_bytes) +
                    " free, and the slot files already take " + bytes_text(allocated) +
                    ": set nvme_bytes to at most " + bytes_text(free_bytes + allocated) +
                    " (less, to leave room for the catalog), or free space");
}

/// What an operator can do about a catalog that does not open, appended to RocksDB's error.
Status explain_catalog_error(const Status& s, const std::string& dir) {
  std::string m = "nvme tier in " + dir + ": " + std::string(s.message());
  if (s.code() == StatusCode::kIoError) {
    m += ". The tier's blocks cannot be found without its catalog: to start with an empty NVMe tier, stop "
         "kvtierd and move " + dir + " aside (kvtier has no repair tool yet)";
  } else if (s.code() == StatusCode::kResourceExhausted) {
    m += ": free space on its file system";
  }
  return Status(s.code(), std::move(m));
}

}  // namespace

NvmeTier::NvmeTier(NvmeTierOptions options)
    : options_(std::move(options)),
      header_bytes_(header_bytes_for(options_.layout)),
      payload_capacity_(align_up(options_.layout.bytes_per_block(), kIoAlignment)),
      slot_bytes_(slot_bytes_for(options_.layout)),
      slot_count_(slot_count_for(options_)),
      allocator_(slot_count_),
      slot_state_(slot_count_, SlotState::kFree),
      readers_(slot_count_, 0) {}

NvmeTier::~NvmeTier() = default;

Result<std::unique_ptr<NvmeTier>> NvmeTier::open(NvmeTierOptions options) {
  KVTIER_RETURN_IF_ERROR(options.layout.validate());
  if (options.dir.empty()) return invalid_argument("nvme tier: options.dir is required");
  if (options.files == 0) return invalid_argument("nvme tier: options.files must be at least 1");
  if (slot_count_for(options) < options.files) {
    return invalid_argument("nvme tier: capacity " + std::to_string(options.capacity_bytes) +
                            " bytes holds fewer slots than files (slot of " +
                            std::to_string(slot_bytes_for(options.layout)) + " bytes)");
  }
  std::error_code ec;
  std::filesystem::create_directories(options.dir, ec);
  if (ec) return Status(StatusCode::kIoError, "create " + options.dir + ": " + ec.message());
  if (!options.device_factory) {
    // Slot files: refuse before anything is created when they cannot fit (an injected factory
    // brings its own devices).
    KVTIER_RETURN_IF_ERROR(check_free_space(options));
    const bool direct = options.direct;
    options.device_factory = [direct](int, const std::string& path, uint64_t size) {
      FileDeviceOptions fo;
      fo.direct = direct;
      return create_file_device(path, size, fo);
    };
  }
  std::unique_ptr<NvmeTier> tier(new NvmeTier(std::move(options)));
  // The catalog first: it holds DIR/LOCK, so a second opener touches no slot file, and the
  // geometry is checked before a slot file of another size is preallocated.
  CatalogOptions co;
  co.sync = tier->options_.durability == Durability::kFdatasync;
  co.lock_file = tier->options_.dir + "/LOCK";
  auto catalog = Catalog::open(tier->options_.dir + "/catalog", co);
  if (!catalog.is_ok()) return explain_catalog_error(catalog.status(), tier->options_.dir);
  tier->catalog_ = std::move(catalog).value();
  KVTIER_RETURN_IF_ERROR(tier->check_geometry());
  KVTIER_RETURN_IF_ERROR(tier->open_devices());
  KVTIER_RETURN_IF_ERROR(tier->recover());
  return tier;
}

Status NvmeTier::open_devices() {
  const uint32_t files = options_.files;
  for (uint32_t i = 0; i < files; ++i) {
    const uint64_t bytes = file_bytes_for(options_, i);
    const std::string path = slot_path(options_, i);
    auto dev = options_.device_factory(static_cast<int>(i), path, bytes);
    if (!dev.is_ok()) return dev.status();
    if ((*dev)->size() < bytes) {
      return invalid_argument("nvme tier: device for " + path + " holds " +
                              std::to_string((*dev)->size()) + " bytes, needs " +
                              std::to_string(bytes));
    }
    devices_.push_back(std::move(dev).value());
  }
  return Status::ok();
}

Status NvmeTier::check_geometry() {
  // Offsets follow from the slot size and the file count; a tier written with others would be
  // read as garbage, so refuse it rather than drop every entry. The geometry string is what is
  // compared (its format is fixed: older data dirs hold it); "layout" beside it is the layout's
  // description, for the message only (missing in data dirs from before it was written).
  const std::string geometry = "slot_format=" + std::to_string(kSlotFormatVersion) +
                               " layout=" + std::to_string(options_.layout.fingerprint()) +
                               " slot_bytes=" + std::to_string(slot_bytes_) +
                               " files=" + std::to_string(options_.files);
  const std::string layout = options_.layout.describe();
  auto stored = catalog_->get_meta("geometry");
  if (stored.is_ok()) {
    auto stored_layout = catalog_->get_meta("layout");
    if (*stored != geometry) {
      const std::string was = stored_layout.is_ok() ? "layout " + *stored_layout
                                                    : "a layout written before kvtier named layouts";
      return {StatusCode::kLayoutMismatch,
              "nvme tier in " + options_.dir + " holds blocks of " + was + " (geometry '" + *stored +
                  "'), but this store is configured with layout " + layout + " (geometry '" + geometry +
                  "'): start with the layout the tier was written with, or move " + options_.dir +
                  " aside to start with an empty NVMe tier"};
    }
    if (!stored_layout.is_ok()) {
      // An older data dir: name its layout from now on. Only the message needs it, so a failure
      // (a full disk) changes nothing else.
      catalog_->put_meta("layout", layout).ignore();
    }
    return Status::ok();
  }
  if (stored.status().code() != StatusCode::kNotFound) return stored.status();
  KVTIER_RETURN_IF_ERROR(catalog_->put_meta("layout", layout));
  return catalog_->put_meta("geometry", geometry);
}


Status NvmeTier::recover() {
  std::vector<CatalogEntry> candidates;
  std::vector<BlockKey> undecodable;
  KVTIER_RETURN_IF_ERROR(catalog_->for_each(
      [&](const CatalogEntry& e) { candidates.push_back(e); }, &undecodable));

  std::vector<std::pair<BlockKey, SlotId>> drop;  // an undecodable entry names no slot
  for (const BlockKey& key : undecodable) drop.emplace_back(key, kNoSlot);
  corrupt_at_open_.fetch_add(undecodable.size(), std::memory_order_relaxed);
  for (const CatalogEntry& e : candidates) {
    bool corrupt = false;
    // The payload checksum is not recomputed here (that would read the whole tier); every read
    // checks it. The header must name this key with the entry's length, checksum and layout.
    std::string why;
    if (e.slot >= slot_count_) {
      why = "slot out of range";
    } else if (allocator_.is_used(e.slot)) {
      why = "slot claimed by another entry";
    } else if (e.layout_fingerprint != options_.layout.fingerprint()) {
      why = "layout differs";
    } else {
      auto info = read_header(e.slot, e.key);
      if (!info.is_ok()) {
        why = info.status().to_string();
        corrupt = true;
      } else if (info->payload_bytes != e.payload_bytes ||
                 info->payload_checksum != e.checksum || info->parent != e.parent ||
                 info->tokens != e.tokens) {
        why = "slot header disagrees with the catalog";
        corrupt = true;
      }
    }
    if (why.empty()) {
      if (!allocator_.claim(e.slot).is_ok()) {
        why = "slot claimed by another entry";
      }
    }
    if (!why.empty()) {
      spdlog::warn("kvtier nvme tier {}: dropping block {} (slot {}): {}", options_.dir,
                   e.key.to_hex(), e.slot, why);
      drop.emplace_back(e.key, e.slot);
      (corrupt ? corrupt_at_open_ : misplaced_at_open_).fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    slot_state_[e.slot] = SlotState::kCommitted;
    live_.emplace(e.key, Live{e, false});
    bytes_used_ += e.payload_bytes;
  }
  for (const auto& [key, slot] : drop) {
    dropped_at_open_.fetch_add(1, std::memory_order_relaxed);
    if (Status s = catalog_->remove(key); !s) {
      // A full disk must not stop the tier from opening. The entry stays in the catalog (and is
      // checked again at the next open); its slot is kept out of use so nothing else is written
      // there under a second entry.
      spdlog::warn("kvtier nvme tier {}: could not erase dropped block {}: {}", options_.dir, key.to_hex(),
                   s.to_string());
      if (slot < slot_count_ && !allocator_.is_used(slot)) allocator_.claim(slot).ignore();
    }
  }
  if (!drop.empty() || !live_.empty()) {
    spdlog::info("kvtier nvme tier {}: {} blocks restored, {} dropped, {} of {} slots free",
                 options_.dir, live_.size(), drop.size(), allocator_.free_count(), slot_count_);
  }
  return Status::ok();
}

}  // namespace kvtier
