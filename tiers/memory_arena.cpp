#include "tiers/memory_arena.h"

#include <spdlog/spdlog.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

#include "api/vocab/byte_size.h"
#include "tiers/device_probe.h"
#include "tiers/storage_device.h"

#ifdef KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {

namespace {

std::atomic<uint64_t> g_outstanding{0};

Status check_shape(uint64_t slot_bytes, uint64_t slots, const char* what) {
  if (slot_bytes == 0 || slots == 0) {
    return invalid_argument(std::string(what) + ": slot_bytes and slots must be > 0");
  }
  const uint64_t rounded = align_up(slot_bytes, kIoAlignment);
  if (slots > (uint64_t(1) << 62) / rounded) {
    return invalid_argument(std::string(what) + ": slot_bytes × slots overflows");
  }
  return Status::ok();
}

/// Host memory from mmap: anonymous, or a memfd another process can map.
class HostArena final : public MemoryArena {
 public:
  HostArena(ArenaKind kind, std::byte* base, uint64_t slot_bytes, uint64_t slots, int memfd,
            bool cuda_registered, bool mlocked, bool huge)
      : MemoryArena(kind, base, slot_bytes, slots),
        memfd_(memfd),
        cuda_registered_(cuda_registered),
        mlocked_(mlocked),
        huge_(huge) {
    g_outstanding += size_bytes();
  }
  ~HostArena() override {
#ifdef KVTIER_WITH_CUDA
    if (cuda_registered_) (void)cudaHostUnregister(base_);
#endif
    if (mlocked_) munlock(base_, size_bytes());
    munmap(base_, size_bytes());
    if (memfd_ >= 0) close(memfd_);
    g_outstanding -= size_bytes();
  }
  int memfd() const noexcept override { return memfd_; }
  std::string describe() const override {
    std::string s = MemoryArena::describe();
    s += cuda_registered_ ? ", pinned (cudaHostRegister)" : mlocked_ ? ", pinned (mlock)" : ", pageable";
    if (huge_) s += ", huge pages requested";
    if (memfd_ >= 0) s += ", memfd-shared";
    return s;
  }

 private:
  int memfd_;
  bool cuda_registered_, mlocked_, huge_;
};

/// Host memory standing in for HBM when there is no GPU.
class EmulatedHbmArena final : public MemoryArena {
 public:
  EmulatedHbmArena(std::byte* base, uint64_t slot_bytes, uint64_t slots)
      : MemoryArena(ArenaKind::kHbmEmulated, base, slot_bytes, slots) {
    g_outstanding += size_bytes();
  }
  ~EmulatedHbmArena() override {
    munmap(base_, size_bytes());
    g_outstanding -= size_bytes();
  }
};

#ifdef KVTIER_WITH_CUDA
class CudaHbmArena final : public MemoryArena {
 public:
  CudaHbmArena(std::byte* base, uint64_t slot_bytes, uint64_t slots, int device)
      : MemoryArena(ArenaKind::kHbmCuda, base, slot_bytes, slots), device_(device) {
    g_outstanding += size_bytes();
  }
  ~CudaHbmArena() override {
    int prev = 0;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(device_);
    (void)cudaFree(base_);
    (void)cudaSetDevice(prev);
    g_outstanding -= size_bytes();
  }
  Result<IpcHandle> export_ipc() const override {
    cudaIpcMemHandle_t h;
    if (cudaError_t e = cudaIpcGetMemHandle(&h, base_); e != cudaSuccess) {
      return Status(StatusCode::kUnavailable, std::string("cudaIpcGetMemHandle: ") + cudaGetErrorString(e));
    }
    IpcHandle out;
    static_assert(sizeof(h) == sizeof(out.bytes));
    std::memcpy(out.bytes.data(), &h, sizeof h);
    return out;
  }
  std::string describe() const override {
    return MemoryArena::describe() + ", CUDA device " + std::to_string(device_);
  }

 private:
  int device_;
};
#endif

Result<std::byte*> map_anonymous(uint64_t bytes, int fd) {
  int flags = fd >= 0 ? MAP_SHARED : (MAP_PRIVATE | MAP_ANONYMOUS);
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, flags, fd, 0);
  if (p == MAP_FAILED) {
    return Status(StatusCode::kResourceExhausted,
                  "mmap of " + format_bytes(bytes) + " failed: " + std::strerror(errno));
  }
  return static_cast<std::byte*>(p);
}

}  // namespace

uint64_t arena_bytes_outstanding() noexcept { return g_outstanding.load(); }

std::string_view arena_kind_name(ArenaKind kind) noexcept {
  switch (kind) {
    case ArenaKind::kHostPinned: return "host-pinned";
    case ArenaKind::kHostPageable: return "host-pageable";
    case ArenaKind::kHbmCuda: return "hbm-cuda";
    case ArenaKind::kHbmEmulated: return "hbm-emulated";
  }
  return "unknown";
}

