#include "transfer/shared_device_memory.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "tiers/device_probe.h"

#ifdef KVTIER_WITH_CUDA
#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>
#endif

namespace kvtier {

namespace {

std::atomic<uint64_t> g_mapped{0};

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

// The emulated allocations of this process (DeviceAllocation without a GPU): base → size and memfd.
struct Emulated {
  uint64_t bytes = 0;
  int fd = -1;
};
std::mutex g_emulated_mu;
std::map<uintptr_t, Emulated>& emulated() {
  static std::map<uintptr_t, Emulated> m;
  return m;
}

#ifdef KVTIER_WITH_CUDA
Status cuda_error(const char* what, cudaError_t e) {
  return Status(StatusCode::kUnavailable, std::string(what) + ": " + cudaGetErrorString(e));
}

// cuMemGetAddressRange through the runtime's driver entry point: no link against libcuda, so the
// binaries still start on machines without the driver.
Result<std::pair<uintptr_t, uint64_t>> allocation_range(const void* p) {
  static PFN_cuMemGetAddressRange_v3020 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      f = nullptr;
    }
    return reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(f);
  }();
  if (!fn) return Status(StatusCode::kUnavailable, "the CUDA driver has no cuMemGetAddressRange");
  CUdeviceptr base = 0;
  size_t size = 0;
  if (CUresult r = fn(&base, &size, static_cast<CUdeviceptr>(reinterpret_cast<uintptr_t>(p))); r != CUDA_SUCCESS) {
    return invalid_argument("cuMemGetAddressRange(" + hex(p) + ") failed with CUDA error " + std::to_string(int(r)));
  }
  return std::pair<uintptr_t, uint64_t>{static_cast<uintptr_t>(base), static_cast<uint64_t>(size)};
}

// CUDA maps one IPC handle once per process: a second cudaIpcOpenMemHandle of the same handle
// fails. Regions of one allocation (a client registering per-layer tensors of one cudaMalloc
// block) share one mapping, counted.
struct IpcMapping {
  std::byte* base = nullptr;
  uint64_t bytes = 0;
  int refs = 0;
};
std::mutex g_ipc_mu;
std::map<std::array<std::byte, 64>, IpcMapping>& ipc_mappings() {
  static std::map<std::array<std::byte, 64>, IpcMapping> m;
  return m;
}

class MappedIpc final : public MappedDeviceMemory {
 public:
  MappedIpc(std::byte* data, uint64_t bytes, std::array<std::byte, 64> handle)
      : MappedDeviceMemory(data, bytes, true), handle_(handle) {
    ++g_mapped;
  }
  ~MappedIpc() override {
    std::lock_guard lock(g_ipc_mu);
    auto it = ipc_mappings().find(handle_);
    if (it != ipc_mappings().end() && --it->second.refs == 0) {
      (void)cudaIpcCloseMemHandle(it->second.base);
      ipc_mappings().erase(it);
    }
    --g_mapped;
  }

 private:
  std::array<std::byte, 64> handle_;
};

// The region in this process's own memory: nothing to open or close.
class MappedOwn final : public MappedDeviceMemory {
 public:
  MappedOwn(std::byte* data, uint64_t bytes) : MappedDeviceMemory(data, bytes, true) { ++g_mapped; }
  ~MappedOwn() override { --g_mapped; }
};

Result<std::unique_ptr<MappedDeviceMemory>> map_ipc(const DeviceShare& share, bool same_process) {
  if (!probe_devices().has_gpu()) {
    return Status(StatusCode::kUnavailable, "a CUDA IPC handle needs a GPU, and this kvtierd has none");
  }
  if (same_process) {
    const auto* p = reinterpret_cast<const std::byte*>(static_cast<uintptr_t>(share.address));
    auto range = allocation_range(p);
    if (!range) return range.status();
    const uint64_t off = reinterpret_cast<uintptr_t>(p) - range->first;
    if (share.offset != off || share.bytes > range->second - off) {
      return invalid_argument("the shared region does not match its CUDA allocation in this process");
    }
    return std::unique_ptr<MappedDeviceMemory>(new MappedOwn(const_cast<std::byte*>(p), share.bytes));
  }
  std::lock_guard lock(g_ipc_mu);
  auto& maps = ipc_mappings();
  auto it = maps.find(share.ipc_handle);
  if (it == maps.end()) {
    cudaIpcMemHandle_t h;
    static_assert(sizeof h == sizeof share.ipc_handle);
    std::memcpy(&h, share.ipc_handle.data(), sizeof h);
    void* p = nullptr;
    if (cudaError_t e = cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
      return cuda_error("cudaIpcOpenMemHandle", e);
    }
    auto range = allocation_range(p);
    if (!range) {
      (void)cudaIpcCloseMemHandle(p);
      return range.status();
    }
    it = maps.emplace(share.ipc_handle, IpcMapping{static_cast<std::byte*>(p), range->second, 0}).first;
  }
  IpcMapping& m = it->second;
  if (share.offset > m.bytes || share.bytes > m.bytes - share.offset) {
    if (m.refs == 0) {
      (void)cudaIpcCloseMemHandle(m.base);
      maps.erase(it);
    }
    return invalid_argument("the shared region [" + std::to_string(share.offset) + ", +" + std::to_string(share.bytes) +
                   ") runs past its " + std::to_string(m.bytes) + "-byte CUDA allocation");
  }
  ++m.refs;
  return std::unique_ptr<MappedDeviceMemory>(new MappedIpc(m.base + share.offset, share.bytes, share.ipc_handle));
}
#endif

