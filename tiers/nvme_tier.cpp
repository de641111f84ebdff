#include "tiers/nvme_tier.h"

#include <algorithm>
#include <chrono>
#include <cstring>

namespace kvtier {

namespace {

uint64_t now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::system_clock::now().time_since_epoch())
                                   .count());
}

/// Reads [offset, offset + out.size()) from a device whose I/O must be page-aligned: the
/// aligned part straight into `out` when its address allows, the rest through a bounce page.
Status read_exact(StorageDevice& dev, uint64_t offset, std::span<std::byte> out) {
  const bool direct_ok = is_aligned(offset, kIoAlignment) &&
                         is_aligned(reinterpret_cast<uintptr_t>(out.data()), kIoAlignment);
  size_t done = 0;
  if (direct_ok) {
    done = out.size() / kIoAlignment * kIoAlignment;
    if (done > 0) KVTIER_RETURN_IF_ERROR(dev.read(offset, out.first(done)));
    if (done == out.size()) return Status::ok();
  }
  const uint64_t start = (offset + done) / kIoAlignment * kIoAlignment;
  const uint64_t end = align_up(offset + out.size(), kIoAlignment);
  AlignedBuffer bounce = make_aligned_buffer(end - start);
  KVTIER_RETURN_IF_ERROR(dev.read(start, std::span(bounce.get(), end - start)));
  std::memcpy(out.data() + done, bounce.get() + (offset + done - start), out.size() - done);
  return Status::ok();
}

}  // namespace

Result<SlotId> NvmeTier::allocate() {
  std::lock_guard lock(mu_);
  auto slot = allocator_.allocate();
  if (slot.is_ok()) slot_state_[*slot] = SlotState::kReserved;
  return slot;
}

Status NvmeTier::check_reserved(SlotId slot) const {
  if (slot >= slot_count_ || slot_state_[slot] != SlotState::kReserved) {
    return invalid_argument("nvme tier: slot " + std::to_string(slot) +
                            " is not reserved by allocate()");
  }
  return Status::ok();
}

Status NvmeTier::release_uncommitted(SlotId slot) {
  std::lock_guard lock(mu_);
  KVTIER_RETURN_IF_ERROR(check_reserved(slot));
  free_slot_locked(slot);
  return Status::ok();
}

void NvmeTier::free_slot_locked(SlotId slot) {
  slot_state_[slot] = SlotState::kFree;
  allocator_.free(slot).ignore();  // the state machine above guarantees the slot is used
}

SlotLocation NvmeTier::location(SlotId slot) const {
  if (slot >= slot_count_) return {};
  return {&device_of(slot), header_offset(slot), header_offset(slot) + header_bytes_,
          payload_capacity_};
}

Status NvmeTier::count_io(Status s) {
  if (s.code() == StatusCode::kIoError || s.code() == StatusCode::kResourceExhausted) {
    io_errors_.fetch_add(1, std::memory_order_relaxed);
  }
  return s;
}

Result<CatalogEntry> NvmeTier::write_header(SlotId slot, const CatalogEntry& entry,
                                            std::span<const std::byte> payload) {
  {
    std::lock_guard lock(mu_);
    KVTIER_RETURN_IF_ERROR(check_reserved(slot));
  }
  if (payload.empty() || payload.size() > payload_capacity_ ||
      entry.tokens.size() > options_.layout.block_tokens ||
      entry.extras.size() > kMaxHeaderExtras) {
    return invalid_argument("nvme tier: block of " + std::to_string(payload.size()) +
                            " bytes, " + std::to_string(entry.tokens.size()) + " tokens, " +
                            std::to_string(entry.extras.size()) + " extras does not fit a slot");
  }
  BlockHeaderInfo info;
  info.key = entry.key;
  info.parent = entry.parent;
  info.ns_root = entry.ns_root;
  info.block_index = entry.block_index;
  info.tokens = entry.tokens;
  info.extras = entry.extras;
  info.layout_fingerprint = options_.layout.fingerprint();
  info.num_layers = options_.layout.num_layers;
  info.priority = entry.priority;
  KVTIER_RETURN_IF_ERROR(compute_checksums(info, payload));
  AlignedBuffer header = make_aligned_buffer(header_bytes_);
  KVTIER_RETURN_IF_ERROR(encode_block_header(info, static_cast<uint32_t>(header_bytes_),
                                             std::span(header.get(), header_bytes_)));
  KVTIER_RETURN_IF_ERROR(count_io(device_of(slot).write(
      header_offset(slot), std::span<const std::byte>(header.get(), header_bytes_))));
  CatalogEntry out = entry;
  out.slot = slot;
  out.payload_bytes = info.payload_bytes;
  out.checksum = info.payload_checksum;
  out.layout_fingerprint = info.layout_fingerprint;
  if (out.created_ns == 0) out.created_ns = now_ns();
  if (out.last_access_ns == 0) out.last_access_ns = out.created_ns;
  return out;
}

