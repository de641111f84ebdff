// The tier manager, load and promotion: a match's blocks copied out to the caller, NVMe copies
// restored (checksums verified) and promoted on a hit.
#include "api/store/tier_manager_internals.h"
#include "api/vocab/sequence_point.h"

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
    counters_->errors.add();
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
    // Timed as a restore when every block came from NVMe (a prefetch, or a load's promotion).
    const bool all_nvme = from_nvme.size() == job.segments.size();
    const uint64_t bytes = uint64_t(job.segments.size()) * block_bytes_;
    const uint64_t start = steady_ns();
    // One job: NVMe → staging → HBM segments pipeline the disk and the copy engine.
    auto h = engine_->submit(std::move(job));
    Status s = h ? h->wait() : h.status();
    if (all_nvme) record_restore(Tier::kNvme, bytes, start, s);
    if (!s) {
      counters_->errors.add();
      for (auto& [key, slot] : moved) free_slot(to, slot);
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(from_nvme);
      failure = s;
    } else {
      for (auto& [key, slot] : moved) {
        if (index_->add_residency(key, to, slot).is_ok()) {
          ++promoted;
          counters_->promotions_in[static_cast<int>(to)]->add();
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
    KVTIER_SEQUENCE_POINT("tier_manager.load.nvme_read");  // the blocks are leased, their slots chosen
    const uint64_t bytes = uint64_t(direct.segments.size()) * block_bytes_;
    const uint64_t start = steady_ns();
    auto h = engine_->submit(std::move(direct));
    Status s = h ? h->wait() : h.status();
    record_restore(Tier::kNvme, bytes, start, s);
    if (!s) {
      counters_->errors.add();
      // Which block: each is read again on its own. A corrupt one is marked so the next lookup
      // stops before it (and the engine's save of those tokens repairs it), instead of every
      // lookup matching it and every load failing on it.
      if (s.code() == StatusCode::kChecksumMismatch) quarantine(direct_keys);
      return s;
    }
  }
  counters_->loaded.add(match.blocks.size());
  {
    // A load is a use of every block it copies out (NVMe admission counts them).
    std::vector<BlockKey> keys;
    keys.reserve(match.blocks.size());
    for (const BlockResidency& r : match.blocks) keys.push_back(r.key);
    uses_->add(keys);
  }
  // Timed as a restore from the one memory tier every copy reads, when there is one such tier.
  auto tier_of = [](const Location& l) { return l.kind == LocationKind::kDevice ? Tier::kHbm : Tier::kHost; };
  const Tier source = from_memory.empty() ? Tier::kHost : tier_of(from_memory.front().second);
  bool one_source = !from_memory.empty() && from_scratch.empty();
  for (const auto& [b, loc] : from_memory) one_source = one_source && tier_of(loc) == source;
  if (one_source) {
    const uint64_t bytes = uint64_t(from_memory.size()) * layers * layer_bytes;
    job.callback = [this, source, bytes, start = steady_ns(), cb = std::move(job.callback)](const Status& s) {
      record_restore(source, bytes, start, s);
      if (cb) cb(s);
    };
  }
  return engine_->submit(std::move(job));
}

std::vector<Status> TierManager::read_blocks(std::span<const BlockKey> keys, std::span<std::byte* const> dsts) {
  std::vector<Status> out(keys.size(), Status::ok());
  if (dsts.size() != keys.size()) {
    std::fill(out.begin(), out.end(), invalid_argument("read_blocks: " + std::to_string(dsts.size()) +
                                                       " destinations for " + std::to_string(keys.size()) + " keys"));
    return out;
  }
  // Each block pinned until it is read, so its slots stay; where it is read from, as a load
  // into host memory reads: the host copy, else HBM, else NVMe (verified by the engine).
  struct Read {
    size_t i;
    Tier from;
    uint64_t checksum;
    Segment seg;
  };
  std::vector<Read> reads;
  std::vector<BlockKey> pinned;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (!index_->pin(keys[i]).is_ok()) {
      out[i] = not_found("block " + keys[i].to_hex() + " is not cached (evicted?)");
      continue;
    }
    pinned.push_back(keys[i]);
    auto where = index_->get(keys[i]);
    if (!where) {
      out[i] = not_found("block " + keys[i].to_hex() + " is not cached (evicted?)");
      continue;
    }
    const Tier from = where->resident_in(Tier::kHost) ? Tier::kHost
                      : where->resident_in(Tier::kHbm) ? Tier::kHbm
                                                        : Tier::kNvme;
    if (from == Tier::kNvme && where->damaged) {
      out[i] = Status(StatusCode::kChecksumMismatch, "block " + keys[i].to_hex() + " is marked corrupt on NVMe");
      continue;
    }
    Segment seg{.layer = 0, .bytes = block_bytes_, .src = block_location(*where, from), .dst = Location::host(dsts[i])};
    if (from == Tier::kNvme) {
      seg.verify = true;
      seg.expected_xxh3_64 = where->checksum;
    }
    reads.push_back({i, from, where->checksum, seg});
  }
  auto run = [&](std::span<const Read> batch) {
    JobSpec job;
    for (const Read& r : batch) job.segments.push_back(r.seg);
    auto h = engine_->submit(std::move(job));
    return h ? h->wait() : h.status();
  };
  KVTIER_SEQUENCE_POINT("tier_manager.read_blocks.copy");  // the blocks are pinned, their slots chosen
  // One job for all; when it fails, each block again on its own to find which.
  const bool all_ok = reads.empty() || run(reads).is_ok();
  std::vector<BlockKey> bad_on_nvme;
  for (const Read& r : reads) {
    Status s = all_ok ? Status::ok() : run(std::span(&r, 1));
    // Memory copies were checked on their way in; checked again here, as the bytes go out.
    if (s.is_ok() && r.from != Tier::kNvme && XXH3_64bits(dsts[r.i], block_bytes_) != r.checksum) {
      s = Status(StatusCode::kChecksumMismatch, std::string("block ") + keys[r.i].to_hex() + "'s " +
                                                    std::string(tier_name(r.from)) + " copy fails its checksum");
    }
    if (s.code() == StatusCode::kChecksumMismatch && r.from == Tier::kNvme) bad_on_nvme.push_back(keys[r.i]);
    if (!s.is_ok()) counters_->errors.add();
    out[r.i] = std::move(s);
  }
  quarantine(bad_on_nvme);
  for (const BlockKey& k : pinned) index_->unpin(k).ignore();
  return out;
}

