// Device element types: 8 consecutive elements loaded (one 16- or 8-byte load) and converted to
// float, and 16-bit stores. The attention kernels give each lane 8 elements of a head_dim row.
// convert turns 8 packed elements (Raw) into floats wherever they were copied to (the attention
// pipeline's shared memory); load8 loads them from global memory and converts.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "kvtier/kv_layout.h"

namespace kvtier::kernels::cuda {

struct ElemF16 {
  static constexpr Dtype kDtype = Dtype::kFp16;
  static constexpr int kBytes = 2;
  using Raw = uint4;
  __device__ __forceinline__ static void load8(const uint8_t* p, float (&f)[8]) { convert(__ldg(reinterpret_cast<const Raw*>(p)), f); }
  __device__ __forceinline__ static void convert(const Raw& v, float (&f)[8]) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static void store(uint8_t* p, float x) {
    *reinterpret_cast<__half*>(p) = __float2half_rn(x);
  }
};

struct ElemBf16 {
  static constexpr Dtype kDtype = Dtype::kBf16;
  static constexpr int kBytes = 2;
  using Raw = uint4;
  __device__ __forceinline__ static void load8(const uint8_t* p, float (&f)[8]) { convert(__ldg(reinterpret_cast<const Raw*>(p)), f); }
  __device__ __forceinline__ static void convert(const Raw& v, float (&f)[8]) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __bfloat1622float2(h[i]);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
  __device__ __forceinline__ static void store(uint8_t* p, float x) {
    *reinterpret_cast<__nv_bfloat16*>(p) = __float2bfloat16_rn(x);
  }
};

struct ElemInt8 {
  static constexpr Dtype kDtype = Dtype::kInt8;
  static constexpr int kBytes = 1;
  using Raw = uint2;
  __device__ __forceinline__ static void load8(const uint8_t* p, float (&f)[8]) { convert(__ldg(reinterpret_cast<const Raw*>(p)), f); }
  __device__ __forceinline__ static void convert(const Raw& v, float (&f)[8]) {
    const int8_t* b = reinterpret_cast<const int8_t*>(&v);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = float(b[i]);
  }
};

struct ElemFp8 {
  static constexpr Dtype kDtype = Dtype::kFp8E4M3;
  static constexpr int kBytes = 1;
  __device__ __forceinline__ static float to_float(uint8_t b) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(b), __NV_E4M3)));
  }
  using Raw = uint2;
  __device__ __forceinline__ static void load8(const uint8_t* p, float (&f)[8]) { convert(__ldg(reinterpret_cast<const Raw*>(p)), f); }
  __device__ __forceinline__ static void convert(const Raw& v, float (&f)[8]) {
    const __nv_fp8x2_storage_t* pairs = reinterpret_cast<const __nv_fp8x2_storage_t*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 x = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pairs[i], __NV_E4M3)));
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};

}  // namespace kvtier::kernels::cuda
