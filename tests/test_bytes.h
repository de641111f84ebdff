// Deterministic test bytes shared by every test binary: splitmix64, a byte pattern from a seed
// that another process can recompute, and a byte comparison.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <vector>

namespace kvtier::testing {

/// splitmix64: deterministic bytes from (seed, index) that a parent process can recompute.
inline uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

/// Fills `out` with the pattern of `seed`: the same bytes in every process, never all zeros.
inline void fill_pattern(std::span<std::byte> out, uint64_t seed) {
  uint64_t state = mix64(seed);
  for (size_t i = 0; i < out.size(); ++i) {
    if (i % 8 == 0) state = mix64(state + i);
    out[i] = static_cast<std::byte>(state >> (8 * (i % 8)));
  }
}

/// `n` bytes of the pattern of `seed`, as a new vector.
inline std::vector<std::byte> pattern_bytes(uint64_t seed, size_t n) {
  std::vector<std::byte> out(n);
  fill_pattern(out, seed);
  return out;
}

inline bool same_bytes(const void* a, const void* b, size_t n) { return std::memcmp(a, b, n) == 0; }

}  // namespace kvtier::testing
