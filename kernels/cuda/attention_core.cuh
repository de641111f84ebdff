// The shared inner loop of the decode and prefill kernels: one CTA of 128 threads streams a
// range of keys for G ≤ kMaxHeadsPerItem query heads that share one kv head (GQA/MQA), with an
// online softmax, then combines its token groups through shared memory.
//
// Thread layout: head_dim / 8 lanes cover one key row (8 elements each, one 16- or 8-byte load),
// so a CTA works on 128 / (head_dim / 8) keys at once. Each token group keeps its own running max,
// sum and accumulator in the log2 domain (queries are pre-scaled by sm_scale · log2 e); the
// accumulator is rescaled only when the max grows, which after the first keys is rare.
// Loop trip counts are uniform across the CTA so the full-warp shuffles never diverge.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/element_types.cuh"
#include "kernels/decode_attention.h"
#include "kernels/paged_kv.h"

namespace kvtier::kernels::cuda {

inline constexpr int kThreads = 128;
inline constexpr int kHeads = int(kMaxHeadsPerItem);

/// CTAs the decode kernel asks to keep resident per SM for G heads (caps its registers at
/// 65536 / (128 · n)); the plan counts on the same number.
template <int G>
inline constexpr int kMinCtasPerSm = int(decode_ctas_per_sm(G));

/// Pipeline depth: stages of key rows in shared memory, kStages − 1 of them loading while one
/// is computed on.
inline constexpr int kStages = 4;

template <int D>
struct Geometry {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim 64, 128 or 256");
  static constexpr int kLanes = D / 8;                 // lanes per key row
  static constexpr int kGroups = kThreads / kLanes;    // key rows in flight per CTA step
};

template <int G>
struct OnlineSoftmax {
  float m[G];
  float l[G];
  float acc[G][8];
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int j = 0; j < G; ++j) {
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
  __device__ __forceinline__ const float* scale_ptr(uint32_t t, uint32_t plane) const {
    return kv.scale_ptr(seq, t, plane, head);
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
};

/// True for int8 / fp8 keys, which carry a dequantization scale per row; 16-bit rows have none.
template <class KT>
inline constexpr bool kScaled = KT::kBytes == 1;

/// cp.async of `bytes` (4, 8 or 16) from global to shared memory; `valid` = false zero-fills the
/// destination and reads nothing (src must still be a mapped address).
template <int bytes>
__device__ __forceinline__ void cp_async(void* dst, const void* src, bool valid) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  const int n = valid ? bytes : 0;
  if constexpr (bytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(d), "l"(src), "n"(bytes), "r"(n));
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int pending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(pending)); }

/// Shared-memory geometry of the key pipeline for element type KT and head_dim D. A stage holds
/// kRows consecutive key rows, K plane then V plane, then (int8/fp8) their scales:
///   [K|V][row][D elements]  then  float [K|V][row]
/// Row r belongs to token group r % kGroups, which copies and reads only its own 8 elements
/// per lane, so the K/V data needs no barrier; scales are copied by lane 0 of the row and read
/// by its other lanes after a __syncwarp (a row's lanes share one warp).
template <class KT, int D>
struct KeyStages {
  static constexpr int kRowsPerGroup = 4 / KT::kBytes;  // 8 KiB of K/V per stage at any dtype
  static constexpr int kRows = Geometry<D>::kGroups * kRowsPerGroup;
  static constexpr int kRowBytes = D * KT::kBytes;
  static constexpr int kScaleOffset = 2 * kRows * kRowBytes;
  static constexpr int kStageBytes = kScaleOffset + (kScaled<KT> ? 2 * kRows * 4 : 0);
  static constexpr int kBytes = kStages * kStageBytes;
};

/// Shared memory combine_groups uses for G heads.
template <int D, int G>
inline constexpr int kCombineBytes = (2 + D) * Geometry<D>::kGroups * G * 4;

/// Shared memory a kernel streaming KT keys (and, for prefill, 16-bit QT keys) then combining
/// G heads declares and hands to attend_range and combine_groups.
template <class KT, class QT, int D, int G>
inline constexpr int kSmemBytes = std::max({KeyStages<KT, D>::kBytes, KeyStages<QT, D>::kBytes, kCombineBytes<D, G>});

