// NvmeTier opening: options checks, slot files, the catalog and its geometry, and recovery,
// which rebuilds the slot map from the catalog, trusting an entry only when its slot header
// agrees with it (DESIGN.md "Persistence").
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
    const bool direct = options.direct;
    options.device_factory = [direct](int, const std::string& path, uint64_t size) {
      FileDeviceOptions fo;
      fo.direct = direct;
      return create_file_device(path, size, fo);
    };
  }
  std::unique_ptr<NvmeTier> tier(new NvmeTier(std::move(options)));
  KVTIER_RETURN_IF_ERROR(tier->open_devices());
  CatalogOptions co;
  co.sync = tier->options_.durability == Durability::kFdatasync;
  auto catalog = Catalog::open(tier->options_.dir + "/catalog", co);
  if (!catalog.is_ok()) return catalog.status();
  tier->catalog_ = std::move(catalog).value();
  KVTIER_RETURN_IF_ERROR(tier->check_geometry());
  KVTIER_RETURN_IF_ERROR(tier->recover());
  return tier;
}

Status NvmeTier::open_devices() {
  const uint32_t files = options_.files;
  for (uint32_t i = 0; i < files; ++i) {
    const uint64_t slots_here = (slot_count_ - i + files - 1) / files;
    const uint64_t bytes = slots_here * slot_bytes_;
    const std::string path = options_.dir + "/slots." + std::to_string(i);
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
  // read as garbage, so refuse it rather than drop every entry.
  const std::string geometry = "slot_format=" + std::to_string(kSlotFormatVersion) +
                               " layout=" + std::to_string(options_.layout.fingerprint()) +
                               " slot_bytes=" + std::to_string(slot_bytes_) +
                               " files=" + std::to_string(options_.files);
  auto stored = catalog_->get_meta("geometry");
  if (stored.is_ok()) {
    if (*stored != geometry) {
      return {StatusCode::kLayoutMismatch,
              "nvme tier in " + options_.dir + " has geometry '" + *stored + "', asked for '" +
                  geometry + "'"};
    }
    return Status::ok();
  }
  if (stored.status().code() != StatusCode::kNotFound) return stored.status();
  return catalog_->put_meta("geometry", geometry);
}


Status NvmeTier::recover() {
  std::vector<CatalogEntry> candidates;
  std::vector<BlockKey> undecodable;
  KVTIER_RETURN_IF_ERROR(catalog_->for_each(
      [&](const CatalogEntry& e) { candidates.push_back(e); }, &undecodable));

  std::vector<BlockKey> drop = undecodable;
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
      drop.push_back(e.key);
      (corrupt ? corrupt_at_open_ : misplaced_at_open_).fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    slot_state_[e.slot] = SlotState::kCommitted;
    live_.emplace(e.key, Live{e, false});
    bytes_used_ += e.payload_bytes;
  }
  for (const BlockKey& key : drop) {
    dropped_at_open_.fetch_add(1, std::memory_order_relaxed);
    if (Status s = catalog_->remove(key); !s) {
      // A full disk must not stop the tier from opening. The entry stays in the catalog (and is
      // checked again at the next open); its slot is kept out of use so nothing else is written
      // there under a second entry.
      spdlog::warn("kvtier nvme tier {}: could not erase dropped block {}: {}", options_.dir, key.to_hex(),
                   s.to_string());
      for (const CatalogEntry& e : candidates) {
        if (e.key == key && e.slot < slot_count_ && !allocator_.is_used(e.slot)) allocator_.claim(e.slot).ignore();
      }
    }
  }
  if (!drop.empty() || !live_.empty()) {
    spdlog::info("kvtier nvme tier {}: {} blocks restored, {} dropped, {} of {} slots free",
                 options_.dir, live_.size(), drop.size(), allocator_.free_count(), slot_count_);
  }
  return Status::ok();
}

}  // namespace kvtier
