// MemoryArena: one contiguous region sliced into equal block slots — the host tier (pinned host
// DRAM) and the HBM tier (device memory). Without a GPU the HBM tier is an emulated arena in host
// memory behind the same interface, chosen at run time and named in logs and stats.
//
// Slot addresses are kIoAlignment-aligned (slot_bytes is rounded up to 4 KiB) so an I/O engine
// can read from NVMe straight into a host slot with O_DIRECT.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "kvtier/status.h"
#include "kvtier/tier.h"

namespace kvtier {

enum class ArenaKind : uint8_t {
  kHostPinned,   // host DRAM, page-locked (cudaHostRegister, or mlock without a GPU)
  kHostPageable, // host DRAM that could not be locked (RLIMIT_MEMLOCK): works, slower DMA
  kHbmCuda,      // device memory from cudaMalloc
  kHbmEmulated,  // host memory standing in for HBM on a machine without a GPU
};
std::string_view arena_kind_name(ArenaKind kind) noexcept;

/// A CUDA IPC memory handle (cudaIpcMemHandle_t's 64 bytes), for another process to map the arena.
struct IpcHandle {
  std::array<std::byte, 64> bytes{};
};

class MemoryArena {
 public:
  virtual ~MemoryArena() = default;
  MemoryArena(const MemoryArena&) = delete;
  MemoryArena& operator=(const MemoryArena&) = delete;

  ArenaKind kind() const noexcept { return kind_; }
  /// True when slot pointers are CUDA device pointers (only kHbmCuda); host code must not
  /// dereference them.
  bool is_device_memory() const noexcept { return kind_ == ArenaKind::kHbmCuda; }
  /// True for the two HBM kinds.
  bool is_hbm() const noexcept { return kind_ == ArenaKind::kHbmCuda || kind_ == ArenaKind::kHbmEmulated; }

  std::byte* base() const noexcept { return base_; }
  uint64_t slot_bytes() const noexcept { return slot_bytes_; }
  uint64_t slots() const noexcept { return slots_; }
  uint64_t size_bytes() const noexcept { return slot_bytes_ * slots_; }
  /// The slot's first byte. The caller checks slot < slots().
  std::byte* slot_ptr(SlotId slot) const noexcept { return base_ + slot * slot_bytes_; }

  /// The memfd backing a shared host arena (another process maps it), or -1.
  virtual int memfd() const noexcept { return -1; }
  /// The CUDA IPC handle of a kHbmCuda arena; kUnavailable for every other kind.
  virtual Result<IpcHandle> export_ipc() const;
  /// "host arena 4.00 GiB, 1024 × 4.00 MiB slots, pinned (mlock), memfd".
  virtual std::string describe() const;

 protected:
  MemoryArena(ArenaKind kind, std::byte* base, uint64_t slot_bytes, uint64_t slots)
      : kind_(kind), base_(base), slot_bytes_(slot_bytes), slots_(slots) {}
  ArenaKind kind_;
  std::byte* base_;
  uint64_t slot_bytes_;
  uint64_t slots_;
};

struct HostArenaOptions {
  /// Bytes per slot, rounded up to 4 KiB; required (> 0).
  uint64_t slot_bytes = 0;
  /// Number of slots; required (> 0).
  uint64_t slots = 0;
  /// Back the arena with a memfd so another process can map the same bytes (default false).
  bool shared = false;
  /// Page-lock the arena: cudaHostRegister when a GPU is present, else mlock (default true).
  /// When locking is refused the arena is kHostPageable and the log says why.
  bool lock = true;
  /// Ask for transparent huge pages (default true; ignored where unsupported).
  bool huge_pages = true;
};
Result<std::unique_ptr<MemoryArena>> create_host_arena(const HostArenaOptions& options);

struct HbmArenaOptions {
  uint64_t slot_bytes = 0;  // required; rounded up to 4 KiB
  uint64_t slots = 0;       // required
  int device = 0;           // CUDA device ordinal (default 0)
  /// Use an emulated arena in host memory when no GPU is present (default true). When false and
  /// there is no GPU, kUnavailable.
  bool allow_emulated = true;
};
/// kHbmCuda when a GPU is present, else kHbmEmulated (logged once).
Result<std::unique_ptr<MemoryArena>> create_hbm_arena(const HbmArenaOptions& options);

}  // namespace kvtier

namespace kvtier {
/// Bytes of arena memory currently page-locked (or device-allocated) by live arenas, across the
/// process: returns to zero once every arena is destroyed (tests check that nothing leaks).
uint64_t arena_bytes_outstanding() noexcept;
}  // namespace kvtier
