// PrefixIndex: the concurrent map from block key to block entry, with longest-prefix match,
// residency per tier, pins and leases, priority and recency, and the eviction choice.
//
// Invariant (prefix closure): every indexed block's parent is indexed too (or is the namespace
// root), so every indexed block is reachable by a prefix match. Inserts must come in prefix
// order, and a block leaves the index only when it has no indexed children.
//
// Layout: a block's entry lives in a run, an array of the consecutive blocks of one chain (entry
// p + 1 of a run is always a child of entry p), with the runs' tokens side by side. A key map,
// sharded by key, finds a block's run. A match keys only the first block it looks for, then walks
// the run comparing the request's tokens with the run's, one contiguous read, and keys again
// only where the run ends or the prompt branches off it: a fully cached 128K-token prompt of
// 16-token blocks takes a few dozen keys and lookups, not 8192. Because a block's parent is the
// run entry before it (or the run's head parent, checked when the run is entered), comparing
// the tokens checks exactly what a keyed lookup would: a hash collision is still a miss.
//
// Concurrency: each key-map shard and each run has its own mutex. Locks are taken key shards
// first (in shard order), then runs (in address order); a match holds one run at a time and
// no key shard while it holds a run. A pinned block never leaves its run, so a lease keeps
// (run, range) pairs and releases a 128K-token match with a few locks. The map of namespace
// roots to groups has a leaf lock of its own (an insert of block 0 takes it under the others).
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <unordered_map>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/match.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "prefix_index/key_chain.h"

