#include "prefix_index/prefix_index.h"

#include <absl/container/flat_hash_map.h>
#include <absl/container/inlined_vector.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>
#include <mutex>
#include <queue>

namespace kvtier {

namespace {

// Field order matters: a match of a long prompt is bound by the cache lines it pulls in per
// block, so everything a match reads or writes comes first, right after the key in the table
// slot, and what only inserts and evictions use comes last. The fields a match writes (pins,
// recency, hits) share the slot's first line with the key, so a match dirties one line per
// block, not two.
struct Entry {
  // --- read or written by match ---
  BlockKey parent;
  uint32_t block_index = 0;
  uint32_t pin_count = 0;
  uint64_t last_access = 0;  // logical recency tick; larger is more recent
  uint64_t hits = 0;
  uint64_t layout_fp = 0;
  absl::InlinedVector<TokenId, 16> tokens;
  uint64_t checksum = 0;
  std::array<SlotId, kNumTiers> slots{kNoSlot, kNoSlot, kNoSlot};
  uint8_t tier_mask = 0;
  Priority priority = Priority::kNormal;
  uint16_t extra_count = 0;  // extras.size(), here so a match without extras never reads `extras`
  // --- not read by match ---
  uint64_t byte_size = 0;    // the layout's block size (a match takes it from the namespace)
  std::vector<BlockKey> extras;  // read by match only when the request has extras
  uint32_t child_count = 0;                       // indexed children
  std::array<uint32_t, kNumTiers> children_in_tier{};  // children resident in each tier

  bool same_block(const BlockKey& p, uint32_t index, std::span<const TokenId> toks,
                  std::span<const BlockKey> ex) const noexcept {
    if (parent != p || block_index != index || tokens.size() != toks.size()) return false;
    // The 16-token page (vLLM, SGLang) compares at a constant length: inline vector compares
    // instead of a call to memcmp per block.
    const bool same_tokens = toks.size() == 16
                                 ? std::memcmp(tokens.data(), toks.data(), 16 * sizeof(TokenId)) == 0
                                 : std::memcmp(tokens.data(), toks.data(), toks.size_bytes()) == 0;
    return same_tokens && extra_count == ex.size() &&
           (ex.empty() || std::memcmp(extras.data(), ex.data(), ex.size_bytes()) == 0);
  }

  BlockResidency residency(const BlockKey& key) const {
    BlockResidency r;
    r.key = key;
    r.tier_mask = tier_mask;
    r.slots = slots;
    r.byte_size = byte_size;
    r.checksum = checksum;
    r.priority = priority;
    return r;
  }
};

struct Candidate {
  Priority priority;
  uint64_t last_access;
  BlockKey key;
  // Lowest priority class first, then oldest.
  bool evict_before(const Candidate& o) const noexcept {
    if (priority != o.priority) return priority < o.priority;
    return last_access < o.last_access;
  }
};

bool eligible(const Entry& e, Tier tier, EvictPurpose purpose) noexcept {
  const int t = static_cast<int>(tier);
  if (!(e.tier_mask & tier_bit(tier)) || e.pin_count != 0 || e.children_in_tier[t] != 0) return false;
  const bool last_residency = (e.tier_mask & ~tier_bit(tier)) == 0;
  return purpose == EvictPurpose::kDemote || !last_residency || e.child_count == 0;
}

}  // namespace

struct alignas(64) PrefixIndex::Shard {
  mutable std::mutex mu;
  // Keys are keyed hashes already (the deployment secret keeps them uniform and unpredictable),
  // so the table uses std::hash<BlockKey>'s one multiply rather than re-hashing 16 bytes with
  // absl::Hash on every lookup and prefetch.
  absl::flat_hash_map<BlockKey, Entry, std::hash<BlockKey>> map;
};

struct PrefixIndex::Leases {
  struct Record {
    std::vector<BlockKey> keys;
    uint64_t expiry_ns;
  };
  std::mutex mu;
  absl::flat_hash_map<LeaseId, Record> active;
};

struct PrefixIndex::Counters {
  std::atomic<uint64_t> entries{0}, lookups{0}, hit_blocks{0}, hit_tokens{0}, lookup_tokens{0},
      inserts{0}, collisions{0}, leases_expired{0};
  std::array<std::atomic<uint64_t>, kNumTiers> resident{}, evictions{};
};

namespace {

// Locks the shards of a block and of its parent, in a fixed order, once when they coincide.
class PairLock {
 public:
  PairLock(std::mutex& a, std::mutex* b) {
    if (b == nullptr || b == &a) {
      first_ = std::unique_lock(a);
    } else if (&a < b) {
      first_ = std::unique_lock(a);
      second_ = std::unique_lock(*b);
    } else {
      first_ = std::unique_lock(*b);
      second_ = std::unique_lock(a);
    }
  }

