#include "prefix_index/key_chain.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <algorithm>
#include <bit>
#include <cstring>

namespace kvtier {

static_assert(std::endian::native == std::endian::little,
              "keys hash token ids as little-endian bytes; add a byte swap for big-endian hosts");

BlockKey xxh3_128_keyed(const void* data, size_t len, const uint8_t* secret, size_t secret_len) {
  XXH128_hash_t h = XXH3_128bits_withSecret(data, len, secret, secret_len);
  return BlockKey{h.low64, h.high64};
}

KeyChain::KeyChain(std::string_view deployment_secret, KeyHashFn hash) : hash_(hash) {
  // XXH3 wants high-entropy secrets of >= 136 bytes; derive them from whatever the operator gave.
  // Three secrets separate the three kinds of input (root, block digest, link) by construction.
  auto derive = [&](std::array<uint8_t, kSecretBytes>& out, std::string_view purpose) {
    std::string seed = std::string(kFormatTag) + "/" + std::string(purpose) + "/" +
                       std::string(deployment_secret);
    (void)XXH3_generateSecret(out.data(), out.size(), seed.data(), seed.size());
  };
  derive(secret_, "root");
  derive(block_secret_, "block");
  derive(link_secret_, "link");
  std::memcpy(link_words_, link_secret_.data(), sizeof link_words_);
}

namespace {
void append_field(std::string& out, std::string_view field) {
  uint32_t n = static_cast<uint32_t>(field.size());
  out.append(reinterpret_cast<const char*>(&n), sizeof n);
  out.append(field);
}
}  // namespace

Result<Namespace> KeyChain::make_namespace(const NamespaceSpec& spec) const {
  if (spec.model_id.empty()) return invalid_argument("namespace needs a model id");
  KVTIER_RETURN_IF_ERROR(spec.layout.validate());
  std::string root_input(kFormatTag);
  append_field(root_input, spec.model_id);
  uint64_t fp = spec.layout.fingerprint();
  root_input.append(reinterpret_cast<const char*>(&fp), sizeof fp);
  append_field(root_input, spec.tenant_salt);
  append_field(root_input, spec.adapter_id);
  // Length-prefixed and last, so a root with a revision never equals one without.
  if (!spec.revision.empty()) append_field(root_input, spec.revision);
  Namespace ns;
  ns.root = hash_(root_input.data(), root_input.size(), secret_.data(), secret_.size());
  ns.layout = spec.layout;
  return ns;
}

BlockKey KeyChain::block_digest(std::span<const TokenId> tokens,
                                std::span<const BlockKey> extras) const {
  if (extras.empty()) {
    return hash_(tokens.data(), tokens.size_bytes(), block_secret_.data(), block_secret_.size());
  }
  std::vector<uint8_t> buf(tokens.size_bytes() + extras.size_bytes());
  std::memcpy(buf.data(), tokens.data(), tokens.size_bytes());
  std::memcpy(buf.data() + tokens.size_bytes(), extras.data(), extras.size_bytes());
  return hash_(buf.data(), buf.size(), block_secret_.data(), block_secret_.size());
}

namespace {
// The chain link: two 64x64->128 multiply-folds (XXH3's own mixing primitive) keyed by the link
// secret. Each output half depends on all four input words. Its latency, a few cycles, is the
// whole serial part of keying; the strong hashing happens in the parallel block digests.
inline BlockKey fold_link(const BlockKey& parent, const BlockKey& digest, const uint64_t* s) {
  const uint64_t a = parent.lo ^ digest.hi ^ s[0];
  const uint64_t b = parent.hi ^ digest.lo ^ s[1];
  const uint64_t c = parent.lo ^ digest.lo ^ s[2];
  const uint64_t d = parent.hi ^ digest.hi ^ s[3];
  return BlockKey{XXH3_mul128_fold64(a, b), XXH3_mul128_fold64(c, d)};
}
}  // namespace

BlockKey KeyChain::link(const BlockKey& parent, const BlockKey& digest) const {
  if (hash_ != &xxh3_128_keyed) {
    // A test hash (e.g. a deliberately weak one) decides the whole key, links included.
    BlockKey in[2] = {parent, digest};
    return hash_(in, sizeof in, link_secret_.data(), link_secret_.size());
  }
  return fold_link(parent, digest, link_words_);
}

BlockKey KeyChain::block_key(const BlockKey& parent, std::span<const TokenId> tokens,
                             std::span<const BlockKey> extras) const {
  return link(parent, block_digest(tokens, extras));
}

void KeyChain::chain_plain(BlockKey parent, const TokenId* tokens, size_t block_tokens, size_t blocks,
                           BlockKey* out) const {
  // The digests of successive blocks do not depend on each other, so the CPU overlaps them; only
  // the link is serial. The parent stays in two general registers: kept as a BlockKey value, the
  // compiler moved it through a vector register and back on every block, which doubled the
  // serial latency of the chain (0.87 -> 0.43 ns/token measured).
  const uint8_t* bs = block_secret_.data();
  const uint64_t s0 = link_words_[0], s1 = link_words_[1], s2 = link_words_[2], s3 = link_words_[3];
  uint64_t plo = parent.lo, phi = parent.hi;
  auto run = [&](auto block_bytes) {
    auto digest = [&](size_t b) {
      return XXH3_128bits_withSecret(tokens + b * block_tokens, block_bytes, bs, kSecretBytes);
    };
    // fold_link, written out on the two registers.
    auto link = [&](const XXH128_hash_t& d, size_t b) {
      const uint64_t lo = XXH3_mul128_fold64(plo ^ d.high64 ^ s0, phi ^ d.low64 ^ s1);
      const uint64_t hi = XXH3_mul128_fold64(plo ^ d.low64 ^ s2, phi ^ d.high64 ^ s3);
      plo = lo;
      phi = hi;
      out[b].lo = lo;
      out[b].hi = hi;
    };
    // Two digests per step, both issued before either link: the scheduler then always has a
    // digest ready while the serial links wait on their multiplies. Measured against raw
    // per-block XXH3-128: one per step 0.78-0.79, two 0.80-0.84, four 0.76-0.78 (registers
    // spill).
    size_t b = 0;
    for (; b + 2 <= blocks; b += 2) {
      const XXH128_hash_t d0 = digest(b), d1 = digest(b + 1);
      link(d0, b);
      link(d1, b + 1);
    }
    if (b < blocks) link(digest(b), b);
  };
  // The 16-token block (vLLM's and SGLang's page) gets a constant length, so the compiler drops
  // XXH3's length dispatch.
  if (block_tokens == 16) {
    run(std::integral_constant<size_t, 16 * sizeof(TokenId)>{});
  } else {
    run(block_tokens * sizeof(TokenId));
  }
}

Status KeyChain::check_extras(std::span<const BlockExtra> extras, size_t blocks) {
  for (size_t e = 0; e < extras.size(); ++e) {
    if (extras[e].block_index >= blocks) {
      return invalid_argument("extra for block " + std::to_string(extras[e].block_index) +
                              " is beyond the last full block (" + std::to_string(blocks) + ")");
    }
    if (e > 0 && extras[e].block_index < extras[e - 1].block_index) {
      return invalid_argument("extras must be sorted by block index");
    }
  }
  return Status::ok();
}

void KeyChain::chain_range(BlockKey parent, std::span<const TokenId> tokens, uint32_t block_tokens,
                           size_t first, size_t count, std::span<const BlockExtra> extras,
                           BlockKey* out) const {
  auto by_block = [](const BlockExtra& x, size_t b) { return x.block_index < b; };
  size_t e = std::lower_bound(extras.begin(), extras.end(), first, by_block) - extras.begin();
  const size_t end_extra = std::lower_bound(extras.begin(), extras.end(), first + count, by_block) - extras.begin();
  if (e == end_extra && hash_ == &xxh3_128_keyed) {
    chain_plain(parent, tokens.data() + first * block_tokens, block_tokens, count, out);
    return;
  }
  std::vector<BlockKey> item_hashes;
  for (size_t b = first; b < first + count; ++b) {
    item_hashes.clear();
    while (e < end_extra && extras[e].block_index == b) item_hashes.push_back(extras[e++].item_hash);
    parent = link(parent, block_digest(tokens.subspan(b * block_tokens, block_tokens), item_hashes));
    out[b - first] = parent;
  }
}

Status KeyChain::chain(const Namespace& ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras, std::vector<BlockKey>& keys) const {
  const uint32_t bt = ns.block_tokens();
  if (bt == 0) return invalid_argument("namespace has block_tokens = 0");
  const size_t blocks = tokens.size() / bt;
  KVTIER_RETURN_IF_ERROR(check_extras(extras, blocks));
  keys.resize(blocks);
  chain_range(ns.root, tokens, bt, 0, blocks, extras, keys.data());
  return Status::ok();
}

}  // namespace kvtier
