// Prefill over a cached prefix: the path a request takes right after its prefix blocks are
// restored. The new tokens' queries attend to every cached prefix token (read in place from the
// arena through the block table) and causally to the new tokens' own K/V, which the engine has
// just computed and passes as contiguous ragged tensors (a partial tail block is never cached,
// so the new K/V need not be in blocks yet).
//
// New token i of sequence s sits at position prefix_len[s] + i and sees prefix tokens
// [0, prefix_len[s]) and new tokens [0, i].
// Ragged rows: new tokens of sequence s are rows [new_indptr[s], new_indptr[s+1]) of q, k_new,
// v_new and out.
#pragma once

#include <cstdint>

#include "kernels/paged_kv.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

struct PrefillAttentionArgs {
  PagedKv prefix;                    // seq_lens = cached prefix lengths (0 is fine)
  const void* q = nullptr;           // [total_new][num_qo_heads][head_dim], q_dtype
  const void* k_new = nullptr;       // [total_new][num_kv_heads][head_dim], q_dtype
  const void* v_new = nullptr;       // [total_new][num_kv_heads][head_dim], q_dtype
  void* out = nullptr;               // [total_new][num_qo_heads][head_dim], q_dtype
  const int32_t* new_indptr = nullptr;  // [num_seqs + 1], non-decreasing, new_indptr[0] = 0
  uint32_t total_new_tokens = 0;     // new_indptr[num_seqs]
  Dtype q_dtype = Dtype::kBf16;      // fp16 or bf16; 16-bit prefix K/V must match
  uint32_t num_qo_heads = 0;         // multiple of prefix.num_kv_heads
  float sm_scale = 0.0f;             // 0 means 1/sqrt(head_dim)
};

/// Dtypes, heads, head_dim (64/128/256), pointers. Reads no device memory.
Status check_prefill_attention(const PrefillAttentionArgs& args);

/// CPU reference (host pointers). Also checks the block table and the indptr.
Status prefill_attention_cpu(const PrefillAttentionArgs& args);

}  // namespace kvtier::kernels
