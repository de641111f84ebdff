// The CUDA backend of DevicePagePacker: one non-blocking stream per lane, cudaMalloc'd staging
// and table, the pack/unpack kernels of page_pack.cu. Every call first selects the lane's device,
// since a lane is used from whichever thread holds it.
#include <cuda_runtime_api.h>

#include <memory>

#include "kernels/cuda/kernels_cuda.h"
#include "kernels/page_packer.h"

namespace kvtier::kernels {

namespace {

class CudaPackLane final : public PackLaneBackend {
 public:
  static Result<std::unique_ptr<PackLaneBackend>> create(int device, uint64_t staging_bytes, uint64_t table_bytes) {
    std::unique_ptr<CudaPackLane> lane(new CudaPackLane(device, staging_bytes, table_bytes));
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaSetDevice(device), "page packer: cudaSetDevice"));
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaStreamCreateWithFlags(&lane->stream_, cudaStreamNonBlocking),
                                            "page packer: cudaStreamCreateWithFlags"));
    void* p = nullptr;
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaMalloc(&p, staging_bytes), "page packer: cudaMalloc (staging)"));
    lane->staging_ = static_cast<std::byte*>(p);
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaMalloc(&p, table_bytes), "page packer: cudaMalloc (table)"));
    lane->table_ = static_cast<std::byte*>(p);
    return std::unique_ptr<PackLaneBackend>(std::move(lane));
  }

  ~CudaPackLane() override {
    cudaSetDevice(device_);
    if (stream_) cudaStreamSynchronize(stream_);
    if (staging_) cudaFree(staging_);
    if (table_) cudaFree(table_);
    if (stream_) cudaStreamDestroy(stream_);
  }

  std::byte* staging() noexcept override { return staging_; }
  uint64_t staging_bytes() const noexcept override { return staging_bytes_; }
  std::byte* table() noexcept override { return table_; }
  uint64_t table_bytes() const noexcept override { return table_bytes_; }

  // cudaMemcpyDefault: with unified addressing the runtime tells host from device pointers, and a
  // peer's mapped memory (CUDA IPC) is device memory too.
  Status copy_to_device(void* dst, const void* src, uint64_t bytes) override {
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaSetDevice(device_), "page packer: cudaSetDevice"));
    return status_from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_),
                            "page packer: cudaMemcpyAsync to the device");
  }
  Status copy_to_host(void* dst, const void* src, uint64_t bytes) override {
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaSetDevice(device_), "page packer: cudaSetDevice"));
    return status_from_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_),
                            "page packer: cudaMemcpyAsync to the host");
  }
  Status launch(const PagePackArgs& args, bool pack) override {
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaSetDevice(device_), "page packer: cudaSetDevice"));
    return pack ? pack_pages_cuda(args, stream_) : unpack_pages_cuda(args, stream_);
  }
  Status sync() override {
    KVTIER_RETURN_IF_ERROR(status_from_cuda(cudaSetDevice(device_), "page packer: cudaSetDevice"));
    return status_from_cuda(cudaStreamSynchronize(stream_), "page packer: cudaStreamSynchronize");
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
