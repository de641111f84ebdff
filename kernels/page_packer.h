// DevicePagePacker: moves blocks between kvtier's canonical layout and an engine's paged KV that
// lives in device memory, with the pack/unpack kernels.
//
// A kernel reads its block table and layer tensors from device memory and reads canonical blocks
// only where the device can. So the packer hands out lanes: each a stream, a device staging buffer
// for canonical blocks and a device table (layer tensors, slots, pages). A caller takes a lane,
// moves canonical blocks through it and gives it back; lanes are few (default 2) and made on
// first use, so a process that never meets paged device KV allocates nothing.
//
// The steps of a lane (copies, launches, a final sync, all in stream order) are a backend:
//   host  memcpy and the CPU references, where device memory is emulated in host memory (no GPU)
//   CUDA  cudaMemcpyAsync and the kernels on the lane's own stream (kernels/cuda/page_packer_cuda.cpp)
// The chunking, the tables and the lane pool are this file's, so CI runs all of it.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "kernels/page_pack.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

/// One lane's device work, in stream order: copies and launches are queued, sync() waits for all
/// of them. Host memory handed to a copy must stay valid until sync().
class PackLaneBackend {
 public:
  virtual ~PackLaneBackend() = default;
  /// Device memory for canonical blocks, staging_bytes() long, 256-byte aligned.
  virtual std::byte* staging() noexcept = 0;
  virtual uint64_t staging_bytes() const noexcept = 0;
  /// Device memory for one launch's layer tensors, slots and pages, table_bytes() long.
  virtual std::byte* table() noexcept = 0;
  virtual uint64_t table_bytes() const noexcept = 0;
  /// kOk when a kernel of this lane may read and write `p` (`what` names it in the error): the
  /// CUDA lane refuses host memory and another GPU's. Reads no memory.
  [[nodiscard]] virtual Status check_reachable(const void* p, const char* what) {
    (void)p;
    (void)what;
    return Status::ok();
  }
  [[nodiscard]] virtual Status copy_to_device(void* dst, const void* src, uint64_t bytes) = 0;
  [[nodiscard]] virtual Status copy_to_host(void* dst, const void* src, uint64_t bytes) = 0;
  /// `args` point into device memory (arena, layer_base, arena_slots, engine_pages).
  [[nodiscard]] virtual Status launch(const PagePackArgs& args, bool pack) = 0;
  [[nodiscard]] virtual Status sync() = 0;
};

struct PagePackerOptions {
  /// Device staging per lane, in bytes (default 64 MiB). A lane always holds at least one block.
  uint64_t staging_bytes = uint64_t(64) << 20;
  /// Device table per lane, in bytes (default 256 KiB: 32K blocks per launch at 32 layers).
  uint64_t table_bytes = uint64_t(256) << 10;
  /// Most lanes at once (default 2); acquire() waits while all are taken.
  uint32_t max_lanes = 2;
  /// CUDA device ordinal of a CUDA packer (default 0).
  int device = 0;
};

/// Makes one lane's backend: (staging bytes, table bytes) → backend.
using PackLaneFactory = std::function<Result<std::unique_ptr<PackLaneBackend>>(uint64_t, uint64_t)>;

class DevicePagePacker {
 public:
  DevicePagePacker(PackLaneFactory factory, PagePackerOptions options);
  DevicePagePacker(const DevicePagePacker&) = delete;
  DevicePagePacker& operator=(const DevicePagePacker&) = delete;

  /// A lane held by one caller; given back to the packer when destroyed. A lane whose work failed
  /// is dropped rather than reused (a CUDA error may have left its stream unusable).
  class Lane {
   public:
    Lane(Lane&& other) noexcept;
    Lane& operator=(Lane&&) = delete;
    ~Lane();

    /// Canonical blocks the caller may write itself (a tier load into device memory) before
    /// unpack_device().
    std::byte* staging() noexcept { return backend_->staging(); }
    uint64_t staging_bytes() const noexcept { return backend_->staging_bytes(); }

    /// Engine pages ← canonical blocks already in device memory (`args.arena`: this lane's
    /// staging, or any device arena). Table arrays in `args` are host memory. Waits.
    [[nodiscard]] Status unpack_device(const PagePackArgs& args);
    /// Canonical blocks in device memory (`args.arena`: this lane's staging, or any device arena)
    /// ← engine pages: the pack kernel alone, no copy. Table arrays in `args` are host memory. Waits.
    [[nodiscard]] Status pack_device(const PagePackArgs& args);
    /// Engine pages ← canonical blocks in host memory (`args.arena`), through staging in pieces.
    /// Only `args`' layer range is copied. Waits.
    [[nodiscard]] Status unpack_from_host(const PagePackArgs& args);
    /// Canonical blocks in host memory (`args.arena`) ← engine pages, through staging in pieces.
    /// Only `args`' layer range is written. Waits.
    [[nodiscard]] Status pack_to_host(const PagePackArgs& args);

   private:
    friend class DevicePagePacker;
    Lane(DevicePagePacker* owner, std::unique_ptr<PackLaneBackend> backend) noexcept
        : owner_(owner), backend_(std::move(backend)) {}
    struct TableLayout;
    Status in_device(const PagePackArgs& args, bool pack);
    Status staged(const PagePackArgs& args, bool pack);
    /// Writes launch k's table (layer tensors, then `count` slots and pages) into its piece of
    /// host_table_, queues its copy to the device table and points `a` at it.
    Status queue_table(const TableLayout& t, uint64_t k, void* const* layer_base, const int32_t* slots,
                       const int32_t* pages, uint32_t count, PagePackArgs& a);
    Status check_tensors(const PagePackArgs& args);
    Status fail(Status s);

    DevicePagePacker* owner_;
    std::unique_ptr<PackLaneBackend> backend_;
    bool failed_ = false;
    std::vector<std::byte> host_table_;  // what the device table gets, alive until sync()
  };

  /// Takes a free lane, making one when fewer than max_lanes exist; waits while all are taken.
  /// A failure to make one (no device memory) is returned.
  [[nodiscard]] Result<Lane> acquire();

  /// Lanes made so far and not dropped (for tests and metrics).
  uint32_t lanes() const;
  /// Callers waiting in acquire() for a lane (for tests and metrics).
  uint32_t waiters() const;

 private:
  void give_back(std::unique_ptr<PackLaneBackend> backend, bool failed);

  PackLaneFactory factory_;
  PagePackerOptions options_;
  mutable std::mutex mu_;
  std::condition_variable freed_;
  std::vector<std::unique_ptr<PackLaneBackend>> idle_;
  uint32_t made_ = 0;  // lanes in idle_ or held
  uint32_t waiting_ = 0;
};

/// Lanes in host memory running the CPU references: for device memory that is emulated in host
/// memory (a machine without a GPU).
std::unique_ptr<PackLaneBackend> make_host_pack_lane(uint64_t staging_bytes, uint64_t table_bytes);
std::unique_ptr<DevicePagePacker> create_host_page_packer(const PagePackerOptions& options = {});
/// Lanes of cudaMalloc'd staging and tables on their own non-blocking streams, running the CUDA
/// kernels on device `options.device`. Defined in kvtier_kernels_cuda (builds with CUDA only).
/// Makes no lane yet, so it succeeds without a GPU; acquire() then fails with kUnavailable.
std::unique_ptr<DevicePagePacker> create_cuda_page_packer(const PagePackerOptions& options = {});

}  // namespace kvtier::kernels
