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
  attend_range<KT, D, G>(q, g, st, PagedSource{a.kv, seq, kv_head}, t0, t1, smem);
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

// One CTA per (sequence, query head); thread d owns output element d.
template <class QT>
__global__ void merge_splits_kernel(const DecodeLaunch p, uint32_t head_dim) {
  const uint64_t row = blockIdx.x;
  const float* lse = p.part_lse + row * p.num_splits;
  float m = -INFINITY;
  for (uint32_t s = 0; s < p.num_splits; ++s) m = fmaxf(m, lse[s]);
  for (uint32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float sum = 0.0f, acc = 0.0f;
    if (m != -INFINITY) {
      for (uint32_t s = 0; s < p.num_splits; ++s) {
        const float w = expf(lse[s] - m);
        sum += w;
        acc = fmaf(w, p.part_out[(row * p.num_splits + s) * head_dim + d], acc);
      }
    }
    QT::store(static_cast<uint8_t*>(p.args.out) + (row * head_dim + d) * QT::kBytes,
              sum > 0.0f ? acc / sum : 0.0f);
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
        const cudaError_t launched = cuda::dispatch_heads(group, [&](auto heads_c) {
          cuda::decode_kernel<QT, decltype(kt), decltype(dim)::value, decltype(heads_c)::value>
              <<<grid, cuda::kThreads, 0, stream>>>(p);
          return cudaGetLastError();
        });
        if (launched != cudaSuccess) return launched;
        if (plan.num_splits > 1) {
          cuda::merge_splits_kernel<QT><<<args.kv.num_seqs * args.num_qo_heads,
                                          decltype(dim)::value, 0, stream>>>(p, args.kv.head_dim);
        }
        return cudaGetLastError();
      });
  return status_from_cuda(err, "decode_attention_cuda");
}

}  // namespace kvtier::kernels
