// Synthetic prompts and KV for the demos, benchmarks and tests: token ids derived from a seed,
// and block KV that is a function of the prompt up to and including the block (as real
// attention KV is), so any process can check a restored block without asking the one that
// saved it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

#include <xxhash.h>

#include "prefix_index/key_chain.h"

namespace kvtier {

/// `n` token ids from `seed`: the same seed gives the same tokens in every process.
inline std::vector<TokenId> synthetic_tokens(uint64_t seed, size_t n) {
  std::vector<TokenId> out(n);
  for (size_t i = 0; i < n; ++i) {
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + (i + 1) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 31)) * 0x94D049BB133111EBull;
    out[i] = static_cast<TokenId>((z ^ (z >> 29)) % 128000);
  }
  return out;
}

/// Stand-in for prefill: `bytes` of KV for block `b` of `prompt`.
inline void synthetic_block_kv(std::span<const TokenId> prompt, size_t b, uint32_t block_tokens, std::byte* out,
                               uint64_t bytes) {
  uint64_t x = XXH3_64bits(prompt.data(), (b + 1) * block_tokens * sizeof(TokenId));
  for (uint64_t i = 0; i < bytes; i += 8) {
    x += 0x9E3779B97F4A7C15ull;
    uint64_t z = x;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    std::memcpy(out + i, &z, std::min<uint64_t>(8, bytes - i));
  }
}

}  // namespace kvtier
