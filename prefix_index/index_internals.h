// The prefix index's internals, shared by the files that implement it (one concept each):
//   prefix_index.cpp      creation, shards, stats
//   index_match.cpp       longest-prefix match and leases
//   index_insert.cpp      insert, residency, pins and priority per block, damage and repair
//   index_groups.cpp      tenant groups and their tier shares
//   pin_ledger.cpp        PinLedger, a holder's priority pins
//   index_eviction.cpp    the eviction choice
//   index_invariants.cpp  check_invariants
//   index_summary.cpp     summarize (kvtier inspect)
// Not for other users: include prefix_index/prefix_index.h.
#pragma once

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <queue>
#include <vector>

#include "prefix_index/prefix_index.h"

namespace kvtier {

namespace index_detail {

// The fields of a block that a match reads or writes, in one cache line. A run keeps them side
// by side, so a match of a long prompt streams through them.
struct Hot {
  BlockKey key;
  std::array<SlotId, kNumTiers> slots{kNoSlot, kNoSlot, kNoSlot};
  uint64_t checksum = 0;
  uint64_t last_access = 0;  // logical recency tick; larger is more recent
  uint32_t pin_count = 0;
  uint8_t tier_mask = 0;  // bit tier_bit(t) set when resident in tier t
  Priority priority = Priority::kNormal;
  uint16_t extra_count = 0;  // here so a match without extras never reads Cold
};
static_assert(sizeof(Hot) == 64);

// What only inserts, evictions and requests with extras read.
struct Cold {
  std::vector<BlockKey> extras;
  uint32_t child_count = 0;                            // indexed children
  std::array<uint32_t, kNumTiers> children_in_tier{};  // children resident in each tier
  Priority own_priority = Priority::kNormal;           // set by insert and set_priority
  std::array<uint32_t, kNumPriorities> pins_at{};      // priority pins held, per class
  bool damaged = false;                                // its only copy failed a checksum

  // Hot::priority: the highest of the block's own class and its priority pins'.
  Priority effective_priority() const noexcept {
    for (int p = kNumPriorities - 1; p > static_cast<int>(own_priority); --p) {
      if (pins_at[p] != 0) return static_cast<Priority>(p);
    }
    return own_priority;
  }
};

// Blocks per run. A 128K-token prompt of 16-token blocks spans 8 runs, so a match of it keys
// and looks up 8 blocks and compares the other 8184 in place.
inline constexpr uint32_t kRunCapacity = 1024;

inline bool same_tokens(const TokenId* a, const TokenId* b, uint32_t block_tokens) noexcept {
  // The 16-token page (vLLM, SGLang) compares at a constant length: inline vector compares
  // instead of a call to memcmp per block.
  return block_tokens == 16 ? std::memcmp(a, b, 16 * sizeof(TokenId)) == 0
                            : std::memcmp(a, b, block_tokens * sizeof(TokenId)) == 0;
}

struct Candidate {
  bool over;  // its group is over its share of the tier
  Priority priority;
  uint64_t last_access;
  BlockKey key;
  GroupId group;
  // A group over its share first, then the lowest priority class, then the oldest.
  bool evict_before(const Candidate& o) const noexcept {
    if (over != o.over) return over;
    if (priority != o.priority) return priority < o.priority;
    return last_access < o.last_access;
  }
};

struct EvictsLater {
  bool operator()(const Candidate& a, const Candidate& b) const noexcept { return b.evict_before(a); }
};

// Keeps the best `max_blocks` of `all`, in eviction order.
inline void keep_best(std::vector<Candidate>& all, size_t max_blocks) {
  auto before = [](const Candidate& a, const Candidate& b) { return a.evict_before(b); };
  if (all.size() > max_blocks) {
    std::nth_element(all.begin(), all.begin() + max_blocks, all.end(), before);
    all.resize(max_blocks);
  }
  std::sort(all.begin(), all.end(), before);
}

// Locks two mutexes of one kind (key shards, or runs) in address order, once when they coincide.
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

}  // namespace index_detail

using index_detail::Candidate;
using index_detail::Cold;
using index_detail::EvictsLater;
using index_detail::Hot;
using index_detail::kRunCapacity;
using index_detail::PairLock;
using index_detail::same_tokens;

// The consecutive blocks of one chain: entry p + 1 is a child of entry p, and entry 0 a child
// of head_parent (the namespace root, or a block of another run). Entries leave from the back
// only (a block with a child never leaves, and entry p + 1 is a child of entry p), so a block's
// position never changes while it is indexed. Guarded by `mu`; the const fields never change.
// The structure (entries, keys, residency, child counts) changes only under the key-shard lock
// of the block concerned as well; pins, recency and hits change under `mu` alone. So holding
// every key shard freezes the structure of every run (check_invariants relies on it).
struct PrefixIndex::Run {
  Run(const BlockKey& head, const BlockKey& root_key, uint32_t first, uint32_t bt, uint64_t fp, uint64_t bytes,
      GroupId g)
      : head_parent(head), root(root_key), first_index(first), block_tokens(bt), layout_fp(fp), byte_size(bytes),
        group(g) {}