Result<CatalogEntry> NvmeTier::write_block(SlotId slot, const CatalogEntry& entry,
                                           std::span<const std::byte> payload) {
  if (!is_aligned(reinterpret_cast<uintptr_t>(payload.data()), kIoAlignment)) {
    return invalid_argument("nvme tier: payload buffer must be " + std::to_string(kIoAlignment) +
                            "-byte aligned (use make_aligned_buffer)");
  }
  if (payload.empty() || payload.size() > payload_capacity_) {
    return invalid_argument("nvme tier: payload of " + std::to_string(payload.size()) +
                            " bytes for a slot of " + std::to_string(payload_capacity_));
  }
  {
    std::lock_guard lock(mu_);
    KVTIER_RETURN_IF_ERROR(check_reserved(slot));
  }
  // Payload first, header last: a header naming a key is only ever written over a complete
  // payload, so a scan of headers (fsck) can trust the order once the file is flushed.
  StorageDevice& dev = device_of(slot);
  const uint64_t payload_offset = header_offset(slot) + header_bytes_;
  const size_t whole = payload.size() / kIoAlignment * kIoAlignment;
  if (whole > 0) {
    KVTIER_RETURN_IF_ERROR(count_io(dev.write(payload_offset, payload.first(whole))));
  }
  if (whole < payload.size()) {
    AlignedBuffer tail = make_aligned_buffer(kIoAlignment);
    std::memset(tail.get(), 0, kIoAlignment);
    std::memcpy(tail.get(), payload.data() + whole, payload.size() - whole);
    KVTIER_RETURN_IF_ERROR(count_io(dev.write(
        payload_offset + whole, std::span<const std::byte>(tail.get(), kIoAlignment))));
  }
  return write_header(slot, entry, payload);
}

Status NvmeTier::commit(const CatalogEntry& entry) {
  return commit_batch(std::span(&entry, 1)).front();
}

std::vector<Status> NvmeTier::commit_batch(std::span<const CatalogEntry> entries) {
  std::vector<Status> result(entries.size());
  std::vector<size_t> accepted;
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < entries.size(); ++i) {
      const CatalogEntry& entry = entries[i];
      if (Status s = check_reserved(entry.slot); !s) {
        result[i] = s;  // also a slot named twice: the first made it kCommitting
      } else if (live_.contains(entry.key) || committing_.contains(entry.key)) {
        result[i] = {StatusCode::kAlreadyExists, "nvme tier: block " + entry.key.to_hex() + " is already stored"};
      } else if (entry.layout_fingerprint != options_.layout.fingerprint() || entry.payload_bytes == 0) {
        result[i] = invalid_argument("nvme tier: commit an entry returned by write_block/write_header");
      } else {
        slot_state_[entry.slot] = SlotState::kCommitting;
        committing_.insert(entry.key);
        accepted.push_back(i);
      }
    }
  }
  if (accepted.empty()) return result;
  std::vector<CatalogEntry> batch;
  batch.reserve(accepted.size());
  for (size_t i : accepted) batch.push_back(entries[i]);
  const Status s = record(batch);

  std::lock_guard lock(mu_);
  for (size_t i : accepted) {
    const CatalogEntry& entry = entries[i];
    committing_.erase(entry.key);
    result[i] = s;
    if (!s.is_ok()) {
      slot_state_[entry.slot] = SlotState::kReserved;
      continue;
    }
    slot_state_[entry.slot] = SlotState::kCommitted;
    live_.emplace(entry.key, Live{entry, false});
    bytes_used_ += entry.payload_bytes;
  }
  return result;
}

Status NvmeTier::record(std::span<const CatalogEntry> entries) {
  // The catalog entries are the commit point: they go in only after the data is durable. One
  // flush per slot file and one synced catalog write cover the whole batch, instead of an
  // fdatasync and a WAL sync per block.
  if (options_.durability == Durability::kFdatasync) {
    std::vector<StorageDevice*> flushed;
    for (const CatalogEntry& e : entries) {
      StorageDevice* dev = &device_of(e.slot);
      if (std::find(flushed.begin(), flushed.end(), dev) != flushed.end()) continue;
      flushed.push_back(dev);
      KVTIER_RETURN_IF_ERROR(count_io(dev->flush()));
    }
  }
  if (options_.before_catalog_commit) KVTIER_RETURN_IF_ERROR(options_.before_catalog_commit());
  return count_io(catalog_->put_batch(entries));
}

