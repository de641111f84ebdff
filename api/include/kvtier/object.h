// Key-addressed objects (an engine's pages named by its own keys, not by tokens): the limits and
// the layout a client and kvtierd share. KvStore::object_put and friends; api/store/object_store.h
// says how objects are kept.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>

#include "kvtier/status.h"

namespace kvtier {

/// An object key's most bytes (any bytes: an engine's page hash or cache-engine key).
inline constexpr uint32_t kMaxObjectKeyBytes = 1024;
/// The most keys one object_exists or object_remove names.
inline constexpr uint32_t kMaxObjectKeys = 4096;
/// An object is kept in whole blocks: its bytes, zeros, then its length in the final 8 bytes.
inline constexpr uint32_t kObjectTrailerBytes = 8;

/// Blocks an object of `length` bytes takes in blocks of `block_bytes`.
constexpr uint64_t object_blocks(uint64_t length, uint64_t block_bytes) noexcept {
  return (length + kObjectTrailerBytes + block_bytes - 1) / block_bytes;
}

/// kInvalidArgument for an empty key or one over kMaxObjectKeyBytes.
inline Status check_object_key(std::string_view key) {
  if (!key.empty() && key.size() <= kMaxObjectKeyBytes) return Status::ok();
  return invalid_argument("an object key is 1 to " + std::to_string(kMaxObjectKeyBytes) + " bytes, got " +
                          std::to_string(key.size()));
}

/// Lays `bytes` out as an object's blocks into `out` (object_blocks × block_bytes long): the
/// bytes, zeros, the length (little endian).
inline void lay_out_object(std::span<const std::byte> bytes, std::span<std::byte> out) noexcept {
  if (!bytes.empty()) std::memcpy(out.data(), bytes.data(), bytes.size());
  std::memset(out.data() + bytes.size(), 0, out.size() - bytes.size() - kObjectTrailerBytes);
  const uint64_t length = bytes.size();
  std::memcpy(out.data() + out.size() - kObjectTrailerBytes, &length, kObjectTrailerBytes);
}

}  // namespace kvtier