void TierManager::record_restore(Tier from, uint64_t bytes, uint64_t start_ns, const Status& s) {
  if (s.is_ok()) restore_->record(from, bytes, steady_ns() - start_ns);
}

RestoreOffer TierManager::plan_restore(std::span<const BlockResidency> blocks, double prefill_tokens_per_second) {
  const uint32_t bt = options_.layout.block_tokens;
  RestoreOffer offer = restore_->plan(blocks, prefill_tokens_per_second, bt);
  counters_->offered_tokens.add(uint64_t(offer.keep) * bt);
  if (offer.seconds_saved > 0) counters_->saved_ns += static_cast<uint64_t>(offer.seconds_saved * 1e9);
  if (offer.held_back == 0) return offer;
  counters_->held_back_tokens.add(uint64_t(offer.held_back) * bt);
  const Tier slow = static_cast<Tier>(offer.held_back_tier);
  // Nothing is read from a tier whose blocks are held back, so its estimate would never learn
  // that the device got faster again: probe it once the estimate is stale.
  const uint64_t last = restore_->last_sample_ns(slow);
  if (last == 0 || steady_ns() - last >= options_.restore_probe_interval_ns) probe(blocks.subspan(offer.keep), slow);
  return offer;
}

void TierManager::probe(std::span<const BlockResidency> blocks, Tier tier) {
  {
    std::lock_guard lock(counters_->probe_mu);
    if (counters_->probing) return;
    counters_->probing = true;
  }
  // Up to 8 blocks whose fastest copy is in `tier`, pinned until the read is done (their lease
  // may end first), each read whole into scratch as a load would: verified when from NVMe.
  constexpr size_t kProbeBlocks = 8;
  auto pinned = std::make_shared<std::vector<BlockKey>>();
  for (const BlockResidency& b : blocks) {
    if (pinned->size() == kProbeBlocks) break;
    if (fastest_tier(b) == tier && b.resident_in(tier) && index_->pin(b.key).is_ok()) pinned->push_back(b.key);
  }
  auto done = [this, pinned] {
    for (const BlockKey& k : *pinned) index_->unpin(k).ignore();
    std::lock_guard lock(counters_->probe_mu);
    counters_->probing = false;
    counters_->probe_cv.notify_all();
  };
  if (pinned->empty()) return done();
  const uint64_t slot_bytes = align_up(block_bytes_, kIoAlignment);
  auto scratch = std::make_shared<AlignedBuffer>(make_aligned_buffer(pinned->size() * slot_bytes));
  JobSpec job;
  for (const BlockKey& key : *pinned) {
    auto where = index_->get(key);  // pinned: its slots stay
    if (!where) continue;
    Segment seg{.layer = 0, .bytes = block_bytes_, .src = block_location(*where, tier),
                .dst = Location::host(scratch->get() + job.segments.size() * slot_bytes)};
    if (tier == Tier::kNvme) {
      seg.verify = true;
      seg.expected_xxh3_64 = where->checksum;
    }
    job.segments.push_back(seg);
  }
  if (job.segments.empty()) return done();
  const uint64_t bytes = uint64_t(job.segments.size()) * block_bytes_;
  job.callback = [this, tier, bytes, start = steady_ns(), scratch, done](const Status& s) {
    record_restore(tier, bytes, start, s);
    done();
  };
  counters_->probes.add();
  auto h = engine_->submit(std::move(job));
  if (!h) return done();  // the callback does not fire for a job that was refused
  // Fire and forget: the handle is kept until the next probe replaces it (or the manager goes).
  // The one it replaces is let go outside the lock: should it still be live, its wait must not
  // hold the lock its own callback takes.
  std::optional<TransferHandle> previous;
  {
    std::lock_guard lock(counters_->probe_mu);
    previous.swap(counters_->probe_job);
    counters_->probe_job.emplace(std::move(*h));
  }
}

void TierManager::wait_for_probes() {
  std::unique_lock lock(counters_->probe_mu);
  counters_->probe_cv.wait(lock, [&] { return !counters_->probing; });
}

}  // namespace kvtier
