// Page pack/unpack: checks, engine offsets and the CPU reference (row-by-row memcpy).
#include <cstring>
#include <string>

#include "kernels/page_pack.h"

namespace kvtier::kernels {

namespace {
uint32_t layer_end(const PagePackArgs& a) {
  return a.layer_count ? a.layer_begin + a.layer_count : a.layout.num_layers;
}

template <class Elem>
void copy_strided(uint8_t* canonical, uint8_t* page, uint32_t n, uint32_t stride, bool to_arena) {
  auto* c = reinterpret_cast<Elem*>(canonical);
  auto* e = reinterpret_cast<Elem*>(page);
  if (to_arena) {
    for (uint32_t d = 0; d < n; ++d) std::memcpy(c + d, e + uint64_t(d) * stride, sizeof(Elem));
  } else {
    for (uint32_t d = 0; d < n; ++d) std::memcpy(e + uint64_t(d) * stride, c + d, sizeof(Elem));
  }
}

// to_arena: pack (engine → arena); otherwise unpack.
Status copy_pages(const PagePackArgs& a, bool to_arena) {
  KVTIER_RETURN_IF_ERROR(check_page_pack(a));
  KVTIER_RETURN_IF_ERROR(check_page_pack_indices(a));
  const KvLayout& l = a.layout;
  const uint64_t slot_stride = a.slot_stride_bytes ? a.slot_stride_bytes : l.bytes_per_block();
  const uint32_t elem_bytes = dtype_bits(l.dtype) / 8;
  const uint64_t row_bytes = uint64_t(l.head_dim) * elem_bytes;
  const uint32_t page_tokens = engine_page_tokens(a);
  const uint32_t pieces = page_tokens / l.block_tokens;  // blocks per engine page
  auto* arena = static_cast<uint8_t*>(a.arena);
  for (uint32_t b = 0; b < a.num_blocks; ++b) {
    const uint32_t page = uint32_t(a.engine_pages[b]) / pieces;
    const uint32_t t0 = uint32_t(a.engine_pages[b]) % pieces * l.block_tokens;
    for (uint32_t layer = a.layer_begin; layer < layer_end(a); ++layer) {
      auto* engine = static_cast<uint8_t*>(a.layer_base[layer]);
      for (uint32_t plane = 0; plane < 2; ++plane) {
        const uint32_t stride = engine_elem_stride(a.engine, page_tokens, plane);
        for (uint32_t t = 0; t < l.block_tokens; ++t) {
          for (uint32_t h = 0; h < l.num_kv_heads; ++h) {
            uint8_t* canonical = arena + uint64_t(a.arena_slots[b]) * slot_stride +
                                 layer * l.bytes_per_block_layer() +
                                 ((uint64_t(plane) * l.block_tokens + t) * l.num_kv_heads + h) * row_bytes;
            uint8_t* at = engine + engine_row_offset(a.engine, a.engine_num_pages, page_tokens, l.num_kv_heads,
                                                     l.head_dim, elem_bytes, page, plane, t0 + t, h);
            if (stride != 1) {  // kVllmCpu's transposed K: element by element
              switch (elem_bytes) {
                case 1: copy_strided<uint8_t>(canonical, at, l.head_dim, stride, to_arena); break;
                case 2: copy_strided<uint16_t>(canonical, at, l.head_dim, stride, to_arena); break;
                case 4: copy_strided<uint32_t>(canonical, at, l.head_dim, stride, to_arena); break;
                default: copy_strided<uint64_t>(canonical, at, l.head_dim, stride, to_arena); break;
              }
            } else if (to_arena) {
              std::memcpy(canonical, at, row_bytes);
            } else {
              std::memcpy(at, canonical, row_bytes);
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
  if (static_cast<uint8_t>(a.engine) >= kNumEngineLayouts) return invalid_argument("page pack: unknown engine layout");
  if (a.page_tokens % a.layout.block_tokens != 0) {
    return invalid_argument("page pack: engine pages of " + std::to_string(a.page_tokens) +
                            " tokens are not whole blocks of " + std::to_string(a.layout.block_tokens));
  }
  const uint32_t elem_bytes = dtype_bits(a.layout.dtype) / 8;
  if (a.engine == EngineLayout::kVllmCpu && elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) {
    return invalid_argument("page pack: vllm_cpu pages need 1-, 2-, 4- or 8-byte elements");
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
    const uint64_t pieces = uint64_t(a.engine_num_pages) * (engine_page_tokens(a) / a.layout.block_tokens);
    if (a.engine_pages[b] < 0 || uint64_t(a.engine_pages[b]) >= pieces) {
      return invalid_argument("page pack: block " + std::to_string(b) + " names block piece " +
                              std::to_string(a.engine_pages[b]) + " outside the engine cache");
    }
  }
  return Status::ok();
}

Status pack_pages_cpu(const PagePackArgs& args) { return copy_pages(args, true); }
Status unpack_pages_cpu(const PagePackArgs& args) { return copy_pages(args, false); }

}  // namespace kvtier::kernels
