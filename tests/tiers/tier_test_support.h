// Helpers shared by the tiers tests: a temporary directory, deterministic bytes, aligned buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <span>
#include <string>
#include <system_error>

#include "temp_dir.h"
#include "tiers/storage_device.h"

namespace kvtier::testing {

/// splitmix64: deterministic bytes from (seed, index) that a parent process can recompute.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline void fill_pattern(std::span<std::byte> out, uint64_t seed) {
  uint64_t state = mix64(seed);
  for (size_t i = 0; i < out.size(); ++i) {
    if (i % 8 == 0) state = mix64(state + i);
    out[i] = static_cast<std::byte>(state >> (8 * (i % 8)));
  }
}

inline AlignedBuffer pattern_buffer(size_t bytes, uint64_t seed) {
  AlignedBuffer buf = make_aligned_buffer(bytes);
  fill_pattern(std::span(buf.get(), bytes), seed);
  return buf;
}

inline bool same_bytes(const std::byte* a, const std::byte* b, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

}  // namespace kvtier::testing