namespace kvtier {

/// The owner a block's residency is counted under: a tenant, for tier shares. Every block of a
/// namespace belongs to the group of its root (set_root_group); 0 is the group of roots never
/// given one.
using GroupId = uint16_t;
inline constexpr GroupId kNoGroup = 0;
inline constexpr uint32_t kMaxGroups = 1024;

struct IndexOptions {
  /// Number of shards; a power of two in [1, 4096]. Default 64.
  uint32_t shards = 64;
  /// Lease lifetime when a match takes a lease without saying how long. Default 30 s.
  uint64_t default_lease_ns = 30'000'000'000ull;
  /// Monotonic clock in nanoseconds, for lease expiry. Default: std::chrono::steady_clock.
  /// Tests inject a manual clock so that expiry never depends on sleeping.
  std::function<uint64_t()> clock_ns;
};

/// Everything the index knows of one block: what a lower tier needs to persist it.
struct BlockRecord {
  BlockKey parent;  // the namespace root for block 0
  uint32_t block_index = 0;
  std::vector<TokenId> tokens;
  std::vector<BlockKey> extras;
  uint64_t layout_fingerprint = 0;
  BlockResidency residency;
  uint64_t hits = 0;  // matches that returned this block since it was inserted
};

/// One indexed block's place in its chain (PrefixIndex::for_each_block).
struct ChainLink {
  BlockKey root;    // its namespace root
  BlockKey key;
  BlockKey parent;  // the namespace root for block 0
  uint32_t block_index = 0;
};

struct MatchOptions {
  /// Pin every matched block under a lease, so none is evicted before the caller loads it.
  bool take_lease = false;
  /// Lease lifetime; 0 means IndexOptions::default_lease_ns.
  uint64_t lease_ns = 0;
  /// Refresh recency and hit counts of matched blocks (a "peek" sets this to false).
  bool touch = true;
};

/// One block to insert. Blocks of a prompt go in prefix order: the parent must be indexed.
struct BlockInsert {
  BlockKey key;                      // KeyChain::block_key(parent, tokens, extras); checked
  BlockKey parent;                   // the namespace root for block 0
  uint32_t block_index = 0;          // position in the prompt, 0-based
  std::span<const TokenId> tokens;   // exactly block_tokens ids
  std::span<const BlockKey> extras;  // per-block extras, as hashed
  uint64_t byte_size = 0;            // 0 = the namespace layout's block size; else must equal it
  uint64_t checksum = 0;             // XXH3-64 of the block's bytes
  Tier tier = Tier::kHost;           // where the bytes were written
  SlotId slot = kNoSlot;             // the tier's handle; required
  Priority priority = Priority::kNormal;
  /// Take one pin with the insert, under the same lock (released with unpin), so that no
  /// eviction can come between the insert and a pin the caller takes after it. Applies to both
  /// outcomes; nothing is pinned when the insert fails.
  bool pin = false;
};

enum class InsertOutcome : uint8_t {
  kInserted,        // a new entry
  kAddedResidency,  // the entry existed; it is now also resident in the given tier
};

/// A block that left a tier (and maybe the index), so its tier can free the slot.
struct EvictedBlock {
  BlockKey key;
  Tier tier;
  SlotId slot;
  bool left_index;  // no residency remained: the entry is gone
};

/// Why the caller asks for victims: to drop blocks, or to copy them down a tier first.
enum class EvictPurpose : uint8_t {
  kDrop,    // a block whose last residency this is must also be an index leaf
  kDemote,  // the caller adds a lower residency before removing this one
};

struct IndexStats {
  uint64_t entries = 0;
  uint64_t lookups = 0;
  uint64_t hit_blocks = 0;
  uint64_t hit_tokens = 0;
  uint64_t lookup_tokens = 0;  // full-block tokens asked about
  uint64_t inserts = 0;
  uint64_t collisions = 0;     // inserts refused because a key held another prompt's block
  uint64_t leases_active = 0;
  uint64_t leases_expired = 0;
  std::array<uint64_t, kNumTiers> resident_blocks{};
  std::array<uint64_t, kNumTiers> evictions{};
  uint64_t damaged_blocks = 0;  // marked damaged and not yet repaired or evicted
  uint64_t over_share_evictions = 0;  // blocks evict() dropped early, their group over its share
};

/// kvtier inspect's view of the blocks of one namespace root.
struct RootSummary {
  BlockKey root;
  uint64_t blocks = 0;
  std::array<uint64_t, kNumTiers> resident{};  // blocks with a copy in each tier
  uint64_t bytes = 0;                          // blocks × their size
  uint64_t hits = 0;                           // matches that returned a block, summed over blocks
  std::array<uint64_t, kNumPriorities> by_priority{};
  uint32_t longest_blocks = 0;                 // the longest cached prefix, in blocks
};

/// A prefix that matches returned often: the chain from its root to `key`.
struct ReusedPrefix {
  BlockKey root;
  BlockKey key;                      // its last block
  uint32_t blocks = 0;               // its length in blocks
  uint64_t hits = 0;                 // matches that returned its last block
  uint8_t tier_mask = 0;             // where its last block is
  std::vector<TokenId> last_tokens;  // its last block's tokens
};

struct IndexSummary {
  std::vector<RootSummary> roots;
  std::vector<ReusedPrefix> most_reused;  // by tokens restored (hits × length), most first
};

class PrefixIndex {
 public:
  static Result<std::unique_ptr<PrefixIndex>> create(const KeyChain& keys, IndexOptions options = {});
  ~PrefixIndex();
  PrefixIndex(const PrefixIndex&) = delete;
  PrefixIndex& operator=(const PrefixIndex&) = delete;

  const KeyChain& key_chain() const noexcept { return keys_; }

  /// Longest prefix of `tokens` whose every block is indexed with the request's own parent key,
  /// tokens and extras (a hash collision never returns another prompt's KV). Fewer tokens than
  /// one block give an empty match, not an error.
  Result<Match> match(const Namespace& ns, std::span<const TokenId> tokens,
                      std::span<const BlockExtra> extras = {}, const MatchOptions& options = {});
  /// The same, into a caller-owned Match whose storage is reused: a 128K-token prompt's result
  /// is ~0.6 MB, and allocating it afresh costs more page faults than the lookups themselves.
  Status match_into(const Namespace& ns, std::span<const TokenId> tokens,
                    std::span<const BlockExtra> extras, const MatchOptions& options, Match& out);

  /// Shortens a match to its first `keep` blocks (`keep` >= its size: no change). Under a lease,
  /// the blocks left out are unpinned and the lease keeps the rest; a lease of no block left is
  /// released (match.lease becomes kNoLease). The index's hit counts drop by the blocks left out.
  /// kNotFound when the lease was released or expired already (the match is shortened anyway).
  Status shorten(Match& match, size_t keep);
  /// Releases a lease's pins. kNotFound when it was released or expired already.
  Status release(LeaseId lease);
  /// Releases every lease whose expiry has passed; returns how many.
  size_t expire_leases();

