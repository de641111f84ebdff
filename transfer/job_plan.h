// JobPlan: turns a JobSpec into per-segment routes, chunk counts and checksum points, and refuses
// malformed specs before anything runs. Pure functions: no I/O, no threads.
#pragma once

#include <cstdint>
#include <vector>

#include "kvtier/status.h"
#include "transfer/transfer_engine.h"

namespace kvtier {

/// Where a verified segment's XXH3-64 is computed (the bytes must be in host memory there).
enum class VerifyPoint : uint8_t {
  kNone,
  kDestinationAtEnd,   // dst is host-readable: hash it once every chunk has arrived
  kSourceAtStart,      // src is host-readable: hash it before the first chunk is issued
  kStagingInOrder,     // neither end is: hash each chunk in staging, in chunk order
};

struct SegmentPlan {
  Segment segment;
  Route route = Route::kHostToHost;
  VerifyPoint verify_at = VerifyPoint::kNone;
  uint32_t chunks = 0;  // ceil(bytes / chunk_bytes)
};

Route route_of(LocationKind src, LocationKind dst) noexcept;

/// Checks every segment (sizes, pointers, alignment, layer numbers, device bounds) and plans it.
/// `device_memory_is_host`: the copy engine's answer (emulated HBM is host-readable).
Result<std::vector<SegmentPlan>> plan_job(const JobSpec& spec, uint64_t chunk_bytes,
                                          bool device_memory_is_host);

/// True when chunk [off, off+n) of the segment must pass through a staging buffer.
bool chunk_needs_staging(const SegmentPlan& plan, uint64_t off, uint64_t n) noexcept;

/// XXH3-64 (seed 0) of a byte range.
uint64_t xxh3_64_of(const void* data, uint64_t bytes) noexcept;

/// XXH3-64 fed chunk by chunk, in order (VerifyPoint::kStagingInOrder).
class StreamingXxh3 {
 public:
  StreamingXxh3();
  ~StreamingXxh3();
  StreamingXxh3(const StreamingXxh3&) = delete;
  StreamingXxh3& operator=(const StreamingXxh3&) = delete;
  void update(const void* data, uint64_t bytes) noexcept;
  uint64_t digest() const noexcept;

 private:
  void* state_;  // XXH3_state_t, kept out of this header
};

}  // namespace kvtier