  mutable std::mutex mu;
  const BlockKey head_parent;
  const BlockKey root;         // the namespace root of the chain
  const uint32_t first_index;  // block_index of entry 0
  const uint32_t block_tokens;
  const uint64_t layout_fp;    // one chain, one layout: insert checks it against the parent's
  const uint64_t byte_size;
  // Every block of a chain is counted under its root's group. Changes only under every key-shard
  // lock (set_root_group), as the counts it names do; atomic for the eviction scan's reads.
  std::atomic<GroupId> group;
  size_t registry_slot = 0;    // position in Runs::all; guarded by Runs::mu
  std::vector<Hot> hot;        // size() is the number of entries
  std::vector<Cold> cold;
  std::vector<uint64_t> hits;  // matches that returned the block
  std::vector<TokenId> tokens; // block_tokens per entry, in order
  uint32_t damaged = 0;        // entries with Cold::damaged; a match reads Cold only when set

  uint32_t size() const noexcept { return static_cast<uint32_t>(hot.size()); }
  GroupId group_now() const noexcept { return group.load(std::memory_order_relaxed); }
  uint32_t block_index(uint32_t pos) const noexcept { return first_index + pos; }
  const BlockKey& parent_of(uint32_t pos) const noexcept { return pos ? hot[pos - 1].key : head_parent; }
  const TokenId* tokens_of(uint32_t pos) const noexcept { return tokens.data() + size_t(pos) * block_tokens; }

  bool same_extras(uint32_t pos, std::span<const BlockKey> ex) const noexcept {
    return hot[pos].extra_count == ex.size() &&
           (ex.empty() || std::memcmp(cold[pos].extras.data(), ex.data(), ex.size_bytes()) == 0);
  }
  bool same_block(uint32_t pos, const BlockKey& parent, size_t index, std::span<const TokenId> toks,
                  std::span<const BlockKey> ex) const noexcept {
    return parent_of(pos) == parent && block_index(pos) == index && toks.size() == block_tokens &&
           same_tokens(tokens_of(pos), toks.data(), block_tokens) && same_extras(pos, ex);
  }

  BlockResidency residency(uint32_t pos) const {
    const Hot& h = hot[pos];
    BlockResidency r;
    r.key = h.key;
    r.tier_mask = h.tier_mask;
    r.slots = h.slots;
    r.byte_size = byte_size;
    r.checksum = h.checksum;
    r.priority = h.priority;
    r.damaged = damaged != 0 && cold[pos].damaged;
    return r;
  }

  bool eligible(uint32_t pos, Tier tier, EvictPurpose purpose) const noexcept {
    const Hot& h = hot[pos];
    const Cold& c = cold[pos];
    const int t = static_cast<int>(tier);
    if (!(h.tier_mask & tier_bit(tier)) || h.pin_count != 0 || c.children_in_tier[t] != 0) return false;
    const bool last_residency = (h.tier_mask & ~tier_bit(tier)) == 0;
    return purpose == EvictPurpose::kDemote || !last_residency || c.child_count == 0;
  }
  Candidate candidate(uint32_t pos, GroupId g, bool over) const noexcept {
    return {over, hot[pos].priority, hot[pos].last_access, hot[pos].key, g};
  }

  void append(const BlockInsert& b, uint64_t tick) {
    Hot& h = hot.emplace_back();
    h.key = b.key;
    h.slots[static_cast<int>(b.tier)] = b.slot;
    h.checksum = b.checksum;
    h.last_access = tick;
    h.pin_count = b.pin ? 1 : 0;
    h.tier_mask = tier_bit(b.tier);
    h.priority = b.priority;
    h.extra_count = static_cast<uint16_t>(b.extras.size());
    Cold& c = cold.emplace_back();
    c.extras.assign(b.extras.begin(), b.extras.end());
    c.own_priority = b.priority;
    hits.push_back(0);
    tokens.insert(tokens.end(), b.tokens.begin(), b.tokens.end());
  }
  /// Sets or clears entry pos's damaged mark, keeping this run's count and the index-wide
  /// `total` in step; true when the mark changed.
  bool set_damaged(uint32_t pos, bool on, std::atomic<uint64_t>& total) noexcept {
    if (cold[pos].damaged == on) return false;
    cold[pos].damaged = on;
    if (on) {
      ++damaged;
      total.fetch_add(1, std::memory_order_relaxed);
    } else {
      --damaged;
      total.fetch_sub(1, std::memory_order_relaxed);
    }
    return true;
  }
  void pop_back() {  // the caller clears a damaged mark first (set_damaged)
    hot.pop_back();
    cold.pop_back();
    hits.pop_back();
    tokens.resize(tokens.size() - block_tokens);
  }
};

struct PrefixIndex::Loc {
  Run* run;
  uint32_t pos;
};

// A lease's pins in one run: entries [begin, end).
struct PrefixIndex::Span {
  Run* run;
  uint32_t begin, end;
};

struct alignas(64) PrefixIndex::Shard {
  mutable std::mutex mu;
  // Keys are keyed hashes already (the deployment secret keeps them uniform and unpredictable),
  // so the table uses std::hash<BlockKey>'s one multiply rather than re-hashing 16 bytes.
  absl::flat_hash_map<BlockKey, Loc, std::hash<BlockKey>> map;
};

// Every run, for eviction scans and the invariant check. The registry owns the runs; a run
// that empties leaves it. `mu` is a leaf lock: nothing else is locked while it is held. Runs
// join and leave only under the key-shard lock of the block that made or emptied them.
struct PrefixIndex::Runs {
  mutable std::mutex mu;
  std::vector<std::shared_ptr<Run>> all;

