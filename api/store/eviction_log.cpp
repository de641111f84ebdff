// EvictionLog (api/store/eviction_log.h).
#include "api/store/eviction_log.h"

namespace kvtier {

void EvictionLog::record(const BlockKey& key, Tier tier, uint64_t wall_ns) {
  if (capacity_ == 0) return;
  std::lock_guard lock(mu_);
  const uint64_t seq = next_seq_++;
  records_.insert_or_assign(key, Held{{tier, wall_ns}, seq});
  order_.emplace_back(key, seq);
  while (records_.size() > capacity_ || order_.size() > 2 * capacity_) {
    const auto& [old, old_seq] = order_.front();
    if (auto it = records_.find(old); it != records_.end() && it->second.seq == old_seq) records_.erase(it);
    order_.pop_front();
  }
}

std::optional<EvictionRecord> EvictionLog::find(const BlockKey& key) const {
  std::lock_guard lock(mu_);
  auto it = records_.find(key);
  if (it == records_.end()) return std::nullopt;
  return it->second.record;
}

size_t EvictionLog::size() const {
  std::lock_guard lock(mu_);
  return records_.size();
}

}  // namespace kvtier
