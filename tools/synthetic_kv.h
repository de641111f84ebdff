// Synthetic prompts and KV for the demos, benchmarks and tests: token ids derived from a seed,
// and block KV that is a function of the prompt up to and including the block (as real
// attention KV is), so any process can check a restored block without asking the one that
// saved it.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <random>
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

/// The single-process demos' workload: users share a system prompt and a few documents; each
/// turn, a user's prompt is system ‖ its document ‖ its conversation so far ‖ a new question.
class SharedPrefixWorkload {
 public:
  SharedPrefixWorkload(uint64_t seed, uint32_t users, size_t system_tokens, uint32_t documents,
                       size_t document_tokens, size_t question_tokens)
      : rng_(seed), question_tokens_(question_tokens), history_(users) {
    system_ = random_tokens(system_tokens);
    for (uint32_t d = 0; d < documents; ++d) documents_.push_back(random_tokens(document_tokens));
  }

  /// User `user`'s prompt for its next turn (its question joins its conversation).
  std::vector<TokenId> next_prompt(uint32_t user) {
    std::vector<TokenId> prompt = system_;
    const auto& doc = documents_[user % documents_.size()];
    prompt.insert(prompt.end(), doc.begin(), doc.end());
    auto question = random_tokens(question_tokens_);
    history_[user].insert(history_[user].end(), question.begin(), question.end());
    prompt.insert(prompt.end(), history_[user].begin(), history_[user].end());
    return prompt;
  }

  const std::vector<TokenId>& system_prompt() const noexcept { return system_; }

 private:
  std::vector<TokenId> random_tokens(size_t n) {
    std::vector<TokenId> out(n);
    for (auto& t : out) t = static_cast<TokenId>(rng_() % 128000);
    return out;
  }

  std::mt19937_64 rng_;
  size_t question_tokens_;
  std::vector<TokenId> system_;
  std::vector<std::vector<TokenId>> documents_;
  std::vector<std::vector<TokenId>> history_;
};

}  // namespace kvtier
