// The shared inner loop of the decode and prefill kernels: one CTA of 128 threads streams a
// range of keys for up to kMaxHeadsPerItem query heads that share one kv head (GQA/MQA), with an
// online softmax, then combines its token groups through shared memory.
//
// Thread layout: head_dim / 8 lanes cover one key row (8 elements each, one 16- or 8-byte load),
// so a CTA works on 128 / (head_dim / 8) keys at once. Each token group keeps its own running max,
// sum and accumulator in the log2 domain (queries are pre-scaled by sm_scale · log2 e); the
// accumulator is rescaled only when the max grows, which after the first keys is rare.
// Loop trip counts are uniform across the CTA so the full-warp shuffles never diverge.
#pragma once

#include <cstdint>

#include "kernels/cuda/element_types.cuh"
#include "kernels/decode_attention.h"
#include "kernels/paged_kv.h"

namespace kvtier::kernels::cuda {

inline constexpr int kThreads = 128;
inline constexpr int kHeads = int(kMaxHeadsPerItem);
inline constexpr int kUnroll = 2;  // keys per token group per iteration: loads in flight

template <int D>
struct Geometry {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim 64, 128 or 256");
  static constexpr int kLanes = D / 8;                 // lanes per key row
  static constexpr int kGroups = kThreads / kLanes;    // key rows in flight per CTA step
};

struct OnlineSoftmax {
  float m[kHeads];
  float l[kHeads];
  float acc[kHeads][8];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < kHeads; ++j) {
      m[j] = -INFINITY;
      l[j] = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[j][e] = 0.0f;
    }
  }
};

/// Keys of one (sequence, kv head) read in place through the block table.
struct PagedSource {
  PagedKv kv;
  uint32_t seq;
  uint32_t head;
  __device__ __forceinline__ const uint8_t* row(uint32_t t, uint32_t plane) const {
    return kv.row(seq, t, plane, head);
  }
  __device__ __forceinline__ float scale(uint32_t t, uint32_t plane) const {
    return kv.scale(seq, t, plane, head);
  }
};

/// Keys from contiguous [rows][kv_heads][head_dim] tensors (prefill's new tokens).
struct DenseSource {
  const uint8_t* k;  // row 0 of this sequence, this head
  const uint8_t* v;
  uint64_t row_stride_bytes;
  __device__ __forceinline__ const uint8_t* row(uint32_t t, uint32_t plane) const {
    return (plane == kPlaneK ? k : v) + uint64_t(t) * row_stride_bytes;
  }
  __device__ __forceinline__ float scale(uint32_t, uint32_t) const { return 1.0f; }
};

/// Streams keys [t0, t1) of `src` into `st` for the first `g` heads of `q`.
template <class KT, int D, class Src>
__device__ __forceinline__ void attend_range(const float (&q)[kHeads][8], int g, OnlineSoftmax& st,
                                             const Src& src, uint32_t t0, uint32_t t1) {
  using Geo = Geometry<D>;
  const int lane = threadIdx.x % Geo::kLanes;
  const int group = threadIdx.x / Geo::kLanes;
  for (uint32_t base = t0; base < t1; base += Geo::kGroups * kUnroll) {
    float kf[kUnroll][8], vf[kUnroll][8], ks[kUnroll], vs[kUnroll];
    bool valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t t = base + u * Geo::kGroups + group;
      valid[u] = t < t1;
      if (valid[u]) {
        KT::load8(src.row(t, kPlaneK) + lane * 8 * KT::kBytes, kf[u]);
        KT::load8(src.row(t, kPlaneV) + lane * 8 * KT::kBytes, vf[u]);
        ks[u] = src.scale(t, kPlaneK);
        vs[u] = src.scale(t, kPlaneV);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) kf[u][e] = vf[u][e] = 0.0f;
        ks[u] = vs[u] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int j = 0; j < kHeads; ++j) {
        if (j >= g) break;  // g is uniform across the CTA
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(q[j][e], kf[u][e], dot);
#pragma unroll
        for (int off = Geo::kLanes / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        // The butterfly leaves the same sum in every lane of the row, so the branches below
        // are uniform within a token group.
        if (!valid[u]) continue;
        const float s = dot * ks[u];
        if (s > st.m[j]) {
          const float c = exp2f(st.m[j] - s);
          st.l[j] *= c;
#pragma unroll
          for (int e = 0; e < 8; ++e) st.acc[j][e] *= c;
          st.m[j] = s;
        }
        const float p = exp2f(s - st.m[j]);
        st.l[j] += p;
        const float pv = p * vs[u];
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[j][e] = fmaf(pv, vf[u][e], st.acc[j][e]);
      }
    }
  }
}

