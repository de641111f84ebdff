// The prefix index, tenant groups: which group a namespace root belongs to, and each group's
// residency and share per tier.
#include "prefix_index/index_internals.h"

namespace kvtier {

GroupId PrefixIndex::group_of_new_run(const BlockInsert& block, const Run* parent_run) const {
  if (parent_run != nullptr) return parent_run->group_now();
  std::lock_guard lock(groups_->roots_mu);
  auto it = groups_->roots.find(block.parent);  // block 0: its parent is the namespace root
  if (it != groups_->roots.end()) return it->second;
  groups_->ungrouped.insert(block.parent);
  return kNoGroup;
}

Status PrefixIndex::set_root_group(const BlockKey& root, GroupId group) {
  if (group >= kMaxGroups) {
    return invalid_argument("group " + std::to_string(group) + " is out of range (at most " +
                            std::to_string(kMaxGroups - 1) + ")");
  }
  std::vector<std::unique_lock<std::mutex>> locks;  // reserved before anything changes
  locks.reserve(options_.shards);
  bool relabel = false;
  {
    std::lock_guard lock(groups_->roots_mu);
    auto [it, added] = groups_->roots.emplace(root, group);
    if (!added) {
      if (it->second == group) return Status::ok();
      return Status(StatusCode::kAlreadyExists, "namespace root " + root.to_hex() + " is counted under group " +
                                                    std::to_string(it->second) + " already");
    }
    relabel = groups_->ungrouped.erase(root) != 0 && group != kNoGroup;
  }
  if (!relabel) return Status::ok();  // the usual case: a namespace with no blocks yet
  // Blocks indexed before the root had a group (recovered from a catalog that named no tenant)
  // join it now, so their chains' new blocks do too. Every key shard held: no residency changes
  // and no run is created meanwhile (an insert that looked the root up before it was added holds
  // its shard until its run is published), which is what check_invariants holds too. Nothing
  // else may be held here: under ThreadSanitizer a thread holds at most 64 locks.
  for (uint32_t s = 0; s < options_.shards; ++s) locks.emplace_back(shards_[s].mu);
  for (const auto& run : runs_->all) {
    if (run->root != root || run->group_now() != kNoGroup) continue;
    for (const Hot& h : run->hot) {
      for (int t = 0; t < kNumTiers; ++t) {
        if (!(h.tier_mask & (1u << t))) continue;
        groups_->resident[kNoGroup][t].fetch_sub(1, std::memory_order_relaxed);
        groups_->resident[group][t].fetch_add(1, std::memory_order_relaxed);
      }
    }
    run->group.store(group, std::memory_order_relaxed);
  }
  return Status::ok();
}

std::optional<GroupId> PrefixIndex::root_group(const BlockKey& root) const {
  std::lock_guard lock(groups_->roots_mu);
  auto it = groups_->roots.find(root);
  if (it == groups_->roots.end()) return std::nullopt;
  return it->second;
}

Status PrefixIndex::set_group_limit(GroupId group, Tier tier, uint64_t max_blocks) {
  if (group >= kMaxGroups) return invalid_argument("group " + std::to_string(group) + " is out of range");
  if (static_cast<int>(tier) >= kNumTiers) return invalid_argument("unknown tier");
  groups_->limit[group][static_cast<int>(tier)].store(max_blocks, std::memory_order_relaxed);
  if (max_blocks != 0) groups_->any_limit.store(true, std::memory_order_relaxed);
  return Status::ok();
}

uint64_t PrefixIndex::group_resident(GroupId group, Tier tier) const noexcept {
  if (group >= kMaxGroups || static_cast<int>(tier) >= kNumTiers) return 0;
  return groups_->resident[group][static_cast<int>(tier)].load(std::memory_order_relaxed);
}

uint64_t PrefixIndex::group_limit(GroupId group, Tier tier) const noexcept {
  if (group >= kMaxGroups || static_cast<int>(tier) >= kNumTiers) return 0;
  return groups_->limit[group][static_cast<int>(tier)].load(std::memory_order_relaxed);
}

}  // namespace kvtier
