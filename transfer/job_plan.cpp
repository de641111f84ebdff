#include "transfer/job_plan.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <new>
#include <string>

namespace kvtier {

std::string_view route_name(Route r) noexcept {
  switch (r) {
    case Route::kStorageToHost: return "storage_to_host";
    case Route::kHostToStorage: return "host_to_storage";
    case Route::kStorageToDevice: return "storage_to_device";
    case Route::kDeviceToStorage: return "device_to_storage";
    case Route::kStorageToStorage: return "storage_to_storage";
    case Route::kHostToDevice: return "host_to_device";
    case Route::kDeviceToHost: return "device_to_host";
    case Route::kDeviceToDevice: return "device_to_device";
    case Route::kHostToHost: return "host_to_host";
  }
  return "unknown";
}

Route route_of(LocationKind src, LocationKind dst) noexcept {
  using K = LocationKind;
  if (src == K::kStorage) {
    return dst == K::kHost ? Route::kStorageToHost
                           : dst == K::kDevice ? Route::kStorageToDevice : Route::kStorageToStorage;
  }
  if (dst == K::kStorage) return src == K::kHost ? Route::kHostToStorage : Route::kDeviceToStorage;
  if (src == K::kHost) return dst == K::kHost ? Route::kHostToHost : Route::kHostToDevice;
  return dst == K::kHost ? Route::kDeviceToHost : Route::kDeviceToDevice;
}

namespace {

Status check_location(const Location& loc, uint64_t bytes, const std::string& what) {
  if (loc.kind != LocationKind::kStorage) {
    if (loc.ptr == nullptr) return invalid_argument(what + ": null pointer");
    return Status::ok();
  }
  if (loc.device == nullptr) return invalid_argument(what + ": null storage device");
  if (!is_aligned(loc.offset, kIoAlignment)) {
    return invalid_argument(what + ": storage offset " + std::to_string(loc.offset) +
                            " is not 4 KiB-aligned");
  }
  const uint64_t span = align_up(bytes, kIoAlignment);
  if (loc.offset > loc.device->size() || span > loc.device->size() - loc.offset) {
    return invalid_argument(what + ": range past the end of " + loc.device->describe());
  }
  return Status::ok();
}

bool host_readable(LocationKind k, bool device_memory_is_host) noexcept {
  return k == LocationKind::kHost || (k == LocationKind::kDevice && device_memory_is_host);
}

}  // namespace

Result<std::vector<SegmentPlan>> plan_job(const JobSpec& spec, uint64_t chunk_bytes,
                                          bool device_memory_is_host) {
  if (chunk_bytes == 0) return invalid_argument("chunk size 0");
  if (spec.num_layers == 0 && !spec.segments.empty()) return invalid_argument("num_layers is 0");
  std::vector<SegmentPlan> plans;
  plans.reserve(spec.segments.size());
  for (size_t i = 0; i < spec.segments.size(); ++i) {
    const Segment& seg = spec.segments[i];
    const std::string what = "segment " + std::to_string(i);
    if (seg.bytes == 0) return invalid_argument(what + ": 0 bytes");
    if (seg.layer >= spec.num_layers) {
      return invalid_argument(what + ": layer " + std::to_string(seg.layer) + " >= num_layers " +
                              std::to_string(spec.num_layers));
    }
    KVTIER_RETURN_IF_ERROR(check_location(seg.src, seg.bytes, what + " src"));
    KVTIER_RETURN_IF_ERROR(check_location(seg.dst, seg.bytes, what + " dst"));
    SegmentPlan plan;
    plan.segment = seg;
    plan.route = route_of(seg.src.kind, seg.dst.kind);
    plan.chunks = static_cast<uint32_t>((seg.bytes + chunk_bytes - 1) / chunk_bytes);
    if (seg.verify) {
      if (host_readable(seg.dst.kind, device_memory_is_host)) {
        plan.verify_at = VerifyPoint::kDestinationAtEnd;
      } else if (host_readable(seg.src.kind, device_memory_is_host)) {
        plan.verify_at = VerifyPoint::kSourceAtStart;
      } else if (seg.src.kind == LocationKind::kStorage || seg.dst.kind == LocationKind::kStorage) {
        plan.verify_at = VerifyPoint::kStagingInOrder;
      } else {
        return invalid_argument(what + ": verify on a device→device copy (never in host memory)");
      }
    }
    plans.push_back(plan);
  }
  return plans;
}

bool chunk_needs_staging(const SegmentPlan& plan, uint64_t off, uint64_t n) noexcept {
  const Segment& s = plan.segment;
  switch (plan.route) {
    case Route::kStorageToHost:
      return !is_aligned(reinterpret_cast<uintptr_t>(s.dst.ptr + off), kIoAlignment) ||
             !is_aligned(n, kIoAlignment);
    case Route::kHostToStorage:
      return !is_aligned(reinterpret_cast<uintptr_t>(s.src.ptr + off), kIoAlignment) ||
             !is_aligned(n, kIoAlignment);
    case Route::kStorageToDevice:
    case Route::kDeviceToStorage:
    case Route::kStorageToStorage:
      return true;
    default:
      return false;
  }
}

uint64_t xxh3_64_of(const void* data, uint64_t bytes) noexcept { return XXH3_64bits(data, bytes); }

StreamingXxh3::StreamingXxh3() : state_(XXH3_createState()) {
  if (state_ == nullptr) throw std::bad_alloc();
  XXH3_64bits_reset(static_cast<XXH3_state_t*>(state_));
}
StreamingXxh3::~StreamingXxh3() { XXH3_freeState(static_cast<XXH3_state_t*>(state_)); }
void StreamingXxh3::update(const void* data, uint64_t bytes) noexcept {
  XXH3_64bits_update(static_cast<XXH3_state_t*>(state_), data, bytes);
}
uint64_t StreamingXxh3::digest() const noexcept {
  return XXH3_64bits_digest(static_cast<const XXH3_state_t*>(state_));
}

}  // namespace kvtier
