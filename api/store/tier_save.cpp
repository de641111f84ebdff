// The tier manager, save: a prompt's new full blocks copied into a tier and indexed (write-through
// persists them to NVMe before it returns).
#include "api/store/tier_manager_internals.h"

namespace kvtier {

Result<size_t> TierManager::save(const Namespace& ns, std::span<const TokenId> tokens,
                                 std::span<const std::byte> kv, Tier tier, Priority priority,
                                 std::span<const BlockExtra> extras, size_t first_block) {
  const size_t full = tokens.size() / ns.block_tokens();
  // A first_block past the prompt is save_blocks' error to report; give it no blocks then.
  const size_t count = first_block <= full ? full - first_block : 0;
  if (kv.size() < count * block_bytes_) {
    return invalid_argument("kv holds " + std::to_string(kv.size()) + " bytes; " +
                            std::to_string(count) + " full blocks need " + std::to_string(count * block_bytes_));
  }
  std::vector<const std::byte*> blocks(count);
  for (size_t i = 0; i < blocks.size(); ++i) blocks[i] = kv.data() + i * block_bytes_;
  return save_blocks(ns, tokens, blocks, LocationKind::kHost, tier, priority, extras, first_block);
}

Result<size_t> TierManager::save_blocks(const Namespace& ns, std::span<const TokenId> tokens,
                                        std::span<const std::byte* const> blocks, LocationKind src_kind, Tier tier,
                                        Priority priority, std::span<const BlockExtra> extras, size_t first_block) {
  if (!(ns.layout == options_.layout)) {
    return Status(StatusCode::kLayoutMismatch, "namespace layout differs from the store's");
  }
  if (tier == Tier::kNvme || !memory_tier(tier)) {
    return invalid_argument("save goes to the host or HBM tier; " + std::string(tier_name(tier)) +
                            " is not a memory tier here");
  }
  std::vector<BlockKey> keys;
  KVTIER_RETURN_IF_ERROR(keys_.chain(ns, tokens, extras, keys));
  if (first_block > keys.size()) {
    return invalid_argument("first_block " + std::to_string(first_block) + " is past the prompt's " +
                            std::to_string(keys.size()) + " full blocks");
  }
  if (blocks.size() != keys.size() - first_block) {
    return invalid_argument("save: " + std::to_string(blocks.size()) + " blocks given; blocks " +
                            std::to_string(first_block) + ".." + std::to_string(keys.size()) + " of the prompt need " +
                            std::to_string(keys.size() - first_block));
  }
  if (src_kind == LocationKind::kStorage) return invalid_argument("save sources are memory");
  // A save of a block is a use of it, cached already or not (NVMe admission counts them); the
  // blocks before first_block were counted by the save of the window that gave them.
  uses_->add(std::span<const BlockKey>(keys).subspan(first_block));
  const bool src_on_device = src_kind == LocationKind::kDevice;
  // A device block whose bytes the host must checksum is read into this host block once.
  std::unique_ptr<std::byte[]> bounce;
  auto read_to_bounce = [&](const std::byte* device_block) -> Status {
    if (!bounce) bounce = std::make_unique<std::byte[]>(block_bytes_);
    return copy_block(bounce.get(), false, device_block, true);
  };
  const uint32_t bt = ns.block_tokens();
  size_t extra_pos = 0;
  size_t saved = 0;
  // Only the previous block stays pinned: it is the parent the next insert needs. Earlier blocks
  // of this prompt may be demoted meanwhile, so a prompt larger than the tier still fits.
  std::optional<BlockKey> pinned;
  auto pin_only = [&](const BlockKey& k) {
    if (pinned) index_->unpin(*pinned).ignore();
    pinned = k;
  };
  MemoryArena& arena = *memory_tier(tier)->arena;
  Status failure;
  // Write-through goes in batches like write-back: the blocks of up to 64 saves written together
  // and made visible by one commit (one flush per slot file, one synced catalog write), not two
  // syncs per block. Every block is on NVMe before save returns.
  constexpr size_t kWriteThroughBatch = 64;
  const bool write_through = options_.write_policy == WritePolicy::kWriteThrough && nvme_ != nullptr;
  std::vector<BlockKey> through;
  auto store_through = [&]() -> Status {
    const std::vector<Status> stored = store_batch_to_nvme(through);
    Status first_error;
    for (const Status& st : stored) {
      if (st.is_ok()) {
        counters_->write_through.add();
      } else if (first_error.is_ok()) {
        first_error = st;
      }
    }
    through.clear();
    return first_error;
  };
  for (size_t b = 0; b < keys.size(); ++b) {
    std::vector<BlockKey> block_extras;
    while (extra_pos < extras.size() && extras[extra_pos].block_index == b) {
      block_extras.push_back(extras[extra_pos++].item_hash);
    }
    const BlockKey parent = b ? keys[b - 1] : ns.root;
    const auto block_tokens = tokens.subspan(b * bt, bt);
    if (index_->pin(keys[b]).is_ok()) {  // cached already
      pin_only(keys[b]);
      if (b < first_block) continue;
      // Unless its only copy was found corrupt: then these bytes replace it.
      auto repaired = index_->damaged_count() == 0
                          ? Result<bool>(false)
                          : repair(keys[b], [&] {
                              return catalog_entry(keys[b], parent, static_cast<uint32_t>(b), block_tokens,
                                                   block_extras, priority);
                            }, blocks[b - first_block], src_on_device);
      if (repaired && *repaired) {
        ++saved;
        counters_->saved.add();
      } else {
        // A failed repair (NVMe full, a write error) leaves the block damaged for a later save;
        // the rest of this save goes on.
        if (!repaired) {
          counters_->errors.add();
          spdlog::warn("kvtier: repair of block {} failed: {}", keys[b].to_hex(), repaired.status().to_string());
        }
        counters_->skipped.add();
      }
      continue;
    }
    if (b < first_block) {
      failure = invalid_argument("block " + std::to_string(b) + " is before first_block " +
                                 std::to_string(first_block) + " but not cached: save the prompt from there");
      break;
    }
    const std::byte* src = blocks[b - first_block];
    BlockInsert ins{.key = keys[b],
                    .parent = parent,
                    .block_index = static_cast<uint32_t>(b),
                    .tokens = block_tokens,
                    .extras = block_extras,
                    .byte_size = block_bytes_,
                    .checksum = 0,  // set from the bytes as stored, below
                    .tier = tier,
                    .priority = priority,
                    // Pinned as it goes in: the background reclaimer must not evict the new leaf
                    // before the next block's insert needs it as a parent.
                    .pin = true};
    auto slot = allocate_slot(tier);
    bool on_nvme = false;
    if (!slot && slot.status().code() == StatusCode::kResourceExhausted && nvme_) {
      // The memory tier holds nothing it may give up (pinned, or parents of resident blocks):
      // the block goes straight to NVMe instead of failing the save. write_to_nvme copies it
      // into a private host block first (a device block by one DMA); the write and the
      // checksum recorded both come from that copy.
      // Its parent first (pinned: the previous block), so NVMe stays prefix-closed.
      const Status parent_stored = b == 0 ? Status::ok() : store_batch_to_nvme(std::span(&parent, 1))[0];
      auto written = !parent_stored ? Result<CatalogEntry>(parent_stored)
                                    : write_to_nvme(catalog_entry(keys[b], parent, ins.block_index, block_tokens,
                                                                  block_extras, priority),
                                                    src, src_on_device, /*src_may_change=*/true);
      if (written) {
        slot = written->slot;
        ins.checksum = written->checksum;
      } else {
        slot = written.status();
      }
      on_nvme = true;
      ins.tier = Tier::kNvme;
    }
    if (!slot) {
      failure = slot.status();
      break;
    }
    ins.slot = *slot;
    if (!on_nvme) {
      if (Status s = copy_block(arena.slot_ptr(*slot), arena.is_device_memory(), src, src_on_device); !s) {
        free_slot(tier, *slot);
        failure = s;
        break;
      }
      // The checksum of the copy the tier holds, not of `src`: a daemon client can change its
      // shared window while it is read, and a checksum of other bytes would fail every later load.
      const bool stored_in_host = !arena.is_device_memory();
      if (!stored_in_host && src_on_device) {
        // Device to HBM: the bytes are nowhere on the host. Read the stored copy back once.
        if (Status s = read_to_bounce(arena.slot_ptr(*slot)); !s) {
          free_slot(tier, *slot);
          failure = s;
          break;
        }
        src = bounce.get();
      }
      ins.checksum = XXH3_64bits(stored_in_host ? arena.slot_ptr(*slot) : src, block_bytes_);
    }
    auto release_slot = [&] {
      if (on_nvme) nvme_->erase(keys[b]).ignore();
      else free_slot(tier, *slot);
    };
    auto r = index_->insert(ns, ins);
    if (!r) {
      release_slot();
      if (r.status().code() == StatusCode::kAlreadyExists && index_->pin(keys[b]).is_ok()) {
        pin_only(keys[b]);  // another saver won the race: same bytes, keep theirs
        counters_->skipped.add();
        continue;
      }
      failure = r.status();
      break;
    }
    pin_only(keys[b]);  // the insert took the pin
    ++saved;
    counters_->saved.add();
    adopt_orphans(ns, keys[b]);  // blocks kept at open below it match again (the next ones skip)
    if (on_nvme) continue;
    {
      // Dirty until on NVMe; under write-through that is by the end of this save, and a block
      // reclaimed before its batch is written back on the way down.
      std::lock_guard dl(counters_->dirty_mu);
      counters_->dirty.insert(keys[b]);
    }
    if (write_through) {
      through.push_back(keys[b]);
      if (through.size() == kWriteThroughBatch && !(failure = store_through()).is_ok()) break;
    }
  }
  if (failure.is_ok() && !through.empty()) failure = store_through();
  if (pinned) index_->unpin(*pinned).ignore();
  // A reclaim pass that ran during the save may have found nothing to move: the save's own pin
  // held the only leaf. Now that it is released, ask again rather than wait for the next save.
  if (reclaimer_ && above_high(tier)) reclaimer_->kick();
  if (!failure.is_ok()) return failure;
  return saved;
}

}  // namespace kvtier
