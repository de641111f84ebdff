// The tier manager, the reclaimer: watermarks, the background reclaimer's pass (reclaimer.h runs
// it), and reclaiming a tier by demoting its coldest blocks down a tier or dropping them.
#include "api/store/tier_manager_internals.h"

namespace kvtier {

bool TierManager::above_high(Tier t) const noexcept {
  const uint64_t cap = capacity_slots(t);
  const auto high = static_cast<uint64_t>(limits_of(options_, t).high_watermark * static_cast<double>(cap));
  return cap > 0 && used_slots(t) + 1 > std::max<uint64_t>(high, 1);
}

uint64_t TierManager::low_mark(Tier t) const noexcept {
  return static_cast<uint64_t>(limits_of(options_, t).low_watermark * static_cast<double>(capacity_slots(t)));
}

void TierManager::reclaim_pass(const std::atomic<bool>& stop) {
  // Top down: HBM's demotions land in the host tier, whose write-back lands on NVMe.
  for (Tier t : kAllTiers) {
    if (!has_tier(t) || !above_high(t)) continue;
    if (Status s = reclaim(t, low_mark(t), &stop); !s) {
      // Everything pinned, or a failing disk: the next save that needs room reports it.
      spdlog::debug("background reclaim of the {} tier: {}", tier_name(t), s.to_string());
    }
  }
}

Status TierManager::reclaim(Tier t, uint64_t target_used, const std::atomic<bool>* stop) {
  const std::optional<Tier> lower = lower_of(t, nvme_ != nullptr);
  for (;;) {
    if (stop != nullptr && stop->load(std::memory_order_relaxed)) return Status::ok();
    std::lock_guard lock(counters_->reclaim_mu[static_cast<int>(t)]);
    if (used_slots(t) <= target_used) return Status::ok();
    // Orphans kept at open go first: no prefix reaches them until their parent is saved again.
    if (t == Tier::kNvme && drop_orphans(std::min<uint64_t>(used_slots(t) - target_used, 64)) > 0) continue;
    (stop != nullptr ? counters_->background_rounds : counters_->foreground_rounds).add();
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
      const std::vector<Status> moved = write_back_victims(t, victims);
      for (size_t v = 0; v < victims.size(); ++v) count_over(v, moved[v]);
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
        release_evicted(e);
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

bool TierManager::admit_to_nvme(const BlockResidency& block) const {
  const uint32_t min_uses = options_.nvme_admission_min_uses;
  return min_uses <= 1 || block.priority >= Priority::kHigh || uses_->estimate(block.key) >= min_uses;
}

std::vector<Status> TierManager::write_back_victims(Tier t, std::span<const BlockKey> victims) {
  std::vector<Status> result(victims.size());
  std::vector<BlockKey> to_store;
  std::vector<uint8_t> refused(victims.size(), 0);
  for (size_t v = 0; v < victims.size(); ++v) {
    auto where = index_->get(victims[v]);
    refused[v] = where && !where->resident_in(Tier::kNvme) && !admit_to_nvme(*where);
    if (!refused[v]) to_store.push_back(victims[v]);
  }
  // Admitted: what this write-back wrote, the admitted blocks' ancestors included.
  size_t written = 0;
  const std::vector<Status> stored = store_batch_to_nvme(to_store, &written);
  counters_->nvme_admitted.add(written);
  size_t s = 0;
  for (size_t v = 0; v < victims.size(); ++v) {
    if (!refused[v]) {
      const Status& st = stored[s++];
      result[v] = st ? drop_residency(victims[v], t) : st;
      continue;
    }
    // Written after all as the ancestor of an admitted child (NVMe stays prefix-closed): it has
    // its lower copy now.
    if (auto where = index_->get(victims[v]); where && where->resident_in(Tier::kNvme)) {
      result[v] = drop_residency(victims[v], t);
      continue;
    }
    // Refused: dropped instead of written. pick_victims put its children in `t` before it, so
    // they are gone by now; kBusy when it was pinned meanwhile (it stays).
    auto removed = index_->remove_residency(victims[v], t);
    if (!removed) {
      result[v] = removed.status();
      continue;
    }
    release_evicted(*removed);
    counters_->nvme_refused.add();
  }
  return result;
}

Result<size_t> TierManager::erase(std::span<const BlockKey> keys) {
  size_t erased = 0;
  for (const BlockKey& key : keys) {
    auto gone = index_->erase(key);
    if (!gone) {
      if (gone.status().code() == StatusCode::kNotFound) continue;
      return gone.status();
    }
    for (const EvictedBlock& e : *gone) release_evicted(e);
    ++erased;
  }
  return erased;
}

void TierManager::release_evicted(const EvictedBlock& e) {
  if (e.tier == Tier::kNvme) {
    nvme_->erase(e.key).ignore();  // already out of the index; a failure leaves a catalog orphan
  } else {
    free_slot(e.tier, e.slot);
  }
  if (e.left_index) {
    {
      std::lock_guard dl(counters_->dirty_mu);
      counters_->dirty.erase(e.key);
    }
    counters_->evicted->record(e.key, e.tier, tier_detail::wall_ns());
  }
  counters_->drops[static_cast<int>(e.tier)]->add();
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
  counters_->demotions_out[static_cast<int>(from)]->add();
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
    counters_->errors.add();
    return s;
  }
  counters_->nvme_written_bytes.add(block_bytes_);
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

}  // namespace kvtier
