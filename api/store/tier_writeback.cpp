// The tier manager, NVMe write-back: batches of blocks written with their ancestors (NVMe stays
// prefix-closed) and recorded in the catalog; quarantine of blocks found corrupt; flush.
#include "api/store/tier_manager_internals.h"

namespace kvtier {

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

std::vector<Status> TierManager::store_batch_to_nvme(std::span<const BlockKey> keys, size_t* written) {
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
    if (!asked.contains(k)) counters_->ancestor_writes.add();
  }
  if (written != nullptr) *written = written_now.size();
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
        counters_->errors.add();
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
      counters_->errors.add();
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
      counters_->errors.add();
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
      counters_->errors.add();
      refuse(w, committed[c]);
      continue;
    }
    counters_->nvme_written_bytes.add(block_bytes_);
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
  counters_->repaired.add();
  spdlog::info("kvtier: block {} repaired: NVMe slot {} replaces corrupt slot {}", key.to_hex(), written->slot, *old);
  return true;
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

}  // namespace kvtier
