// Paged decode attention on the GPU: one CTA per (split, kv head × head chunk, sequence), then a
// merge kernel when the plan has more than one split. A head chunk is the kv-head group rounded
// up to 1, 2, 4 or 8 query heads, each a separate instantiation. See attention_core.cuh for the inner loop
// and decode_attention.h for the contract shared with the CPU reference.
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_core.cuh"
#include "kernels/cuda/kernels_cuda.h"

namespace kvtier::kernels {
namespace cuda {
namespace {

struct DecodeLaunch {
  DecodeAttentionArgs args;
  uint32_t num_splits;
  uint32_t tokens_per_split;
  uint32_t chunks;  // head chunks (of G query heads) per kv head
  float q_scale;    // sm_scale · log2(e)
  float* part_out;
  float* part_lse;
};

template <class QT, class KT, int D, int G>
__global__ void __launch_bounds__(kThreads, kMinCtasPerSm<G>) decode_kernel(const DecodeLaunch p) {
  const DecodeAttentionArgs& a = p.args;
  const uint32_t split = blockIdx.x;
  const uint32_t kv_head = blockIdx.y / p.chunks;
  const uint32_t chunk = blockIdx.y % p.chunks;
  const uint32_t seq = blockIdx.z;
  const uint32_t H = a.num_qo_heads;
  const uint32_t group = H / a.kv.num_kv_heads;
  const uint32_t h0 = kv_head * group + chunk * G;
  const int g = int(min(uint32_t(G), group - chunk * G));
  const uint32_t len = uint32_t(a.kv.seq_lens[seq]);
  const uint32_t t0 = min(len, split * p.tokens_per_split);
  const uint32_t t1 = min(len, t0 + p.tokens_per_split);

  float q[G][8];
  load_queries<QT, D, G>(static_cast<const uint8_t*>(a.q) + (uint64_t(seq) * H + h0) * D * QT::kBytes, g,
                      p.q_scale, q);
  __shared__ alignas(16) uint8_t smem[kSmemBytes<KT, KT, D, G>];
  OnlineSoftmax<G> st;
  st.init();
  attend_range<KT, D, G>(q, st, PagedSource{a.kv, seq, kv_head}, t0, t1, smem);
  combine_groups<D, G>(st, g, smem, [&](int j, int d, float value, float lse) {
    const uint64_t row = uint64_t(seq) * H + h0 + j;
    if (p.num_splits == 1) {
      QT::store(static_cast<uint8_t*>(a.out) + (row * D + d) * QT::kBytes, value);
    } else {
      p.part_out[(row * p.num_splits + split) * D + d] = value;
      if (d == 0) p.part_lse[row * p.num_splits + split] = lse;
    }
  });
}

// One CTA of kMergeThreads per (sequence, query head): warp w takes splits w, w + 8, ..., and
// its lanes own D/32 consecutive elements each; the eight warps then sum through shared
// memory. Every split's partial row is read by one load round per eight splits, where one
// thread per element walking all splits waited a memory latency per split.
constexpr int kMergeWarps = 8;
constexpr int kMergeThreads = 32 * kMergeWarps;

template <class QT, int D>
__global__ void __launch_bounds__(kMergeThreads) merge_splits_kernel(const DecodeLaunch p) {
  constexpr int kPer = D / 32;
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const uint64_t row = blockIdx.x;
  const uint32_t n = p.num_splits;
  const float* lse = p.part_lse + row * n;
  const float* part = p.part_out + row * n * D;
  __shared__ float s_max[kMergeWarps];
  __shared__ float s_sum[kMergeWarps];
  __shared__ float s_acc[kMergeWarps][D];

  float m = -INFINITY;
  for (uint32_t s = threadIdx.x; s < n; s += kMergeThreads) m = fmaxf(m, lse[s]);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (lane == 0) s_max[warp] = m;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < kMergeWarps; ++w) m = fmaxf(m, s_max[w]);

  float sum = 0.0f, acc[kPer] = {};
  if (m != -INFINITY) {  // else every split was empty: the output is zeros
#pragma unroll 4
    for (uint32_t s = warp; s < n; s += kMergeWarps) {
      const float w = expf(lse[s] - m);
      sum += w;
      const float* x = part + uint64_t(s) * D + lane * kPer;
#pragma unroll
      for (int e = 0; e < kPer; ++e) acc[e] = fmaf(w, x[e], acc[e]);
    }
  }
  if (lane == 0) s_sum[warp] = sum;
#pragma unroll
  for (int e = 0; e < kPer; ++e) s_acc[warp][lane * kPer + e] = acc[e];
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += kMergeThreads) {
    float total = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kMergeWarps; ++w) {
      total += s_sum[w];
      value += s_acc[w][d];
    }
    QT::store(static_cast<uint8_t*>(p.args.out) + (row * D + d) * QT::kBytes,
              total > 0.0f ? value / total : 0.0f);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace
}  // namespace cuda

Status decode_attention_cuda(const DecodeAttentionArgs& args, const DecodePlan& plan,
                             const Workspace& workspace, cudaStream_t stream) {
  KVTIER_RETURN_IF_ERROR(check_decode_attention(args, plan, workspace));
  if (!cuda::aligned16(args.q) || !cuda::aligned16(args.out) || !cuda::aligned16(args.kv.arena) ||
      args.kv.slot_stride_bytes % 16 != 0) {
    return invalid_argument("decode attention (cuda): q, out, arena and slot stride must be 16-byte aligned");
  }
  if (args.kv.num_seqs > 65535) {
    return invalid_argument("decode attention (cuda): at most 65535 sequences per launch");
  }
  const uint32_t group = args.num_qo_heads / args.kv.num_kv_heads;
  const uint32_t heads = decode_heads_per_item(group);
  cuda::DecodeLaunch p{args,
                       plan.num_splits,
                       plan.tokens_per_split,
                       (group + heads - 1) / heads,
                       effective_sm_scale(args.sm_scale, args.kv.head_dim) * 1.4426950408889634f,
                       static_cast<float*>(workspace.data),
                       nullptr};
  if (plan.num_splits > 1) {
    p.part_lse = p.part_out + uint64_t(args.kv.num_seqs) * args.num_qo_heads * plan.num_splits *
                                  args.kv.head_dim;
  }
  const dim3 grid(plan.num_splits, args.kv.num_kv_heads * p.chunks, args.kv.num_seqs);
  const cudaError_t err = cuda::dispatch_attention(
      args.q_dtype, args.kv.kv_dtype, args.kv.head_dim, [&](auto qt, auto kt, auto dim) {
        using QT = decltype(qt);
        const cudaError_t launched = cuda::dispatch_heads(heads, [&](auto heads_c) {
          cuda::decode_kernel<QT, decltype(kt), decltype(dim)::value, decltype(heads_c)::value>
              <<<grid, cuda::kThreads, 0, stream>>>(p);
          return cudaGetLastError();
        });
        if (launched != cudaSuccess) return launched;
        if (plan.num_splits > 1) {
          cuda::merge_splits_kernel<QT, decltype(dim)::value>
              <<<args.kv.num_seqs * args.num_qo_heads, cuda::kMergeThreads, 0, stream>>>(p);
        }
        return cudaGetLastError();
      });
  return status_from_cuda(err, "decode_attention_cuda");
}

}  // namespace kvtier::kernels
