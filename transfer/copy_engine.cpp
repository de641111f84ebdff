#include "transfer/copy_engine.h"

#include <algorithm>
#include <thread>

#include <spdlog/spdlog.h>

#include "tiers/device_probe.h"
#include "transfer/host_copy_engine.h"

namespace kvtier {

std::string_view copy_direction_name(CopyDirection d) noexcept {
  switch (d) {
    case CopyDirection::kHostToHost: return "host_to_host";
    case CopyDirection::kHostToDevice: return "host_to_device";
    case CopyDirection::kDeviceToHost: return "device_to_host";
    case CopyDirection::kDeviceToDevice: return "device_to_device";
  }
  return "unknown";
}

std::unique_ptr<CopyEngine> create_host_copy_engine(const CopyEngineOptions& options) {
  // Auto: two workers (one CPU on a 1-CPU machine). A copy is queued per block layer, so one worker
  // spends much of a load waking up between memcpys; a second overlaps that (Store::load of 128 MiB
  // went from 0.64 to 1.07 of one memcpy's time on the 2-vCPU VM, kvtier_bench_service layered).
  const uint32_t threads = options.threads != 0
                               ? options.threads
                               : std::clamp<uint32_t>(std::thread::hardware_concurrency(), 1, 2);
  return std::make_unique<HostCopyEngine>(threads, options.queue_depth);
}

Result<std::unique_ptr<CopyEngine>> create_copy_engine(const CopyEngineOptions& options) {
  if (probe_devices().has_gpu()) {
    auto cuda = create_cuda_copy_engine(options);
    if (cuda) {
      spdlog::info("kvtier transfer: copy engine {}", (*cuda)->describe());
      return cuda;
    }
    // HBM pointers are real device memory here: a host memcpy would fault, so no fallback.
    return cuda.status();
  }
  auto host = create_host_copy_engine(options);
  spdlog::info("kvtier transfer: copy engine {}", host->describe());
  return host;
}

}  // namespace kvtier
