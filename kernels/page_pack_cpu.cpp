// Page pack/unpack: checks, engine offsets and the CPU reference (row-by-row memcpy).
#include <cstring>
#include <string>

#include "kernels/page_pack.h"

namespace kvtier::kernels {

namespace {
uint32_t layer_end(const PagePackArgs& a) {
  return a.layer_count ? a.layer_begin + a.layer_count : a.layout.num_layers;
}

// to_arena: pack (engine → arena); otherwise unpack.
Status copy_pages(const PagePackArgs& a, bool to_arena) {
  KVTIER_RETURN_IF_ERROR(check_page_pack(a));
  KVTIER_RETURN_IF_ERROR(check_page_pack_indices(a));
  const KvLayout& l = a.layout;
  const uint64_t slot_stride = a.slot_stride_bytes ? a.slot_stride_bytes : l.bytes_per_block();
  const uint64_t row_bytes = uint64_t(l.head_dim) * dtype_bits(l.dtype) / 8;
  auto* arena = static_cast<uint8_t*>(a.arena);
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    for (uint32_t layer = a.layer_begin; layer < layer_end(a); ++layer) {
      auto* engine = static_cast<uint8_t*>(a.layer_base[layer]);
      for (uint32_t plane = 0; plane < 2; ++plane) {
        for (uint32_t t = 0; t < l.block_tokens; ++t) {
          for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
            uint8_t* canonical = arena + uint64_t(a.arena_slots[b]) * slot_stride +
                                 layer * l.bytes_per_block_layer() +
                                 ((uint64_t(plane) * l.block_tokens + t) * l.num_kv_heads + h) * row_bytes;
            uint8_t* page = engine + engine_row_offset(a.engine, a.engine_num_pages, l.block_tokens,
                                                       l.num_kv_heads, row_bytes,
                                                       uint32_t(a.engine_pages[b]), plane, t, h);
            if (to_arena) {
              std::memcpy(canonical, page, row_bytes);
            } else {
              std::memcpy(page, canonical, row_bytes);
            }
          }
        }
      }
    }
  }
  return Status::ok();
}
}  // namespace

Status check_page_pack(const PagePackArgs& a) {
  KVTIER_RETURN_IF_ERROR(a.layout.validate());
  if (a.layout.kind != AttentionKind::kStandard || dtype_bits(a.layout.dtype) % 8 != 0) {
    return invalid_argument("page pack: needs a standard layout with whole-byte elements");
  }
  if (a.arena == nullptr || a.layer_base == nullptr || a.arena_slots == nullptr ||
      a.engine_pages == nullptr) {
    return invalid_argument("page pack: arena, layer bases, slots and pages are required");
  }
  if (a.engine != EngineLayout::kVllm && a.engine != EngineLayout::kFlashInferNhd &&
      a.engine != EngineLayout::kFlashInferHnd) {
    return invalid_argument("page pack: unknown engine layout");
  }
  if (a.layer_begin >= a.layout.num_layers || layer_end(a) > a.layout.num_layers) {
    return invalid_argument("page pack: layer range outside the layout");
  }
  if (a.slot_stride_bytes != 0 && a.slot_stride_bytes < a.layout.bytes_per_block()) {
    return invalid_argument("page pack: slot stride is smaller than one block");
  }
  return Status::ok();
}

Status check_page_pack_indices(const PagePackArgs& a) {
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    if (a.arena_slots[b] < 0 || uint32_t(a.arena_slots[b]) >= a.num_slots) {
      return invalid_argument("page pack: block " + std::to_string(b) + " names slot " +
                              std::to_string(a.arena_slots[b]) + " outside the arena");
    }
    if (a.engine_pages[b] < 0 || uint32_t(a.engine_pages[b]) >= a.engine_num_pages) {
      return invalid_argument("page pack: block " + std::to_string(b) + " names engine page " +
                              std::to_string(a.engine_pages[b]) + " outside the engine cache");
    }
  }
  return Status::ok();
}

Status pack_pages_cpu(const PagePackArgs& args) { return copy_pages(args, true); }
Status unpack_pages_cpu(const PagePackArgs& args) { return copy_pages(args, false); }

}  // namespace kvtier::kernels