Result<IpcHandle> MemoryArena::export_ipc() const {
  return Status(StatusCode::kUnavailable,
                std::string("CUDA IPC needs a CUDA HBM arena; this one is ") +
                    std::string(arena_kind_name(kind_)));
}

std::string MemoryArena::describe() const {
  return std::string(arena_kind_name(kind_)) + " arena " + format_bytes(size_bytes()) + ", " +
         std::to_string(slots_) + " × " + format_bytes(slot_bytes_) + " slots";
}

Result<std::unique_ptr<MemoryArena>> create_host_arena(const HostArenaOptions& options) {
  KVTIER_RETURN_IF_ERROR(check_shape(options.slot_bytes, options.slots, "host arena"));
  const uint64_t slot_bytes = align_up(options.slot_bytes, kIoAlignment);
  const uint64_t bytes = slot_bytes * options.slots;

  int fd = -1;
  if (options.shared) {
    fd = memfd_create("kvtier-host-arena", MFD_CLOEXEC);
    if (fd < 0) return Status(StatusCode::kUnavailable, std::string("memfd_create: ") + std::strerror(errno));
    if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
      int e = errno;
      close(fd);
      return Status(StatusCode::kResourceExhausted,
                    "sizing the shared host arena to " + format_bytes(bytes) + ": " + std::strerror(e));
    }
  }
  auto mapped = map_anonymous(bytes, fd);
  if (!mapped) {
    if (fd >= 0) close(fd);
    return mapped.status();
  }
  std::byte* base = *mapped;
  bool huge = false;
  if (options.huge_pages && madvise(base, bytes, MADV_HUGEPAGE) == 0) huge = true;

  bool cuda_registered = false, mlocked = false;
  if (options.lock) {
#ifdef KVTIER_WITH_CUDA
    if (probe_devices().has_gpu()) {
      cudaError_t e = cudaHostRegister(base, bytes, cudaHostRegisterPortable);
      if (e == cudaSuccess) {
        cuda_registered = true;
      } else {
        (void)cudaGetLastError();
        spdlog::warn("kvtier: cudaHostRegister of the host arena failed ({}); trying mlock",
                     cudaGetErrorString(e));
      }
    }
#endif
    if (!cuda_registered) {
      if (mlock(base, bytes) == 0) {
        mlocked = true;
      } else {
        spdlog::warn("kvtier: host arena of {} stays pageable: mlock failed ({}); raise "
                     "RLIMIT_MEMLOCK (ulimit -l) to pin it",
                     format_bytes(bytes), std::strerror(errno));
      }
    }
  }
  const ArenaKind kind = (cuda_registered || mlocked) ? ArenaKind::kHostPinned : ArenaKind::kHostPageable;
  return std::unique_ptr<MemoryArena>(
      new HostArena(kind, base, slot_bytes, options.slots, fd, cuda_registered, mlocked, huge));
}

Result<std::unique_ptr<MemoryArena>> create_hbm_arena(const HbmArenaOptions& options) {
  KVTIER_RETURN_IF_ERROR(check_shape(options.slot_bytes, options.slots, "HBM arena"));
  const uint64_t slot_bytes = align_up(options.slot_bytes, kIoAlignment);
  const uint64_t bytes = slot_bytes * options.slots;
  const DeviceProbe& probe = probe_devices();
#ifdef KVTIER_WITH_CUDA
  if (probe.has_gpu()) {
    if (options.device < 0 || options.device >= static_cast<int>(probe.gpus.size())) {
      return invalid_argument("HBM arena: CUDA device " + std::to_string(options.device) +
                              " does not exist (" + std::to_string(probe.gpus.size()) + " found)");
    }
    int prev = 0;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(options.device);
    void* p = nullptr;
    cudaError_t e = cudaMalloc(&p, bytes);
    (void)cudaSetDevice(prev);
    if (e != cudaSuccess) {
      (void)cudaGetLastError();
      return Status(StatusCode::kResourceExhausted,
                    "cudaMalloc of " + format_bytes(bytes) + " for the HBM arena: " + cudaGetErrorString(e));
    }
    return std::unique_ptr<MemoryArena>(
        new CudaHbmArena(static_cast<std::byte*>(p), slot_bytes, options.slots, options.device));
  }
#endif
  if (!options.allow_emulated) {
    return Status(StatusCode::kUnavailable, "HBM arena: no GPU (" + probe.reason +
                                                ") and the emulated arena is not allowed");
  }
  auto mapped = map_anonymous(bytes, -1);
  if (!mapped) return mapped.status();
  spdlog::info("kvtier: HBM tier is emulated in host memory ({}): {}", probe.reason, format_bytes(bytes));
  return std::unique_ptr<MemoryArena>(new EmulatedHbmArena(*mapped, slot_bytes, options.slots));
}

}  // namespace kvtier