class MappedMemfd final : public MappedDeviceMemory {
 public:
  MappedMemfd(std::byte* data, uint64_t bytes, void* map, size_t map_bytes)
      : MappedDeviceMemory(data, bytes, false), map_(map), map_bytes_(map_bytes) {
    ++g_mapped;
  }
  ~MappedMemfd() override {
    ::munmap(map_, map_bytes_);
    --g_mapped;
  }

 private:
  void* map_;
  size_t map_bytes_;
};

Result<std::unique_ptr<MappedDeviceMemory>> map_memfd(const DeviceShare& share) {
  if (share.fd < 0) return invalid_argument("a memfd share came without its descriptor");
  struct stat st {};
  if (::fstat(share.fd, &st) != 0 || !S_ISREG(st.st_mode)) return invalid_argument("the shared descriptor is not a memory file");
  const int seals = ::fcntl(share.fd, F_GET_SEALS);
  // Only a file its owner cannot shrink: a truncated file would make this process's copies fault.
  if (seals < 0 || !(seals & F_SEAL_SHRINK)) return invalid_argument("the shared memory must be a memfd sealed with F_SEAL_SHRINK");
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (share.offset > file_bytes || share.bytes > file_bytes - share.offset) {
    return invalid_argument("the shared region [" + std::to_string(share.offset) + ", +" + std::to_string(share.bytes) +
                   ") runs past the " + std::to_string(file_bytes) + "-byte memory file");
  }
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t start = share.offset / page * page;
  const size_t map_bytes = static_cast<size_t>(share.offset - start + share.bytes);
  // MAP_POPULATE: the page tables are filled here, at registration, not by page faults during the
  // first load into the region (which ran at a third of the later loads' speed).
  void* p = ::mmap(nullptr, map_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, share.fd,
                   static_cast<off_t>(start));
  if (p == MAP_FAILED) {
    return Status(StatusCode::kResourceExhausted, std::string("cannot map the shared region: ") + std::strerror(errno));
  }
  auto* data = static_cast<std::byte*>(p) + (share.offset - start);
  return std::unique_ptr<MappedDeviceMemory>(new MappedMemfd(data, share.bytes, p, map_bytes));
}

}  // namespace

Result<SharedMemfd> create_shared_memfd(const char* name, uint64_t bytes) {
  if (bytes == 0) return invalid_argument("shared memory needs at least one byte");
  const int fd = ::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0) return Status(StatusCode::kResourceExhausted, std::string("memfd_create: ") + std::strerror(errno));
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0 || ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
    const int err = errno;
    ::close(fd);
    return Status(StatusCode::kResourceExhausted, std::string("sizing shared memory (") + name + "): " + std::strerror(err));
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::close(fd);
    return Status(StatusCode::kResourceExhausted, std::string("mmap of shared memory (") + name + "): " + std::strerror(err));
  }
  return SharedMemfd{.fd = fd, .data = static_cast<std::byte*>(p)};
}

Result<DeviceAllocation> DeviceAllocation::create(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("a device allocation needs at least one byte");
  DeviceAllocation a;
#ifdef KVTIER_WITH_CUDA
  if (probe_devices().has_gpu()) {
    void* p = nullptr;
    if (cudaError_t e = cudaMalloc(&p, bytes); e != cudaSuccess) {
      return Status(StatusCode::kResourceExhausted, std::string("cudaMalloc: ") + cudaGetErrorString(e));
    }
    a.data_ = static_cast<std::byte*>(p);
    a.bytes_ = bytes;
    a.cuda_ = true;
    return a;
  }
#endif
  auto m = create_shared_memfd("kvtier-device", bytes);
  if (!m) return m.status();
  const int fd = m->fd;
  void* p = m->data;
  a.data_ = static_cast<std::byte*>(p);
  a.bytes_ = bytes;
  std::lock_guard lock(g_emulated_mu);
  emulated()[reinterpret_cast<uintptr_t>(p)] = Emulated{bytes, fd};
  return a;
}

DeviceAllocation& DeviceAllocation::operator=(DeviceAllocation&& o) noexcept {
  if (this != &o) {
    this->~DeviceAllocation();
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    cuda_ = std::exchange(o.cuda_, false);
  }
  return *this;
}

