// PagedKv: the one non-owning descriptor through which every attention kernel reads K/V in
// place from a slot arena (the HBM tier on a GPU, any host buffer for the CPU references).
//
// Each arena slot holds one block in the canonical layout of DESIGN.md:
//   [layer][K|V][token][kv_head][head_dim]
// A sequence's blocks are listed, in token order, by its row of the block table; the slots may
// sit anywhere in the arena, in any order. Quantized blocks (int8, fp8 e4m3) carry one float
// scale per (layer, plane, token, kv_head) in a parallel scale arena with the same slot indices:
//   scales[slot][layer][K|V][token][kv_head]
//
// The descriptor is passed by value to host and device code alike; it never owns or allocates.
// Its address helpers are shared by the CPU references and the CUDA kernels, so both read the
// same bytes by construction.
#pragma once

#include <cstdint>

#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

#if defined(__CUDACC__)
#define KVTIER_HD __host__ __device__ __forceinline__
#else
#define KVTIER_HD inline
#endif

namespace kvtier::kernels {

inline constexpr uint32_t kPlaneK = 0;
inline constexpr uint32_t kPlaneV = 1;

/// Where the blocks live. Pointers are device pointers for CUDA kernels, host pointers for the
/// CPU references.
struct KvArena {
  const void* base = nullptr;     // slot 0 of the arena
  uint32_t num_slots = 0;         // slots in the arena (host-side bounds checks only)
  uint64_t slot_stride_bytes = 0; // bytes between slots; 0 = layout.bytes_per_block()
  const float* scales = nullptr;  // int8/fp8 blocks only: the scale arena (see file comment)
  uint64_t scale_slot_stride = 0; // floats between slots' scales; 0 = kv_scales_per_block()
};

/// Which blocks belong to which sequence (vLLM's block_tables + seq_lens).
struct BlockTable {
  const int32_t* slots = nullptr;     // [num_seqs][max_blocks_per_seq] slot indices, token order
  uint32_t max_blocks_per_seq = 0;    // row stride of `slots`
  const int32_t* seq_lens = nullptr;  // [num_seqs] tokens of each sequence held in the arena
  uint32_t num_seqs = 0;
};

/// Floats of scales per block for a quantized layout: layers × 2 × block_tokens × kv_heads.
inline uint64_t kv_scales_per_block(const KvLayout& layout) noexcept {
  return uint64_t(layout.num_layers) * 2 * layout.block_tokens * layout.num_kv_heads;
}

/// True for the element types the attention kernels read: fp16, bf16, int8, fp8 e4m3.
inline bool is_quantized_kv(Dtype d) noexcept { return d == Dtype::kInt8 || d == Dtype::kFp8E4M3; }

struct PagedKv {
  const uint8_t* arena = nullptr;
  const float* scales = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* seq_lens = nullptr;
  uint64_t slot_stride_bytes = 0;
  uint64_t layer_offset_bytes = 0;  // offset of the chosen layer inside a slot
  uint64_t plane_stride_bytes = 0;  // K plane to V plane of one layer of one block
  uint64_t scale_slot_stride = 0;   // floats
  uint64_t scale_layer_offset = 0;  // floats
  uint32_t num_slots = 0;
  uint32_t max_blocks_per_seq = 0;
  uint32_t num_seqs = 0;
  uint32_t layer = 0;
  uint32_t num_kv_heads = 0;
  uint32_t head_dim = 0;
  uint32_t block_tokens = 0;
  uint32_t elem_bytes = 0;
  Dtype kv_dtype = Dtype::kBf16;

  /// Builds the descriptor for one layer of a standard-attention layout whose dtype is fp16,
  /// bf16, int8 or fp8 e4m3 (the last two need `arena.scales`).
  static Result<PagedKv> create(const KvLayout& layout, uint32_t layer, const KvArena& arena,
                                const BlockTable& table);

  /// Host-only: every sequence fits its block-table row and every slot it reads is inside the
  /// arena. Reads the table, so call it only where the table is host memory (CPU references).
  Status check_table_host() const;

  // ---- address helpers (host and device) ----
  KVTIER_HD uint64_t row_elems() const { return uint64_t(num_kv_heads) * head_dim; }
  /// Slot holding token `t` of sequence `seq`.
  KVTIER_HD int32_t slot_of(uint32_t seq, uint32_t t) const {
    return block_table[uint64_t(seq) * max_blocks_per_seq + t / block_tokens];
  }
  /// First byte of the head_dim elements of (plane, token t, kv head) of sequence `seq`.
  KVTIER_HD const uint8_t* row(uint32_t seq, uint32_t t, uint32_t plane, uint32_t head) const {
    const uint64_t slot = uint64_t(slot_of(seq, t));
    const uint64_t in_block = (uint64_t(t % block_tokens) * num_kv_heads + head) * head_dim;
    return arena + slot * slot_stride_bytes + layer_offset_bytes + plane * plane_stride_bytes +
           in_block * elem_bytes;
  }
  /// Where the dequantization scale of that row lives (quantized blocks only: `scales` is set).
  KVTIER_HD const float* scale_ptr(uint32_t seq, uint32_t t, uint32_t plane, uint32_t head) const {
    const uint64_t slot = uint64_t(slot_of(seq, t));
    return scales + slot * scale_slot_stride + scale_layer_offset +
           (uint64_t(plane) * block_tokens + t % block_tokens) * num_kv_heads + head;
  }
  /// Dequantization scale of that row (1 for fp16/bf16 blocks).
  KVTIER_HD float scale(uint32_t seq, uint32_t t, uint32_t plane, uint32_t head) const {
    return scales == nullptr ? 1.0f : *scale_ptr(seq, t, plane, head);
  }
};

/// Caller-owned scratch memory sized by a plan step. Kernels never allocate.
struct Workspace {
  void* data = nullptr;
  uint64_t bytes = 0;
};

}  // namespace kvtier::kernels
