// The CUDA backend of DevicePagePacker: one non-blocking stream per lane, cudaMalloc'd staging
// and table, the pack/unpack kernels of page_pack.cu. Every call selects the lane's device for
// its duration, since a lane is used from whichever thread holds it.
#include <cuda_runtime_api.h>

#include <memory>
#include <string>

#include "kernels/cuda/kernels_cuda.h"
#include "kernels/page_packer.h"

namespace kvtier::kernels {

namespace {

// A failed runtime call also sets the thread's last error, which the next kernel launch on this
// thread would report as its own (page_pack.cu checks cudaGetLastError): clear it here.
Status checked(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return Status::ok();
  cudaGetLastError();
  return status_from_cuda(err, what);
}

// Makes `device` current for the scope and puts the caller's device back: a lane runs on the
// thread of whoever holds it (an engine thread, a daemon session), whose device is its own.
class DeviceScope {
 public:
  explicit DeviceScope(int device) : device_(device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device_) status_ = checked(cudaSetDevice(device_), "page packer: cudaSetDevice");
  }
  ~DeviceScope() {
    if (previous_ >= 0 && previous_ != device_) cudaSetDevice(previous_);
  }
  const Status& status() const noexcept { return status_; }

 private:
  int device_;
  int previous_ = -1;
  Status status_;
};

class CudaPackLane final : public PackLaneBackend {
 public:
  static Result<std::unique_ptr<PackLaneBackend>> create(int device, uint64_t staging_bytes, uint64_t table_bytes) {
    DeviceScope scope(device);
    KVTIER_RETURN_IF_ERROR(scope.status());
    std::unique_ptr<CudaPackLane> lane(new CudaPackLane(device, staging_bytes, table_bytes));
    KVTIER_RETURN_IF_ERROR(checked(cudaStreamCreateWithFlags(&lane->stream_, cudaStreamNonBlocking),
                                   "page packer: cudaStreamCreateWithFlags"));
    void* p = nullptr;
    KVTIER_RETURN_IF_ERROR(checked(cudaMalloc(&p, staging_bytes), "page packer: cudaMalloc (staging)"));
    lane->staging_ = static_cast<std::byte*>(p);
    KVTIER_RETURN_IF_ERROR(checked(cudaMalloc(&p, table_bytes), "page packer: cudaMalloc (table)"));
    lane->table_ = static_cast<std::byte*>(p);
    return std::unique_ptr<PackLaneBackend>(std::move(lane));
  }

  ~CudaPackLane() override {
    DeviceScope scope(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (staging_) cudaFree(staging_);
    if (table_) cudaFree(table_);
    if (stream_) cudaStreamDestroy(stream_);
    cudaGetLastError();
  }

  std::byte* staging() noexcept override { return staging_; }
  uint64_t staging_bytes() const noexcept override { return staging_bytes_; }
  std::byte* table() noexcept override { return table_; }
  uint64_t table_bytes() const noexcept override { return table_bytes_; }

  // A kernel given host memory, or another GPU's, would fault and could take the context with it:
  // refuse such a tensor up front.
  Status check_reachable(const void* p, const char* what) override {
    cudaPointerAttributes attr{};
    KVTIER_RETURN_IF_ERROR(checked(cudaPointerGetAttributes(&attr, p), "page packer: cudaPointerGetAttributes"));
    if (attr.type != cudaMemoryTypeDevice && attr.type != cudaMemoryTypeManaged) {
      return invalid_argument(std::string("page packer: ") + what + " is not GPU memory");
    }
    if (attr.device != device_) {
      return invalid_argument(std::string("page packer: ") + what + " is on GPU " + std::to_string(attr.device) +
                              "; this packer runs on GPU " + std::to_string(device_));
    }
    return Status::ok();
  }

  // cudaMemcpyDefault: with unified addressing the runtime tells host from device pointers, and a
  // peer's mapped memory (CUDA IPC) is device memory too.
  Status copy_to_device(void* dst, const void* src, uint64_t bytes) override {
    DeviceScope scope(device_);
    KVTIER_RETURN_IF_ERROR(scope.status());
    return checked(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_),
                   "page packer: cudaMemcpyAsync to the device");
  }
  Status copy_to_host(void* dst, const void* src, uint64_t bytes) override {
    DeviceScope scope(device_);
    KVTIER_RETURN_IF_ERROR(scope.status());
    return checked(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_),
                   "page packer: cudaMemcpyAsync to the host");
  }
  Status launch(const PagePackArgs& args, bool pack) override {
    DeviceScope scope(device_);
    KVTIER_RETURN_IF_ERROR(scope.status());
    return pack ? pack_pages_cuda(args, stream_) : unpack_pages_cuda(args, stream_);
  }
  Status sync() override {
    DeviceScope scope(device_);
    KVTIER_RETURN_IF_ERROR(scope.status());
    return checked(cudaStreamSynchronize(stream_), "page packer: cudaStreamSynchronize");
  }

 private:
  CudaPackLane(int device, uint64_t staging_bytes, uint64_t table_bytes)
      : device_(device), staging_bytes_(staging_bytes), table_bytes_(table_bytes) {}

  int device_;
  uint64_t staging_bytes_, table_bytes_;
  cudaStream_t stream_ = nullptr;
  std::byte* staging_ = nullptr;
  std::byte* table_ = nullptr;
};

}  // namespace

std::unique_ptr<DevicePagePacker> create_cuda_page_packer(const PagePackerOptions& options) {
  const int device = options.device;
  return std::make_unique<DevicePagePacker>(
      [device](uint64_t staging, uint64_t table) { return CudaPackLane::create(device, staging, table); }, options);
}

}  // namespace kvtier::kernels
