// Shared by the service tests and their child processes (service_child): a small KV layout,
// prompts, and KV bytes that are a function of the prompt prefix, so any process can check a
// restored block without talking to the one that saved it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <xxhash.h>

#include "kvtier/kv_layout.h"
#include "prefix_index/key_chain.h"

namespace kvtier::testing {

/// 2 layers × 2 kv heads × head dim 16, fp16, 16 tokens: 4 KiB blocks, 2 KiB per layer.
inline KvLayout service_test_layout() {
  return KvLayout{AttentionKind::kStandard, 2, 2, 16, Dtype::kFp16, 16};
}

/// `n` tokens from `seed`; prompts with the same seed share every token.
inline std::vector<TokenId> test_prompt(uint64_t seed, size_t n, size_t offset = 0) {
  std::vector<TokenId> out(n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + (offset + i) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 29;
    out[i] = static_cast<TokenId>(z % 128000);
  }
  return out;
}

/// The KV bytes of block `b` of `prompt`: a function of the prefix up to and including it.
inline void fill_block(const std::vector<TokenId>& prompt, size_t b, uint32_t block_tokens, std::byte* out,
                       uint64_t bytes) {
  uint64_t x = XXH3_64bits(prompt.data(), (b + 1) * block_tokens * sizeof(TokenId));
  for (uint64_t i = 0; i < bytes; i += 8) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    std::memcpy(out + i, &z, std::min<uint64_t>(8, bytes - i));
  }
}

/// Blocks [first, first + count) of `prompt` back to back.
inline std::vector<std::byte> prompt_kv(const std::vector<TokenId>& prompt, const KvLayout& layout, size_t first,
                                        size_t count) {
  const uint64_t bpb = layout.bytes_per_block();
  std::vector<std::byte> kv(count * bpb);
  for (size_t i = 0; i < count; ++i) fill_block(prompt, first + i, layout.block_tokens, kv.data() + i * bpb, bpb);
  return kv;
}

}  // namespace kvtier::testing
