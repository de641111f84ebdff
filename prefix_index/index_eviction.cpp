// The prefix index, the eviction choice: leaf-first candidates of a tier, groups over their share
// first, then the lowest priority class, then the oldest.
#include "prefix_index/index_internals.h"

namespace kvtier {

PrefixIndex::Victims PrefixIndex::candidate_heap(Tier tier, size_t max_blocks, EvictPurpose purpose) const {
  const int t = static_cast<int>(tier);
  Victims victims;
  if (groups_->any_limit.load(std::memory_order_relaxed)) {
    for (uint32_t g = 0; g < kMaxGroups; ++g) {
      const uint64_t limit = groups_->limit[g][t].load(std::memory_order_relaxed);
      const uint64_t held = groups_->resident[g][t].load(std::memory_order_relaxed);
      if (limit != 0 && held > limit) victims.excess.emplace(static_cast<GroupId>(g), held - limit);
    }
  }
  // The best `max_blocks` eligible blocks of all runs, one run locked at a time.
  std::vector<Candidate> best;
  for (const auto& run : runs_->snapshot()) {
    std::lock_guard lock(run->mu);
    const GroupId g = run->group_now();
    const bool over = victims.over(g);
    for (uint32_t p = 0; p < run->size(); ++p) {
      if (run->eligible(p, tier, purpose)) best.push_back(run->candidate(p, g, over));
    }
    if (best.size() > 2 * max_blocks + 4096) victims.keep_best(best, max_blocks);
  }
  victims.keep_best(best, max_blocks);
  for (const auto& c : best) victims.heap.push(c);
  return victims;
}

// A parent whose child was just chosen joins the candidates when `joins(run, pos)` says so; the
// entry is read under its locks.
template <typename Joins>
void PrefixIndex::push_parent_if(const BlockKey& parent, Victims& victims, Joins joins) const {
  with_entry(parent, [&](const Run& run, uint32_t pos) {
    const GroupId g = run.group_now();
    if (joins(run, pos)) victims.heap.push(run.candidate(pos, g, victims.over(g)));
  });
}

std::vector<BlockKey> PrefixIndex::pick_victims(Tier tier, size_t max_blocks, EvictPurpose purpose,
                                               std::vector<uint8_t>* over_share) const {
  std::vector<BlockKey> keys;
  if (over_share) over_share->clear();
  if (max_blocks == 0) return keys;
  Victims victims = candidate_heap(tier, max_blocks, purpose);
  const int t = static_cast<int>(tier);
  absl::flat_hash_map<BlockKey, uint32_t, std::hash<BlockKey>> leaving;  // parent -> its victims
  while (keys.size() < max_blocks) {
    const std::optional<Candidate> c = victims.pop();
    if (!c) break;
    keys.push_back(c->key);
    if (over_share) over_share->push_back(c->over);
    victims.took(*c, nullptr);  // advisory: the caller counts the moves that succeed
    if (purpose != EvictPurpose::kDemote) continue;
    // A demoted block leaves this tier only; it stays indexed. Once all of a parent's children
    // in this tier are victims, the parent may follow them in the same batch.
    auto parent = parent_key_of(c->key);
    if (!parent || !*parent) continue;
    const uint32_t picked = ++leaving[**parent];
    push_parent_if(**parent, victims, [&](const Run& run, uint32_t pos) {
      const Hot& h = run.hot[pos];
      return (h.tier_mask & tier_bit(tier)) && h.pin_count == 0 && run.cold[pos].children_in_tier[t] == picked;
    });
  }
  return keys;
}

std::vector<EvictedBlock> PrefixIndex::evict(Tier tier, size_t max_blocks) {
  expire_leases();
  std::vector<EvictedBlock> out;
  if (max_blocks == 0) return out;
  Victims victims = candidate_heap(tier, max_blocks, EvictPurpose::kDrop);
  while (out.size() < max_blocks) {
    const std::optional<Candidate> c = victims.pop();
    if (!c) break;
    auto parent = parent_key_of(c->key);
    auto removed = remove_residency_impl(c->key, tier, /*count_eviction=*/true);
    if (!removed) continue;  // pinned or gained a child since it was chosen: skip it
    out.push_back(*removed);
    victims.took(*c, &counters_->over_share_evictions);
    if (!parent || !*parent) continue;
    // The parent may have just become a leaf of this tier: it joins the candidates.
    push_parent_if(**parent, victims,
                   [&](const Run& run, uint32_t pos) { return run.eligible(pos, tier, EvictPurpose::kDrop); });
  }
  return out;
}

}  // namespace kvtier
