// KV quantization so lower tiers can hold compressed blocks: int8 symmetric or fp8 e4m3, one
// float scale per (layer, K|V, token, kv_head) row of head_dim elements.
//
//   int8:  scale = amax / 127, q = clamp(round_half_even(x / scale), ±127), x' = q · scale
//   fp8:   scale = amax / 448, q = e4m3_rne_satfinite(x / scale),           x' = q · scale
// where amax is the row's largest |x| (a zero row stores scale 0 and zeros).
//
// Error bound per element (x the fp16/bf16 input, x' = q · scale in float), documented in
// docs/kernels.md and asserted by tests/kernels/kv_quant_test.cpp:
//   int8:  |x − x'| ≤ scale/2 = amax/254                      (+ float rounding, ≤ 2^-22·|x|)
//   fp8:   |x − x'| ≤ max(2^-4·|x|, 2^-10·scale)              (+ float rounding)
//          (3 mantissa bits give half-ulp 2^-4 relative; below 2^-6·scale the subnormal step
//           2^-9·scale rules)
// Dequantizing into fp16/bf16 adds that type's rounding (half an ulp of x').
//
// Block layouts: wide and narrow slots are both canonical [layer][K|V][token][kv_head][head_dim];
// scales sit in the scale arena [slot][layer][K|V][token][kv_head] at the narrow slot's index,
// which is what PagedKv reads for int8/fp8 attention.
#pragma once

#include <cstdint>

#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

struct KvQuantArgs {
  KvLayout layout;                  // standard; layout.dtype is the WIDE type (fp16 or bf16)
  Dtype narrow_dtype = Dtype::kInt8;  // kInt8 or kFp8E4M3
  void* wide_arena = nullptr;       // fp16/bf16 slots
  uint64_t wide_slot_stride_bytes = 0;    // 0 = bytes of one wide block
  void* narrow_arena = nullptr;     // int8/fp8 slots
  uint64_t narrow_slot_stride_bytes = 0;  // 0 = bytes of one narrow block
  float* scales = nullptr;          // scale arena, indexed by narrow slot
  uint64_t scale_slot_stride = 0;   // floats; 0 = kv_scales_per_block(layout)
  const int32_t* wide_slots = nullptr;    // [num_blocks]
  const int32_t* narrow_slots = nullptr;  // [num_blocks]
  uint32_t num_blocks = 0;
  uint32_t num_wide_slots = 0;      // host-side bounds checks
  uint32_t num_narrow_slots = 0;
};

/// Checks the layout, dtypes and pointers; reads no device memory.
Status check_kv_quant(const KvQuantArgs& args);

/// Strides with the zero defaults resolved.
struct KvQuantStrides {
  uint64_t wide_slot_bytes;
  uint64_t narrow_slot_bytes;
  uint64_t scale_slot_floats;
  uint64_t rows_per_block;  // layers × 2 × block_tokens × kv_heads
};
KvQuantStrides kv_quant_strides(const KvQuantArgs& args);

/// CPU references (host pointers). quantize: wide → narrow + scales; dequantize: the reverse.
Status quantize_kv_cpu(const KvQuantArgs& args);
Status dequantize_kv_cpu(const KvQuantArgs& args);

}  // namespace kvtier::kernels
