// Decode attention: the plan, the argument check, and the CPU reference.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/decode_attention.h"
#include "kernels/numeric.h"

namespace kvtier::kernels {

namespace {
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

uint32_t ceil_div(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }

uint64_t partial_floats(const DecodeAttentionArgs& a, uint32_t splits) {
  return uint64_t(a.kv.num_seqs) * a.num_qo_heads * splits * (uint64_t(a.kv.head_dim) + 1);
}
}  // namespace

float effective_sm_scale(float sm_scale, uint32_t head_dim) {
  return sm_scale != 0.0f ? sm_scale : 1.0f / std::sqrt(float(head_dim));
}

Result<DecodePlan> plan_decode_attention(const DecodeAttentionArgs& args, uint32_t max_seq_len,
                                         const DecodePlanOptions& options) {
  const PagedKv& kv = args.kv;
  if (kv.block_tokens == 0 || kv.num_kv_heads == 0 || args.num_qo_heads == 0) {
    return invalid_argument("plan_decode_attention: descriptor is not initialised");
  }
  if (uint64_t(max_seq_len) > uint64_t(kv.max_blocks_per_seq) * kv.block_tokens) {
    return invalid_argument("max_seq_len " + std::to_string(max_seq_len) +
                            " exceeds the block-table row capacity");
  }
  DecodePlan plan;
  plan.max_seq_len = max_seq_len;
  const uint32_t tokens = std::max<uint32_t>(max_seq_len, 1);
  // Tokens per split when asking for s splits: whole blocks, so a split never shares a block with
  // its neighbour (which can leave fewer splits than asked).
  auto split_tokens = [&](uint32_t s) {
    s = std::clamp<uint32_t>(s, 1, ceil_div(tokens, kv.block_tokens));
    return ceil_div(ceil_div(tokens, s), kv.block_tokens) * kv.block_tokens;
  };
  uint32_t splits = 1;
  if (options.force_splits != 0) {
    splits = options.force_splits;
  } else {
    const uint32_t group = std::max<uint32_t>(args.num_qo_heads / kv.num_kv_heads, 1);
    const uint32_t heads = decode_heads_per_item(group);
    const uint64_t items = uint64_t(kv.num_seqs) * kv.num_kv_heads * ceil_div(group, heads);
    const uint64_t slots = uint64_t(std::max<uint32_t>(options.num_sms, 1)) * decode_ctas_per_sm(heads);
    const uint32_t most = std::min<uint64_t>(ceil_div(tokens, std::max<uint32_t>(options.min_tokens_per_split, 1)),
                                             ceil_div(4 * slots, items));  // four waves at most
    double best = -1.0;
    for (uint32_t s = 1; s <= most; ++s) {
      const uint64_t total = items * ceil_div(tokens, split_tokens(s));
      const uint64_t waves = (total + slots - 1) / slots;
      const double score = double(total) / double(waves * slots) - 0.05 * double(waves - 1);
      if (score > best + 1e-9) {
        best = score;
        splits = s;
      }
    }
  }
  plan.tokens_per_split = split_tokens(splits);
  plan.num_splits = ceil_div(tokens, plan.tokens_per_split);
  plan.workspace_bytes = plan.num_splits > 1 ? partial_floats(args, plan.num_splits) * 4 : 0;
  return plan;
}

Status check_decode_attention(const DecodeAttentionArgs& a, const DecodePlan& plan,
                              const Workspace& ws) {
  const PagedKv& kv = a.kv;
  if (a.q == nullptr || a.out == nullptr || kv.arena == nullptr || kv.block_table == nullptr ||
      kv.seq_lens == nullptr) {
    return invalid_argument("decode attention: q, out, arena, block table and lengths are required");
  }
  if (a.q_dtype != Dtype::kFp16 && a.q_dtype != Dtype::kBf16) {
    return invalid_argument("decode attention: queries must be fp16 or bf16");
  }
  if (!is_quantized_kv(kv.kv_dtype) && kv.kv_dtype != a.q_dtype) {
    return invalid_argument("decode attention: 16-bit K/V must have the query's dtype");
  }
  if (kv.head_dim != 64 && kv.head_dim != 128 && kv.head_dim != 256) {
    return invalid_argument("decode attention: head_dim must be 64, 128 or 256, not " +
                            std::to_string(kv.head_dim));
  }
  if (kv.num_kv_heads == 0 || a.num_qo_heads == 0 || a.num_qo_heads % kv.num_kv_heads != 0) {
    return invalid_argument("decode attention: num_qo_heads must be a multiple of num_kv_heads");
  }
  if (plan.num_splits == 0 || plan.tokens_per_split == 0 ||
      plan.tokens_per_split % kv.block_tokens != 0) {
    return invalid_argument("decode attention: plan is not from plan_decode_attention");
  }
  if (uint64_t(plan.num_splits) * plan.tokens_per_split < plan.max_seq_len) {
    return invalid_argument("decode attention: plan does not cover max_seq_len");
  }
  if (plan.num_splits > 1 && (ws.data == nullptr || ws.bytes < partial_floats(a, plan.num_splits) * 4)) {
    return invalid_argument("decode attention: workspace smaller than plan.workspace_bytes");
  }
  return Status::ok();
}

Status decode_attention_cpu(const DecodeAttentionArgs& a, const DecodePlan& plan,
                            const Workspace& ws) {
  KVTIER_RETURN_IF_ERROR(check_decode_attention(a, plan, ws));
  const PagedKv& kv = a.kv;
  KVTIER_RETURN_IF_ERROR(kv.check_table_host());
  for (uint32_t s = 0; s < kv.num_seqs; ++s) {
    if (uint32_t(kv.seq_lens[s]) > plan.max_seq_len) {
      return invalid_argument("decode attention: sequence " + std::to_string(s) +
                              " is longer than the plan's max_seq_len");
    }
  }
  const uint32_t D = kv.head_dim;
  const uint32_t H = a.num_qo_heads;
  const uint32_t group = H / kv.num_kv_heads;
  const uint32_t splits = plan.num_splits;
  const float scale = effective_sm_scale(a.sm_scale, D);
  float* part_out = static_cast<float*>(ws.data);
  float* part_lse = splits > 1 ? part_out + uint64_t(kv.num_seqs) * H * splits * D : nullptr;

  std::vector<float> q(D), acc(D), scores(plan.tokens_per_split);
  for (uint32_t s = 0; s < kv.num_seqs; ++s) {
    const uint32_t len = uint32_t(kv.seq_lens[s]);
    for (uint32_t h = 0; h < H; ++h) {
      const uint32_t kh = h / group;
      const uint64_t qrow = (uint64_t(s) * H + h) * D;
      for (uint32_t d = 0; d < D; ++d) q[d] = load_as_float(a.q, a.q_dtype, qrow + d);
      for (uint32_t sp = 0; sp < splits; ++sp) {
        const uint32_t t0 = sp * plan.tokens_per_split;
        const uint32_t t1 = std::min(len, t0 + plan.tokens_per_split);
        float m = kNegInf;
        for (uint32_t t = t0; t < t1; ++t) {
          const uint8_t* k = kv.row(s, t, kPlaneK, kh);
          float dot = 0.0f;
          for (uint32_t d = 0; d < D; ++d) dot += q[d] * load_as_float(k, kv.kv_dtype, d);
          scores[t - t0] = dot * kv.scale(s, t, kPlaneK, kh) * scale;
          m = std::max(m, scores[t - t0]);
        }
        float l = 0.0f;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (uint32_t t = t0; t < t1; ++t) {
          const float p = std::exp(scores[t - t0] - m);
          l += p;
          const uint8_t* v = kv.row(s, t, kPlaneV, kh);
          const float pv = p * kv.scale(s, t, kPlaneV, kh);
          for (uint32_t d = 0; d < D; ++d) acc[d] += pv * load_as_float(v, kv.kv_dtype, d);
        }
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;  // an empty range contributes nothing
        if (splits == 1) {
          for (uint32_t d = 0; d < D; ++d) store_from_float(a.out, a.q_dtype, qrow + d, acc[d] * inv);
        } else {
          const uint64_t prow = (uint64_t(s) * H + h) * splits + sp;
          for (uint32_t d = 0; d < D; ++d) part_out[prow * D + d] = acc[d] * inv;
          part_lse[prow] = l > 0.0f ? m + std::log(l) : kNegInf;
        }
      }
      if (splits == 1) continue;
      // Merge: weight each split by exp(lse - max lse); empty splits weigh 0.
      const uint64_t prow0 = (uint64_t(s) * H + h) * splits;
      float lse_max = kNegInf;
      for (uint32_t sp = 0; sp < splits; ++sp) lse_max = std::max(lse_max, part_lse[prow0 + sp]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      float wsum = 0.0f;
      for (uint32_t sp = 0; sp < splits && lse_max != kNegInf; ++sp) {
        const float w = std::exp(part_lse[prow0 + sp] - lse_max);
        wsum += w;
        for (uint32_t d = 0; d < D; ++d) acc[d] += w * part_out[(prow0 + sp) * D + d];
      }
      const float inv = wsum > 0.0f ? 1.0f / wsum : 0.0f;
      for (uint32_t d = 0; d < D; ++d) store_from_float(a.out, a.q_dtype, qrow + d, acc[d] * inv);
    }
  }
  return Status::ok();
}

}  // namespace kvtier::kernels
