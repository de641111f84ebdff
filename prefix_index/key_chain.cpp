#include "prefix_index/key_chain.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

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

Status KeyChain::chain(const Namespace& ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras, std::vector<BlockKey>& keys) const {
  const size_t bt = ns.block_tokens();
  if (bt == 0) return invalid_argument("namespace has block_tokens = 0");
  const size_t blocks = tokens.size() / bt;
  for (size_t e = 0; e < extras.size(); ++e) {
    if (extras[e].block_index >= blocks) {
      return invalid_argument("extra for block " + std::to_string(extras[e].block_index) +
                              " is beyond the last full block (" + std::to_string(blocks) + ")");
    }
    if (e > 0 && extras[e].block_index < extras[e - 1].block_index) {
      return invalid_argument("extras must be sorted by block index");
    }
  }
  keys.resize(blocks);
  BlockKey parent = ns.root;
  size_t e = 0;
  for (size_t b = 0; b < blocks; ++b) {
    const size_t first_extra = e;
    while (e < extras.size() && extras[e].block_index == b) ++e;
    const auto block_tokens = tokens.subspan(b * bt, bt);
    if (e == first_extra && hash_ == &xxh3_128_keyed) {
      // Hot path, inlined: the digests of successive blocks do not depend on each other, so
      // the CPU overlaps them; only the cheap fold_link is serial.
      // The 16-token block (vLLM's and SGLang's page) gets a constant length, so the compiler
      // drops XXH3's length dispatch.
      XXH128_hash_t h =
          bt == 16 ? XXH3_128bits_withSecret(block_tokens.data(), 16 * sizeof(TokenId),
                                             block_secret_.data(), kSecretBytes)
                   : XXH3_128bits_withSecret(block_tokens.data(), block_tokens.size_bytes(),
                                             block_secret_.data(), kSecretBytes);
      parent = fold_link(parent, BlockKey{h.low64, h.high64}, link_words_);
    } else {
      std::vector<BlockKey> item_hashes;
      for (size_t x = first_extra; x < e; ++x) item_hashes.push_back(extras[x].item_hash);
      parent = link(parent, block_digest(block_tokens, item_hashes));
    }
    keys[b] = parent;
  }
  return Status::ok();
}

}  // namespace kvtier
