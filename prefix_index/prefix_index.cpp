#include "prefix_index/prefix_index.h"

#include <absl/container/flat_hash_map.h>
#include <absl/container/flat_hash_set.h>

#include <algorithm>
#include <bit>
#include <chrono>
#include <cstring>
#include <mutex>
#include <queue>

namespace kvtier {

namespace {

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
constexpr uint32_t kRunCapacity = 1024;

bool same_tokens(const TokenId* a, const TokenId* b, uint32_t block_tokens) noexcept {
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
void keep_best(std::vector<Candidate>& all, size_t max_blocks) {
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

}  // namespace

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
    ::kvtier::keep_best(all, max_blocks);
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
  counters_->lookups.fetch_add(1, std::memory_order_relaxed);
  counters_->lookup_tokens.fetch_add(n * bt, std::memory_order_relaxed);
  if (n == 0) return Status::ok();

  thread_local std::vector<uint32_t> extra_begin;
  thread_local std::vector<BlockKey> extra_hashes;
  thread_local std::vector<Span> spans;
  // Reserved for the whole prompt at once: growing it block by block reallocated (and
  // page-faulted) the 0.5 MB result of a 128K-token prompt several times over.
  result.blocks.reserve(n);
  spans.clear();
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

  // Each round keys block i, finds it through the key map, and checks it is the request's block
  // (a collision is a miss, never a wrong hit); then it walks the block's run for as long as
  // the run's tokens are the prompt's. The next round starts where the prompt leaves the run.
  size_t i = 0;
  BlockKey parent = ns.root;
  while (i < n) {
    const std::span<const TokenId> block = tokens.subspan(i * bt, bt);
    const BlockKey key = keys_.block_key(parent, block, extras_of(i));
    Shard& shard = shard_for(key);
    std::unique_lock shard_lock(shard.mu);
    auto it = shard.map.find(key);
    if (it == shard.map.end()) break;
    Run& run = *it->second.run;
    uint32_t pos = it->second.pos;
    std::lock_guard run_lock(run.mu);
    shard_lock.unlock();
    if (run.layout_fp != layout_fp || !run.same_block(pos, parent, i, block, extras_of(i))) {
      break;
    }
    const uint32_t first = pos;
    bool damaged = false;
    do {
      if (run.damaged != 0 && run.cold[pos].damaged) {  // not cached until a save repairs it
        damaged = true;
        break;
      }
      Hot& h = run.hot[pos];
      result.blocks.push_back(run.residency(pos));
      if (options.take_lease) ++h.pin_count;
      if (options.touch) {
        h.last_access = base_tick + (n - 1 - i);
        ++run.hits[pos];
      }
      ++pos;
      ++i;
      // Entry pos is a child of entry pos - 1 with the next block index: only its tokens and
      // extras remain to compare.
    } while (i < n && pos < run.size() && same_tokens(run.tokens_of(pos), tokens.data() + i * bt, bt) &&
             run.same_extras(pos, extras_of(i)));
    if (options.take_lease && pos != first) spans.push_back({&run, first, pos});
    if (damaged) break;
    parent = run.hot[pos - 1].key;
  }

  const size_t matched = result.blocks.size();
  result.tokens = uint64_t(matched) * bt;
  counters_->hit_blocks.fetch_add(matched, std::memory_order_relaxed);
  counters_->hit_tokens.fetch_add(result.tokens, std::memory_order_relaxed);

  if (options.take_lease && matched > 0) {
    const uint64_t lifetime = options.lease_ns ? options.lease_ns : options_.default_lease_ns;
    result.lease = next_lease_.fetch_add(1, std::memory_order_relaxed);
    result.lease_expiry_ns = now_ns() + lifetime;
    std::lock_guard lock(leases_->mu);
    leases_->active.emplace(result.lease,
                            Leases::Record{std::vector<Span>(spans.begin(), spans.end()), result.lease_expiry_ns});
  }
  return Status::ok();
}

Status PrefixIndex::release_spans(std::span<const Span> spans) {
  // A pinned block cannot leave its run, so the spans still name the pinned blocks.
  Status status;
  for (const Span& s : spans) {
    std::lock_guard lock(s.run->mu);
    for (uint32_t p = s.begin; p < s.end; ++p) {
      if (p >= s.run->size() || s.run->hot[p].pin_count == 0) {
        status = internal_error("released a pin on a block that was not pinned");
        continue;
      }
      --s.run->hot[p].pin_count;
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
  return release_spans(record.spans);
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
  for (const auto& r : expired) release_spans(r.spans).ignore();  // pinned blocks cannot vanish
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
  PairLock shards_locked(shard.mu, parent_shard ? &parent_shard->mu : nullptr);

  std::optional<Loc> parent;
  if (parent_shard) {
    auto pit = parent_shard->map.find(block.parent);
    if (pit == parent_shard->map.end()) {
      return not_found("parent block " + block.parent.to_hex() +
                       " is not indexed; insert a prompt's blocks in prefix order");
    }
    parent = pit->second;
  }
  if (auto it = shard.map.find(block.key); it != shard.map.end()) {
    const Loc loc = it->second;
    PairLock runs_locked(loc.run->mu, parent ? &parent->run->mu : nullptr);
    Run& run = *loc.run;
    if (run.layout_fp != layout_fp ||
        !run.same_block(loc.pos, block.parent, block.block_index, block.tokens, block.extras)) {
      counters_->collisions.fetch_add(1, std::memory_order_relaxed);
      return Status(StatusCode::kCollision, "key " + block.key.to_hex() +
                                                " already holds a different block; refusing to overwrite");
    }
    Hot& h = run.hot[loc.pos];
    if (h.tier_mask & tier_bit(block.tier)) {
      return Status(StatusCode::kAlreadyExists,
                    "block already resident in " + std::string(tier_name(block.tier)));
    }
    h.tier_mask |= tier_bit(block.tier);
    h.slots[t] = block.slot;
    if (block.pin) ++h.pin_count;
    if (parent) ++parent->run->cold[parent->pos].children_in_tier[t];
    count_residency(run, t, true);
    if (run.set_damaged(loc.pos, false, counters_->damaged)) h.checksum = block.checksum;  // the new copy is the good one
    return InsertOutcome::kAddedResidency;
  }

  // A new block goes at the end of its parent's run when the parent ends it; otherwise (block
  // 0, a branch, a full run) it heads a new run.
  std::unique_lock<std::mutex> parent_lock;
  Run* run = nullptr;
  if (parent) {
    Run& prun = *parent->run;
    parent_lock = std::unique_lock(prun.mu);
    if (prun.layout_fp != layout_fp) {
      return Status(StatusCode::kLayoutMismatch, "parent block was stored with another KV layout");
    }
    if (prun.block_index(parent->pos) + 1 != block.block_index) {
      return invalid_argument("block_index does not follow its parent's");
    }
    if (parent->pos + 1 == prun.size() && prun.size() < kRunCapacity) run = &prun;
  }
  const uint64_t tick = recency_clock_.fetch_add(1, std::memory_order_relaxed);
  if (run != nullptr) {
    run->append(block, tick);
  } else {
    // Filled before it is published (registry, then key map), so no one sees it half-made.
    // Block 0's parent is the namespace root; any other block's chain has its parent's root.
    const BlockKey root = parent ? parent->run->root : block.parent;
    auto fresh = std::make_shared<Run>(block.parent, root, block.block_index, bt, layout_fp, block_bytes,
                                       group_of_new_run(block, parent ? parent->run : nullptr));
    fresh->append(block, tick);
    run = fresh.get();
    runs_->add(std::move(fresh));
  }
  shard.map.emplace(block.key, Loc{run, run->size() - 1});
  if (parent) {
    Cold& pc = parent->run->cold[parent->pos];
    ++pc.child_count;
    ++pc.children_in_tier[t];
  }
  counters_->entries.fetch_add(1, std::memory_order_relaxed);
  counters_->inserts.fetch_add(1, std::memory_order_relaxed);
  count_residency(*run, t, true);
  return InsertOutcome::kInserted;
}

GroupId PrefixIndex::group_of_new_run(const BlockInsert& block, const Run* parent_run) const {
  if (parent_run != nullptr) return parent_run->group_now();
  std::lock_guard lock(groups_->roots_mu);
  auto it = groups_->roots.find(block.parent);  // block 0: its parent is the namespace root
  if (it != groups_->roots.end()) return it->second;
  groups_->ungrouped.insert(block.parent);
  return kNoGroup;
}

// Under the block's key-shard and run locks, like the residency change it counts, so that
// check_invariants sees the counters and the entries agree.
void PrefixIndex::count_residency(const Run& run, int t, bool added) noexcept {
  std::atomic<uint64_t>& group = groups_->resident[run.group_now()][t];
  if (added) {
    group.fetch_add(1, std::memory_order_relaxed);
  } else {
    group.fetch_sub(1, std::memory_order_relaxed);
  }
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

Result<std::optional<BlockKey>> PrefixIndex::parent_key_of(const BlockKey& key) const {
  std::optional<BlockKey> parent;
  const bool found = with_entry(key, [&](const Run& run, uint32_t pos) {
    if (run.block_index(pos) != 0) parent = run.parent_of(pos);
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  return parent;
}

// Locks a block's and its parent's key shards, then their runs, for a residency change.
// `parent_key` is what parent_key_of returned; a key's parent never changes.
#define KVTIER_LOCK_BLOCK_AND_PARENT(key, parent_key)                                               \
  Shard& shard = shard_for(key);                                                                     \
  Shard* parent_shard = (parent_key) ? &shard_for(*(parent_key)) : nullptr;                         \
  PairLock shards_locked(shard.mu, parent_shard ? &parent_shard->mu : nullptr);                      \
  auto it = shard.map.find(key);                                                                     \
  if (it == shard.map.end()) return not_found("block " + (key).to_hex() + " left the index");       \
  const Loc loc = it->second;                                                                        \
  std::optional<Loc> parent;                                                                         \
  if (parent_shard) {                                                                                \
    auto pit = parent_shard->map.find(*(parent_key));                                                \
    /* the parent of an indexed block is indexed (prefix closure) */                                 \
    if (pit == parent_shard->map.end()) return internal_error("indexed block without its parent");   \
    parent = pit->second;                                                                            \
  }                                                                                                  \
  PairLock runs_locked(loc.run->mu, parent ? &parent->run->mu : nullptr);                            \
  Run& run = *loc.run;                                                                               \
  Hot& h = run.hot[loc.pos]

Status PrefixIndex::add_residency(const BlockKey& key, Tier tier, SlotId slot) {
  if (slot == kNoSlot) return invalid_argument("add_residency needs a slot");
  const int t = static_cast<int>(tier);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  KVTIER_LOCK_BLOCK_AND_PARENT(key, *parent_of);
  if (h.tier_mask & tier_bit(tier)) {
    return Status(StatusCode::kAlreadyExists, "block already resident in " + std::string(tier_name(tier)));
  }
  h.tier_mask |= tier_bit(tier);
  h.slots[t] = slot;
  if (parent) ++parent->run->cold[parent->pos].children_in_tier[t];
  count_residency(run, t, true);
  run.set_damaged(loc.pos, false, counters_->damaged);  // a second copy, verified: the block serves again
  return Status::ok();
}

Result<EvictedBlock> PrefixIndex::remove_residency(const BlockKey& key, Tier tier) {
  return remove_residency_impl(key, tier, /*count_eviction=*/false);
}

Result<EvictedBlock> PrefixIndex::remove_residency_impl(const BlockKey& key, Tier tier,
                                                        bool count_eviction) {
  const int t = static_cast<int>(tier);
  auto parent_of = parent_key_of(key);
  if (!parent_of) return parent_of.status();
  std::shared_ptr<Run> emptied;  // dropped once the run is unlocked
  EvictedBlock out;
  {
    KVTIER_LOCK_BLOCK_AND_PARENT(key, *parent_of);
    if (!(h.tier_mask & tier_bit(tier))) {
      return not_found("block is not resident in " + std::string(tier_name(tier)));
    }
    if (h.pin_count != 0) return busy("block is pinned by " + std::to_string(h.pin_count) + " holder(s)");
    const Cold& c = run.cold[loc.pos];
    if (c.children_in_tier[t] != 0) {
      return busy("block has children resident in " + std::string(tier_name(tier)) + "; evict those first");
    }
    const bool last = (h.tier_mask & ~tier_bit(tier)) == 0;
    if (last && c.child_count != 0) return busy("block has indexed children; removing it would orphan them");
    // A childless block ends its run: the entry after it would be its child.
    if (last && loc.pos + 1 != run.size()) return internal_error("a childless block is not the end of its run");

    out = EvictedBlock{key, tier, h.slots[t], last};
    h.tier_mask &= static_cast<uint8_t>(~tier_bit(tier));
    h.slots[t] = kNoSlot;
    if (parent) {
      Cold& pc = parent->run->cold[parent->pos];
      --pc.children_in_tier[t];
      if (last) --pc.child_count;
    }
    // Counted under the locks, so check_invariants sees counters and entries agree.
    count_residency(run, t, false);
    if (last) {
      run.set_damaged(loc.pos, false, counters_->damaged);
      run.pop_back();
      shard.map.erase(it);
      // An empty run is unreachable: no key maps to it, and inserts append only after a parent.
      if (run.size() == 0) emptied = runs_->remove(&run);
      counters_->entries.fetch_sub(1, std::memory_order_relaxed);
    }
  }
  if (count_eviction) counters_->evictions[t].fetch_add(1, std::memory_order_relaxed);
  return out;
}
#undef KVTIER_LOCK_BLOCK_AND_PARENT

Result<std::vector<EvictedBlock>> PrefixIndex::erase(const BlockKey& key) {
  Status blocked;
  const bool found = with_entry(key, [&](const Run& run, uint32_t pos) {
    if (run.hot[pos].pin_count != 0) {
      blocked = busy("block is pinned");
    } else if (run.cold[pos].child_count != 0) {
      blocked = busy("block has indexed children; erase them first");
    }
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  KVTIER_RETURN_IF_ERROR(blocked);
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

Status PrefixIndex::touch(const BlockKey& key) {
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    run.hot[pos].last_access = recency_clock_.fetch_add(1, std::memory_order_relaxed);
    ++run.hits[pos];
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::pin(const BlockKey& key) {
  const bool found = with_entry(key, [](Run& run, uint32_t pos) { ++run.hot[pos].pin_count; });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::unpin(const BlockKey& key) {
  Status status;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    if (run.hot[pos].pin_count == 0) {
      status = busy("block is not pinned");
    } else {
      --run.hot[pos].pin_count;
    }
  });
  return found ? status : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::pin(const BlockKey& key, Priority at) {
  if (static_cast<int>(at) >= kNumPriorities) return invalid_argument("unknown priority class");
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    ++run.hot[pos].pin_count;
    ++run.cold[pos].pins_at[static_cast<int>(at)];
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::unpin(const BlockKey& key, Priority at) {
  if (static_cast<int>(at) >= kNumPriorities) return invalid_argument("unknown priority class");
  Status status;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    uint32_t& n = run.cold[pos].pins_at[static_cast<int>(at)];
    if (n == 0 || run.hot[pos].pin_count == 0) {
      status = busy("block holds no pin at priority " + std::string(priority_name(at)));
      return;
    }
    --n;
    --run.hot[pos].pin_count;
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? status : not_found("block " + key.to_hex() + " is not indexed");
}

Status PrefixIndex::set_priority(const BlockKey& key, Priority priority) {
  if (static_cast<int>(priority) >= kNumPriorities) return invalid_argument("unknown priority class");
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    run.cold[pos].own_priority = priority;
    run.hot[pos].priority = run.cold[pos].effective_priority();
  });
  return found ? Status::ok() : not_found("block " + key.to_hex() + " is not indexed");
}

Result<bool> PrefixIndex::mark_damaged(const BlockKey& key, Tier only_copy) {
  bool marked = false;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    // A copy elsewhere was verified on its way in (and loads read it): nothing to mark.
    if (run.hot[pos].tier_mask == tier_bit(only_copy)) marked = run.set_damaged(pos, true, counters_->damaged);
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  return marked;
}

Result<SlotId> PrefixIndex::repair(const BlockKey& key, Tier tier, SlotId slot, uint64_t checksum) {
  if (slot == kNoSlot) return invalid_argument("repair needs a slot");
  Status refused;
  SlotId old = kNoSlot;
  const bool found = with_entry(key, [&](Run& run, uint32_t pos) {
    Hot& h = run.hot[pos];
    if (!run.cold[pos].damaged) {
      refused = busy("block " + key.to_hex() + " is not damaged: nothing to repair");
    } else if (h.tier_mask != tier_bit(tier)) {  // cannot be: marks are cleared by a second copy
      refused = internal_error("damaged block " + key.to_hex() + " has copies outside " +
                               std::string(tier_name(tier)));
    } else {
      old = h.slots[static_cast<int>(tier)];
      h.slots[static_cast<int>(tier)] = slot;
      h.checksum = checksum;
      run.set_damaged(pos, false, counters_->damaged);
    }
  });
  if (!found) return not_found("block " + key.to_hex() + " is not indexed");
  KVTIER_RETURN_IF_ERROR(refused);
  return old;
}

uint64_t PrefixIndex::damaged_count() const noexcept {
  return counters_->damaged.load(std::memory_order_relaxed);
}

std::optional<BlockResidency> PrefixIndex::get(const BlockKey& key) const {
  std::optional<BlockResidency> out;
  with_entry(key, [&](const Run& run, uint32_t pos) { out = run.residency(pos); });
  return out;
}

std::optional<BlockRecord> PrefixIndex::describe(const BlockKey& key) const {
  std::optional<BlockRecord> out;
  with_entry(key, [&](const Run& run, uint32_t pos) {
    const TokenId* toks = run.tokens_of(pos);
    out = BlockRecord{run.parent_of(pos), run.block_index(pos),
                      std::vector<TokenId>(toks, toks + run.block_tokens), run.cold[pos].extras,
                      run.layout_fp, run.residency(pos), run.hits[pos]};
  });
  return out;
}

Status PinLedger::pin(PrefixIndex& index, const BlockKey& key, Priority at) {
  KVTIER_RETURN_IF_ERROR(index.pin(key, at));
  pins_[key].push_back(at);
  ++count_;
  return Status::ok();
}

Status PinLedger::unpin(PrefixIndex& index, const BlockKey& key) {
  auto it = pins_.find(key);
  if (it == pins_.end()) return not_found("no pin of this holder on block " + key.to_hex());
  const Priority at = it->second.back();
  it->second.pop_back();
  if (it->second.empty()) pins_.erase(it);
  --count_;
  return index.unpin(key, at);
}

void PinLedger::unpin_all(PrefixIndex& index) {
  for (const auto& [key, classes] : pins_) {
    for (Priority at : classes) index.unpin(key, at).ignore();  // pinned blocks cannot leave
  }
  pins_.clear();
  count_ = 0;
}

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
