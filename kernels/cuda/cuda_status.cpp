// CUDA error codes turned into kvtier Status values, once, here.
#include <cuda_runtime_api.h>

#include <string>

#include "kernels/cuda/kernels_cuda.h"

namespace kvtier::kernels {

Status status_from_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::ok();
  const std::string msg = std::string(what) + ": " + cudaGetErrorName(err) + " (" +
                          cudaGetErrorString(err) + ")";
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver ||
      err == cudaErrorDevicesUnavailable) {
    return Status(StatusCode::kUnavailable, msg);
  }
  if (err == cudaErrorMemoryAllocation) return Status(StatusCode::kResourceExhausted, msg);
  if (err == cudaErrorInvalidValue || err == cudaErrorInvalidConfiguration) {
    return Status(StatusCode::kInvalidArgument, msg);
  }
  return Status(StatusCode::kInternal, msg);
}

Result<uint32_t> current_device_sm_count() {
  int device = 0;
  int sms = 0;
  KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaGetDevice(&device), "cudaGetDevice"));
  KVTIER_RETURN_IF_ERROR(status_from_cuda(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute"));
  return uint32_t(sms);
}

}  // namespace kvtier::kernels
