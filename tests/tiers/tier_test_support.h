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
#include "test_bytes.h"
#include "tiers/storage_device.h"

namespace kvtier::testing {

inline AlignedBuffer pattern_buffer(size_t bytes, uint64_t seed) {
  AlignedBuffer buf = make_aligned_buffer(bytes);
  fill_pattern(std::span(buf.get(), bytes), seed);
  return buf;
}

}  // namespace kvtier::testing
