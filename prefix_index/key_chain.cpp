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
  // XXH3 wants a high-entropy secret of >= 136 bytes; derive one from whatever the operator gave.
  std::string seed = std::string(kFormatTag) + "/secret/" + std::string(deployment_secret);
  (void)XXH3_generateSecret(secret_.data(), secret_.size(), seed.data(), seed.size());
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

BlockKey KeyChain::block_key(const BlockKey& parent, std::span<const TokenId> tokens,
                             std::span<const BlockKey> extras) const {
  // One-shot hashing over a stack buffer is several times faster than XXH3's streaming state
  // for the common 80-byte input (16-byte parent + 16 tokens).
  constexpr size_t kStackBytes = 1024;
  const size_t len = sizeof(BlockKey) + tokens.size_bytes() + extras.size_bytes();
  if (len <= kStackBytes) {
    alignas(16) uint8_t buf[kStackBytes];
    std::memcpy(buf, &parent, sizeof parent);
    std::memcpy(buf + sizeof parent, tokens.data(), tokens.size_bytes());
    if (!extras.empty()) {
      std::memcpy(buf + sizeof parent + tokens.size_bytes(), extras.data(), extras.size_bytes());
    }
    return hash_(buf, len, secret_.data(), secret_.size());
  }
  std::vector<uint8_t> buf(len);
  std::memcpy(buf.data(), &parent, sizeof parent);
  std::memcpy(buf.data() + sizeof parent, tokens.data(), tokens.size_bytes());
  if (!extras.empty()) {
    std::memcpy(buf.data() + sizeof parent + tokens.size_bytes(), extras.data(), extras.size_bytes());
  }
  return hash_(buf.data(), len, secret_.data(), secret_.size());
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
  BlockKey block_extras[64];
  for (size_t b = 0; b < blocks; ++b) {
    size_t n_extra = 0;
    while (e < extras.size() && extras[e].block_index == b) {
      if (n_extra == std::size(block_extras)) return invalid_argument("more than 64 extras in one block");
      block_extras[n_extra++] = extras[e++].item_hash;
    }
    parent = block_key(parent, tokens.subspan(b * bt, bt), std::span(block_extras, n_extra));
    keys[b] = parent;
  }
  return Status::ok();
}

}  // namespace kvtier
