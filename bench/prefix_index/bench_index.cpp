// Prefix-index benchmark: keying vs raw XXH3-128 over the same bytes, and match() of a
// 128K-token prompt (all cached, none cached) on 1 and 2 threads. Median of repeats, with spread.
// Rerun: build/default/bench/prefix_index/kvtier_bench_index [repeats]
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <barrier>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>

#include "bench/bench_stats.h"
#include "prefix_index/prefix_index.h"

using namespace kvtier;
using namespace kvtier::bench;

namespace {

constexpr size_t kPromptTokens = 128 * 1024;
constexpr uint32_t kBlockTokens = 16;

std::vector<TokenId> random_tokens(std::mt19937_64& rng, size_t n) {
  std::vector<TokenId> t(n);
  for (auto& x : t) x = static_cast<TokenId>(rng() % 128000);
  return t;
}

void print_row(const char* what, const Summary& s, double scale, const char* unit) {
  std::printf("  %-44s %10.2f %s  (min %.2f, max %.2f)\n", what, s.median * scale, unit, s.min * scale,
              s.max * scale);
}

// Runs `fn` on `threads` threads at once, `repeats` times; returns per-call seconds (median over
// threads of each repeat).
template <typename Fn>
std::vector<double> concurrent_runs(int threads, int repeats, Fn&& fn) {
  std::vector<double> out;
  for (int r = 0; r < repeats; ++r) {
    std::vector<double> per(threads);
    std::barrier start(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        start.arrive_and_wait();
        auto t0 = std::chrono::steady_clock::now();
        fn();
        per[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      });
    }
    for (auto& th : pool) th.join();
    out.push_back(summarize(per).max);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(3, std::atoi(argv[1])) : 21;
  std::mt19937_64 rng(2024);
  KeyChain chain("bench-secret");
  auto layout = *KvLayout::standard(32, 8, 128, Dtype::kBf16, kBlockTokens);
  auto ns = *chain.make_namespace({"bench-model", layout, "", ""});
  const auto prompt = random_tokens(rng, kPromptTokens);
  const size_t blocks = kPromptTokens / kBlockTokens;

  std::printf("kvtier prefix-index benchmark: %zu-token prompt, %u-token blocks, %d repeats\n",
              kPromptTokens, kBlockTokens, repeats);

  // ---- keying vs raw XXH3-128 over the same bytes ------------------------------------------
  std::vector<BlockKey> keys;
  if (!chain.chain(ns, prompt, {}, keys).is_ok()) return 1;
  // The same bytes: each block's token ids, hashed independently (no chain) — the least work
  // any per-block keyed scheme must do. Plus one bulk hash over the whole prompt, for scale.
  const size_t block_bytes = kBlockTokens * sizeof(TokenId);
  std::array<uint8_t, KeyChain::kSecretBytes> secret{};
  (void)XXH3_generateSecret(secret.data(), secret.size(), "x", 1);

  auto raw = summarize(time_runs(repeats, [&] {
    uint64_t acc = 0;
    const auto* bytes = reinterpret_cast<const uint8_t*>(prompt.data());
    for (size_t b = 0; b < blocks; ++b) {
      acc ^= XXH3_128bits_withSecret(bytes + b * block_bytes, block_bytes, secret.data(), secret.size()).low64;
    }
    do_not_optimize(acc);
  }));
  auto bulk = summarize(time_runs(repeats, [&] {
    do_not_optimize(XXH3_128bits_withSecret(prompt.data(), prompt.size() * sizeof(TokenId),
                                            secret.data(), secret.size()).low64);
  }));
  auto ours = summarize(time_runs(repeats, [&] {
    chain.chain(ns, prompt, {}, keys).ignore();
    do_not_optimize(keys.data());
  }));
  std::printf("\nkeying (ns per token)\n");
  print_row("raw XXH3-128 per block, same bytes, unchained", raw, 1e9 / kPromptTokens, "ns/token");
  print_row("raw XXH3-128 bulk over the whole prompt", bulk, 1e9 / kPromptTokens, "ns/token");
  print_row("kvtier chained keying", ours, 1e9 / kPromptTokens, "ns/token");
  std::printf("  ratio kvtier/raw throughput: %.2f (goal >= 0.80); goal < 1 ns/token: %s\n",
              raw.median / ours.median, ours.median * 1e9 / kPromptTokens < 1.0 ? "met" : "not met");

  // ---- match() on a 128K-token prompt --------------------------------------------------------
  auto index = std::move(*PrefixIndex::create(chain));
  // Background: 64 other 2K-token prompts, so the table is not trivially small.
  for (int p = 0; p < 64; ++p) {
    auto other = random_tokens(rng, 2048);
    std::vector<BlockKey> ok;
    if (!chain.chain(ns, other, {}, ok).is_ok()) return 1;
    for (size_t b = 0; b < ok.size(); ++b) {
      BlockInsert ins{.key = ok[b], .parent = b ? ok[b - 1] : ns.root, .block_index = uint32_t(b),
                      .tokens = std::span(other).subspan(b * kBlockTokens, kBlockTokens), .slot = b};
      if (!index->insert(ns, ins)) return 1;
    }
  }
  for (size_t b = 0; b < blocks; ++b) {
    BlockInsert ins{.key = keys[b], .parent = b ? keys[b - 1] : ns.root, .block_index = uint32_t(b),
                    .tokens = std::span(prompt).subspan(b * kBlockTokens, kBlockTokens), .slot = b};
    if (!index->insert(ns, ins)) return 1;
  }
  const auto uncached = random_tokens(rng, kPromptTokens);

  std::printf("\nmatch() of a 128K-token prompt (%llu blocks indexed)\n",
              static_cast<unsigned long long>(index->stats().entries));
  for (int threads : {1, 2}) {
    for (bool cached : {true, false}) {
      const auto& p = cached ? prompt : uncached;
      std::atomic<size_t> matched{0};
      auto s = summarize(concurrent_runs(threads, repeats, [&] {
        thread_local Match m;  // reused storage, as a serving engine's loop would
        if (index->match_into(ns, p, {}, {}, m).is_ok()) matched = m.blocks.size();
      }));
      char label[96];
      std::snprintf(label, sizeof label, "%s, %d thread%s (%zu blocks hit)", cached ? "all cached" : "none cached",
                    threads, threads > 1 ? "s" : "", matched.load());
      print_row(label, s, 1e6, "us/match");
      std::printf("  %-44s %10.2f ns/token\n", "", s.median * 1e9 / kPromptTokens);
    }
  }
  Match reused;
  auto leased = summarize(time_runs(repeats, [&] {
    if (index->match_into(ns, prompt, {}, {.take_lease = true}, reused).is_ok() && reused.lease) {
      index->release(reused.lease).ignore();
    }
  }));
  print_row("all cached, with lease + release, 1 thread", leased, 1e6, "us/match");
  auto fresh = summarize(time_runs(repeats, [&] { do_not_optimize(index->match(ns, prompt)->tokens); }));
  print_row("all cached, fresh Match each call, 1 thread", fresh, 1e6, "us/match");
  std::printf("  goal: full match of a cached 128K-token prompt < 100 us on one core\n");
  std::printf("\nrerun: build/default/bench/prefix_index/kvtier_bench_index %d\n", repeats);
  return 0;
}