 private:
  std::unique_lock<std::mutex> first_, second_;
};

// Groups positions 0..n-1 by shard with a counting sort, so each shard is locked once.
struct ShardGroups {
  std::vector<uint32_t> order;   // positions, grouped by shard
  std::vector<uint32_t> begin;   // begin[s]..begin[s+1] index into order
  std::vector<uint32_t> fill;    // scratch, kept to reuse its storage

  template <typename ShardOf>
  void build(size_t n, uint32_t shards, ShardOf&& shard_of) {
    begin.assign(shards + 1, 0);
    order.resize(n);
    for (size_t i = 0; i < n; ++i) ++begin[shard_of(i) + 1];
    for (uint32_t s = 0; s < shards; ++s) begin[s + 1] += begin[s];
    fill.assign(begin.begin(), begin.end() - 1);
    for (size_t i = 0; i < n; ++i) order[fill[shard_of(i)]++] = static_cast<uint32_t>(i);
  }
};

}  // namespace

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
      leases_(new Leases),
      counters_(new Counters) {}

PrefixIndex::~PrefixIndex() = default;

PrefixIndex::Shard& PrefixIndex::shard_for(const BlockKey& key) const noexcept {
  // The key is a uniform hash; its top bits pick the shard (shift of 64 means one shard).
  return shards_[shard_shift_ >= 64 ? 0 : key.hi >> shard_shift_];
}

uint64_t PrefixIndex::now_ns() const { return options_.clock_ns(); }

Result<Match> PrefixIndex::match(const Namespace& ns, std::span<const TokenId> tokens,
                                 std::span<const BlockExtra> extras, const MatchOptions& options) {
  Match result;
  KVTIER_RETURN_IF_ERROR(match_into(ns, tokens, extras, options, result));
  return result;
}

Status PrefixIndex::match_into(const Namespace& ns, std::span<const TokenId> tokens,
                               std::span<const BlockExtra> extras, const MatchOptions& options,
                               Match& result) {
  result.blocks.clear();
  result.tokens = 0;
  result.lease = kNoLease;
  result.lease_expiry_ns = 0;
  const uint32_t bt = ns.block_tokens();
  if (bt == 0) return invalid_argument("namespace has block_tokens = 0");
  const size_t n = tokens.size() / bt;
  KVTIER_RETURN_IF_ERROR(KeyChain::check_extras(extras, n));
  const uint64_t layout_fp = ns.layout.fingerprint();
  const uint64_t block_bytes = ns.layout.bytes_per_block();
  counters_->lookups.fetch_add(1, std::memory_order_relaxed);
  counters_->lookup_tokens.fetch_add(n * bt, std::memory_order_relaxed);
  if (n == 0) return Status::ok();

  thread_local std::vector<BlockKey> keys;
  thread_local ShardGroups groups;
  thread_local std::vector<uint8_t> found;
  thread_local std::vector<uint32_t> extra_begin;
  thread_local std::vector<BlockKey> extra_hashes;
  thread_local std::vector<Entry*> entries;
  thread_local std::vector<BlockResidency> scratch;  // one chunk's matched blocks, in shard order
  thread_local std::vector<uint32_t> position;        // prompt position -> index into scratch
  // Sized for the whole prompt once, filled a chunk at a time: growing them chunk by chunk
  // reallocated (and page-faulted) the 0.6 MB result of a 128K-token prompt several times over.
  keys.resize(n);
  result.blocks.reserve(n);
  found.clear();
  extra_begin.clear();
  extra_hashes.clear();
  if (!extras.empty()) {
    extra_begin.assign(n + 1, 0);
    for (const auto& e : extras) ++extra_begin[e.block_index + 1];
    for (size_t b = 0; b < n; ++b) extra_begin[b + 1] += extra_begin[b];
    for (const auto& e : extras) extra_hashes.push_back(e.item_hash);
  }
  auto extras_of = [&](size_t i) -> std::span<const BlockKey> {
    if (extra_begin.empty()) return {};
    return std::span(extra_hashes).subspan(extra_begin[i], extra_begin[i + 1] - extra_begin[i]);
  };

  // Recency: block 0 gets the newest tick, the last block the oldest, so a prompt's leaves are
  // evicted before its root-most blocks.
  const uint64_t base_tick = options.touch ? recency_clock_.fetch_add(n, std::memory_order_relaxed) : 0;

  // The prompt is keyed and looked up a chunk at a time, in prompt order, and the match stops at
  // the chunk holding its first miss: a prompt that shares only its first blocks with the cache
  // (the common case) costs those blocks, not the whole prompt. Chunks double in size, so a
  // fully cached prompt takes a few chunks and each shard is still locked only a few times.
  constexpr size_t kFirstChunk = 32, kMaxChunk = 1024;
  size_t matched = 0;
  for (size_t lo = 0, chunk = kFirstChunk; lo < n; lo += chunk, chunk = std::min(chunk * 2, kMaxChunk)) {
    const size_t hi = std::min(n, lo + chunk);
    keys_.chain_range(lo == 0 ? ns.root : keys[lo - 1], tokens, bt, lo, hi - lo, extras, keys.data() + lo);
    found.resize(hi, 0);
    scratch.resize(hi - lo);
    position.resize(hi - lo);
    groups.build(hi - lo, options_.shards, [&](size_t i) {
      return shard_shift_ >= 64 ? 0u : static_cast<uint32_t>(keys[lo + i].hi >> shard_shift_);
    });
    for (uint32_t s = 0; s < options_.shards; ++s) {
      const uint32_t group_begin = groups.begin[s], group_end = groups.begin[s + 1];
      if (group_begin == group_end) continue;
      Shard& shard = shards_[s];
      std::lock_guard lock(shard.mu);
      // Two passes over the shard's blocks, so their cache misses overlap instead of queueing:
      // the first finds each entry (its table slot prefetched kPrefetchAhead lookups earlier)
      // and prefetches the entry's own lines; the second compares and copies them. Entry
      // pointers stay valid: the shard is locked and nothing is inserted or erased meanwhile.
      constexpr uint32_t kPrefetchAhead = 8;
      entries.resize(group_end - group_begin);
      for (uint32_t g = group_begin; g < std::min(group_begin + kPrefetchAhead, group_end); ++g) {
        shard.map.prefetch(keys[lo + groups.order[g]]);
      }
      for (uint32_t g = group_begin; g < group_end; ++g) {
        if (g + kPrefetchAhead < group_end) shard.map.prefetch(keys[lo + groups.order[g + kPrefetchAhead]]);
        auto it = shard.map.find(keys[lo + groups.order[g]]);
        Entry* e = it == shard.map.end() ? nullptr : &it->second;
        entries[g - group_begin] = e;
        if (e != nullptr) {
          const char* first = reinterpret_cast<const char*>(&*it);
          for (size_t off = 64; off < sizeof(*it); off += 64) __builtin_prefetch(first + off);
        }
      }
      for (uint32_t g = group_begin; g < group_end; ++g) {
        Entry* e = entries[g - group_begin];
        if (e == nullptr) continue;
        const size_t i = lo + groups.order[g];
        const BlockKey& parent = i == 0 ? ns.root : keys[i - 1];
        if (e->layout_fp != layout_fp ||
            !e->same_block(parent, static_cast<uint32_t>(i), tokens.subspan(i * bt, bt), extras_of(i))) {
          continue;  // same key, different block: a collision is a miss, never a wrong hit
        }
        found[i] = 1;
        // Field by field rather than through Entry::residency(): that built a temporary and read
        // the entry's byte size, and measured 20-30% slower here.
        BlockResidency& r = scratch[g];  // in shard order: sequential writes
        r.key = keys[i];
        r.slots = e->slots;
        r.byte_size = block_bytes;  // equal to the entry's: insert checks it against the layout
        r.checksum = e->checksum;
        r.tier_mask = e->tier_mask;
        r.priority = e->priority;
        if (options.take_lease) ++e->pin_count;
        if (options.touch) {
          e->last_access = base_tick + (n - 1 - i);
          ++e->hits;
        }
      }
    }
    // Into the result in prompt order, up to the first miss. Written straight into the result
    // in shard order, these 64-byte records were scattered stores over the whole result, and
    // those stores took 40% of a match.
    for (size_t g = 0; g < hi - lo; ++g) position[groups.order[g]] = static_cast<uint32_t>(g);
    while (matched < hi && found[matched]) result.blocks.push_back(scratch[position[matched - lo]]), ++matched;
    if (matched < hi) break;  // the prefix ends in this chunk
  }

  if (options.take_lease) {
    // Blocks found past the first miss of the last chunk (only possible while a concurrent insert
    // or eviction runs) were pinned above; give those pins back.
    std::vector<BlockKey> beyond;
    for (size_t i = matched; i < found.size(); ++i) {
      if (found[i]) beyond.push_back(keys[i]);
    }
    if (!beyond.empty()) release_keys(beyond).ignore();  // entries are pinned: cannot vanish
  }
  result.tokens = uint64_t(matched) * bt;
  counters_->hit_blocks.fetch_add(matched, std::memory_order_relaxed);
  counters_->hit_tokens.fetch_add(result.tokens, std::memory_order_relaxed);

  if (options.take_lease && matched > 0) {
    const uint64_t lifetime = options.lease_ns ? options.lease_ns : options_.default_lease_ns;
    result.lease = next_lease_.fetch_add(1, std::memory_order_relaxed);
    result.lease_expiry_ns = now_ns() + lifetime;
    std::lock_guard lock(leases_->mu);
    leases_->active.emplace(result.lease,
                            Leases::Record{std::vector<BlockKey>(keys.begin(), keys.begin() + matched),
                                           result.lease_expiry_ns});
  }
  return Status::ok();
}

Status PrefixIndex::release_keys(std::span<const BlockKey> keys) {
  ShardGroups groups;
  groups.build(keys.size(), options_.shards, [&](size_t i) {
    return shard_shift_ >= 64 ? 0u : static_cast<uint32_t>(keys[i].hi >> shard_shift_);
  });
  Status status;
  for (uint32_t s = 0; s < options_.shards; ++s) {
    if (groups.begin[s] == groups.begin[s + 1]) continue;
    std::lock_guard lock(shards_[s].mu);
    for (uint32_t g = groups.begin[s]; g < groups.begin[s + 1]; ++g) {
      auto it = shards_[s].map.find(keys[groups.order[g]]);
      if (it == shards_[s].map.end() || it->second.pin_count == 0) {
        status = internal_error("released a pin on a block that was not pinned");
        continue;
      }
      --it->second.pin_count;
    }
  }
  return status;
}

Status PrefixIndex::release(LeaseId lease) {
  Leases::Record record;
  {
    std::lock_guard lock(leases_->mu);
    auto it = leases_->active.find(lease);
    if (it == leases_->active.end()) {
      return not_found("lease " + std::to_string(lease) + " is not active (released or expired)");
    }
    record = std::move(it->second);
    leases_->active.erase(it);
  }
  return release_keys(record.keys);
}

size_t PrefixIndex::expire_leases() {
  const uint64_t now = now_ns();
  std::vector<Leases::Record> expired;
  {
    std::lock_guard lock(leases_->mu);
    for (auto it = leases_->active.begin(); it != leases_->active.end();) {
      if (it->second.expiry_ns <= now) {
        expired.push_back(std::move(it->second));
        leases_->active.erase(it++);
      } else {
        ++it;
      }
    }
  }
  for (const auto& r : expired) release_keys(r.keys).ignore();  // pinned blocks cannot vanish
  counters_->leases_expired.fetch_add(expired.size(), std::memory_order_relaxed);
  return expired.size();
}

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
  PairLock lock(shard.mu, parent_shard ? &parent_shard->mu : nullptr);

