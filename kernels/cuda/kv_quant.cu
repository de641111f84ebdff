// KV quantize/dequantize on the GPU: one warp per (block, layer, K|V, token, kv head) row.
// Arithmetic mirrors kv_quant_cpu.cpp operation for operation (IEEE division, round-half-even),
// so the GPU check demands bit-equal codes, scales and dequantized values.
#include <cstdint>

#include "kernels/cuda/element_types.cuh"
#include "kernels/cuda/kernels_cuda.h"

namespace kvtier::kernels {
namespace cuda {
namespace {

constexpr int kWarpsPerCta = 4;

struct QuantLaunch {
  KvQuantArgs args;
  KvQuantStrides strides;
  uint64_t total_rows;
};

template <class Wide>
__device__ __forceinline__ float load_wide(const uint8_t* row, uint32_t d) {
  if constexpr (Wide::kDtype == Dtype::kFp16) {
    return __half2float(reinterpret_cast<const __half*>(row)[d]);
  } else {
    return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(row)[d]);
  }
}

template <class Wide, bool kInt8>
__global__ void __launch_bounds__(kWarpsPerCta * 32) quantize_kernel(const QuantLaunch p) {
  const uint64_t row = uint64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (row >= p.total_rows) return;  // whole warps leave together
  const int lane = threadIdx.x % 32;
  const KvQuantArgs& a = p.args;
  const uint32_t D = a.layout.head_dim;
  const uint64_t b = row / p.strides.rows_per_block;
  const uint64_t r = row % p.strides.rows_per_block;
  const uint8_t* wide = static_cast<const uint8_t*>(a.wide_arena) +
                        uint64_t(a.wide_slots[b]) * p.strides.wide_slot_bytes + r * D * 2;
  uint8_t* narrow = static_cast<uint8_t*>(a.narrow_arena) +
                    uint64_t(a.narrow_slots[b]) * p.strides.narrow_slot_bytes + r * D;
  float amax = 0.0f;
  for (uint32_t d = lane; d < D; d += 32) amax = fmaxf(amax, fabsf(load_wide<Wide>(wide, d)));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float scale = amax / (kInt8 ? 127.0f : 448.0f);
  if (lane == 0) a.scales[uint64_t(a.narrow_slots[b]) * p.strides.scale_slot_floats + r] = scale;
  for (uint32_t d = lane; d < D; d += 32) {
    const float x = load_wide<Wide>(wide, d);
    uint8_t code = 0;
    if (scale > 0.0f) {
      if constexpr (kInt8) {
        code = uint8_t(int8_t(max(-127, min(127, __float2int_rn(x / scale)))));
      } else {
        code = uint8_t(__nv_cvt_float_to_fp8(x / scale, __NV_SATFINITE, __NV_E4M3));
      }
    }
    narrow[d] = code;
  }
}

template <class Wide, bool kInt8>
__global__ void __launch_bounds__(kWarpsPerCta * 32) dequantize_kernel(const QuantLaunch p) {
  const uint64_t row = uint64_t(blockIdx.x) * kWarpsPerCta + threadIdx.x / 32;
  if (row >= p.total_rows) return;
  const int lane = threadIdx.x % 32;
  const KvQuantArgs& a = p.args;
  const uint32_t D = a.layout.head_dim;
  const uint64_t b = row / p.strides.rows_per_block;
  const uint64_t r = row % p.strides.rows_per_block;
  uint8_t* wide = static_cast<uint8_t*>(a.wide_arena) +
                  uint64_t(a.wide_slots[b]) * p.strides.wide_slot_bytes + r * D * 2;
  const uint8_t* narrow = static_cast<const uint8_t*>(a.narrow_arena) +
                          uint64_t(a.narrow_slots[b]) * p.strides.narrow_slot_bytes + r * D;
  const float scale = a.scales[uint64_t(a.narrow_slots[b]) * p.strides.scale_slot_floats + r];
  for (uint32_t d = lane; d < D; d += 32) {
    const float q = kInt8 ? float(int8_t(narrow[d])) : ElemFp8::to_float(narrow[d]);
    Wide::store(wide + d * 2, q * scale);
  }
}

Status launch(const KvQuantArgs& args, bool quantize, cudaStream_t stream) {
  KVTIER_RETURN_IF_ERROR(check_kv_quant(args));
  const QuantLaunch p{args, kv_quant_strides(args),
                      uint64_t(args.num_blocks) * kv_scales_per_block(args.layout)};
  if (p.total_rows == 0) return Status::ok();
  const uint64_t ctas = (p.total_rows + kWarpsPerCta - 1) / kWarpsPerCta;
  if (ctas > 0x7fffffffull) return invalid_argument("kv quant (cuda): batch too large for one launch");
  const bool int8 = args.narrow_dtype == Dtype::kInt8;
  const bool fp16 = args.layout.dtype == Dtype::kFp16;
  const dim3 grid{uint32_t(ctas)};
  const dim3 block{kWarpsPerCta * 32};
  if (quantize) {
    if (fp16 && int8) quantize_kernel<ElemF16, true><<<grid, block, 0, stream>>>(p);
    if (fp16 && !int8) quantize_kernel<ElemF16, false><<<grid, block, 0, stream>>>(p);
    if (!fp16 && int8) quantize_kernel<ElemBf16, true><<<grid, block, 0, stream>>>(p);
    if (!fp16 && !int8) quantize_kernel<ElemBf16, false><<<grid, block, 0, stream>>>(p);
  } else {
    if (fp16 && int8) dequantize_kernel<ElemF16, true><<<grid, block, 0, stream>>>(p);
    if (fp16 && !int8) dequantize_kernel<ElemF16, false><<<grid, block, 0, stream>>>(p);
    if (!fp16 && int8) dequantize_kernel<ElemBf16, true><<<grid, block, 0, stream>>>(p);
    if (!fp16 && !int8) dequantize_kernel<ElemBf16, false><<<grid, block, 0, stream>>>(p);
  }
  return status_from_cuda(cudaGetLastError(), quantize ? "quantize_kv_cuda" : "dequantize_kv_cuda");
}

}  // namespace
}  // namespace cuda

Status quantize_kv_cuda(const KvQuantArgs& args, cudaStream_t stream) {
  return cuda::launch(args, true, stream);
}
Status dequantize_kv_cuda(const KvQuantArgs& args, cudaStream_t stream) {
  return cuda::launch(args, false, stream);
}

}  // namespace kvtier::kernels
