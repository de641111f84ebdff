// BlockKey: the 128-bit content key of one KV block (see DESIGN.md "Keys").
#pragma once

#include <compare>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

#include "kvtier/export.h"
#include "kvtier/status.h"

namespace kvtier {

struct KVTIER_API BlockKey {
  uint64_t lo = 0;  // low 64 bits of the XXH3-128 digest
  uint64_t hi = 0;  // high 64 bits

  constexpr bool is_zero() const noexcept { return lo == 0 && hi == 0; }

  /// 32 lower-case hex digits, high half first (the digest read as one big-endian number).
  std::string to_hex() const;
  /// Parses exactly 32 hex digits (either case); anything else is kInvalidArgument.
  static Result<BlockKey> from_hex(std::string_view hex);

  friend constexpr bool operator==(const BlockKey&, const BlockKey&) noexcept = default;
  friend constexpr auto operator<=>(const BlockKey& a, const BlockKey& b) noexcept {
    if (auto c = a.hi <=> b.hi; c != 0) return c;
    return a.lo <=> b.lo;
  }

  /// Abseil hash support (the key is already uniformly distributed).
  template <typename H>
  friend H AbslHashValue(H h, const BlockKey& k) {
    return H::combine(std::move(h), k.lo, k.hi);
  }
};

static_assert(sizeof(BlockKey) == 16);

}  // namespace kvtier

template <>
struct std::hash<kvtier::BlockKey> {
  size_t operator()(const kvtier::BlockKey& k) const noexcept {
    // The key is a strong hash already; mixing the halves guards against structured test keys.
    return static_cast<size_t>(k.lo ^ (k.hi * 0x9E3779B97F4A7C15ull));
  }
};