  Entry* parent = nullptr;
  if (parent_shard) {
    auto pit = parent_shard->map.find(block.parent);
    if (pit == parent_shard->map.end()) {
      return not_found("parent block " + block.parent.to_hex() +
                       " is not indexed; insert a prompt's blocks in prefix order");
    }
    parent = &pit->second;
    if (parent->layout_fp != layout_fp) {
      return Status(StatusCode::kLayoutMismatch, "parent block was stored with another KV layout");
    }
    if (parent->block_index + 1 != block.block_index) {
      return invalid_argument("block_index does not follow its parent's");
    }
  }

  auto [it, inserted] = shard.map.try_emplace(block.key);
  Entry& e = it->second;
  // The emplace may have rehashed the shard, and the parent may live in the same shard.
  if (parent_shard == &shard && inserted) parent = &shard.map.find(block.parent)->second;
  if (!inserted) {
    if (e.layout_fp != layout_fp || !e.same_block(block.parent, block.block_index, block.tokens, block.extras)) {
      counters_->collisions.fetch_add(1, std::memory_order_relaxed);
      return Status(StatusCode::kCollision, "key " + block.key.to_hex() +
                                                " already holds a different block; refusing to overwrite");
    }
    if (e.tier_mask & tier_bit(block.tier)) {
      return Status(StatusCode::kAlreadyExists,
                    "block already resident in " + std::string(tier_name(block.tier)));
    }
    e.tier_mask |= tier_bit(block.tier);
    e.slots[t] = block.slot;
    if (block.pin) ++e.pin_count;
    if (parent) ++parent->children_in_tier[t];
    counters_->resident[t].fetch_add(1, std::memory_order_relaxed);
    return InsertOutcome::kAddedResidency;
  }
  e.parent = block.parent;
  e.block_index = block.block_index;
  e.tokens.assign(block.tokens.begin(), block.tokens.end());
  e.extras.assign(block.extras.begin(), block.extras.end());
  e.extra_count = static_cast<uint16_t>(block.extras.size());
  e.layout_fp = layout_fp;
  e.byte_size = block_bytes;
  e.checksum = block.checksum;
  e.slots[t] = block.slot;
  e.tier_mask = tier_bit(block.tier);
  e.priority = block.priority;
  e.pin_count = block.pin ? 1 : 0;
  e.last_access = recency_clock_.fetch_add(1, std::memory_order_relaxed);
  if (parent) {
    ++parent->child_count;
    ++parent->children_in_tier[t];
  }
  counters_->entries.fetch_add(1, std::memory_order_relaxed);
  counters_->inserts.fetch_add(1, std::memory_order_relaxed);
  counters_->resident[t].fetch_add(1, std::memory_order_relaxed);
  return InsertOutcome::kInserted;
}

