#include "tools/demo_tiers.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <vector>

#include "api/store/tier_manager.h"
#include "tools/synthetic_kv.h"

namespace kvtier {

namespace {

using Clock = std::chrono::steady_clock;

/// Stand-in for prefill: KV bytes that depend on the block's key, so a restore can be checked.
void compute_kv(const BlockKey& key, std::byte* out, uint64_t bytes) {
  uint64_t x = key.lo ^ key.hi;
  auto* words = reinterpret_cast<uint64_t*>(out);
  for (uint64_t i = 0; i < bytes / 8; ++i) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    words[i] = z ^ (z >> 27);
  }
}

struct Buffer {
  std::vector<std::byte> storage;
  std::byte* data;
  explicit Buffer(uint64_t bytes) : storage(bytes + 4096) {
    data = reinterpret_cast<std::byte*>(align_up(reinterpret_cast<uintptr_t>(storage.data()), 4096));
  }
};

struct TurnResult {
  uint64_t prompt_tokens = 0, restored_tokens = 0, restored_bytes = 0;
  double restore_s = 0;
  bool verified = true;
};

/// One request: match, restore what is cached, "compute" the rest, save it.
Result<TurnResult> serve(TierManager& tm, const Namespace& ns, const std::vector<TokenId>& prompt) {
  TurnResult r;
  const uint64_t bb = tm.layout().bytes_per_block();
  std::vector<BlockKey> keys;
  KVTIER_RETURN_IF_ERROR(tm.index().key_chain().chain(ns, prompt, {}, keys));
  Buffer kv(keys.size() * bb);
  auto t0 = Clock::now();
  auto match = tm.index().match(ns, prompt, {}, {.take_lease = true});
  if (!match) return match.status();
  std::vector<std::byte*> dst;
  for (size_t b = 0; b < match->blocks.size(); ++b) dst.push_back(kv.data + b * bb);
  if (!dst.empty()) {
    auto h = tm.load(*match, dst);
    if (!h) return h.status();
    KVTIER_RETURN_IF_ERROR(h->wait());
  }
  r.restore_s = std::chrono::duration<double>(Clock::now() - t0).count();
  tm.index().release(match->lease).ignore();
  Buffer expect(bb);
  for (size_t b = 0; b < match->blocks.size(); ++b) {
    compute_kv(keys[b], expect.data, bb);
    if (std::memcmp(expect.data, kv.data + b * bb, bb) != 0) r.verified = false;
  }
  for (size_t b = match->blocks.size(); b < keys.size(); ++b) compute_kv(keys[b], kv.data + b * bb, bb);
  auto saved = tm.save(ns, prompt, std::span<const std::byte>(kv.data, keys.size() * bb));
  if (!saved) return saved.status();
  r.prompt_tokens = prompt.size();
  r.restored_tokens = match->tokens;
  r.restored_bytes = match->blocks.size() * bb;
  return r;
}

}  // namespace

