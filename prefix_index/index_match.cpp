// The prefix index, longest-prefix match and leases: a match walks a prompt through the runs of its
// chain and leases what it found; release and lease expiry give the pins back.
#include "prefix_index/index_internals.h"

namespace kvtier {

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

Status PrefixIndex::shorten(Match& match, size_t keep) {
  if (keep >= match.blocks.size()) return Status::ok();
  const size_t dropped = match.blocks.size() - keep;
  const uint64_t block_tokens = match.tokens / match.blocks.size();
  match.blocks.resize(keep);
  match.tokens = uint64_t(keep) * block_tokens;
  counters_->hit_blocks.fetch_sub(dropped, std::memory_order_relaxed);
  counters_->hit_tokens.fetch_sub(dropped * block_tokens, std::memory_order_relaxed);
  if (match.lease == kNoLease) return Status::ok();
  // The lease's spans cover its blocks in match order: keep the first `keep`, give back the rest.
  std::vector<Span> given_back;
  {
    std::lock_guard lock(leases_->mu);
    auto it = leases_->active.find(match.lease);
    if (it == leases_->active.end()) {
      match.lease = kNoLease;
      return not_found("lease is not active (released or expired)");
    }
    std::vector<Span>& spans = it->second.spans;
    size_t left = keep;
    size_t s = 0;
    for (; s < spans.size() && left >= spans[s].end - spans[s].begin; ++s) left -= spans[s].end - spans[s].begin;
    if (s < spans.size() && left > 0) {
      given_back.push_back({spans[s].run, spans[s].begin + static_cast<uint32_t>(left), spans[s].end});
      spans[s].end = spans[s].begin + static_cast<uint32_t>(left);
      ++s;
    }
    given_back.insert(given_back.end(), spans.begin() + static_cast<std::ptrdiff_t>(s), spans.end());
    spans.resize(s);
    if (spans.empty()) {
      leases_->active.erase(it);
      match.lease = kNoLease;
      match.lease_expiry_ns = 0;
    }
  }
  return release_spans(given_back);
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

}  // namespace kvtier