DeviceAllocation::~DeviceAllocation() {
  if (!data_) return;
#ifdef KVTIER_WITH_CUDA
  if (cuda_) {
    (void)cudaFree(data_);
    data_ = nullptr;
    return;
  }
#endif
  int fd = -1;
  {
    std::lock_guard lock(g_emulated_mu);
    auto it = emulated().find(reinterpret_cast<uintptr_t>(data_));
    if (it != emulated().end()) {
      fd = it->second.fd;
      emulated().erase(it);
    }
  }
  ::munmap(data_, bytes_);
  if (fd >= 0) ::close(fd);
  data_ = nullptr;
}

Status DeviceAllocation::write(uint64_t offset, const void* src, uint64_t bytes) {
  if (offset > bytes_ || bytes > bytes_ - offset) return invalid_argument("write past the end of the device allocation");
#ifdef KVTIER_WITH_CUDA
  if (cuda_) {
    if (cudaError_t e = cudaMemcpy(data_ + offset, src, bytes, cudaMemcpyHostToDevice); e != cudaSuccess) {
      return cuda_error("cudaMemcpy", e);
    }
    return Status::ok();
  }
#endif
  std::memcpy(data_ + offset, src, bytes);
  return Status::ok();
}

Status DeviceAllocation::read(uint64_t offset, void* dst, uint64_t bytes) const {
  if (offset > bytes_ || bytes > bytes_ - offset) return invalid_argument("read past the end of the device allocation");
#ifdef KVTIER_WITH_CUDA
  if (cuda_) {
    if (cudaError_t e = cudaMemcpy(dst, data_ + offset, bytes, cudaMemcpyDeviceToHost); e != cudaSuccess) {
      return cuda_error("cudaMemcpy", e);
    }
    return Status::ok();
  }
#endif
  std::memcpy(dst, data_ + offset, bytes);
  return Status::ok();
}

Result<DeviceShare> export_device_memory(const void* base, uint64_t bytes) {
  if (!base || bytes == 0) return invalid_argument("share a non-empty region");
  const auto p = reinterpret_cast<uintptr_t>(base);
  {
    std::lock_guard lock(g_emulated_mu);
    auto it = emulated().upper_bound(p);
    if (it != emulated().begin()) {
      --it;
      const uint64_t off = p - it->first;
      if (off < it->second.bytes) {
        if (bytes > it->second.bytes - off) {
          return invalid_argument("the region [" + hex(base) + ", +" + std::to_string(bytes) + ") runs past its " +
                         std::to_string(it->second.bytes) + "-byte DeviceAllocation");
        }
        return DeviceShare{.kind = ShareKind::kMemfd, .offset = off, .bytes = bytes, .fd = it->second.fd};
      }
    }
  }
#ifdef KVTIER_WITH_CUDA
  if (probe_devices().has_gpu()) {
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, base) == cudaSuccess && attr.type == cudaMemoryTypeDevice) {
      auto range = allocation_range(base);
      if (!range) return range.status();
      const auto [alloc, alloc_bytes] = *range;
      const uint64_t off = p - alloc;
      if (bytes > alloc_bytes - off) {
        return invalid_argument("the region [" + hex(base) + ", +" + std::to_string(bytes) + ") runs past its " +
                       std::to_string(alloc_bytes) + "-byte CUDA allocation");
      }
      cudaIpcMemHandle_t h;
      if (cudaError_t e = cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(alloc)); e != cudaSuccess) {
        return cuda_error("cudaIpcGetMemHandle", e);
      }
      DeviceShare s{.kind = ShareKind::kCudaIpc, .offset = off, .bytes = bytes, .address = p};
      std::memcpy(s.ipc_handle.data(), &h, sizeof h);
      return s;
    }
    (void)cudaGetLastError();  // a host pointer is not an error worth keeping
  }
#endif
  return invalid_argument("memory at " + hex(base) +
                 " cannot be shared: register CUDA device memory (cudaMalloc, a CUDA tensor) or, on a machine "
                 "without a GPU, memory from kvtier::DeviceAllocation::create");
}

Result<std::unique_ptr<MappedDeviceMemory>> map_device_memory(const DeviceShare& share, bool same_process) {
  if (share.bytes == 0) return invalid_argument("a shared region must not be empty");
  switch (share.kind) {
    case ShareKind::kMemfd: return map_memfd(share);
    case ShareKind::kCudaIpc:
#ifdef KVTIER_WITH_CUDA
      return map_ipc(share, same_process);
#else
      (void)same_process;
      return Status(StatusCode::kUnavailable, "a CUDA IPC handle needs a GPU, and this kvtierd was built without CUDA");
#endif
  }
  return invalid_argument("unknown share kind");
}

uint64_t mapped_device_regions() noexcept { return g_mapped.load(); }

}  // namespace kvtier