/// Loads 8 elements per lane of `g` query rows (row j at q_row0 + j·D elements), pre-scaled.
template <class QT, int D>
__device__ __forceinline__ void load_queries(const uint8_t* q_row0, int g, float scale,
                                             float (&q)[kHeads][8]) {
  const int lane = threadIdx.x % Geometry<D>::kLanes;
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
    if (j < g) {
      QT::load8(q_row0 + (uint64_t(j) * D + lane * 8) * QT::kBytes, q[j]);
#pragma unroll
      for (int e = 0; e < 8; ++e) q[j][e] *= scale;
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) q[j][e] = 0.0f;
    }
  }
}

/// Combines the token groups of the CTA. For head j < g and element d, calls
/// emit(j, d, value, lse) where value is the normalised output and lse the natural log-sum-exp
/// of the scores (−inf and value 0 for an empty range). Every thread must call this.
template <int D, class Emit>
__device__ __forceinline__ void combine_groups(const OnlineSoftmax& st, int g, Emit emit) {
  using Geo = Geometry<D>;
  __shared__ float s_m[Geo::kGroups][kHeads];
  __shared__ float s_l[Geo::kGroups][kHeads];
  __shared__ float s_acc[Geo::kGroups][kHeads][D];
  const int lane = threadIdx.x % Geo::kLanes;
  const int group = threadIdx.x / Geo::kLanes;
#pragma unroll
  for (int j = 0; j < kHeads; ++j) {
    if (j >= g) break;
#pragma unroll
    for (int e = 0; e < 8; ++e) s_acc[group][j][lane * 8 + e] = st.acc[j][e];
    if (lane == 0) {
      s_m[group][j] = st.m[j];
      s_l[group][j] = st.l[j];
    }
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < g * D; idx += kThreads) {
    const int j = idx / D;
    const int d = idx % D;
    float m = -INFINITY;
    for (int k = 0; k < Geo::kGroups; ++k) m = fmaxf(m, s_m[k][j]);
    float sum = 0.0f, acc = 0.0f;
    if (m != -INFINITY) {
      for (int k = 0; k < Geo::kGroups; ++k) {
        const float w = exp2f(s_m[k][j] - m);  // an empty group has m = −inf: weight 0
        sum = fmaf(s_l[k][j], w, sum);
        acc = fmaf(s_acc[k][j][d], w, acc);
      }
    }
    const float value = sum > 0.0f ? acc / sum : 0.0f;
    const float lse = sum > 0.0f ? (m + log2f(sum)) * 0.69314718055994531f : -INFINITY;
    emit(j, d, value, lse);
  }
}

/// Calls f(QT{}, KT{}, std::integral_constant<int, D>{}) for the supported combinations.
template <class F>
cudaError_t dispatch_attention(Dtype q, Dtype kv, uint32_t head_dim, F&& f) {
  auto with_dim = [&](auto qt, auto kt) -> cudaError_t {
    switch (head_dim) {
      case 64: return f(qt, kt, std::integral_constant<int, 64>{});
      case 128: return f(qt, kt, std::integral_constant<int, 128>{});
      case 256: return f(qt, kt, std::integral_constant<int, 256>{});
      default: return cudaErrorInvalidValue;
    }
  };
  auto with_kv = [&](auto qt, Dtype same) -> cudaError_t {
    if (kv == same) return with_dim(qt, qt);
    if (kv == Dtype::kInt8) return with_dim(qt, ElemInt8{});
    if (kv == Dtype::kFp8E4M3) return with_dim(qt, ElemFp8{});
    return cudaErrorInvalidValue;
  };
  if (q == Dtype::kFp16) return with_kv(ElemF16{}, Dtype::kFp16);
  if (q == Dtype::kBf16) return with_kv(ElemBf16{}, Dtype::kBf16);
  return cudaErrorInvalidValue;
}

}  // namespace kvtier::kernels::cuda
