// Prefill over a cached prefix: the argument check and the CPU reference.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "kernels/numeric.h"
#include "kernels/prefill_attention.h"

namespace kvtier::kernels {

Status check_prefill_attention(const PrefillAttentionArgs& a) {
  const PagedKv& kv = a.prefix;
  if (a.q == nullptr || a.k_new == nullptr || a.v_new == nullptr || a.out == nullptr ||
      a.new_indptr == nullptr || kv.arena == nullptr || kv.block_table == nullptr ||
      kv.seq_lens == nullptr) {
    return invalid_argument("prefill attention: q, k_new, v_new, out, indptr and the prefix "
                            "descriptor are required");
  }
  if (a.q_dtype != Dtype::kFp16 && a.q_dtype != Dtype::kBf16) {
    return invalid_argument("prefill attention: queries must be fp16 or bf16");
  }
  if (!is_quantized_kv(kv.kv_dtype) && kv.kv_dtype != a.q_dtype) {
    return invalid_argument("prefill attention: 16-bit prefix K/V must have the query's dtype");
  }
  if (kv.head_dim != 64 && kv.head_dim != 128 && kv.head_dim != 256) {
    return invalid_argument("prefill attention: head_dim must be 64, 128 or 256");
  }
  if (kv.num_kv_heads == 0 || a.num_qo_heads == 0 || a.num_qo_heads % kv.num_kv_heads != 0) {
    return invalid_argument("prefill attention: num_qo_heads must be a multiple of num_kv_heads");
  }
  return Status::ok();
}

Status prefill_attention_cpu(const PrefillAttentionArgs& a) {
  KVTIER_RETURN_IF_ERROR(check_prefill_attention(a));
  const PagedKv& kv = a.prefix;
  KVTIER_RETURN_IF_ERROR(kv.check_table_host());
  if (a.new_indptr[0] != 0 || uint32_t(a.new_indptr[kv.num_seqs]) != a.total_new_tokens) {
    return invalid_argument("prefill attention: new_indptr must run from 0 to total_new_tokens");
  }
  for (uint32_t s = 0; s < kv.num_seqs; ++s) {
    if (a.new_indptr[s + 1] < a.new_indptr[s]) {
      return invalid_argument("prefill attention: new_indptr must not decrease");
    }
  }
  const uint32_t D = kv.head_dim;
  const uint32_t H = a.num_qo_heads;
  const uint32_t KH = kv.num_kv_heads;
  const uint32_t group = H / KH;
  const float scale = effective_sm_scale(a.sm_scale, D);
  std::vector<float> q(D), acc(D), scores;
  for (uint32_t s = 0; s < kv.num_seqs; ++s) {
    const uint32_t prefix_len = uint32_t(kv.seq_lens[s]);
    const uint32_t row0 = uint32_t(a.new_indptr[s]);
    const uint32_t n_new = uint32_t(a.new_indptr[s + 1]) - row0;
    scores.resize(prefix_len + n_new);
    for (uint32_t i = 0; i < n_new; ++i) {
      const uint64_t row = row0 + i;
      for (uint32_t h = 0; h < H; ++h) {
        const uint32_t kh = h / group;
        for (uint32_t d = 0; d < D; ++d) q[d] = load_as_float(a.q, a.q_dtype, (row * H + h) * D + d);
        const uint32_t n_keys = prefix_len + i + 1;
        float m = -std::numeric_limits<float>::infinity();
        for (uint32_t t = 0; t < n_keys; ++t) {
          float dot = 0.0f;
          if (t < prefix_len) {
            const uint8_t* k = kv.row(s, t, kPlaneK, kh);
            for (uint32_t d = 0; d < D; ++d) dot += q[d] * load_as_float(k, kv.kv_dtype, d);
            dot *= kv.scale(s, t, kPlaneK, kh);
          } else {
            const uint64_t krow = ((row0 + t - prefix_len) * uint64_t(KH) + kh) * D;
            for (uint32_t d = 0; d < D; ++d) dot += q[d] * load_as_float(a.k_new, a.q_dtype, krow + d);
          }
          scores[t] = dot * scale;
          m = std::max(m, scores[t]);
        }
        float l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (uint32_t t = 0; t < n_keys; ++t) {
          const float p = std::exp(scores[t] - m);
          l += p;
          if (t < prefix_len) {
            const uint8_t* v = kv.row(s, t, kPlaneV, kh);
            const float pv = p * kv.scale(s, t, kPlaneV, kh);
            for (uint32_t d = 0; d < D; ++d) acc[d] += pv * load_as_float(v, kv.kv_dtype, d);
          } else {
            const uint64_t vrow = ((row0 + t - prefix_len) * uint64_t(KH) + kh) * D;
            for (uint32_t d = 0; d < D; ++d) acc[d] += p * load_as_float(a.v_new, a.q_dtype, vrow + d);
          }
        }
        for (uint32_t d = 0; d < D; ++d) store_from_float(a.out, a.q_dtype, (row * H + h) * D + d, acc[d] / l);
      }
    }
  }
  return Status::ok();
}

}  // namespace kvtier::kernels