/// Streams keys [t0, t1) of `src` into `st` for the G heads of `q`, through a kStages-deep
/// cp.async pipeline in `smem` (KeyStages<KT, D>::kBytes, 16-byte aligned): the copies of the
/// next kStages − 1 stages are in flight while one stage is computed on, and they occupy no
/// registers, so every warp keeps memory busy.
template <class KT, int D, int G, class Src>
__device__ __forceinline__ void attend_range(const float (&q)[G][8], OnlineSoftmax<G>& st,
                                             const Src& src, uint32_t t0, uint32_t t1, uint8_t* smem) {
  using Geo = Geometry<D>;
  using Stg = KeyStages<KT, D>;
  constexpr int kChunk = 8 * KT::kBytes;  // this lane's bytes of one row
  const int lane = threadIdx.x % Geo::kLanes;
  const int group = threadIdx.x / Geo::kLanes;
  if (t0 >= t1) return;
  const uint32_t steps = (t1 - t0 + Stg::kRows - 1) / Stg::kRows;

  auto fetch = [&](uint32_t step) {
    uint8_t* stage = smem + (step % kStages) * Stg::kStageBytes;
    const uint32_t base = t0 + step * Stg::kRows;
#pragma unroll
    for (int u = 0; u < Stg::kRowsPerGroup; ++u) {
      const int r = u * Geo::kGroups + group;
      const bool valid = base + r < t1;
      const uint32_t t = valid ? base + r : t0;  // a mapped address even when nothing is read
      cp_async<kChunk>(stage + r * Stg::kRowBytes + lane * kChunk, src.row(t, kPlaneK) + lane * kChunk, valid);
      cp_async<kChunk>(stage + (Stg::kRows + r) * Stg::kRowBytes + lane * kChunk,
                       src.row(t, kPlaneV) + lane * kChunk, valid);
      if constexpr (kScaled<KT>) {
        if (lane == 0) {
          float* scales = reinterpret_cast<float*>(stage + Stg::kScaleOffset);
          cp_async<4>(scales + r, src.scale_ptr(t, kPlaneK), valid);
          cp_async<4>(scales + Stg::kRows + r, src.scale_ptr(t, kPlaneV), valid);
        }
      }
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (uint32_t(s) < steps) fetch(s);
    cp_async_commit();  // empty groups keep the count uniform
  }
  for (uint32_t step = 0; step < steps; ++step) {
    if (step + kStages - 1 < steps) fetch(step + kStages - 1);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // this step's group has landed
    if constexpr (kScaled<KT>) __syncwarp();
    const uint8_t* stage = smem + (step % kStages) * Stg::kStageBytes;
    const float* scales = reinterpret_cast<const float*>(stage + Stg::kScaleOffset);
    const uint32_t base = t0 + step * Stg::kRows;
    constexpr int U = Stg::kRowsPerGroup;
    // Scores of this thread's U rows for all G heads first: U·G independent dot products and
    // butterflies with no branch between them, so the scheduler interleaves their latencies.
    // Heads past g have zero queries and are never emitted.
    float score[U][G];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = u * Geo::kGroups + group;
      valid[u] = base + r < t1;
      float kf[8];
      KT::convert(*reinterpret_cast<const typename KT::Raw*>(stage + r * Stg::kRowBytes + lane * kChunk), kf);
      const float ks = kScaled<KT> ? scales[r] : 1.0f;
#pragma unroll
      for (int j = 0; j < G; ++j) {
        float lo = 0.0f, hi = 0.0f;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          lo = fmaf(q[j][e], kf[e], lo);
          hi = fmaf(q[j][e + 4], kf[e + 4], hi);
        }
        score[u][j] = (lo + hi) * ks;
      }
    }
#pragma unroll
    for (int off = Geo::kLanes / 2; off > 0; off /= 2) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < G; ++j) score[u][j] += __shfl_xor_sync(0xffffffffu, score[u][j], off);
      }
    }
    // The butterfly leaves the same sums in every lane of a row, so each row group takes the
    // rescale branch together. One max and at most one rescale per head per stage.
#pragma unroll
    for (int j = 0; j < G; ++j) {
      float mx = st.m[j];
#pragma unroll
      for (int u = 0; u < U; ++u) mx = valid[u] ? fmaxf(mx, score[u][j]) : mx;
      if (mx > st.m[j]) {
        const float c = exp2f(st.m[j] - mx);
        st.l[j] *= c;
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[j][e] *= c;
        st.m[j] = mx;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int r = u * Geo::kGroups + group;
      float vf[8];
      KT::convert(*reinterpret_cast<const typename KT::Raw*>(stage + (Stg::kRows + r) * Stg::kRowBytes + lane * kChunk), vf);
      const float vs = kScaled<KT> ? scales[Stg::kRows + r] : 1.0f;
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float p = valid[u] ? exp2f(score[u][j] - st.m[j]) : 0.0f;
        st.l[j] += p;
        const float pv = p * vs;
#pragma unroll
        for (int e = 0; e < 8; ++e) st.acc[j][e] = fmaf(pv, vf[e], st.acc[j][e]);
      }
    }
    // Lane 0 overwrites this stage's scales kStages − 1 steps on; the row's lanes are past them.
    if constexpr (kScaled<KT>) __syncwarp();
  }
  cp_async_wait<0>();
}

/// Loads 8 elements per lane of `g` query rows (row j at q_row0 + j·D elements), pre-scaled.
template <class QT, int D, int G>
__device__ __forceinline__ void load_queries(const uint8_t* q_row0, int g, float scale, float (&q)[G][8]) {
  const int lane = threadIdx.x % Geometry<D>::kLanes;
#pragma unroll
  for (int j = 0; j < G; ++j) {
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
/// of the scores (−inf and value 0 for an empty range). Every thread must call this. `smem` is
/// the kernel's buffer (kCombineBytes<D, G> at least); the key pipeline's stages are reused.
template <int D, int G, class Emit>
__device__ __forceinline__ void combine_groups(const OnlineSoftmax<G>& st, int g, uint8_t* smem, Emit emit) {
  using Geo = Geometry<D>;
  auto s_m = reinterpret_cast<float (*)[G]>(smem);
  auto s_l = reinterpret_cast<float (*)[G]>(smem + Geo::kGroups * G * 4);
  auto s_acc = reinterpret_cast<float (*)[G][D]>(smem + 2 * Geo::kGroups * G * 4);
  const int lane = threadIdx.x % Geo::kLanes;
  const int group = threadIdx.x / Geo::kLanes;
  __syncthreads();  // smem held other threads' key stages until now
#pragma unroll
  for (int j = 0; j < G; ++j) {
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

/// Calls f(std::integral_constant<int, G>{}) for G = `heads` (decode_heads_per_item: 1, 2, 4 or
/// 8): registers scale with G, so a small group keeps more CTAs resident per SM.
template <class F>
cudaError_t dispatch_heads(uint32_t heads, F&& f) {
  switch (heads) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, kHeads>{});
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