Status NvmeTier::replace(const CatalogEntry& entry) {
  {
    std::lock_guard lock(mu_);
    KVTIER_RETURN_IF_ERROR(check_reserved(entry.slot));
    auto it = live_.find(entry.key);
    if (it == live_.end() || it->second.changing) {
      return not_found("nvme tier has no block " + entry.key.to_hex() + " to replace");
    }
    if (entry.layout_fingerprint != options_.layout.fingerprint() || entry.payload_bytes == 0) {
      return invalid_argument("nvme tier: replace with an entry returned by write_block/write_header");
    }
    it->second.changing = true;  // no erase or second replace until this one is recorded
    slot_state_[entry.slot] = SlotState::kCommitting;
  }
  // The catalog put is the switch: a crash before it leaves the old copy named, after it the new
  // one. The old slot is free once the entry no longer names it; the next open finds it unclaimed.
  const Status s = record(std::span(&entry, 1));
  std::lock_guard lock(mu_);
  Live& live = live_.at(entry.key);
  live.changing = false;
  if (!s.is_ok()) {
    slot_state_[entry.slot] = SlotState::kReserved;
    return s;
  }
  const SlotId old = live.entry.slot;
  bytes_used_ = bytes_used_ - live.entry.payload_bytes + entry.payload_bytes;
  live.entry = entry;
  slot_state_[entry.slot] = SlotState::kCommitted;
  if (readers_[old] > 0) {
    slot_state_[old] = SlotState::kFreeWhenUnread;  // the last reader frees it
  } else {
    free_slot_locked(old);
  }
  return Status::ok();
}

Result<CatalogEntry> NvmeTier::store(const CatalogEntry& entry,
                                     std::span<const std::byte> payload) {
  auto slot = allocate();
  if (!slot.is_ok()) return slot.status();
  auto written = write_block(*slot, entry, payload);
  Status s = written.is_ok() ? commit(*written) : written.status();
  if (!s.is_ok()) {
    release_uncommitted(*slot).ignore();  // reserved by us above; cannot fail
    return s;
  }
  return written;
}

Status NvmeTier::erase(const BlockKey& key) {
  SlotId slot;
  {
    std::lock_guard lock(mu_);
    auto it = live_.find(key);
    if (it == live_.end() || it->second.changing) {
      return not_found("nvme tier has no block " + key.to_hex());
    }
    it->second.changing = true;
    slot = it->second.entry.slot;
  }
  // Catalog first, slot second. Freed first, the slot could be reallocated and overwritten by a
  // new block while the catalog still maps `key` to it; a crash then would bring back `key`
  // pointing at another block's bytes. Deleted first, a crash leaves at worst an unused slot,
  // which the next open finds free because no entry claims it.
  Status s = count_io(catalog_->remove(key));
  std::lock_guard lock(mu_);
  auto it = live_.find(key);
  if (!s.is_ok()) {
    it->second.changing = false;
    return s;
  }
  bytes_used_ -= it->second.entry.payload_bytes;
  live_.erase(it);
  if (readers_[slot] > 0) {
    slot_state_[slot] = SlotState::kFreeWhenUnread;  // the last reader frees it
  } else {
    free_slot_locked(slot);
  }
  return Status::ok();
}

Result<CatalogEntry> NvmeTier::pin(const BlockKey& key) {
  std::lock_guard lock(mu_);
  auto it = live_.find(key);
  if (it == live_.end()) return not_found("nvme tier has no block " + key.to_hex());
  ++readers_[it->second.entry.slot];
  return it->second.entry;
}

void NvmeTier::unpin(SlotId slot) {
  std::lock_guard lock(mu_);
  if (--readers_[slot] == 0 && slot_state_[slot] == SlotState::kFreeWhenUnread) {
    free_slot_locked(slot);
  }
}

Status NvmeTier::refuse(Status s, std::span<std::byte> out) {
  if (s.code() == StatusCode::kChecksumMismatch) {
    checksum_errors_.fetch_add(1, std::memory_order_relaxed);
  }
  if (!out.empty()) std::memset(out.data(), 0, out.size());  // never leave suspect KV behind
  return s;
}

