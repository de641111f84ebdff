// Sharing a process's GPU memory with kvtierd, so the daemon loads KV straight into an engine's
// KV cache and saves straight from it: no shared window, no second copy, and KV bytes never cross
// the socket.
//
// The client hands the daemon its own memory (never the other way round: a mapping of the
// daemon's HBM arena would let a client read every tenant's blocks).
//
//   GPU memory          a CUDA IPC handle of the allocation that holds the region, and the
//                       region's offset in it (a tensor of a caching allocator lies inside a larger
//                       cudaMalloc block). The daemon opens it with cudaIpcOpenMemHandle.
//   emulated (no GPU)   memory from DeviceAllocation::create() on a machine without a GPU is a
//                       sealed memfd; the descriptor rides along (SCM_RIGHTS) and the daemon maps
//                       it. So the whole path, but for the CUDA calls, runs in CI.
//
//   client                                             kvtierd
//   export_device_memory(ptr, bytes) ─ DeviceShare ─▶ map_device_memory(share) → MappedDeviceMemory
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvtier/status.h"

namespace kvtier {

enum class ShareKind : uint8_t {
  kCudaIpc = 0,  // cudaIpcMemHandle_t of the allocation + offset
  kMemfd = 1,    // a memfd (passed alongside) + offset: emulated device memory
};

/// What crosses the socket to share one region [offset, offset + bytes) of an allocation.
struct DeviceShare {
  ShareKind kind = ShareKind::kMemfd;
  std::array<std::byte, 64> ipc_handle{};  // kCudaIpc only
  uint64_t offset = 0;  // of the region inside the allocation (kCudaIpc) or the memfd (kMemfd)
  uint64_t bytes = 0;   // the region's length, > 0
  int fd = -1;          // kMemfd: the descriptor to pass; owned by whoever made the share
  uint64_t address = 0; // kCudaIpc: the region's address in the exporting process, which the
                        // importer uses only when it is that process (CUDA refuses to open a
                        // handle where it was made; a daemon embedded in its client's process)
};

/// A memfd of `bytes`, sealed against shrinking and mapped shared here: what a client hands kvtierd
/// as emulated device memory or shared host memory. The caller owns both (munmap, close).
/// kResourceExhausted when it cannot be had.
struct SharedMemfd {
  int fd = -1;
  std::byte* data = nullptr;
};
Result<SharedMemfd> create_shared_memfd(const char* name, uint64_t bytes);

/// Memory a client may register with kvtierd: cudaMalloc on a machine with a GPU, else a sealed
/// memfd mapping that stands in for device memory (see above). Freed on destruction.
class DeviceAllocation {
 public:
  /// kResourceExhausted when the memory cannot be had; bytes must be > 0.
  static Result<DeviceAllocation> create(uint64_t bytes);
  DeviceAllocation() = default;
  DeviceAllocation(DeviceAllocation&& o) noexcept { *this = std::move(o); }
  DeviceAllocation& operator=(DeviceAllocation&& o) noexcept;
  ~DeviceAllocation();

  std::byte* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return bytes_; }
  /// True when data() is CUDA device memory (host code must not dereference it).
  bool is_cuda() const noexcept { return cuda_; }
  /// Copies between host memory and [offset, offset + bytes) of the allocation, whichever kind it
  /// is (cudaMemcpy or memcpy). kInvalidArgument past its end.
  Status write(uint64_t offset, const void* src, uint64_t bytes);
  Status read(uint64_t offset, void* dst, uint64_t bytes) const;

 private:
  std::byte* data_ = nullptr;
  uint64_t bytes_ = 0;
  bool cuda_ = false;
};

/// Client side: how to share [base, base + bytes). CUDA device memory → kCudaIpc (the handle of
/// the allocation holding it); memory of a live emulated DeviceAllocation → kMemfd with its
/// descriptor (still owned by the allocation: do not close it). kInvalidArgument for anything else
/// (pageable host memory, a range that runs past its allocation), naming what was expected.
Result<DeviceShare> export_device_memory(const void* base, uint64_t bytes);

/// Daemon side: a region another process shared, mapped into this one; unmapped on destruction.
class MappedDeviceMemory {
 public:
  virtual ~MappedDeviceMemory() = default;
  /// The region's first byte in this process.
  std::byte* data() const noexcept { return data_; }
  uint64_t size() const noexcept { return bytes_; }
  /// True when data() is CUDA device memory (kCudaIpc); false for a mapped memfd, which is host
  /// memory standing in for a device.
  bool is_cuda() const noexcept { return cuda_; }

 protected:
  MappedDeviceMemory(std::byte* data, uint64_t bytes, bool cuda) : data_(data), bytes_(bytes), cuda_(cuda) {}
  std::byte* data_;
  uint64_t bytes_;
  bool cuda_;
};

/// Maps a share. kMemfd: `share.fd` must be a memfd sealed against shrinking and at least
/// offset + bytes long (the caller keeps and closes the descriptor; the mapping does not need it).
/// kCudaIpc: kUnavailable without a GPU; kInvalidArgument when the region runs past the
/// allocation. Never trusts the share's numbers: every one is checked before use.
/// `same_process`: the share was exported by this very process (the caller knows it from the
/// peer's credentials); a CUDA share then maps to its own address, checked against its allocation.
Result<std::unique_ptr<MappedDeviceMemory>> map_device_memory(const DeviceShare& share, bool same_process = false);

/// Regions mapped by map_device_memory and not yet unmapped, across the process (tests check that
/// a client's disconnect unmaps everything it registered).
uint64_t mapped_device_regions() noexcept;

}  // namespace kvtier
