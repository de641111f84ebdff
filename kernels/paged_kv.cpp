// PagedKv::create and the host-side block-table check.
#include "kernels/paged_kv.h"

#include <string>

namespace kvtier::kernels {

Result<PagedKv> PagedKv::create(const KvLayout& layout, uint32_t layer, const KvArena& arena,
                                const BlockTable& table) {
  KVTIER_RETURN_IF_ERROR(layout.validate());
  if (layout.kind != AttentionKind::kStandard) {
    return invalid_argument("paged attention needs a standard (K|V) layout, not latent");
  }
  const Dtype d = layout.dtype;
  if (d != Dtype::kFp16 && d != Dtype::kBf16 && !is_quantized_kv(d)) {
    return invalid_argument("paged attention reads fp16, bf16, int8 or fp8_e4m3 K/V, not " +
                            std::string(dtype_name(d)));
  }
  if (layer >= layout.num_layers) {
    return invalid_argument("layer " + std::to_string(layer) + " out of range (" +
                            std::to_string(layout.num_layers) + " layers)");
  }
  if (arena.base == nullptr || table.slots == nullptr || table.seq_lens == nullptr) {
    return invalid_argument("arena base, block table and sequence lengths must be non-null");
  }
  if (table.num_seqs == 0 || table.max_blocks_per_seq == 0) {
    return invalid_argument("block table needs at least one sequence and one block per row");
  }
  if (is_quantized_kv(d) && arena.scales == nullptr) {
    return invalid_argument("int8/fp8 K/V needs the scale arena");
  }
  PagedKv kv;
  kv.arena = static_cast<const uint8_t*>(arena.base);
  kv.slot_stride_bytes = arena.slot_stride_bytes ? arena.slot_stride_bytes : layout.bytes_per_block();
  if (kv.slot_stride_bytes < layout.bytes_per_block()) {
    return invalid_argument("slot stride is smaller than one block");
  }
  kv.layer_offset_bytes = uint64_t(layer) * layout.bytes_per_block_layer();
  kv.plane_stride_bytes = layout.bytes_per_block_layer() / 2;
  kv.num_slots = arena.num_slots;
  kv.block_table = table.slots;
  kv.max_blocks_per_seq = table.max_blocks_per_seq;
  kv.seq_lens = table.seq_lens;
  kv.num_seqs = table.num_seqs;
  kv.layer = layer;
  kv.num_kv_heads = layout.num_kv_heads;
  kv.head_dim = layout.head_dim;
  kv.block_tokens = layout.block_tokens;
  kv.elem_bytes = dtype_bits(d) / 8;
  kv.kv_dtype = d;
  if (is_quantized_kv(d)) {
    kv.scales = arena.scales;
    kv.scale_slot_stride = arena.scale_slot_stride ? arena.scale_slot_stride
                                                   : kv_scales_per_block(layout);
    if (kv.scale_slot_stride < kv_scales_per_block(layout)) {
      return invalid_argument("scale slot stride is smaller than one block's scales");
    }
    kv.scale_layer_offset = uint64_t(layer) * 2 * layout.block_tokens * layout.num_kv_heads;
  }
  return kv;
}

Status PagedKv::check_table_host() const {
  for (uint32_t s = 0; s < num_seqs; ++s) {
    const int32_t len = seq_lens[s];
    if (len < 0 || uint64_t(len) > uint64_t(max_blocks_per_seq) * block_tokens) {
      return invalid_argument("sequence " + std::to_string(s) + " has length " +
                              std::to_string(len) + ", more than its block-table row holds");
    }
    const uint32_t blocks = (uint32_t(len) + block_tokens - 1) / block_tokens;
    for (uint32_t b = 0; b < blocks; ++b) {
      const int32_t slot = block_table[uint64_t(s) * max_blocks_per_seq + b];
      if (slot < 0 || uint32_t(slot) >= num_slots) {
        return invalid_argument("sequence " + std::to_string(s) + " block " + std::to_string(b) +
                                " names slot " + std::to_string(slot) + ", outside the arena of " +
                                std::to_string(num_slots));
      }
    }
  }
  return Status::ok();
}

}  // namespace kvtier::kernels
