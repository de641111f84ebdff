#include "kvtier/block_key.h"

namespace kvtier {

namespace {
constexpr char kHexDigits[] = "0123456789abcdef";

int hex_value(char c) noexcept {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}
}  // namespace

std::string BlockKey::to_hex() const {
  std::string out(32, '0');
  for (int i = 0; i < 16; ++i) {
    out[15 - i] = kHexDigits[(hi >> (4 * i)) & 0xF];
    out[31 - i] = kHexDigits[(lo >> (4 * i)) & 0xF];
  }
  return out;
}

Result<BlockKey> BlockKey::from_hex(std::string_view hex) {
  if (hex.size() != 32) {
    return invalid_argument("block key must be 32 hex digits, got " + std::to_string(hex.size()) +
                            " characters");
  }
  BlockKey key;
  for (size_t i = 0; i < 32; ++i) {
    int v = hex_value(hex[i]);
    if (v < 0) return invalid_argument("block key has a non-hex character at position " + std::to_string(i));
    uint64_t& half = i < 16 ? key.hi : key.lo;
    half = (half << 4) | static_cast<uint64_t>(v);
  }
  return key;
}

}  // namespace kvtier
