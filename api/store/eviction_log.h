// EvictionLog: the blocks that recently left the index for good, and from which tier, so kvtier
// doctor can tell "evicted from host" from "never saved". Bounded: the oldest records go first.
// Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <unordered_map>

#include "kvtier/block_key.h"
#include "kvtier/tier.h"

namespace kvtier {

struct EvictionRecord {
  Tier tier = Tier::kHost;  // the tier that held the block's last copy
  uint64_t wall_ns = 0;     // when, nanoseconds since the epoch
};

class EvictionLog {
 public:
  /// Remembers the last `capacity` blocks (0: none).
  explicit EvictionLog(size_t capacity) : capacity_(capacity) {}

  void record(const BlockKey& key, Tier tier, uint64_t wall_ns);
  std::optional<EvictionRecord> find(const BlockKey& key) const;
  size_t size() const;

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  struct Held {
    EvictionRecord record;
    uint64_t seq;  // which of order_'s entries is this record's
  };
  std::unordered_map<BlockKey, Held> records_;
  // Oldest first. An entry whose seq is not its key's record's (recorded again since) erases
  // nothing when it leaves.
  std::deque<std::pair<BlockKey, uint64_t>> order_;
  uint64_t next_seq_ = 0;
};

}  // namespace kvtier