  /// Inserts a block (or adds a tier residency to an existing identical block).
  /// kInvalidArgument: wrong token count, key not derived from parent+tokens+extras, no slot.
  /// kNotFound: the parent is not indexed. kCollision: the key holds another block.
  /// kAlreadyExists: the block is already resident in that tier (the caller frees its slot).
  Result<InsertOutcome> insert(const Namespace& ns, const BlockInsert& block);

  /// Residency changes made by the tier manager.
  Status add_residency(const BlockKey& key, Tier tier, SlotId slot);
  /// Removes one tier's residency; the entry leaves the index with its last residency.
  /// kBusy when pinned, when a child in that tier depends on it, or when it would orphan a child.
  Result<EvictedBlock> remove_residency(const BlockKey& key, Tier tier);
  /// Removes an entry from every tier at once: same rules as removing its last residency.
  Result<std::vector<EvictedBlock>> erase(const BlockKey& key);

  Status touch(const BlockKey& key);
  Status pin(const BlockKey& key);
  Status unpin(const BlockKey& key);
  /// A pin that also holds the block at priority class `at` or above while it lasts. A block's
  /// class is the highest of its own (insert, set_priority) and those of its priority pins, so
  /// unpinning restores what the block had. kBusy from unpin when no pin at `at` is held.
  Status pin(const BlockKey& key, Priority at);
  Status unpin(const BlockKey& key, Priority at);
  /// The block's own priority class; pins at a higher class still hold it higher.
  Status set_priority(const BlockKey& key, Priority priority);

  /// Marks a block whose only copy, in `only_copy`, failed its checksum. A match stops before
  /// it, as before a block that is not cached, so the engine recomputes from there, and the save
  /// of those tokens repairs it (repair). The entry and its children stay, evictable as before;
  /// the children match again once it is repaired, or once add_residency gives it a second
  /// (verified) copy. True when marked; false when already marked or when it has a copy outside
  /// `only_copy` (checked under the block's lock). kNotFound when not indexed.
  Result<bool> mark_damaged(const BlockKey& key, Tier only_copy);
  /// Gives a damaged block a new copy in `tier`, its only residency: the slot and checksum are
  /// replaced and the block matches again. Returns the slot it replaced. kBusy when the block is
  /// not damaged; kNotFound when not indexed.
  Result<SlotId> repair(const BlockKey& key, Tier tier, SlotId slot, uint64_t checksum);
  /// Blocks marked damaged now (a relaxed read: a fast check before looking at any one block).
  uint64_t damaged_count() const noexcept;

  /// A snapshot of one block, or nullopt.
  std::optional<BlockResidency> get(const BlockKey& key) const;
  /// A snapshot of one block with its parent, tokens and extras, or nullopt.
  std::optional<BlockRecord> describe(const BlockKey& key) const;

  /// Counts every block of namespace `root` (block 0 and everything chained from it) under
  /// `group`, for tier shares. Blocks of the root indexed before it had a group join it (then,
  /// and only then, this holds every key shard while it walks the runs; call it with no other
  /// lock held). Setting the group a root has already is ok; kAlreadyExists when it has another
  /// one, kNoGroup included (it keeps the first); kInvalidArgument for a group >= kMaxGroups.
  Status set_root_group(const BlockKey& root, GroupId group);
  /// The group set_root_group gave `root`; nullopt when it gave none.
  std::optional<GroupId> root_group(const BlockKey& root) const;
  /// The most blocks `group` may keep in `tier` before its blocks are evicted ahead of everyone
  /// else's (its share of the tier); 0 (the default) sets no share. Work-conserving: a group
  /// may fill a tier while the others leave room, and loses only its own blocks once over.
  Status set_group_limit(GroupId group, Tier tier, uint64_t max_blocks);
  /// Blocks of `group` resident in `tier` now (a relaxed read); 0 for an unknown group.
  uint64_t group_resident(GroupId group, Tier tier) const noexcept;
  /// The limit set_group_limit gave, 0 when none.
  uint64_t group_limit(GroupId group, Tier tier) const noexcept;

