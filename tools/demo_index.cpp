#include "tools/demo_index.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "prefix_index/prefix_index.h"
#include "tools/synthetic_kv.h"

namespace kvtier {

namespace {

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

}  // namespace

int run_index_demo(const IndexDemoOptions& o) {
  KeyChain keys("kvtier-demo-secret");
  auto layout = KvLayout::standard(32, 8, 128, Dtype::kBf16, 16);  // Llama-3-8B: 2 MiB blocks
  if (!layout) {
    std::fprintf(stderr, "demo layout: %s\n", layout.status().to_string().c_str());
    return 1;
  }
  auto index = PrefixIndex::create(keys);
  if (!index) {
    std::fprintf(stderr, "index: %s\n", index.status().to_string().c_str());
    return 1;
  }
  auto ns = keys.make_namespace({"meta-llama/Llama-3.1-8B-Instruct", *layout, "", ""});
  if (!ns) {
    std::fprintf(stderr, "namespace: %s\n", ns.status().to_string().c_str());
    return 1;
  }
  SharedPrefixWorkload workload(o.seed, o.users, o.system_tokens, o.documents, o.document_tokens,
                                o.question_tokens);

  std::printf("kvtier prefix-index demo: %u users x %u turns, %u-token system prompt, %u shared "
              "%u-token documents\nlayout %s, host tier capacity %llu blocks\n\n",
              o.users, o.turns, o.system_tokens, o.documents, o.document_tokens,
              layout->describe().c_str(), static_cast<unsigned long long>(o.host_capacity_blocks));
  std::printf("%-6s %10s %10s %8s %12s %12s\n", "turn", "prompt", "restored", "hit%", "match p50 us",
              "evicted");

  SlotId next_slot = 0;
  uint64_t total_prompt = 0, total_restored = 0;
  std::vector<BlockKey> chain;
  std::vector<double> all_latency_us;
  for (uint32_t turn = 0; turn < o.turns; ++turn) {
    uint64_t turn_prompt = 0, turn_restored = 0;
    std::vector<double> latency_us;
    size_t evicted = 0;
    for (uint32_t u = 0; u < o.users; ++u) {
      // system ‖ document ‖ this user's conversation so far ‖ a new question
      const std::vector<TokenId> prompt = workload.next_prompt(u);

      auto t0 = std::chrono::steady_clock::now();
      auto match = (*index)->match(*ns, prompt, {}, {.take_lease = true});
      auto t1 = std::chrono::steady_clock::now();
      if (!match) {
        std::fprintf(stderr, "match: %s\n", match.status().to_string().c_str());
        return 1;
      }
      latency_us.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
      turn_prompt += prompt.size();
      turn_restored += match->tokens;

      // "Prefill" the rest and save every new full block to the host tier.
      if (auto st = keys.chain(*ns, prompt, {}, chain); !st) {
        std::fprintf(stderr, "keys: %s\n", st.to_string().c_str());
        return 1;
      }
      for (size_t b = match->blocks.size(); b < chain.size(); ++b) {
        BlockInsert ins{.key = chain[b], .parent = b == 0 ? ns->root : chain[b - 1],
                        .block_index = static_cast<uint32_t>(b),
                        .tokens = std::span(prompt).subspan(b * 16, 16), .tier = Tier::kHost,
                        .slot = next_slot++};
        if (b < (o.system_tokens / 16)) ins.priority = Priority::kRetained;
        auto r = (*index)->insert(*ns, ins);
        if (!r) {
          std::fprintf(stderr, "insert: %s\n", r.status().to_string().c_str());
          return 1;
        }
      }
      if (match->lease != kNoLease) (*index)->release(match->lease).ignore();
      // Keep the host tier within capacity: lowest priority, least recently used, leaves first.
      const auto resident = (*index)->stats().resident_blocks[static_cast<int>(Tier::kHost)];
      if (resident > o.host_capacity_blocks) {
        evicted += (*index)->evict(Tier::kHost, resident - o.host_capacity_blocks).size();
      }
    }
    total_prompt += turn_prompt;
    total_restored += turn_restored;
    all_latency_us.insert(all_latency_us.end(), latency_us.begin(), latency_us.end());
    std::printf("%-6u %10llu %10llu %7.1f%% %12.1f %12zu\n", turn + 1,
                static_cast<unsigned long long>(turn_prompt),
                static_cast<unsigned long long>(turn_restored), 100.0 * turn_restored / turn_prompt,
                percentile(latency_us, 0.5), evicted);
  }

  // Another tenant with its own salt sends the very same system prompt: nothing is shared.
  auto other = keys.make_namespace({"meta-llama/Llama-3.1-8B-Instruct", *layout, "tenant-b", ""});
  auto foreign = (*index)->match(*other, workload.system_prompt());
  auto stats = (*index)->stats();
  if (auto st = (*index)->check_invariants(); !st) {
    std::fprintf(stderr, "invariant check failed: %s\n", st.to_string().c_str());
    return 1;
  }
  std::printf("\ntotal: %llu prompt tokens, %llu restored instead of recomputed (%.1f%%), "
              "match p50 %.1f us, p99 %.1f us\n",
              static_cast<unsigned long long>(total_prompt),
              static_cast<unsigned long long>(total_restored), 100.0 * total_restored / total_prompt,
              percentile(all_latency_us, 0.5), percentile(all_latency_us, 0.99));
  std::printf("index: %llu blocks, %llu inserts, %llu host evictions, %llu collisions refused\n",
              static_cast<unsigned long long>(stats.entries),
              static_cast<unsigned long long>(stats.inserts),
              static_cast<unsigned long long>(stats.evictions[static_cast<int>(Tier::kHost)]),
              static_cast<unsigned long long>(stats.collisions));
  std::printf("tenant isolation: another salt matching the same system prompt restores %llu tokens\n",
              static_cast<unsigned long long>(foreign ? foreign->tokens : 0));
  return 0;
}

}  // namespace kvtier
