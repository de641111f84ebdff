#include "tiers/block_header.h"

#include <bit>
#include <cstring>
#include <string>

#include <xxhash.h>

#include "tiers/storage_device.h"

namespace kvtier {

namespace {

template <typename T>
void put(std::span<std::byte> out, size_t& at, T v) {
  static_assert(std::endian::native == std::endian::little, "encoding assumes little-endian");
  std::memcpy(out.data() + at, &v, sizeof v);
  at += sizeof v;
}

template <typename T>
T get(std::span<const std::byte> in, size_t& at) {
  T v;
  std::memcpy(&v, in.data() + at, sizeof v);
  at += sizeof v;
  return v;
}

void put_key(std::span<std::byte> out, size_t& at, const BlockKey& k) {
  put(out, at, k.lo);
  put(out, at, k.hi);
}

BlockKey get_key(std::span<const std::byte> in, size_t& at) {
  BlockKey k;
  k.lo = get<uint64_t>(in, at);
  k.hi = get<uint64_t>(in, at);
  return k;
}

uint64_t encoded_size(uint64_t tokens, uint64_t extras, uint64_t layers) noexcept {
  return kHeaderFixedBytes + 4 * tokens + 16 * extras + 8 * layers + 8;
}

Status damaged(const std::string& what) {
  return {StatusCode::kChecksumMismatch, "slot header: " + what};
}

}  // namespace

uint64_t encoded_header_bytes(const BlockHeaderInfo& info) noexcept {
  return encoded_size(info.tokens.size(), info.extras.size(), info.num_layers);
}

uint64_t header_bytes_for(const KvLayout& layout) noexcept {
  return align_up(encoded_size(layout.block_tokens, kMaxHeaderExtras, layout.num_layers),
                  kIoAlignment);
}

uint64_t payload_checksum(std::span<const std::byte> bytes) noexcept {
  return XXH3_64bits(bytes.data(), bytes.size());
}

Status compute_checksums(BlockHeaderInfo& info, std::span<const std::byte> payload) {
  if (info.num_layers == 0 || payload.size() % info.num_layers != 0) {
    return invalid_argument("payload of " + std::to_string(payload.size()) +
                            " bytes does not split into " + std::to_string(info.num_layers) +
                            " equal layers");
  }
  info.payload_bytes = payload.size();
  info.payload_checksum = payload_checksum(payload);
  const size_t layer_bytes = payload.size() / info.num_layers;
  info.layer_checksums.resize(info.num_layers);
  for (uint32_t l = 0; l < info.num_layers; ++l) {
    info.layer_checksums[l] = payload_checksum(payload.subspan(l * layer_bytes, layer_bytes));
  }
  return Status::ok();
}

Status encode_block_header(const BlockHeaderInfo& info, uint32_t header_bytes,
                           std::span<std::byte> out) {
  const uint64_t need = encoded_header_bytes(info);
  if (info.tokens.size() > kMaxBlockTokens || info.extras.size() > kMaxHeaderExtras ||
      info.num_layers > kMaxLayers) {
    return invalid_argument("slot header: too many tokens, extras or layers");
  }
  if (info.layer_checksums.size() != info.num_layers) {
    return invalid_argument("slot header: " + std::to_string(info.layer_checksums.size()) +
                            " layer checksums for " + std::to_string(info.num_layers) + " layers");
  }
  if (need > header_bytes || out.size() < header_bytes || header_bytes % kIoAlignment != 0) {
    return invalid_argument("slot header of " + std::to_string(need) +
                            " bytes does not fit a region of " + std::to_string(header_bytes));
  }
  std::memset(out.data(), 0, header_bytes);
  size_t at = 0;
  put<uint32_t>(out, at, kSlotMagic);
  put<uint16_t>(out, at, kSlotFormatVersion);
  put<uint16_t>(out, at, 0);
  put<uint32_t>(out, at, header_bytes);
  put<uint32_t>(out, at, static_cast<uint32_t>(need));
  put_key(out, at, info.key);
  put_key(out, at, info.parent);
  put_key(out, at, info.ns_root);
  put<uint32_t>(out, at, info.block_index);
  put<uint8_t>(out, at, static_cast<uint8_t>(info.priority));
  at += 3;
  put<uint64_t>(out, at, info.layout_fingerprint);
  put<uint32_t>(out, at, info.num_layers);
  put<uint32_t>(out, at, static_cast<uint32_t>(info.tokens.size()));
  put<uint32_t>(out, at, static_cast<uint32_t>(info.extras.size()));
  at += 4;
  put<uint64_t>(out, at, info.payload_bytes);
  put<uint64_t>(out, at, info.payload_checksum);
  for (TokenId t : info.tokens) put<uint32_t>(out, at, t);
  for (const BlockKey& e : info.extras) put_key(out, at, e);
  for (uint64_t c : info.layer_checksums) put<uint64_t>(out, at, c);
  const uint64_t self = XXH3_64bits(out.data(), at);
  put<uint64_t>(out, at, self);
  return Status::ok();
}

Result<BlockHeaderInfo> decode_block_header(std::span<const std::byte> in) {
  if (in.size() < kHeaderFixedBytes + 8) return damaged("region too small");
  size_t at = 0;
  if (get<uint32_t>(in, at) != kSlotMagic) return damaged("bad magic (no block was written here)");
  // The version is checked before the checksum: a later format may place its checksum elsewhere.
  const uint16_t version = get<uint16_t>(in, at);
  if (version != kSlotFormatVersion) {
    return invalid_argument("slot header: unsupported format version " + std::to_string(version) +
                            " (this build reads " + std::to_string(kSlotFormatVersion) + ")");
  }
  const uint16_t reserved16 = get<uint16_t>(in, at);
  const uint32_t header_bytes = get<uint32_t>(in, at);
  const uint32_t encoded = get<uint32_t>(in, at);
  if (reserved16 != 0) return damaged("reserved bits set");
  if (header_bytes % kIoAlignment != 0 || header_bytes == 0 || header_bytes > in.size() ||
      encoded > header_bytes || encoded < kHeaderFixedBytes + 8) {
    return damaged("impossible sizes (region " + std::to_string(header_bytes) + ", encoded " +
                   std::to_string(encoded) + ", given " + std::to_string(in.size()) + ")");
  }
  const uint64_t stored_self = [&] {
    size_t p = encoded - 8;
    return get<uint64_t>(in, p);
  }();
  if (XXH3_64bits(in.data(), encoded - 8) != stored_self) return damaged("header checksum mismatch");
  for (size_t i = encoded; i < header_bytes; ++i) {
    if (in[i] != std::byte{0}) return damaged("non-zero padding at byte " + std::to_string(i));
  }

  BlockHeaderInfo info;
  info.key = get_key(in, at);
  info.parent = get_key(in, at);
  info.ns_root = get_key(in, at);
  info.block_index = get<uint32_t>(in, at);
  const uint8_t priority = get<uint8_t>(in, at);
  const uint8_t r0 = get<uint8_t>(in, at), r1 = get<uint8_t>(in, at), r2 = get<uint8_t>(in, at);
  info.layout_fingerprint = get<uint64_t>(in, at);
  info.num_layers = get<uint32_t>(in, at);
  const uint32_t tokens = get<uint32_t>(in, at);
  const uint32_t extras = get<uint32_t>(in, at);
  const uint32_t reserved32 = get<uint32_t>(in, at);
  info.payload_bytes = get<uint64_t>(in, at);
  info.payload_checksum = get<uint64_t>(in, at);
  if ((r0 | r1 | r2) != 0 || reserved32 != 0) return damaged("reserved bytes set");
  if (priority >= kNumPriorities) return damaged("bad priority " + std::to_string(priority));
  if (tokens > kMaxBlockTokens || extras > kMaxHeaderExtras || info.num_layers > kMaxLayers) {
    return damaged("counts out of range");
  }
  if (encoded_size(tokens, extras, info.num_layers) != encoded) {
    return damaged("encoded size disagrees with the counts");
  }
  info.priority = static_cast<Priority>(priority);
  info.tokens.resize(tokens);
  for (auto& t : info.tokens) t = get<uint32_t>(in, at);
  info.extras.resize(extras);
  for (auto& e : info.extras) e = get_key(in, at);
  info.layer_checksums.resize(info.num_layers);
  for (auto& c : info.layer_checksums) c = get<uint64_t>(in, at);
  return info;
}

Status verify_payload(const BlockHeaderInfo& info, std::span<const std::byte> payload) {
  if (payload.size() != info.payload_bytes) {
    return {StatusCode::kChecksumMismatch, "payload length " + std::to_string(payload.size()) +
                                               " differs from the header's " +
                                               std::to_string(info.payload_bytes)};
  }
  if (payload_checksum(payload) != info.payload_checksum) {
    return {StatusCode::kChecksumMismatch, "payload checksum mismatch for block " +
                                               info.key.to_hex()};
  }
  return Status::ok();
}

Status verify_layer(const BlockHeaderInfo& info, uint32_t layer, std::span<const std::byte> bytes) {
  if (layer >= info.num_layers || info.layer_checksums.size() != info.num_layers) {
    return invalid_argument("layer " + std::to_string(layer) + " of a block with " +
                            std::to_string(info.num_layers) + " layers");
  }
  if (bytes.size() != info.payload_bytes / info.num_layers ||
      payload_checksum(bytes) != info.layer_checksums[layer]) {
    return {StatusCode::kChecksumMismatch, "layer " + std::to_string(layer) +
                                               " checksum mismatch for block " + info.key.to_hex()};
  }
  return Status::ok();
}

}  // namespace kvtier
