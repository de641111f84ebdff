// Paged decode attention: one new query token per sequence attends to every token its block
// table lists, reading K/V in place from the arena (no gather). GQA and MQA (num_qo_heads a
// multiple of num_kv_heads), fp16 or bf16 queries, head_dim 64/128/256, K/V in the query's type
// or int8 / fp8 e4m3 with per-token-head scales, and split-K (flash-decoding) for long contexts.
//
// Split-K: the plan cuts every sequence into `num_splits` ranges of `tokens_per_split` tokens.
// Each range writes a partial output normalised by its own softmax sum, plus the log-sum-exp of
// its scores, into the caller's workspace; a merge step combines the ranges. With one split the
// output is written directly and no workspace is needed.
//   workspace: partial_out float [num_seqs][num_qo_heads][num_splits][head_dim]
//              partial_lse float [num_seqs][num_qo_heads][num_splits]   (natural log)
//
// decode_attention_cpu is the reference: the same plan, the same workspace, float32 arithmetic.
// The CUDA launcher with the same arguments is in kernels/cuda/kernels_cuda.h.
#pragma once

#include <cstdint>

#include "kernels/paged_kv.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

struct DecodeAttentionArgs {
  PagedKv kv;                  // one layer of the paged K/V; seq_lens[s] ≥ 0 (0 gives zeros)
  const void* q = nullptr;     // [num_seqs][num_qo_heads][head_dim] of q_dtype
  void* out = nullptr;         // [num_seqs][num_qo_heads][head_dim] of q_dtype
  Dtype q_dtype = Dtype::kBf16;  // fp16 or bf16; 16-bit K/V must have the same type
  uint32_t num_qo_heads = 0;   // a multiple of kv.num_kv_heads (= for MHA, ×group for GQA/MQA)
  float sm_scale = 0.0f;       // softmax scale; 0 means 1/sqrt(head_dim)
};

struct DecodePlanOptions {
  uint32_t num_sms = 132;             // the device's multiprocessors (current_device_sm_count())
  uint32_t min_tokens_per_split = 256;  // below this a split costs more than it saves
  uint32_t force_splits = 0;          // tests: exactly this many splits (clamped to the tokens)
};

struct DecodePlan {
  uint32_t num_splits = 1;
  uint32_t tokens_per_split = 0;  // a multiple of block_tokens
  uint32_t max_seq_len = 0;
  uint64_t workspace_bytes = 0;   // 0 when num_splits == 1
};

/// Heads of one kv-head group handled together by one CUDA work item; larger groups (MQA) are
/// cut into chunks of this many query heads. The CPU reference ignores it.
inline constexpr uint32_t kMaxHeadsPerItem = 8;

/// Query heads one CUDA work item carries: the group rounded up to 1, 2, 4 or 8.
constexpr uint32_t decode_heads_per_item(uint32_t group) {
  return group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : kMaxHeadsPerItem;
}

/// Work items the CUDA decode kernel keeps resident per SM for that many heads (its launch
/// bounds; registers and shared memory fit this many). The plan sizes its waves with it.
constexpr uint32_t decode_ctas_per_sm(uint32_t heads_per_item) { return heads_per_item <= 4 ? 4 : 2; }

/// Sizes the split-K work for `max_seq_len` (the longest sequence in the batch): the split count
/// whose work items fill the GPU's resident slots (num_sms × decode_ctas_per_sm) most evenly,
/// a wave beyond the first costing 5% of a wave (each split also pays a merge and a pipeline
/// fill), with at least min_tokens_per_split tokens and whole blocks per split.
Result<DecodePlan> plan_decode_attention(const DecodeAttentionArgs& args, uint32_t max_seq_len,
                                         const DecodePlanOptions& options = {});

/// Checks dtypes, head counts, head_dim (64, 128, 256), pointers and workspace size. Called by
/// both the CPU reference and the CUDA launcher; reads no device memory.
Status check_decode_attention(const DecodeAttentionArgs& args, const DecodePlan& plan,
                              const Workspace& workspace);

/// Softmax scale actually used: args.sm_scale, or 1/sqrt(head_dim) when 0.
float effective_sm_scale(float sm_scale, uint32_t head_dim);

/// CPU reference (host pointers). Also checks the block table against the arena.
Status decode_attention_cpu(const DecodeAttentionArgs& args, const DecodePlan& plan,
                            const Workspace& workspace);

}  // namespace kvtier::kernels
