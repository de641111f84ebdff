// The prefix index: creation, key shards and stats (index_internals.h lists the other parts).
#include "prefix_index/index_internals.h"

#include <bit>
#include <chrono>

namespace kvtier {

Result<std::unique_ptr<PrefixIndex>> PrefixIndex::create(const KeyChain& keys, IndexOptions options) {
  if (options.shards == 0 || options.shards > 4096 || !std::has_single_bit(options.shards)) {
    return invalid_argument("index shards must be a power of two in [1, 4096], got " +
                            std::to_string(options.shards));
  }
  if (options.default_lease_ns == 0) return invalid_argument("default_lease_ns must be positive");
  if (!options.clock_ns) {
    options.clock_ns = [] {
      return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                       std::chrono::steady_clock::now().time_since_epoch())
                                       .count());
    };
  }
  return std::unique_ptr<PrefixIndex>(new PrefixIndex(keys, std::move(options)));
}

PrefixIndex::PrefixIndex(const KeyChain& keys, IndexOptions options)
    : keys_(keys),
      options_(std::move(options)),
      shard_shift_(64 - std::countr_zero(options_.shards)),
      shards_(new Shard[options_.shards]),
      runs_(new Runs),
      leases_(new Leases),
      groups_(new Groups),
      counters_(new Counters) {}

PrefixIndex::~PrefixIndex() = default;

PrefixIndex::Shard& PrefixIndex::shard_for(const BlockKey& key) const noexcept {
  // The key is a uniform hash; its top bits pick the shard (shift of 64 means one shard).
  return shards_[shard_shift_ >= 64 ? 0 : key.hi >> shard_shift_];
}

uint64_t PrefixIndex::now_ns() const { return options_.clock_ns(); }

IndexStats PrefixIndex::stats() const {
  IndexStats s;
  auto ld = [](const std::atomic<uint64_t>& a) { return a.load(std::memory_order_relaxed); };
  s.entries = ld(counters_->entries);
  s.lookups = ld(counters_->lookups);
  s.hit_blocks = ld(counters_->hit_blocks);
  s.hit_tokens = ld(counters_->hit_tokens);
  s.lookup_tokens = ld(counters_->lookup_tokens);
  s.inserts = ld(counters_->inserts);
  s.collisions = ld(counters_->collisions);
  s.leases_expired = ld(counters_->leases_expired);
  s.damaged_blocks = ld(counters_->damaged);
  s.over_share_evictions = ld(counters_->over_share_evictions);
  for (int t = 0; t < kNumTiers; ++t) {
    for (const auto& group : groups_->resident) s.resident_blocks[t] += ld(group[t]);
    s.evictions[t] = ld(counters_->evictions[t]);
  }
  std::lock_guard lock(leases_->mu);
  s.leases_active = leases_->active.size();
  return s;
}

}  // namespace kvtier
