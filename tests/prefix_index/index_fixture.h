// Shared helpers for the prefix-index tests: a small layout, random prompts, prefix inserts.
#pragma once

#include <catch2/catch.hpp>

#include <random>
#include <vector>

#include "prefix_index/prefix_index.h"

namespace kvtier::testing {

inline KvLayout small_layout(uint32_t block_tokens = 4) {
  return *KvLayout::standard(2, 2, 8, Dtype::kFp16, block_tokens);
}

inline std::vector<TokenId> random_tokens(std::mt19937_64& rng, size_t n) {
  std::vector<TokenId> t(n);
  for (auto& x : t) x = static_cast<TokenId>(rng() % 50000);
  return t;
}

/// A manual clock for lease expiry: tests advance it instead of sleeping.
struct ManualClock {
  std::shared_ptr<std::atomic<uint64_t>> now = std::make_shared<std::atomic<uint64_t>>(1000);
  std::function<uint64_t()> fn() const {
    auto n = now;
    return [n] { return n->load(); };
  }
  void advance(uint64_t ns) { *now += ns; }
};

/// What most index tests open with: a key chain, an index over it made with `options`, and one
/// namespace of small_layout(4). Declared in this order, so the chain outlives the index.
///   TestIndex t({.shards = 8});
///   auto& [chain, index, ns] = t;
struct TestIndex {
  KeyChain chain{"secret"};
  std::unique_ptr<PrefixIndex> index;
  Namespace ns;
  explicit TestIndex(IndexOptions options = {})
      : index(std::move(*PrefixIndex::create(chain, std::move(options)))),
        ns(*chain.make_namespace({"m", small_layout(4), "", ""})) {}
};

/// Inserts every full block of `tokens` not yet indexed into `tier`; returns the keys.
inline std::vector<BlockKey> insert_prompt(PrefixIndex& index, const Namespace& ns,
                                           const std::vector<TokenId>& tokens, Tier tier = Tier::kHost,
                                           Priority priority = Priority::kNormal) {
  static std::atomic<SlotId> next_slot{0};
  std::vector<BlockKey> keys;
  REQUIRE(index.key_chain().chain(ns, tokens, {}, keys).is_ok());
  const uint32_t bt = ns.block_tokens();
  for (size_t b = 0; b < keys.size(); ++b) {
    BlockInsert ins{.key = keys[b], .parent = b ? keys[b - 1] : ns.root,
                    .block_index = static_cast<uint32_t>(b),
                    .tokens = std::span(tokens).subspan(b * bt, bt), .tier = tier,
                    .slot = next_slot++, .priority = priority};
    auto r = index.insert(ns, ins);
    if (!r) REQUIRE(r.status().code() == StatusCode::kAlreadyExists);
  }
  return keys;
}

}  // namespace kvtier::testing