Result<BlockHeaderInfo> NvmeTier::read_header(SlotId slot, const BlockKey& expected) {
  if (slot >= slot_count_) return invalid_argument("nvme tier: slot out of range");
  AlignedBuffer buf = make_aligned_buffer(header_bytes_);
  KVTIER_RETURN_IF_ERROR(
      count_io(device_of(slot).read(header_offset(slot), std::span(buf.get(), header_bytes_))));
  auto info = decode_block_header(std::span<const std::byte>(buf.get(), header_bytes_));
  if (!info.is_ok()) return info.status();
  if (info->key != expected || info->layout_fingerprint != options_.layout.fingerprint() ||
      info->payload_bytes == 0 || info->payload_bytes > payload_capacity_) {
    return Status(StatusCode::kChecksumMismatch,
                  "slot " + std::to_string(slot) + " holds block " + info->key.to_hex() +
                      ", not " + expected.to_hex() + " of this layout");
  }
  return info;
}

Status NvmeTier::read_slot(SlotId slot, const BlockKey& expected, std::span<std::byte> out) {
  if (!is_aligned(reinterpret_cast<uintptr_t>(out.data()), kIoAlignment)) {
    return invalid_argument("nvme tier: read buffer must be " + std::to_string(kIoAlignment) +
                            "-byte aligned (use make_aligned_buffer)");
  }
  auto info = read_header(slot, expected);
  if (!info.is_ok()) return refuse(info.status(), out);
  if (out.size() < info->payload_bytes) {
    return invalid_argument("nvme tier: buffer of " + std::to_string(out.size()) +
                            " bytes for a block of " + std::to_string(info->payload_bytes));
  }
  auto payload = out.first(info->payload_bytes);
  Status s = count_io(read_exact(device_of(slot), header_offset(slot) + header_bytes_, payload));
  if (s.is_ok()) s = verify_payload(*info, payload);
  if (!s.is_ok()) return refuse(s, out);
  return Status::ok();
}

Status NvmeTier::read_block(const BlockKey& key, std::span<std::byte> out) {
  auto entry = pin(key);
  if (!entry.is_ok()) return entry.status();
  Status s = read_slot(entry->slot, key, out);
  unpin(entry->slot);
  return s;
}

Status NvmeTier::read_layer(const BlockKey& key, uint32_t layer, std::span<std::byte> out) {
  auto entry = pin(key);
  if (!entry.is_ok()) return entry.status();
  const SlotId slot = entry->slot;
  Status s = [&]() -> Status {
    auto info = read_header(slot, key);
    if (!info.is_ok()) return refuse(info.status(), out);
    if (layer >= info->num_layers) {
      return invalid_argument("nvme tier: layer " + std::to_string(layer) + " of " +
                              std::to_string(info->num_layers));
    }
    const uint64_t layer_bytes = info->payload_bytes / info->num_layers;
    if (out.size() < layer_bytes) {
      return invalid_argument("nvme tier: buffer of " + std::to_string(out.size()) +
                              " bytes for a layer of " + std::to_string(layer_bytes));
    }
    auto bytes = out.first(layer_bytes);
    const uint64_t offset = header_offset(slot) + header_bytes_ + layer * layer_bytes;
    Status r = count_io(read_exact(device_of(slot), offset, bytes));
    if (r.is_ok()) r = verify_layer(*info, layer, bytes);
    return r.is_ok() ? r : refuse(r, out);
  }();
  unpin(slot);
  return s;
}

bool NvmeTier::contains(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  return live_.contains(key);
}

Result<CatalogEntry> NvmeTier::entry(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  auto it = live_.find(key);
  if (it == live_.end()) return not_found("nvme tier has no block " + key.to_hex());
  return it->second.entry;
}

std::vector<CatalogEntry> NvmeTier::entries() const {
  std::lock_guard lock(mu_);
  std::vector<CatalogEntry> out;
  out.reserve(live_.size());
  for (const auto& [key, live] : live_) out.push_back(live.entry);
  return out;
}

void NvmeTier::for_each(const std::function<void(const CatalogEntry&)>& fn) const {
  for (const CatalogEntry& e : entries()) fn(e);  // a copy: `fn` may call back into the tier
}

NvmeTierStats NvmeTier::stats() const {
  std::lock_guard lock(mu_);
  NvmeTierStats s;
  s.blocks = live_.size();
  s.bytes_used = bytes_used_;
  s.capacity_bytes = slot_count_ * slot_bytes_;
  s.slots = slot_count_;
  s.free_slots = allocator_.free_count();
  s.checksum_errors = checksum_errors_.load(std::memory_order_relaxed);
  s.dropped_at_open = dropped_at_open_.load(std::memory_order_relaxed);
  s.corrupt_at_open = corrupt_at_open_.load(std::memory_order_relaxed);
  s.misplaced_at_open = misplaced_at_open_.load(std::memory_order_relaxed);
  s.io_errors = io_errors_.load(std::memory_order_relaxed);
  return s;
}

}  // namespace kvtier
