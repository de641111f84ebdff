// CopyEngine: asynchronous memory copies between host memory and the HBM arena.
//
//   HostCopyEngine  worker threads doing memcpy; used when there is no GPU, where the emulated HBM
//                   arena is host memory (transfer/host_copy_engine.h)
//   CudaCopyEngine  cudaMemcpyAsync on its own non-blocking streams, completion via events polled
//                   by one thread; host memory must be page-locked (transfer/cuda_copy_engine.h,
//                   built only with KVTIER_WITH_CUDA)
// create_copy_engine() picks CUDA when probe_devices().has_gpu(), else host, and logs which.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>

#include "kvtier/status.h"

namespace kvtier {

enum class CopyDirection : uint8_t { kHostToHost, kHostToDevice, kDeviceToHost, kDeviceToDevice };
std::string_view copy_direction_name(CopyDirection d) noexcept;

/// Runs once when the copy has finished (ok) or failed (kInternal/kUnavailable with the CUDA text).
using CopyCallback = std::function<void(const Status&)>;

struct CopyEngineOptions {
  /// Host engine: memcpy worker threads (default 0: auto, 2, or 1 on a 1-CPU machine). CUDA
  /// engine: streams per direction (0 or 1 → 2 streams, one per direction).
  uint32_t threads = 0;
  /// Most copies queued or in flight; submit() blocks while this many are (default 64).
  uint32_t queue_depth = 64;
  /// CUDA device ordinal (default 0).
  int device = 0;
};

class CopyEngine {
 public:
  virtual ~CopyEngine() = default;
  CopyEngine(const CopyEngine&) = delete;
  CopyEngine& operator=(const CopyEngine&) = delete;

  /// Queues a copy of `bytes` from `src` to `dst`; `done` runs exactly once on an engine thread.
  /// Blocks while queue_depth copies are outstanding. kInvalidArgument (null pointer) or
  /// kUnavailable (shut down) without calling `done`. `done` must not submit to this engine.
  [[nodiscard]] virtual Status submit(void* dst, const void* src, uint64_t bytes, CopyDirection direction,
                                      CopyCallback done) = 0;

  /// Blocks until no copy is outstanding.
  virtual void drain() = 0;

  /// True when "device" pointers are plain host memory the CPU may read (the host engine with the
  /// emulated HBM arena): the transfer engine can then checksum bytes in HBM.
  virtual bool device_memory_is_host() const noexcept = 0;

  /// Page-locks a host region for DMA (cudaHostRegister) when the engine needs it; a no-op for the
  /// host engine. The region must outlive the engine or be unregistered first.
  [[nodiscard]] virtual Status register_host_memory(void* base, size_t bytes) = 0;
  virtual void unregister_host_memory(void* base) noexcept = 0;

  /// "host memcpy (1 thread)" or "cuda (device 0, 2 streams)".
  virtual std::string describe() const = 0;

 protected:
  CopyEngine() = default;
};

/// The host engine: always available.
std::unique_ptr<CopyEngine> create_host_copy_engine(const CopyEngineOptions& options = {});
/// The CUDA engine: kUnavailable without a GPU or without CUDA in the build.
Result<std::unique_ptr<CopyEngine>> create_cuda_copy_engine(const CopyEngineOptions& options = {});
/// CUDA when probe_devices().has_gpu(), else host; logs (spdlog::info) which one runs.
Result<std::unique_ptr<CopyEngine>> create_copy_engine(const CopyEngineOptions& options = {});

}  // namespace kvtier
