// KV quantize/dequantize: checks, strides and the CPU reference, row by row.
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/kv_quant.h"
#include "kernels/numeric.h"
#include "kernels/paged_kv.h"

namespace kvtier::kernels {

Status check_kv_quant(const KvQuantArgs& a) {
  KVTIER_RETURN_IF_ERROR(a.layout.validate());
  if (a.layout.kind != AttentionKind::kStandard) {
    return invalid_argument("kv quant: needs a standard (K|V) layout");
  }
  if (a.layout.dtype != Dtype::kFp16 && a.layout.dtype != Dtype::kBf16) {
    return invalid_argument("kv quant: the wide type (layout.dtype) must be fp16 or bf16");
  }
  if (!is_quantized_kv(a.narrow_dtype)) {
    return invalid_argument("kv quant: the narrow type must be int8 or fp8_e4m3");
  }
  if (a.wide_arena == nullptr || a.narrow_arena == nullptr || a.scales == nullptr ||
      a.wide_slots == nullptr || a.narrow_slots == nullptr) {
    return invalid_argument("kv quant: arenas, scales and slot lists are required");
  }
  const KvQuantStrides st = kv_quant_strides(a);
  if (st.wide_slot_bytes < a.layout.bytes_per_block() ||
      st.narrow_slot_bytes < a.layout.bytes_per_block() / 2 ||
      st.scale_slot_floats < st.rows_per_block) {
    return invalid_argument("kv quant: a slot stride is smaller than one block");
  }
  return Status::ok();
}

KvQuantStrides kv_quant_strides(const KvQuantArgs& a) {
  const uint64_t narrow_block = a.layout.bytes_per_block() / 2;  // 8-bit elements
  return {a.wide_slot_stride_bytes ? a.wide_slot_stride_bytes : a.layout.bytes_per_block(),
          a.narrow_slot_stride_bytes ? a.narrow_slot_stride_bytes : narrow_block,
          a.scale_slot_stride ? a.scale_slot_stride : kv_scales_per_block(a.layout),
          kv_scales_per_block(a.layout)};
}

namespace {
Status check_slots_host(const KvQuantArgs& a) {
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    if (a.wide_slots[b] < 0 || uint32_t(a.wide_slots[b]) >= a.num_wide_slots ||
        a.narrow_slots[b] < 0 || uint32_t(a.narrow_slots[b]) >= a.num_narrow_slots) {
      return invalid_argument("kv quant: block " + std::to_string(b) + " names a slot outside its arena");
    }
  }
  return Status::ok();
}
}  // namespace

Status quantize_kv_cpu(const KvQuantArgs& a) {
  KVTIER_RETURN_IF_ERROR(check_kv_quant(a));
  KVTIER_RETURN_IF_ERROR(check_slots_host(a));
  const KvQuantStrides st = kv_quant_strides(a);
  const uint32_t D = a.layout.head_dim;
  const bool int8 = a.narrow_dtype == Dtype::kInt8;
  const float qmax = int8 ? kInt8Max : kFp8E4M3Max;
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    const auto* wide = static_cast<const uint8_t*>(a.wide_arena) + uint64_t(a.wide_slots[b]) * st.wide_slot_bytes;
    auto* narrow = static_cast<uint8_t*>(a.narrow_arena) + uint64_t(a.narrow_slots[b]) * st.narrow_slot_bytes;
    float* scales = a.scales + uint64_t(a.narrow_slots[b]) * st.scale_slot_floats;
    for (uint64_t r = 0; r < st.rows_per_block; ++r) {
      float amax = 0.0f;
      for (uint32_t d = 0; d < D; ++d) {
        amax = std::max(amax, std::fabs(load_as_float(wide, a.layout.dtype, r * D + d)));
      }
      const float scale = amax / qmax;
      scales[r] = scale;
      for (uint32_t d = 0; d < D; ++d) {
        const float x = load_as_float(wide, a.layout.dtype, r * D + d);
        if (int8) {
          narrow[r * D + d] = uint8_t(float_to_int8_scaled(x, scale));
        } else {
          narrow[r * D + d] = scale > 0.0f ? float_to_fp8_e4m3(x / scale) : 0;
        }
      }
    }
  }
  return Status::ok();
}

Status dequantize_kv_cpu(const KvQuantArgs& a) {
  KVTIER_RETURN_IF_ERROR(check_kv_quant(a));
  KVTIER_RETURN_IF_ERROR(check_slots_host(a));
  const KvQuantStrides st = kv_quant_strides(a);
  const uint32_t D = a.layout.head_dim;
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    auto* wide = static_cast<uint8_t*>(a.wide_arena) + uint64_t(a.wide_slots[b]) * st.wide_slot_bytes;
    const auto* narrow = static_cast<const uint8_t*>(a.narrow_arena) + uint64_t(a.narrow_slots[b]) * st.narrow_slot_bytes;
    const float* scales = a.scales + uint64_t(a.narrow_slots[b]) * st.scale_slot_floats;
    for (uint64_t r = 0; r < st.rows_per_block; ++r) {
      for (uint32_t d = 0; d < D; ++d) {
        const float q = load_as_float(narrow, a.narrow_dtype, r * D + d);
        store_from_float(wide, a.layout.dtype, r * D + d, q * scales[r]);
      }
    }
  }
  return Status::ok();
}

}  // namespace kvtier::kernels