  /// Up to `max_blocks` victims in `tier`: first the blocks of groups over their share of the
  /// tier (set_group_limit; as many as they are over, to within one call's `max_blocks`), then
  /// lowest priority class first, then least recently used; never pinned; never a block with a
  /// child resident in the same tier; for kDrop, never a block whose removal would orphan an
  /// indexed child. Advisory: removal re-checks.
  /// For kDemote, a block whose every child resident in `tier` is already among the victims
  /// joins the candidates too, after those children: moved in the order returned, a batch can
  /// take the last 64 blocks of one long prompt, not just its one leaf.
  /// `over_share`, when given, gets one flag per victim: taken for its group's share.
  std::vector<BlockKey> pick_victims(Tier tier, size_t max_blocks, EvictPurpose purpose,
                                     std::vector<uint8_t>* over_share = nullptr) const;

  /// Drops up to `max_blocks` blocks from `tier` in eviction order, leaves first, following
  /// parents as they become leaves. Expired leases are released first.
  std::vector<EvictedBlock> evict(Tier tier, size_t max_blocks);

  IndexStats stats() const;
  /// One pass over every block, one run locked at a time (a snapshot per run, not of the whole
  /// index): per-root counts, and the `top` prefixes that saved the most tokens. A prefix counts
  /// where its hits end: its last block has more hits than its child in the same chain.
  IndexSummary summarize(size_t top) const;
  /// Calls `fn` for every indexed block, one run locked at a time as summarize() does (`fn` must
  /// not call the index): kvtier export's snapshot of what the daemon holds.
  void for_each_block(const std::function<void(const ChainLink&)>& fn) const;

  /// Checks every structural invariant (prefix closure, child counts, residency masks);
  /// for tests and `kvtier demo`, which checks it after its workload. Locks the whole index.
  Status check_invariants() const;

 private:
  // Defined in index_internals.h.
  struct Shard;
  struct Run;
  struct Runs;
  struct Loc;
  struct Span;
  struct CandidateQueue;
  struct Victims;
  PrefixIndex(const KeyChain& keys, IndexOptions options);
  Shard& shard_for(const BlockKey& key) const noexcept;
  uint64_t now_ns() const;
  Status release_spans(std::span<const Span> spans);
  /// The parent key of an indexed block (nullopt for block 0). A key's parent never changes,
  /// so callers read it first and then lock the block's and the parent's shards together.
  Result<std::optional<BlockKey>> parent_key_of(const BlockKey& key) const;
  Result<EvictedBlock> remove_residency_impl(const BlockKey& key, Tier tier, bool count_eviction);
  /// Runs `fn(run, pos)` on an indexed block under its shard's and run's locks; false when the
  /// key is not indexed.
  template <typename Fn>
  bool with_entry(const BlockKey& key, Fn&& fn) const;
  /// The group of a new run: the root's for block 0, else its parent run's.
  GroupId group_of_new_run(const BlockInsert& block, const Run* parent_run) const;
  void count_residency(const Run& run, int tier, bool added) noexcept;
  template <typename Joins>
  void push_parent_if(const BlockKey& parent, Victims& victims, Joins joins) const;
  Victims candidate_heap(Tier tier, size_t max_blocks, EvictPurpose purpose) const;

  KeyChain keys_;
  IndexOptions options_;
  uint32_t shard_shift_;
  std::unique_ptr<Shard[]> shards_;
  std::unique_ptr<Runs> runs_;
  std::atomic<uint64_t> recency_clock_{1};
  std::atomic<LeaseId> next_lease_{1};

  struct Leases;
  std::unique_ptr<Leases> leases_;

  struct Groups;
  std::unique_ptr<Groups> groups_;

  struct Counters;
  std::unique_ptr<Counters> counters_;
};

/// The priority pins one holder (a Store, a daemon session) holds in an index, so that each of
/// its unpins undoes one of its own pins at the class it was taken with, the latest first.
/// Not thread-safe.
class PinLedger {
 public:
  /// index.pin(key, at), remembered; the index's error (kNotFound: the block left) otherwise.
  Status pin(PrefixIndex& index, const BlockKey& key, Priority at);
  /// Undoes this holder's latest pin of `key`; kNotFound when it holds none.
  Status unpin(PrefixIndex& index, const BlockKey& key);
  /// Undoes every pin held.
  void unpin_all(PrefixIndex& index);
  /// Pins held, over all blocks.
  size_t size() const noexcept { return count_; }

 private:
  std::unordered_map<BlockKey, std::vector<Priority>> pins_;
  size_t count_ = 0;
};

}  // namespace kvtier
