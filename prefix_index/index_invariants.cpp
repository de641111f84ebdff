// The prefix index, invariants: prefix closure, child counts, residency masks and counters, checked
// under every lock.
#include "prefix_index/index_internals.h"

namespace kvtier {

Status PrefixIndex::check_invariants() const {
  // Every key shard, in order: that freezes the structure of every run and the registry (see
  // Run), which is all this reads. Runs are not locked: under ThreadSanitizer a thread may hold
  // at most 64 locks.
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(options_.shards);
  for (uint32_t s = 0; s < options_.shards; ++s) locks.emplace_back(shards_[s].mu);
  const auto& runs = runs_->all;
  absl::flat_hash_set<const Run*> registered;
  for (const auto& run : runs) registered.insert(run.get());

  // The key map and the runs agree: each key names its own entry, and every entry has a key.
  uint64_t mapped = 0;
  for (uint32_t s = 0; s < options_.shards; ++s) {
    for (const auto& [key, loc] : shards_[s].map) {
      ++mapped;
      if (&shard_for(key) != &shards_[s]) return internal_error("key in the wrong shard");
      if (!registered.contains(loc.run)) return internal_error("key " + key.to_hex() + " maps to an unknown run");
      if (loc.pos >= loc.run->size() || loc.run->hot[loc.pos].key != key) {
        return internal_error("key " + key.to_hex() + " maps to another block's entry");
      }
    }
  }

  absl::flat_hash_map<BlockKey, std::pair<uint32_t, std::array<uint32_t, kNumTiers>>> children;
  absl::flat_hash_map<GroupId, std::array<uint64_t, kNumTiers>> group_resident;
  uint64_t entries = 0, damaged = 0;
  for (const auto& run : runs) {
    const Run& r = *run;
    if (r.cold.size() != r.size() || r.hits.size() != r.size() || r.tokens.size() != size_t(r.size()) * r.block_tokens) {
      return internal_error("run arrays of different lengths");
    }
    const auto in_run = std::count_if(r.cold.begin(), r.cold.end(), [](const Cold& c) { return c.damaged; });
    if (static_cast<uint32_t>(in_run) != r.damaged) return internal_error("a run's damaged count is wrong");
    damaged += static_cast<uint64_t>(in_run);
    for (uint32_t p = 0; p < r.size(); ++p) {
      ++entries;
      const Hot& h = r.hot[p];
      if (h.tier_mask == 0) return internal_error("entry " + h.key.to_hex() + " has no residency");
      if (h.extra_count != r.cold[p].extras.size()) return internal_error("extra count is wrong");
      if (h.priority != r.cold[p].effective_priority()) return internal_error("priority class out of date");
      if (r.cold[p].damaged && !std::has_single_bit(h.tier_mask)) {
        return internal_error("damaged block " + h.key.to_hex() + " has more than one copy");
      }
      for (int t = 0; t < kNumTiers; ++t) {
        const bool in = h.tier_mask & (1u << t);
        if (in != (h.slots[t] != kNoSlot)) return internal_error("residency mask and slots disagree");
        group_resident[r.group_now()][t] += in;
      }
      if (r.block_index(p) == 0) continue;
      if (p == 0) {
        // The head's parent is in another run: indexed, one block earlier, same layout.
        const Shard& ps = shard_for(r.head_parent);
        auto pit = ps.map.find(r.head_parent);
        if (pit == ps.map.end()) {
          return internal_error("prefix closure broken: parent of " + h.key.to_hex() + " is missing");
        }
        const Run& pr = *pit->second.run;
        if (pr.block_index(pit->second.pos) + 1 != r.first_index) return internal_error("block_index chain broken");
        if (pr.layout_fp != r.layout_fp) return internal_error("a run's layout differs from its parent's");
        if (pr.group_now() != r.group_now()) return internal_error("a run's group differs from its parent's");
        if (pr.root != r.root) return internal_error("a run's root differs from its parent's");
      }
      auto& c = children[r.parent_of(p)];
      ++c.first;
      for (int t = 0; t < kNumTiers; ++t) c.second[t] += (h.tier_mask >> t) & 1;
    }
  }
  if (entries != mapped) return internal_error("run entries without a key in the map");
  for (const auto& run : runs) {
    for (uint32_t p = 0; p < run->size(); ++p) {
      auto it = children.find(run->hot[p].key);
      const uint32_t count = it == children.end() ? 0 : it->second.first;
      if (count != run->cold[p].child_count) return internal_error("child count of " + run->hot[p].key.to_hex() + " is wrong");
      for (int t = 0; t < kNumTiers; ++t) {
        const uint32_t in_tier = it == children.end() ? 0 : it->second.second[t];
        if (in_tier != run->cold[p].children_in_tier[t]) return internal_error("per-tier child count is wrong");
      }
    }
  }
  if (entries != counters_->entries.load()) return internal_error("entry counter drifted");
  if (damaged != counters_->damaged.load()) return internal_error("damaged counter drifted");
  // Per group; a tier's total is their sum (stats()).
  for (uint32_t g = 0; g < kMaxGroups; ++g) {
    auto it = group_resident.find(static_cast<GroupId>(g));
    for (int t = 0; t < kNumTiers; ++t) {
      const uint64_t counted = it == group_resident.end() ? 0 : it->second[t];
      if (counted != groups_->resident[g][t].load()) {
        return internal_error("resident counter of group " + std::to_string(g) + " drifted");
      }
    }
  }
  return Status::ok();
}

}  // namespace kvtier
