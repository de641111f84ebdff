// Slot header: encode/decode round trip; any flipped byte or a wrong version is refused.
#include <catch2/catch.hpp>

#include <cstring>

#include "tier_test_support.h"
#include "tiers/block_header.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
KvLayout small_layout() {
  auto l = KvLayout::standard(4, 2, 64, Dtype::kFp16, 16);
  REQUIRE(l.is_ok());
  return *l;
}

BlockHeaderInfo sample_info(const KvLayout& layout, std::span<const std::byte> payload) {
  BlockHeaderInfo info;
  info.key = {0x1111, 0x2222};
  info.parent = {0x3333, 0x4444};
  info.ns_root = {0x5555, 0x6666};
  info.block_index = 7;
  for (TokenId t = 0; t < layout.block_tokens; ++t) info.tokens.push_back(1000 + t * 3);
  info.extras = {{9, 10}, {11, 12}};
  info.layout_fingerprint = layout.fingerprint();
  info.num_layers = layout.num_layers;
  info.priority = Priority::kHigh;
  REQUIRE(compute_checksums(info, payload).is_ok());
  return info;
}
}  // namespace

TEST_CASE("A slot header decodes to exactly what was encoded") {
  const KvLayout layout = small_layout();
  auto payload = pattern_buffer(layout.bytes_per_block(), 5);
  std::span<const std::byte> pay(payload.get(), layout.bytes_per_block());
  BlockHeaderInfo info = sample_info(layout, pay);
  const uint64_t hb = header_bytes_for(layout);
  CHECK(hb % kIoAlignment == 0);
  CHECK(encoded_header_bytes(info) <= hb);

  auto buf = make_aligned_buffer(hb);
  REQUIRE(encode_block_header(info, static_cast<uint32_t>(hb), std::span(buf.get(), hb)).is_ok());
  auto decoded = decode_block_header(std::span<const std::byte>(buf.get(), hb));
  REQUIRE(decoded.is_ok());
  CHECK(*decoded == info);
  CHECK(verify_payload(*decoded, pay).is_ok());
  const size_t layer_bytes = layout.bytes_per_block_layer();
  for (uint32_t l = 0; l < layout.num_layers; ++l) {
    CHECK(verify_layer(*decoded, l, pay.subspan(l * layer_bytes, layer_bytes)).is_ok());
  }
  // A changed payload byte fails the whole-payload and that layer's checksum only.
  payload[layer_bytes + 3] ^= std::byte{1};
  CHECK(verify_payload(*decoded, pay).code() == StatusCode::kChecksumMismatch);
  CHECK(verify_layer(*decoded, 1, pay.subspan(layer_bytes, layer_bytes)).code() ==
        StatusCode::kChecksumMismatch);
  CHECK(verify_layer(*decoded, 0, pay.subspan(0, layer_bytes)).is_ok());
}

TEST_CASE("Every single flipped byte of a header region is detected") {
  const KvLayout layout = small_layout();
  auto payload = pattern_buffer(layout.bytes_per_block(), 6);
  BlockHeaderInfo info = sample_info(layout, std::span(payload.get(), layout.bytes_per_block()));
  const uint64_t hb = header_bytes_for(layout);
  auto buf = make_aligned_buffer(hb);
  REQUIRE(encode_block_header(info, static_cast<uint32_t>(hb), std::span(buf.get(), hb)).is_ok());
  int undetected = 0;
  for (size_t i = 0; i < hb; ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}}) {
      buf[i] ^= std::byte{mask};
      if (decode_block_header(std::span<const std::byte>(buf.get(), hb)).is_ok()) ++undetected;
      buf[i] ^= std::byte{mask};
    }
  }
  CHECK(undetected == 0);
  CHECK(decode_block_header(std::span<const std::byte>(buf.get(), hb)).is_ok());
}

TEST_CASE("A header of another format version, or none at all, is refused with a reason") {
  const KvLayout layout = small_layout();
  auto payload = pattern_buffer(layout.bytes_per_block(), 7);
  BlockHeaderInfo info = sample_info(layout, std::span(payload.get(), layout.bytes_per_block()));
  const uint64_t hb = header_bytes_for(layout);
  auto buf = make_aligned_buffer(hb);
  REQUIRE(encode_block_header(info, static_cast<uint32_t>(hb), std::span(buf.get(), hb)).is_ok());
  const uint16_t future = kSlotFormatVersion + 1;
  std::memcpy(buf.get() + 4, &future, 2);
  auto r = decode_block_header(std::span<const std::byte>(buf.get(), hb));
  REQUIRE_FALSE(r.is_ok());
  CHECK(r.status().code() == StatusCode::kInvalidArgument);
  CHECK(std::string(r.status().message()).find("version") != std::string::npos);

  std::memset(buf.get(), 0, hb);  // a slot never written
  CHECK(decode_block_header(std::span<const std::byte>(buf.get(), hb)).status().code() ==
        StatusCode::kChecksumMismatch);
}

TEST_CASE("Headers that cannot fit or are inconsistent are not encoded") {
  const KvLayout layout = small_layout();
  auto payload = pattern_buffer(layout.bytes_per_block(), 8);
  BlockHeaderInfo info = sample_info(layout, std::span(payload.get(), layout.bytes_per_block()));
  auto buf = make_aligned_buffer(8192);
  info.layer_checksums.pop_back();
  CHECK(encode_block_header(info, 4096, std::span(buf.get(), 4096)).code() ==
        StatusCode::kInvalidArgument);
  info.layer_checksums.push_back(0);
  info.extras.resize(kMaxHeaderExtras + 1);
  CHECK(encode_block_header(info, 4096, std::span(buf.get(), 4096)).code() ==
        StatusCode::kInvalidArgument);
  BlockHeaderInfo odd;
  odd.num_layers = 3;
  CHECK(compute_checksums(odd, std::span(payload.get(), 4096)).code() ==
        StatusCode::kInvalidArgument);
}
