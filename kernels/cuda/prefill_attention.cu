// Prefill over a cached prefix on the GPU: one CTA per (new token, kv head × head chunk). Each
// streams the cached prefix in place through the block table, then the sequence's new keys up
// to and including its own position. Queries do not share K/V loads across CTAs here (L2 does);
// prefill is compute-light next to the decode path this layer is tuned for.
#include <cstdint>
#include <type_traits>

#include "kernels/cuda/attention_core.cuh"
#include "kernels/cuda/kernels_cuda.h"

namespace kvtier::kernels {
namespace cuda {
namespace {

struct PrefillLaunch {
  PrefillAttentionArgs args;
  uint32_t chunks;
  float q_scale;
};

template <class QT, class KT, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const PrefillLaunch p) {
  const PrefillAttentionArgs& a = p.args;
  const uint32_t row = blockIdx.x;
  const uint32_t kv_head = blockIdx.y / p.chunks;
  const uint32_t chunk = blockIdx.y % p.chunks;
  const uint32_t H = a.num_qo_heads;
  const uint32_t KH = a.prefix.num_kv_heads;
  const uint32_t group = H / KH;
  const uint32_t h0 = kv_head * group + chunk * kHeads;
  const int g = int(min(uint32_t(kHeads), group - chunk * kHeads));
  // The sequence owning this row: the last s with new_indptr[s] <= row.
  uint32_t lo = 0, hi = a.prefix.num_seqs;
  while (hi - lo > 1) {
    const uint32_t mid = (lo + hi) / 2;
    if (uint32_t(a.new_indptr[mid]) <= row) lo = mid; else hi = mid;
  }
  const uint32_t seq = lo;
  const uint32_t row0 = uint32_t(a.new_indptr[seq]);
  const uint32_t prefix_len = uint32_t(a.prefix.seq_lens[seq]);

  float q[kHeads][8];
  load_queries<QT, D, kHeads>(static_cast<const uint8_t*>(a.q) + (uint64_t(row) * H + h0) * D * QT::kBytes, g,
                      p.q_scale, q);
  __shared__ alignas(16) uint8_t smem[kSmemBytes<KT, QT, D, kHeads>];
  OnlineSoftmax<kHeads> st;
  st.init();
  attend_range<KT, D, kHeads>(q, st, PagedSource{a.prefix, seq, kv_head}, 0, prefix_len, smem);
  const uint64_t stride = uint64_t(KH) * D * QT::kBytes;
  const uint64_t first = uint64_t(row0) * stride + uint64_t(kv_head) * D * QT::kBytes;
  const DenseSource fresh{static_cast<const uint8_t*>(a.k_new) + first,
                          static_cast<const uint8_t*>(a.v_new) + first, stride};
  // The new keys' pipeline maps shared memory to threads differently when the prefix is int8/fp8
  // (other rows per stage): every thread must be done with the prefix's stages first.
  __syncthreads();
  attend_range<QT, D, kHeads>(q, st, fresh, 0, row - row0 + 1, smem);
  combine_groups<D, kHeads>(st, g, smem, [&](int j, int d, float value, float) {
    QT::store(static_cast<uint8_t*>(a.out) + ((uint64_t(row) * H + h0 + j) * D + d) * QT::kBytes, value);
  });
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace
}  // namespace cuda

Status prefill_attention_cuda(const PrefillAttentionArgs& args, cudaStream_t stream) {
  KVTIER_RETURN_IF_ERROR(check_prefill_attention(args));
  if (!cuda::aligned16(args.q) || !cuda::aligned16(args.k_new) || !cuda::aligned16(args.v_new) ||
      !cuda::aligned16(args.out) || !cuda::aligned16(args.prefix.arena) ||
      args.prefix.slot_stride_bytes % 16 != 0) {
    return invalid_argument("prefill attention (cuda): tensors, arena and slot stride must be 16-byte aligned");
  }
  if (args.total_new_tokens == 0) return Status::ok();
  const uint32_t group = args.num_qo_heads / args.prefix.num_kv_heads;
  cuda::PrefillLaunch p{args, (group + kMaxHeadsPerItem - 1) / kMaxHeadsPerItem,
                        effective_sm_scale(args.sm_scale, args.prefix.head_dim) * 1.4426950408889634f};
  const dim3 grid(args.total_new_tokens, args.prefix.num_kv_heads * p.chunks);
  const cudaError_t err = cuda::dispatch_attention(
      args.q_dtype, args.prefix.kv_dtype, args.prefix.head_dim, [&](auto qt, auto kt, auto dim) {
        cuda::prefill_kernel<decltype(qt), decltype(kt), decltype(dim)::value>
            <<<grid, cuda::kThreads, 0, stream>>>(p);
        return cudaGetLastError();
      });
  return status_from_cuda(err, "prefill_attention_cuda");
}

}  // namespace kvtier::kernels
