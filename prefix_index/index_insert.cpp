// The prefix index, insert and residency: indexing a block (a new run or the tail of its parent's),
// its tier copies, recency, pins and priority, and its damage and repair.
#include "prefix_index/index_internals.h"

namespace kvtier {

Result<InsertOutcome> PrefixIndex::insert(const Namespace& ns, const BlockInsert& block) {
  const uint32_t bt = ns.block_tokens();
  if (block.tokens.size() != bt) {
    return invalid_argument("a block holds exactly " + std::to_string(bt) + " tokens, got " +
                            std::to_string(block.tokens.size()) + "; partial blocks are never keyed");
  }
  if (block.slot == kNoSlot) return invalid_argument("insert needs the tier slot holding the block");
  if (block.extras.size() > UINT16_MAX) {
    return invalid_argument("a block carries at most 65535 extras, got " + std::to_string(block.extras.size()));
  }
  if (static_cast<int>(block.tier) >= kNumTiers) return invalid_argument("unknown tier");
  const uint64_t block_bytes = ns.layout.bytes_per_block();
  if (block.byte_size != 0 && block.byte_size != block_bytes) {
    return Status(StatusCode::kLayoutMismatch,
                  "block of " + std::to_string(block.byte_size) + " bytes does not fit the layout " +
                      ns.layout.describe());
  }
  if ((block.block_index == 0) != (block.parent == ns.root)) {
    return invalid_argument("block 0, and only block 0, has the namespace root as its parent");
  }
  if (keys_.block_key(block.parent, block.tokens, block.extras) != block.key) {
    return invalid_argument("block key " + block.key.to_hex() +
                            " is not the chained key of its parent, tokens and extras");
  }
  const uint64_t layout_fp = ns.layout.fingerprint();
  const int t = static_cast<int>(block.tier);

  Shard& shard = shard_for(block.key);
  Shard* parent_shard = block.block_index > 0 ? &shard_for(block.parent) : nullptr;
  PairLock shards_locked(shard.mu, parent_shard ? &parent_shard->mu : nullptr);

  std::optional<Loc> parent;
  if (parent_shard) {
    auto pit = parent_shard->map.find(block.parent);
    if (pit == parent_shard->map.end()) {
      return not_found("parent block " + block.parent.to_hex() +
                       " is not indexed; insert a prompt's blocks in prefix order");
    }
    parent = pit->second;
  }
  if (auto it = shard.map.find(block.key); it != shard.map.end()) {
    const Loc loc = it->second;
    PairLock runs_locked(loc.run->mu, parent ? &parent->run->mu : nullptr);
    Run& run = *loc.run;
    if (run.layout_fp != layout_fp ||
        !run.same_block(loc.pos, block.parent, block.block_index, block.tokens, block.extras)) {
      counters_->collisions.fetch_add(1, std::memory_order_relaxed);
      return Status(StatusCode::kCollision, "key " + block.key.to_hex() +
                                                " already holds a different block; refusing to overwrite");
    }
    Hot& h = run.hot[loc.pos];
    if (h.tier_mask & tier_bit(block.tier)) {
      return Status(StatusCode::kAlreadyExists,
                    "block already resident in " + std::string(tier_name(block.tier)));
    }
    h.tier_mask |= tier_bit(block.tier);
    h.slots[t] = block.slot;
    if (block.pin) ++h.pin_count;
    if (parent) ++parent->run->cold[parent->pos].children_in_tier[t];
    count_residency(run, t, true);
    if (run.set_damaged(loc.pos, false, counters_->damaged)) h.checksum = block.checksum;  // the new copy is the good one
    return InsertOutcome::kAddedResidency;
  }

  // A new block goes at the end of its parent's run when the parent ends it; otherwise (block
  // 0, a branch, a full run) it heads a new run.
  std::unique_lock<std::mutex> parent_lock;
  Run* run = nullptr;
  if (parent) {
    Run& prun = *parent->run;
    parent_lock = std::unique_lock(prun.mu);
    if (prun.layout_fp != layout_fp) {
      return Status(StatusCode::kLayoutMismatch, "parent block was stored with another KV layout");
    }
    if (prun.block_index(parent->pos) + 1 != block.block_index) {
      return invalid_argument("block_index does not follow its parent's");
    }
    if (parent->pos + 1 == prun.size() && prun.size() < kRunCapacity) run = &prun;
  }
  const uint64_t tick = recency_clock_.fetch_add(1, std::memory_order_relaxed);
  if (run != nullptr) {
    run->append(block, tick);
  } else {
    // Filled before it is published (registry, then key map), so no one sees it half-made.
    // Block 0's parent is the namespace root; any other block's chain has its parent's root.
    const BlockKey root = parent ? parent->run->root : block.parent;
    auto fresh = std::make_shared<Run>(block.parent, root, block.block_index, bt, layout_fp, block_bytes,
                                       group_of_new_run(block, parent ? parent->run : nullptr));
    fresh->append(block, tick);
    run = fresh.get();
    runs_->add(std::move(fresh));
  }
  shard.map.emplace(block.key, Loc{run, run->size() - 1});
  if (parent) {
    Cold& pc = parent->run->cold[parent->pos];
    ++pc.child_count;
    ++pc.children_in_tier[t];
  }
  counters_->entries.fetch_add(1, std::memory_order_relaxed);
  counters_->inserts.fetch_add(1, std::memory_order_relaxed);
  count_residency(*run, t, true);
  return InsertOutcome::kInserted;
}

// Under the block's key-shard and run locks, like the residency change it counts, so that
// check_invariants sees the counters and the entries agree.
void PrefixIndex::count_residency(const Run& run, int t, bool added) noexcept {
  std::atomic<uint64_t>& group = groups_->resident[run.group_now()][t];
  if (added) {
    group.fetch_add(1, std::memory_order_relaxed);
  } else {
    group.fetch_sub(1, std::memory_order_relaxed);
  }
}

Result<std::optional<BlockKey>> PrefixIndex::parent_key_of(const BlockKey& key) const {
  std::optional<BlockKey> parent;
  const bool found = with_entry(key, [&](const Run& run, uint32_t pos) {
    if (run.block_index(pos) != 0) parent = run.parent_of(pos);
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  return parent;
}

// Locks a block's and its parent's key shards, then their runs, for a residency change.
// `parent_key` is what parent_key_of returned; a key's parent never changes.
#define KVTIER_LOCK_BLOCK_AND_PARENT(key, parent_key)                                               \
  Shard& shard = shard_for(key);                                                                     \
  Shard* parent_shard = (parent_key) ? &shard_for(*(parent_key)) : nullptr;                         \
  PairLock shards_locked(shard.mu, parent_shard ? &parent_shard->mu : nullptr);                      \
  auto it = shard.map.find(key);                                                                     \
  if (it == shard.map.end()) return not_found("block " + (key).to_hex() + " left the index");       \
  const Loc loc = it->second;                                                                        \
  std::optional<Loc> parent;                                                                         \
  if (parent_shard) {                                                                                \
    auto pit = parent_shard->map.find(*(parent_key));                                                \
    /* the parent of an indexed block is indexed (prefix closure) */                                 \
    if (pit == parent_shard->map.end()) return internal_error("indexed block without its parent");   \
    parent = pit->second;                                                                            \
  }                                                                                                  \
  PairLock runs_locked(loc.run->mu, parent ? &parent->run->mu : nullptr);                            \
  Run& run = *loc.run;                                                                               \
  Hot& h = run.hot[loc.pos]

Status PrefixIndex::add_residency(const BlockKey& key, Tier tier, SlotId slot) {
  if (slot == kNoSlot) return invalid_argument("add_residency needs a slot");
  const int t = static_cast<int>(tier);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  KVTIER_LOCK_BLOCK_AND_PARENT(key, *parent_of);
  if (h.tier_mask & tier_bit(tier)) {
    return Status(StatusCode::kAlreadyExists, "block already resident in " + std::string(tier_name(tier)));
  }
  h.tier_mask |= tier_bit(tier);
  h.slots[t] = slot;
  if (parent) ++parent->run->cold[parent->pos].children_in_tier[t];
  count_residency(run, t, true);
  run.set_damaged(loc.pos, false, counters_->damaged);  // a second copy, verified: the block serves again
  return Status::ok();
}

Result<EvictedBlock> PrefixIndex::remove_residency(const BlockKey& key, Tier tier) {
  return remove_residency_impl(key, tier, /*count_eviction=*/false);
}

Result<EvictedBlock> PrefixIndex::remove_residency_impl(const BlockKey& key, Tier tier,
                                                        bool count_eviction) {
  const int t = static_cast<int>(tier);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  std::shared_ptr<Run> emptied;  // dropped once the run is unlocked
  EvictedBlock out;
  {
    KVTIER_LOCK_BLOCK_AND_PARENT(key, *parent_of);
    if (!(h.tier_mask & tier_bit(tier))) {
      return not_found("block is not resident in " + std::string(tier_name(tier)));
    }
    if (h.pin_count != 0) return busy("block is pinned by " + std::to_string(h.pin_count) + " holder(s)");
    const Cold& c = run.cold[loc.pos];
    if (c.children_in_tier[t] != 0) {
      return busy("block has children resident in " + std::string(tier_name(tier)) + "; evict those first");
    }
    const bool last = (h.tier_mask & ~tier_bit(tier)) == 0;
    if (last && c.child_count != 0) return busy("block has indexed children; removing it would orphan them");
    // A childless block ends its run: the entry after it would be its child.
    if (last && loc.pos + 1 != run.size()) return internal_error("a childless block is not the end of its run");

    out = EvictedBlock{key, tier, h.slots[t], last};
    h.tier_mask &= static_cast<uint8_t>(~tier_bit(tier));
    h.slots[t] = kNoSlot;
    if (parent) {
      Cold& pc = parent->run->cold[parent->pos];
      --pc.children_in_tier[t];
      if (last) --pc.child_count;
    }
    // Counted under the locks, so check_invariants sees counters and entries agree.
    count_residency(run, t, false);
    if (last) {
      run.set_damaged(loc.pos, false, counters_->damaged);
      run.pop_back();
      shard.map.erase(it);
      // An empty run is unreachable: no key maps to it, and inserts append only after a parent.
      if (run.size() == 0) emptied = runs_->remove(&run);
      counters_->entries.fetch_sub(1, std::memory_order_relaxed);
    }
  }
  if (count_eviction) counters_->evictions[t].fetch_add(1, std::memory_order_relaxed);
  return out;
}
#undef KVTIER_LOCK_BLOCK_AND_PARENT

Result<std::vector<EvictedBlock>> PrefixIndex::erase(const BlockKey& key) {
  Status blocked;
  const bool found = with_entry(key, [&](const Run& run, uint32_t pos) {
    if (run.hot[pos].pin_count != 0) {
      blocked = busy("block is pinned");
    } else if (run.cold[pos].child_count != 0) {
      blocked = busy("block has indexed children; erase them first");
    }
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  KVTIER_RETURN_IF_ERROR(blocked);
  std::vector<EvictedBlock> out;
  for (Tier tier : kAllTiers) {
    auto r = remove_residency_impl(key, tier, false);
    if (r) {
      out.push_back(*r);
    } else if (r.status().code() != StatusCode::kNotFound) {
      return r.status();  // pinned or re-parented in between: report, the entry stays consistent
    }
  }
  return out;
}

Status PrefixIndex::touch(const BlockKey& key) {
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    run.hot[pos].last_access = recency_clock_.fetch_add(1, std::memory_order_relaxed);
    ++run.hits[pos];
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::pin(const BlockKey& key) {
  const bool found = with_entry(key, [](Run& run, uint32_t pos) { ++run.hot[pos].pin_count; });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::unpin(const BlockKey& key) {
  Status status;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    if (run.hot[pos].pin_count == 0) {
      status = busy("block is not pinned");
    } else {
      --run.hot[pos].pin_count;
    }
  });
  return found ? status : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::pin(const BlockKey& key, Priority at) {
  if (static_cast<int>(at) >= kNumPriorities) return invalid_argument("unknown priority class");
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    ++run.hot[pos].pin_count;
    ++run.cold[pos].pins_at[static_cast<int>(at)];
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::unpin(const BlockKey& key, Priority at) {
  if (static_cast<int>(at) >= kNumPriorities) return invalid_argument("unknown priority class");
  Status status;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    uint32_t& n = run.cold[pos].pins_at[static_cast<int>(at)];
    if (n == 0 || run.hot[pos].pin_count == 0) {
      status = busy("block holds no pin at priority " + std::string(priority_name(at)));
      return;
    }
    --n;
    --run.hot[pos].pin_count;
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? status : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::set_priority(const BlockKey& key, Priority priority) {
  if (static_cast<int>(priority) >= kNumPriorities) return invalid_argument("unknown priority class");
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    run.cold[pos].own_priority = priority;
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Result<bool> PrefixIndex::mark_damaged(const BlockKey& key, Tier only_copy) {
  bool marked = false;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    // A copy elsewhere was verified on its way in (and loads read it): nothing to mark.
    if (run.hot[pos].tier_mask == tier_bit(only_copy)) marked = run.set_damaged(pos, true, counters_->damaged);
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  return marked;
}

Result<SlotId> PrefixIndex::repair(const BlockKey& key, Tier tier, SlotId slot, uint64_t checksum) {
  if (slot == kNoSlot) return invalid_argument("repair needs a slot");
  Status refused;
  SlotId old = kNoSlot;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    Hot& h = run.hot[pos];
    if (!run.cold[pos].damaged) {
      refused = busy("block " + key.to_hex() + " is not damaged: nothing to repair");
    } else if (h.tier_mask != tier_bit(tier)) {  // cannot be: marks are cleared by a second copy
      refused = internal_error("damaged block " + key.to_hex() + " has copies outside " +
                               std::string(tier_name(tier)));
    } else {
      old = h.slots[static_cast<int>(tier)];
      h.slots[static_cast<int>(tier)] = slot;
      h.checksum = checksum;
      run.set_damaged(pos, false, counters_->damaged);
    }
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  KVTIER_RETURN_IF_ERROR(refused);
  return old;
}

uint64_t PrefixIndex::damaged_count() const noexcept {
  return counters_->damaged.load(std::memory_order_relaxed);
}

std::optional<BlockResidency> PrefixIndex::get(const BlockKey& key) const {
  std::optional<BlockResidency> out;
  with_entry(key, [&](const Run& run, uint32_t pos) { out = run.residency(pos); });
  return out;
}

std::optional<BlockRecord> PrefixIndex::describe(const BlockKey& key) const {
  std::optional<BlockRecord> out;
  with_entry(key, [&](const Run& run, uint32_t pos) {
    const TokenId* toks = run.tokens_of(pos);
    out = BlockRecord{run.parent_of(pos), run.block_index(pos),
                      std::vector<TokenId>(toks, toks + run.block_tokens), run.cold[pos].extras,
                      run.layout_fp, run.residency(pos), run.hits[pos]};
  });
  return out;
}

}  // namespace kvtier
