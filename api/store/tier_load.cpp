// The tier manager, load and promotion: a match's blocks copied out to the caller, NVMe copies
// restored (checksums verified) and promoted on a hit.
#include "api/store/tier_manager_internals.h"

namespace kvtier {

Segment TierManager::copy_segment(const BlockResidency& where, Tier to, SlotId slot) {
  Tier src_tier = Tier::kNvme;  // the fastest tier holding the block, other than `to`
  for (Tier t : kAllTiers) {
    if (t != to && where.resident_in(t)) {
      src_tier = t;
      break;
    }
  }
  std::byte* dst = memory_tier(to)->arena->slot_ptr(slot);
  Segment seg{.layer = 0, .bytes = block_bytes_, .src = block_location(where, src_tier),
              .dst = to == Tier::kHbm ? Location::device_memory(dst) : Location::host(dst)};
  if (src_tier == Tier::kNvme) {  // storage is not trusted: verify on the way in
    seg.verify = true;
    seg.expected_xxh3_64 = where.checksum;
  }
  return seg;
}

Result<SlotId> TierManager::copy_into_memory_tier(const BlockResidency& from, Tier to) {
  auto slot = allocate_slot(to);
  if (!slot) return slot.status();
  JobSpec job;
  job.segments.push_back(copy_segment(from, to, *slot));
  auto handle = engine_->submit(std::move(job));
  Status s = handle ? handle->wait() : handle.status();
  if (!s) {
    free_slot(to, *slot);
    counters_->errors++;
    return s;
  }
  return *slot;
}

Result<size_t> TierManager::promote(std::span<const BlockKey> keys, Tier to) {
  if (to == Tier::kNvme || !memory_tier(to)) return invalid_argument("promote goes to host or HBM");
  std::vector<BlockKey> pinned;
  std::vector<std::pair<BlockKey, SlotId>> moved;
  std::vector<BlockKey> from_nvme;  // suspects when the job fails its checksum
  JobSpec job;
  Status failure;
  for (const BlockKey& key : keys) {
    if (!index_->pin(key).is_ok()) continue;  // not indexed (any more)
    pinned.push_back(key);
    auto where = index_->get(key);
    if (!where || where->resident_in(to)) continue;
    auto slot = allocate_slot(to);
    if (!slot) {
      failure = slot.status();
      break;
    }
    job.segments.push_back(copy_segment(*where, to, *slot));
    moved.emplace_back(key, *slot);
    if (job.segments.back().verify) from_nvme.push_back(key);
  }
  size_t promoted = 0;
  if (!job.segments.empty()) {
    // One job: NVMe → staging → HBM segments pipeline the disk and the copy engine.
    auto h = engine_->submit(std::move(job));
    Status s = h ? h->wait() : h.status();
    if (!s) {
      counters_->errors++;
      for (auto& [key, slot] : moved) free_slot(to, slot);
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(from_nvme);
      failure = s;
    } else {
      for (auto& [key, slot] : moved) {
        if (index_->add_residency(key, to, slot).is_ok()) {
          ++promoted;
          counters_->promotions_in[static_cast<int>(to)]++;
        } else {
          free_slot(to, slot);
        }
      }
    }
  }
  for (const BlockKey& k : pinned) index_->unpin(k).ignore();
  if (!failure.is_ok()) return failure;
  return promoted;
}

Result<TransferHandle> TierManager::load(const Match& match, std::span<std::byte* const> destinations,
                                         LocationKind dst_kind, TransferCallback callback, LayerRange range) {
  if (match.lease == kNoLease) return invalid_argument("load needs a leased match (MatchOptions::take_lease)");
  if (destinations.size() != match.blocks.size()) {
    return invalid_argument("load: " + std::to_string(destinations.size()) + " destinations for " +
                            std::to_string(match.blocks.size()) + " matched blocks");
  }
  if (dst_kind == LocationKind::kStorage) return invalid_argument("load destinations are memory");
  const uint32_t all_layers = options_.layout.num_layers;
  const uint32_t layers = range.size(all_layers);
  if (layers == 0) {
    return invalid_argument("load: layers [" + std::to_string(range.begin) + ", +" + std::to_string(range.count) +
                            ") are outside the layout's " + std::to_string(all_layers));
  }
  const bool whole_blocks = layers == all_layers;
  const uint64_t layer_bytes = options_.layout.bytes_per_block_layer();
  auto dst_at = [&](size_t b, uint64_t off) {
    return dst_kind == LocationKind::kDevice ? Location::device_memory(destinations[b] + off)
                                             : Location::host(destinations[b] + off);
  };

  // Blocks only on NVMe: restore them into the host tier first (verified), so the layered copy
  // below reads memory. What the host tier cannot take is read whole straight into its
  // destination, or, for a load of some layers only, into a scratch block the layers come from.
  // Either way the read is verified: a block whose checksum fails is never handed to the caller
  // as good (the load fails with kChecksumMismatch, even when the destination is GPU memory).
  std::vector<BlockKey> nvme_only;
  for (const BlockResidency& r : match.blocks) {
    if (!r.resident_in(Tier::kHbm) && !r.resident_in(Tier::kHost)) nvme_only.push_back(r.key);
  }
  if (!nvme_only.empty() && options_.promote_on_hit) promote(nvme_only, Tier::kHost).ignore();

  JobSpec direct;  // whole-block, verified reads for blocks still only on NVMe
  std::vector<BlockKey> direct_keys;
  std::vector<std::pair<size_t, size_t>> from_scratch;  // (block, scratch index): partial loads
  std::vector<std::pair<size_t, Location>> from_memory;  // (block, its slot in HBM or host)
  JobSpec job;
  job.num_layers = layers;
  for (size_t b = 0; b < match.blocks.size(); ++b) {
    auto where = index_->get(match.blocks[b].key);
    if (!where) return not_found("block " + match.blocks[b].key.to_hex() + " left the index (lease expired?)");
    Tier src;
    if (where->resident_in(Tier::kHbm) && (dst_kind == LocationKind::kDevice || !where->resident_in(Tier::kHost))) {
      src = Tier::kHbm;
    } else if (where->resident_in(Tier::kHost)) {
      src = Tier::kHost;
    } else {
      Segment read{.layer = 0, .bytes = block_bytes_, .src = block_location(*where, Tier::kNvme),
                   .verify = true, .expected_xxh3_64 = where->checksum};
      if (whole_blocks) {
        read.dst = dst_at(b, 0);  // into device memory the engine hashes it in staging, in order
      } else {
        from_scratch.emplace_back(b, from_scratch.size());
      }
      direct.segments.push_back(read);
      direct_keys.push_back(match.blocks[b].key);
      continue;
    }
    from_memory.emplace_back(b, block_location(*where, src));
  }
  std::shared_ptr<std::byte[]> scratch;
  if (!from_scratch.empty()) {
    // Page-aligned, so the verified reads go straight from the disk into it.
    const size_t bytes = from_scratch.size() * block_bytes_;
    scratch = std::shared_ptr<std::byte[]>(new (std::align_val_t{4096}) std::byte[bytes],
                                           [](std::byte* p) { ::operator delete[](p, std::align_val_t{4096}); });
    for (size_t k = 0; k < direct.segments.size(); ++k) {  // all of them: none is whole_blocks
      direct.segments[k].dst = Location::host(scratch.get() + k * block_bytes_);
    }
    for (auto [b, k] : from_scratch) from_memory.emplace_back(b, Location::host(scratch.get() + k * block_bytes_));
    // The copies out of the scratch block run in `job`: it lives until the job is final.
    job.callback = [scratch, cb = std::move(callback)](const Status& s) {
      if (cb) cb(s);
    };
  } else {
    job.callback = std::move(callback);
  }
  // Layer-major: the engine issues segments in order, so layer 0 of every block lands first and
  // wait_layer(0) returns after 1/layers of the copy, not at its end.
  for (uint32_t i = 0; i < layers; ++i) {
    for (const auto& [b, base] : from_memory) {
      Location from = base;
      from.ptr += uint64_t(range.begin + i) * layer_bytes;
      job.segments.push_back({.layer = i, .bytes = layer_bytes, .src = from, .dst = dst_at(b, i * layer_bytes)});
    }
  }
  if (!direct.segments.empty()) {
    auto h = engine_->submit(std::move(direct));
    Status s = h ? h->wait() : h.status();
    if (!s) {
      counters_->errors++;
      // Which block: each is read again on its own. A corrupt one is marked so the next lookup
      // stops before it (and the engine's save of those tokens repairs it), instead of every
      // lookup matching it and every load failing on it.
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(direct_keys);
      return s;
    }
  }
  counters_->loaded += match.blocks.size();
  return engine_->submit(std::move(job));
}

}  // namespace kvtier
