// KeyChain: turns token ids into chained, keyed 128-bit block keys (DESIGN.md "Keys").
//
//   key_0 = H(s_root, "kvtier/1" ‖ model id ‖ layout fingerprint ‖ tenant salt ‖ adapter id
//               [‖ revision])   (the revision field only when one is given, so roots without
//                                 one are the same as before revisions existed)
//   d_i   = H(s_block, tokens_i ‖ extras_i)          (block digest)
//   key_i = L(s_link, key_{i-1}, d_i)                (link)
// with H = XXH3-128, L = two keyed XXH3 multiply-folds with avalanche (each output word mixes all
// four input words), and s_root, s_block, s_link secrets derived from the deployment secret.
//
// Why a digest and a cheap link rather than DESIGN.md's single H(secret, key_{i-1} ‖ tokens_i):
// the chain is serial, so its cost is the latency of one full hash per block (~20 ns measured,
// 1.3 ns/token). Digests do not depend on each other and overlap in the CPU; the serial link
// costs a few cycles. Every key still depends on the whole prefix. Key quality affects only the
// hit rate, never correctness: a match compares each entry's stored parent key and tokens, and
// a parent cannot leave the index before its children, so a matched chain holds exactly the
// request's tokens at every position even if keys collide.
//
// The secret comes from the deployment's configuration, so keys are equal in every process and
// after every restart that uses the same secret, and differ for another secret. Variable-length
// fields of the root are length-prefixed so ("ab","c") and ("a","bc") never meet.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"
#include "kvtier/tokens.h"

namespace kvtier {

/// What a prefix's root key is made of. Two specs share blocks only when every field is equal.
struct NamespaceSpec {
  std::string model_id;    // e.g. "meta-llama/Llama-3.1-8B-Instruct@main"; required
  KvLayout layout;         // must validate; its fingerprint and block size go into the root
  std::string tenant_salt; // "" shares across all users of the deployment
  std::string adapter_id;  // LoRA adapter, "" for the base model
  std::string revision;    // the weights' revision (a commit hash or a digest of the weight files);
                           // "" when unknown. KV of other weights of the same model never matches
};

/// A resolved namespace: the root key plus the layout its blocks follow.
struct Namespace {
  BlockKey root;
  KvLayout layout;
  uint32_t block_tokens() const noexcept { return layout.block_tokens; }
};

/// The 128-bit hash used for keys. Replaceable only so tests can force collisions.
using KeyHashFn = BlockKey (*)(const void* data, size_t len, const uint8_t* secret,
                               size_t secret_len);
/// XXH3-128 with a custom secret: the production hash.
BlockKey xxh3_128_keyed(const void* data, size_t len, const uint8_t* secret, size_t secret_len);

class KeyChain {
 public:
  static constexpr std::string_view kFormatTag = "kvtier/1";  // bump when key derivation changes
  static constexpr size_t kSecretBytes = 192;

  /// `deployment_secret` may be any string (even empty, which gives well-known keys: fine for a
  /// single trusted deployment, wrong when tenants must not probe each other's prompts).
  explicit KeyChain(std::string_view deployment_secret, KeyHashFn hash = &xxh3_128_keyed);

  /// The namespace root. kInvalidArgument for an empty model id or an invalid layout.
  Result<Namespace> make_namespace(const NamespaceSpec& spec) const;

  /// The digest of one block's tokens and extras (independent of its position).
  BlockKey block_digest(std::span<const TokenId> tokens, std::span<const BlockKey> extras = {}) const;
  /// One link of the chain: a block's key from its parent key and its digest.
  BlockKey link(const BlockKey& parent, const BlockKey& digest) const;
  /// link(parent, block_digest(tokens, extras)).
  BlockKey block_key(const BlockKey& parent, std::span<const TokenId> tokens,
                     std::span<const BlockKey> extras = {}) const;

  /// Keys of every full block of `tokens`, written into `keys` (cleared first); a partial tail is
  /// never keyed. `extras` must be sorted by block index; an extra beyond the last full block is
  /// kInvalidArgument.
  Status chain(const Namespace& ns, std::span<const TokenId> tokens,
               std::span<const BlockExtra> extras, std::vector<BlockKey>& keys) const;

  /// Checks `extras` for chain(): sorted by block index, none beyond the last of `blocks`.
  static Status check_extras(std::span<const BlockExtra> extras, size_t blocks);
  /// Keys of blocks [first, first + count) of `tokens`, continuing the chain from `parent` (the
  /// key of block first - 1, or the namespace root when first is 0), into out[0, count).
  /// `extras` as chain() takes them, already checked; the range must lie within the full blocks.
  /// This lets a match key a long prompt a chunk at a time and stop at its first miss.
  void chain_range(BlockKey parent, std::span<const TokenId> tokens, uint32_t block_tokens,
                   size_t first, size_t count, std::span<const BlockExtra> extras, BlockKey* out) const;

  KeyHashFn hash_fn() const noexcept { return hash_; }

 private:
  // chain() without extras, with the production hash: `blocks` keys from `parent` into `out`.
  void chain_plain(BlockKey parent, const TokenId* tokens, size_t block_tokens, size_t blocks,
                   BlockKey* out) const;

  std::array<uint8_t, kSecretBytes> secret_{};        // root keys
  std::array<uint8_t, kSecretBytes> block_secret_{};  // block digests
  std::array<uint8_t, kSecretBytes> link_secret_{};   // chain links
  uint64_t link_words_[4] = {};                         // first words of link_secret_
  KeyHashFn hash_;
};

}  // namespace kvtier
