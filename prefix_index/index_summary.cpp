// PrefixIndex::summarize and for_each_block: what kvtier inspect shows of the index and what kvtier
// export walks (prefix_index.h).
#include <algorithm>

#include "prefix_index/index_internals.h"

namespace kvtier {

IndexSummary PrefixIndex::summarize(size_t top) const {
  absl::flat_hash_map<BlockKey, RootSummary, std::hash<BlockKey>> roots;
  std::vector<ReusedPrefix> reused;
  auto tokens_saved = [](const ReusedPrefix& p) { return p.hits * p.blocks; };
  auto more_saved = [&](const ReusedPrefix& a, const ReusedPrefix& b) { return tokens_saved(a) > tokens_saved(b); };
  for (const auto& run : runs_->snapshot()) {
    std::lock_guard lock(run->mu);
    const Run& r = *run;
    if (r.size() == 0) continue;
    RootSummary& sum = roots[r.root];
    sum.root = r.root;
    for (uint32_t p = 0; p < r.size(); ++p) {
      const Hot& h = r.hot[p];
      ++sum.blocks;
      sum.bytes += r.byte_size;
      sum.hits += r.hits[p];
      ++sum.by_priority[static_cast<int>(h.priority)];
      for (int t = 0; t < kNumTiers; ++t) sum.resident[t] += (h.tier_mask & tier_bit(static_cast<Tier>(t))) != 0;
      sum.longest_blocks = std::max(sum.longest_blocks, r.block_index(p) + 1);
      // The end of a stretch of equal hits within the chain: the whole prefix up to here was
      // reused that often, and its child less.
      const bool ends = p + 1 == r.size() || r.hits[p + 1] < r.hits[p];
      if (top == 0 || r.hits[p] == 0 || !ends) continue;
      reused.push_back({r.root, h.key, r.block_index(p) + 1, r.hits[p], h.tier_mask,
                        std::vector<TokenId>(r.tokens_of(p), r.tokens_of(p) + r.block_tokens)});
      if (reused.size() > 2 * top + 64) {
        std::nth_element(reused.begin(), reused.begin() + top, reused.end(), more_saved);
        reused.resize(top);
      }
    }
  }
  std::sort(reused.begin(), reused.end(), more_saved);
  if (reused.size() > top) reused.resize(top);
  IndexSummary out;
  out.most_reused = std::move(reused);
  for (auto& [root, sum] : roots) out.roots.push_back(sum);
  std::sort(out.roots.begin(), out.roots.end(), [](const RootSummary& a, const RootSummary& b) {
    return a.blocks != b.blocks ? a.blocks > b.blocks : a.root < b.root;
  });
  return out;
}

void PrefixIndex::for_each_block(const std::function<void(const ChainLink&)>& fn) const {
  for (const auto& run : runs_->snapshot()) {
    std::lock_guard lock(run->mu);
    for (uint32_t p = 0; p < run->size(); ++p) fn({run->root, run->hot[p].key, run->parent_of(p), run->block_index(p)});
  }
}

}  // namespace kvtier