Result<std::optional<BlockKey>> PrefixIndex::parent_key_of(const BlockKey& key) const {
  Shard& shard = shard_for(key);
  std::lock_guard lock(shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return not_found("block " + key.to_hex() + " is not indexed");
  if (it->second.block_index == 0) return std::optional<BlockKey>();
  return std::optional<BlockKey>(it->second.parent);
}

Status PrefixIndex::add_residency(const BlockKey& key, Tier tier, SlotId slot) {
  if (slot == kNoSlot) return invalid_argument("add_residency needs a slot");
  const int t = static_cast<int>(tier);
  Shard& shard = shard_for(key);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  const bool has_parent = parent_of->has_value();
  const BlockKey parent_key = has_parent ? **parent_of : BlockKey{};
  // A key's parent never changes, so reading it first and locking both shards after is safe.
  Shard* parent_shard = has_parent ? &shard_for(parent_key) : nullptr;
  PairLock lock(shard.mu, parent_shard ? &parent_shard->mu : nullptr);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return not_found("block " + key.to_hex() + " left the index");
  Entry& e = it->second;
  if (e.tier_mask & tier_bit(tier)) {
    return Status(StatusCode::kAlreadyExists, "block already resident in " + std::string(tier_name(tier)));
  }
  e.tier_mask |= tier_bit(tier);
  e.slots[t] = slot;
  if (parent_shard) ++parent_shard->map.find(parent_key)->second.children_in_tier[t];
  counters_->resident[t].fetch_add(1, std::memory_order_relaxed);
  return Status::ok();
}

Result<EvictedBlock> PrefixIndex::remove_residency(const BlockKey& key, Tier tier) {
  return remove_residency_impl(key, tier, /*count_eviction=*/false);
}

Result<EvictedBlock> PrefixIndex::remove_residency_impl(const BlockKey& key, Tier tier,
                                                        bool count_eviction) {
  const int t = static_cast<int>(tier);
  Shard& shard = shard_for(key);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  const bool has_parent = parent_of->has_value();
  const BlockKey parent_key = has_parent ? **parent_of : BlockKey{};
  Shard* parent_shard = has_parent ? &shard_for(parent_key) : nullptr;
  PairLock lock(shard.mu, parent_shard ? &parent_shard->mu : nullptr);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return not_found("block " + key.to_hex() + " left the index");
  Entry& e = it->second;
  if (!(e.tier_mask & tier_bit(tier))) {
    return not_found("block is not resident in " + std::string(tier_name(tier)));
  }
  if (e.pin_count != 0) return busy("block is pinned by " + std::to_string(e.pin_count) + " holder(s)");
  if (e.children_in_tier[t] != 0) {
    return busy("block has children resident in " + std::string(tier_name(tier)) + "; evict those first");
  }
  const bool last = (e.tier_mask & ~tier_bit(tier)) == 0;
  if (last && e.child_count != 0) return busy("block has indexed children; removing it would orphan them");

  EvictedBlock out{key, tier, e.slots[t], last};
  e.tier_mask &= static_cast<uint8_t>(~tier_bit(tier));
  e.slots[t] = kNoSlot;
  if (parent_shard) {
    Entry& parent = parent_shard->map.find(parent_key)->second;
    --parent.children_in_tier[t];
    if (last) --parent.child_count;
  }
  if (last) {
    shard.map.erase(it);
    counters_->entries.fetch_sub(1, std::memory_order_relaxed);
  }
  counters_->resident[t].fetch_sub(1, std::memory_order_relaxed);
  if (count_eviction) counters_->evictions[t].fetch_add(1, std::memory_order_relaxed);
  return out;
}

Result<std::vector<EvictedBlock>> PrefixIndex::erase(const BlockKey& key) {
  {
    Shard& shard = shard_for(key);
    std::lock_guard lock(shard.mu);
    auto it = shard.map.find(key);
    if (it == shard.map.end()) return not_found("block " + key.to_hex() + " is not indexed");
    if (it->second.pin_count != 0) return busy("block is pinned");
    if (it->second.child_count != 0) return busy("block has indexed children; erase them first");
  }
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

#define KVTIER_WITH_ENTRY(key, body)                                                       \
  do {                                                                                     \
    Shard& shard_ = shard_for(key);                                                        \
    std::lock_guard lock_(shard_.mu);                                                      \
    auto it_ = shard_.map.find(key);                                                       \
    if (it_ == shard_.map.end()) return not_found("block " + (key).to_hex() + " is not indexed"); \
    Entry& e = it_->second;                                                                \
    body                                                                                   \
  } while (0)

Status PrefixIndex::touch(const BlockKey& key) {
  KVTIER_WITH_ENTRY(key, {
    e.last_access = recency_clock_.fetch_add(1, std::memory_order_relaxed);
    ++e.hits;
  });
  return Status::ok();
}

Status PrefixIndex::pin(const BlockKey& key) {
  KVTIER_WITH_ENTRY(key, { ++e.pin_count; });
  return Status::ok();
}

Status PrefixIndex::unpin(const BlockKey& key) {
  KVTIER_WITH_ENTRY(key, {
    if (e.pin_count == 0) return busy("block is not pinned");
    --e.pin_count;
  });
  return Status::ok();
}

Status PrefixIndex::set_priority(const BlockKey& key, Priority priority) {
  if (static_cast<int>(priority) >= kNumPriorities) return invalid_argument("unknown priority class");
  KVTIER_WITH_ENTRY(key, { e.priority = priority; });
  return Status::ok();
}
#undef KVTIER_WITH_ENTRY

std::optional<BlockResidency> PrefixIndex::get(const BlockKey& key) const {
  Shard& shard = shard_for(key);
  std::lock_guard lock(shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return std::nullopt;
  return it->second.residency(key);
}

std::optional<BlockRecord> PrefixIndex::describe(const BlockKey& key) const {
  Shard& shard = shard_for(key);
  std::lock_guard lock(shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return std::nullopt;
  const Entry& e = it->second;
  return BlockRecord{e.parent, e.block_index, std::vector<TokenId>(e.tokens.begin(), e.tokens.end()),
                     e.extras, e.layout_fp, e.residency(key)};
}

namespace {
std::vector<Candidate> best_candidates(std::vector<Candidate> all, size_t max_blocks) {
  auto before = [](const Candidate& a, const Candidate& b) { return a.evict_before(b); };
  if (all.size() > max_blocks) {
    std::nth_element(all.begin(), all.begin() + max_blocks, all.end(), before);
    all.resize(max_blocks);
  }
  std::sort(all.begin(), all.end(), before);
  return all;
}

// The best `max_blocks` eviction candidates of one shard, under its lock.
std::vector<Candidate> shard_candidates(const PrefixIndex::Shard& shard, Tier tier, size_t max_blocks,
                                        EvictPurpose purpose) {
  std::vector<Candidate> local;
  {
    std::lock_guard lock(shard.mu);
    for (const auto& [key, e] : shard.map) {
      if (eligible(e, tier, purpose)) local.push_back({e.priority, e.last_access, key});
    }
  }
  return best_candidates(std::move(local), max_blocks);
}

struct EvictsLater {
  bool operator()(const Candidate& a, const Candidate& b) const noexcept { return b.evict_before(a); }
};
// Eviction candidates, the next victim on top.
using CandidateHeap = std::priority_queue<Candidate, std::vector<Candidate>, EvictsLater>;

// Every shard's best `max_blocks` candidates, merged.
CandidateHeap candidate_heap(const PrefixIndex::Shard* shards, uint32_t count, Tier tier, size_t max_blocks,
                             EvictPurpose purpose) {
  CandidateHeap heap;
  for (uint32_t s = 0; s < count; ++s) {
    for (const auto& c : shard_candidates(shards[s], tier, max_blocks, purpose)) heap.push(c);
  }
  return heap;
}

// A parent whose child was just chosen joins the candidates when `joins(entry)` says so; the
// entry is read under its shard's lock.
template <typename Joins>
void push_parent_if(const PrefixIndex::Shard& shard, const BlockKey& parent, CandidateHeap& heap, Joins joins) {
  std::lock_guard lock(shard.mu);
  auto it = shard.map.find(parent);
  if (it != shard.map.end() && joins(it->second)) heap.push({it->second.priority, it->second.last_access, parent});
}
}  // namespace

std::vector<BlockKey> PrefixIndex::pick_victims(Tier tier, size_t max_blocks, EvictPurpose purpose) const {
  std::vector<BlockKey> keys;
  if (max_blocks == 0) return keys;
  CandidateHeap heap = candidate_heap(shards_.get(), options_.shards, tier, max_blocks, purpose);
  const int t = static_cast<int>(tier);
  absl::flat_hash_map<BlockKey, uint32_t, std::hash<BlockKey>> leaving;  // parent -> its victims
  while (!heap.empty() && keys.size() < max_blocks) {
    const Candidate c = heap.top();
    heap.pop();
    keys.push_back(c.key);
    if (purpose != EvictPurpose::kDemote) continue;
    // A demoted block leaves this tier only; it stays indexed. Once all of a parent's children
    // in this tier are victims, the parent may follow them in the same batch.
    auto parent = parent_key_of(c.key);
    if (!parent || !*parent) continue;
    const uint32_t picked = ++leaving[**parent];
    push_parent_if(shard_for(**parent), **parent, heap, [&](const Entry& p) {
      return (p.tier_mask & tier_bit(tier)) && p.pin_count == 0 && p.children_in_tier[t] == picked;
    });
  }
  return keys;
}

std::vector<EvictedBlock> PrefixIndex::evict(Tier tier, size_t max_blocks) {
  expire_leases();
  std::vector<EvictedBlock> out;
  if (max_blocks == 0) return out;
  CandidateHeap heap = candidate_heap(shards_.get(), options_.shards, tier, max_blocks, EvictPurpose::kDrop);
  while (!heap.empty() && out.size() < max_blocks) {
    const Candidate c = heap.top();
    heap.pop();
    auto parent = parent_key_of(c.key);
    auto removed = remove_residency_impl(c.key, tier, /*count_eviction=*/true);
    if (!removed) continue;  // pinned or gained a child since it was chosen: skip it
    out.push_back(*removed);
    if (!parent || !*parent) continue;
    // The parent may have just become a leaf of this tier: it joins the candidates.
    push_parent_if(shard_for(**parent), **parent, heap,
                   [&](const Entry& p) { return eligible(p, tier, EvictPurpose::kDrop); });
  }
  return out;
}

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
  for (int t = 0; t < kNumTiers; ++t) {
    s.resident_blocks[t] = ld(counters_->resident[t]);
    s.evictions[t] = ld(counters_->evictions[t]);
  }
  std::lock_guard lock(leases_->mu);
  s.leases_active = leases_->active.size();
  return s;
}

Status PrefixIndex::check_invariants() const {
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(options_.shards);
  for (uint32_t s = 0; s < options_.shards; ++s) locks.emplace_back(shards_[s].mu);

  absl::flat_hash_map<BlockKey, std::pair<uint32_t, std::array<uint32_t, kNumTiers>>> children;
  std::array<uint64_t, kNumTiers> resident{};
  uint64_t entries = 0;
  for (uint32_t s = 0; s < options_.shards; ++s) {
    for (const auto& [key, e] : shards_[s].map) {
      ++entries;
      if (&shard_for(key) != &shards_[s]) return internal_error("entry in the wrong shard");
      if (e.tier_mask == 0) return internal_error("entry " + key.to_hex() + " has no residency");
      for (int t = 0; t < kNumTiers; ++t) {
        const bool in = e.tier_mask & (1u << t);
        if (in != (e.slots[t] != kNoSlot)) return internal_error("residency mask and slots disagree");
        resident[t] += in;
      }
      if (e.block_index == 0) continue;
      const Shard& ps = shard_for(e.parent);
      auto pit = ps.map.find(e.parent);
      if (pit == ps.map.end()) {
        return internal_error("prefix closure broken: parent of " + key.to_hex() + " is missing");
      }
      if (pit->second.block_index + 1 != e.block_index) return internal_error("block_index chain broken");
      auto& c = children[e.parent];
      ++c.first;
      for (int t = 0; t < kNumTiers; ++t) c.second[t] += (e.tier_mask >> t) & 1;
    }
  }
  for (uint32_t s = 0; s < options_.shards; ++s) {
    for (const auto& [key, e] : shards_[s].map) {
      auto it = children.find(key);
      uint32_t count = it == children.end() ? 0 : it->second.first;
      if (count != e.child_count) return internal_error("child count of " + key.to_hex() + " is wrong");
      for (int t = 0; t < kNumTiers; ++t) {
        uint32_t in_tier = it == children.end() ? 0 : it->second.second[t];
        if (in_tier != e.children_in_tier[t]) return internal_error("per-tier child count is wrong");
      }
    }
  }
  if (entries != counters_->entries.load()) return internal_error("entry counter drifted");
  for (int t = 0; t < kNumTiers; ++t) {
    if (resident[t] != counters_->resident[t].load()) return internal_error("resident counter drifted");
  }
  return Status::ok();
}

}  // namespace kvtier
