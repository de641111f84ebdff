// Finds the CUDA devices this process can use, once, and says so in the log. Without a GPU (or
// without CUDA in the build) every tier runs on its host implementation.
#pragma once

#include <string>
#include <vector>

namespace kvtier {

struct GpuInfo {
  int ordinal = 0;
  std::string name;
  int sm_major = 0, sm_minor = 0;
  size_t total_bytes = 0;
};

struct DeviceProbe {
  bool cuda_built = false;   // compiled with CUDA
  std::vector<GpuInfo> gpus;  // empty: host paths (emulated HBM, host copy engine)
  std::string reason;         // why there is no GPU, when there is none
  bool has_gpu() const noexcept { return !gpus.empty(); }
};

/// Probes on first call and caches the answer; logs one line with the outcome.
const DeviceProbe& probe_devices();

}  // namespace kvtier