int run_tier_demo(const TierDemoOptions& o) {
  auto layout = KvLayout::standard(32, 8, 128, Dtype::kBf16, 16);  // Llama-3-8B: 2 MiB blocks
  std::error_code ec;
  std::filesystem::remove_all(o.dir, ec);
  KeyChain keys("kvtier-demo-secret");
  TierManagerOptions opts;
  opts.layout = *layout;
  opts.host.capacity_bytes = o.host_mib << 20;
  opts.hbm.capacity_bytes = 64ull << 20;
  opts.nvme.dir = o.dir;
  opts.nvme.durability = Durability::kNone;
  opts.nvme_limits.capacity_bytes = o.nvme_mib << 20;
  auto open = [&]() -> std::unique_ptr<TierManager> {
    auto tm = TierManager::open(keys, opts);
    if (!tm) {
      std::fprintf(stderr, "kvtier tier-demo: %s\n", tm.status().to_string().c_str());
      return nullptr;
    }
    return std::move(*tm);
  };
  auto tm = open();
  if (!tm) return 1;
  auto ns = tm->add_namespace({"meta-llama/Llama-3.1-8B-Instruct", *layout, "", ""});
  if (!ns) {
    std::fprintf(stderr, "kvtier tier-demo: %s\n", ns.status().to_string().c_str());
    return 1;
  }

  SharedPrefixWorkload workload(o.seed, o.users, o.system_tokens, o.documents, o.document_tokens,
                                o.question_tokens);

  std::printf("kvtier tiered-store demo: %u users x %u turns sharing a %u-token system prompt and %u "
              "documents of %u tokens\nlayout %s; host tier %llu MiB, NVMe tier %llu MiB in %s\n\n",
              o.users, o.turns, o.system_tokens, o.documents, o.document_tokens, layout->describe().c_str(),
              static_cast<unsigned long long>(o.host_mib), static_cast<unsigned long long>(o.nvme_mib),
              o.dir.c_str());
  std::printf("%-6s %10s %10s %7s %14s %12s %10s %10s\n", "turn", "prompt", "restored", "hit%",
              "restore ms p50", "restore GB/s", "host used", "on NVMe");
  std::vector<TokenId> last_prompt;
  bool all_verified = true;
  uint64_t total_prompt = 0, total_restored = 0;
  for (uint32_t turn = 0; turn < o.turns; ++turn) {
    uint64_t prompt_tokens = 0, restored = 0, bytes = 0;
    double seconds = 0;
    std::vector<double> ms;
    for (uint32_t u = 0; u < o.users; ++u) {
      // system ‖ document ‖ this user's conversation so far ‖ a new question
      const std::vector<TokenId> prompt = workload.next_prompt(u);
      auto r = serve(*tm, *ns, prompt);
      if (!r) {
        std::fprintf(stderr, "kvtier tier-demo: %s\n", r.status().to_string().c_str());
        return 1;
      }
      all_verified &= r->verified;
      prompt_tokens += r->prompt_tokens;
      restored += r->restored_tokens;
      bytes += r->restored_bytes;
      seconds += r->restore_s;
      if (r->restored_tokens) ms.push_back(r->restore_s * 1e3);
      last_prompt = prompt;
    }
    std::sort(ms.begin(), ms.end());
    auto st = tm->stats();
    std::printf("%-6u %10llu %10llu %6.1f%% %14.2f %12.2f %9.0f%% %10llu\n", turn + 1,
                static_cast<unsigned long long>(prompt_tokens), static_cast<unsigned long long>(restored),
                100.0 * restored / std::max<uint64_t>(prompt_tokens, 1), ms.empty() ? 0.0 : ms[ms.size() / 2],
                seconds > 0 ? bytes / seconds / 1e9 : 0.0,
                100.0 * st.tiers[int(Tier::kHost)].used_slots / st.tiers[int(Tier::kHost)].capacity_slots,
                static_cast<unsigned long long>(st.nvme.blocks));
    total_prompt += prompt_tokens;
    total_restored += restored;
  }
  auto st = tm->stats();
  std::printf("\n%.1f%% of %llu prompt tokens restored instead of recomputed; %llu blocks demoted "
              "host -> NVMe, %llu promoted NVMe -> host; restored bytes %s\n",
              100.0 * total_restored / std::max<uint64_t>(total_prompt, 1),
              static_cast<unsigned long long>(total_prompt),
              static_cast<unsigned long long>(st.tiers[int(Tier::kHost)].demotions_out),
              static_cast<unsigned long long>(st.tiers[int(Tier::kHost)].promotions_in),
              all_verified ? "byte-identical to the computed KV" : "DIFFER (bug)");

  auto flushed = tm->flush();
  tm.reset();
  std::printf("\nrestart: flushed %llu memory-only blocks to NVMe, closed the store, reopened it\n",
              static_cast<unsigned long long>(flushed ? *flushed : 0));
  tm = open();
  if (!tm) return 1;
  ns = tm->add_namespace({"meta-llama/Llama-3.1-8B-Instruct", *layout, "", ""});
  auto r = serve(*tm, *ns, last_prompt);
  if (!r) {
    std::fprintf(stderr, "kvtier tier-demo: %s\n", r.status().to_string().c_str());
    return 1;
  }
  std::printf("after restart: %llu blocks recovered from the catalog; the last user's %llu-token "
              "prompt restored %llu tokens from NVMe in %.1f ms (%.2f GB/s), %s\n",
              static_cast<unsigned long long>(tm->stats().recovered_blocks),
              static_cast<unsigned long long>(r->prompt_tokens),
              static_cast<unsigned long long>(r->restored_tokens), r->restore_s * 1e3,
              r->restore_s > 0 ? r->restored_bytes / r->restore_s / 1e9 : 0.0,
              r->verified ? "byte-identical" : "DIFFERENT (bug)");
  tm.reset();
  std::filesystem::remove_all(o.dir, ec);
  return all_verified && r->verified && r->restored_tokens > 0 ? 0 : 1;
}

}  // namespace kvtier