  void add(std::shared_ptr<Run> run) {
    std::lock_guard lock(mu);
    run->registry_slot = all.size();
    all.push_back(std::move(run));
  }
  // Returns the registry's reference, for the caller to drop once it has unlocked the run.
  std::shared_ptr<Run> remove(Run* run) {
    std::lock_guard lock(mu);
    const size_t i = run->registry_slot;
    std::shared_ptr<Run> gone = std::move(all[i]);
    if (i + 1 != all.size()) {
      all[i] = std::move(all.back());
      all[i]->registry_slot = i;
    }
    all.pop_back();
    return gone;
  }
  // Scanners hold a reference, so a run that empties meanwhile stays valid (and empty).
  std::vector<std::shared_ptr<Run>> snapshot() const {
    std::lock_guard lock(mu);
    return all;
  }
};

struct PrefixIndex::CandidateQueue : std::priority_queue<Candidate, std::vector<Candidate>, EvictsLater> {};

// Residency per group and tier (summed over the groups, a tier's resident blocks), the groups'
// shares, and which group each namespace root has.
struct PrefixIndex::Groups {
  std::array<std::array<std::atomic<uint64_t>, kNumTiers>, kMaxGroups> resident{};
  std::array<std::array<std::atomic<uint64_t>, kNumTiers>, kMaxGroups> limit{};
  std::atomic<bool> any_limit{false};
  mutable std::mutex roots_mu;  // a leaf lock, for the two below
  absl::flat_hash_map<BlockKey, GroupId, std::hash<BlockKey>> roots;
  // Roots that had blocks indexed before set_root_group gave them an entry: the ones whose runs
  // it must relabel.
  absl::flat_hash_set<BlockKey, std::hash<BlockKey>> ungrouped;
};

// The candidates of one eviction call, best first, and how many blocks each group over its
// share has to give up. A candidate popped as "over" after its group gave up that many goes back
// as an ordinary one, so a group loses only what it holds beyond its share.
struct PrefixIndex::Victims {
  CandidateQueue heap;
  absl::flat_hash_map<GroupId, uint64_t> excess;  // groups over their share at the scan

  bool over(GroupId g) const {
    auto it = excess.find(g);
    return it != excess.end() && it->second != 0;
  }
  std::optional<Candidate> pop() {
    while (!heap.empty()) {
      Candidate c = heap.top();
      heap.pop();
      if (!c.over || over(c.group)) return c;
      c.over = false;
      heap.push(c);
    }
    return std::nullopt;
  }
  // Call for each candidate taken; `over_share` counts those taken for being over (evictions).
  void took(const Candidate& c, std::atomic<uint64_t>* over_share) {
    if (!c.over) return;
    --excess[c.group];
    if (over_share) over_share->fetch_add(1, std::memory_order_relaxed);
  }
  // Keeps the best `max_blocks` of `all`, in eviction order, where only a group's best `excess`
  // candidates rank as over its share: its others compete as everyone else's do.
  void keep_best(std::vector<Candidate>& all, size_t max_blocks) const {
    if (!excess.empty()) {
      auto before = [](const Candidate& a, const Candidate& b) { return a.evict_before(b); };
      std::sort(all.begin(), all.end(), before);
      absl::flat_hash_map<GroupId, uint64_t> left = excess;
      for (Candidate& c : all) {
        if (!c.over) continue;
        uint64_t& n = left[c.group];
        if (n == 0) {
          c.over = false;
        } else {
          --n;
        }
      }
    }
    index_detail::keep_best(all, max_blocks);
  }
};

struct PrefixIndex::Leases {
  struct Record {
    std::vector<Span> spans;
    uint64_t expiry_ns;
  };
  std::mutex mu;
  absl::flat_hash_map<LeaseId, Record> active;
};

struct PrefixIndex::Counters {
  std::atomic<uint64_t> entries{0}, lookups{0}, hit_blocks{0}, hit_tokens{0}, lookup_tokens{0},
      inserts{0}, collisions{0}, leases_expired{0}, damaged{0}, over_share_evictions{0};
  std::array<std::atomic<uint64_t>, kNumTiers> evictions{};
};

template <typename Fn>
bool PrefixIndex::with_entry(const BlockKey& key, Fn&& fn) const {
  Shard& shard = shard_for(key);
  std::lock_guard shard_lock(shard.mu);
  auto it = shard.map.find(key);
  if (it == shard.map.end()) return false;
  std::lock_guard run_lock(it->second.run->mu);
  fn(*it->second.run, it->second.pos);
  return true;
}

}  // namespace kvtier
