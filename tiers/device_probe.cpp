#include "tiers/device_probe.h"

#include <spdlog/spdlog.h>

#ifdef KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {

namespace {
DeviceProbe run_probe() {
  DeviceProbe p;
#ifdef KVTIER_WITH_CUDA
  p.cuda_built = true;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    p.reason = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(err);
    (void)cudaGetLastError();  // clear the sticky error so later calls start clean
  } else if (count == 0) {
    p.reason = "no CUDA device found";
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
    p.gpus.push_back({i, prop.name, prop.major, prop.minor, prop.totalGlobalMem});
  }
#else
  p.reason = "built without CUDA (KVTIER_CUDA=OFF or nvcc not found)";
#endif
  if (p.has_gpu()) {
    for (const auto& g : p.gpus) {
      spdlog::info("kvtier: GPU {} {} (sm_{}{}, {:.1f} GiB): HBM tier and CUDA copy engine enabled",
                   g.ordinal, g.name, g.sm_major, g.sm_minor, g.total_bytes / 1073741824.0);
    }
  } else {
    spdlog::info("kvtier: no GPU ({}); using the emulated HBM arena and the host copy engine",
                 p.reason);
  }
  return p;
}
}  // namespace

const DeviceProbe& probe_devices() {
  static const DeviceProbe probe = run_probe();
  return probe;
}

}  // namespace kvtier
