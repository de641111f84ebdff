// Pack and unpack between serving-engine page layouts and kvtier's canonical block layout, for a
// batch of blocks and a range of layers in one call (one launch on the GPU).
//
// Engine layouts, per layer (one tensor per layer, `layer_base[layer]` points at it):
//   kVllm           [2][num_pages][page_tokens][kv_heads][head_dim]   (K plane, then V plane)
//   kFlashInferNhd  [num_pages][2][page_tokens][kv_heads][head_dim]
//   kFlashInferHnd  [num_pages][2][kv_heads][page_tokens][head_dim]
//   kVllmCpu        [num_pages][kv_heads][page_tokens × 2 × head_dim], inside each (page, head)
//                   K transposed as [head_dim][page_tokens], then V as [page_tokens][head_dim]
// Canonical slot: [layer][K|V][token][kv_head][head_dim]. An engine page holds page_tokens, a
// multiple of layout.block_tokens; `engine_pages` names block-sized pieces of pages (kvtier/kv_buffer.h).
// Element bytes are copied unchanged.
//
// pack:   engine pages → arena slots (saving new blocks into the cache)
// unpack: arena slots → engine pages (loading restored blocks into the engine)
#pragma once

#include <cstdint>

#include "kernels/paged_kv.h"
#include "kvtier/kv_buffer.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

using ::kvtier::EngineLayout;  // kvtier/kv_buffer.h: the engine layouts above

struct PagePackArgs {
  KvLayout layout;                 // standard attention; dtype sets the element size
  void* arena = nullptr;           // canonical slots
  uint64_t slot_stride_bytes = 0;  // 0 = layout.bytes_per_block()
  uint32_t num_slots = 0;          // host-side bounds check
  EngineLayout engine = EngineLayout::kVllm;
  void* const* layer_base = nullptr;  // [num_layers] engine tensor per layer. For the CUDA path
                                      // this array itself must be in device memory.
  uint32_t engine_num_pages = 0;   // pages in each engine tensor (vLLM: K→V plane distance)
  const int32_t* arena_slots = nullptr;   // [num_blocks]
  const int32_t* engine_pages = nullptr;  // [num_blocks] block-sized pieces of engine pages
  uint32_t num_blocks = 0;
  uint32_t layer_begin = 0;        // layers [layer_begin, layer_begin + layer_count)
  uint32_t layer_count = 0;        // 0 = every layer from layer_begin
  uint32_t page_tokens = 0;        // tokens per engine page, a multiple of block_tokens (0: equal)
};

/// Checks the layout, pointers and layer range; reads no device memory.
Status check_page_pack(const PagePackArgs& args);
/// Checks every slot against num_slots and every page against engine_num_pages; reads
/// arena_slots and engine_pages, so they must be host memory here.
Status check_page_pack_indices(const PagePackArgs& args);

/// Tokens per engine page of `a` (page_tokens, or block_tokens when 0).
KVTIER_HD uint32_t engine_page_tokens(const PagePackArgs& a) {
  return a.page_tokens ? a.page_tokens : a.layout.block_tokens;
}

/// Byte offset of element 0 of (plane `plane`, token `t` of the page, kv head `h`) of engine page
/// `page` inside the engine tensor of one layer. Its head_dim elements follow one another except
/// in kVllmCpu's K plane, where they lie page_tokens elements apart (engine_elem_stride). Shared
/// by the CPU reference and the CUDA kernel.
KVTIER_HD uint64_t engine_row_offset(EngineLayout engine, uint32_t engine_num_pages,
                                     uint32_t page_tokens, uint32_t kv_heads, uint32_t head_dim,
                                     uint32_t elem_bytes, uint32_t page, uint32_t plane, uint32_t t,
                                     uint32_t h) {
  const uint64_t T = page_tokens, Hk = kv_heads, D = head_dim, E = elem_bytes;
  switch (engine) {
    case EngineLayout::kVllm:
      return (((uint64_t(plane) * engine_num_pages + page) * T + t) * Hk + h) * D * E;
    case EngineLayout::kFlashInferNhd:
      return (((uint64_t(page) * 2 + plane) * T + t) * Hk + h) * D * E;
    case EngineLayout::kFlashInferHnd:
      return (((uint64_t(page) * 2 + plane) * Hk + h) * T + t) * D * E;
    case EngineLayout::kVllmCpu: {
      const uint64_t head_slice = (uint64_t(page) * Hk + h) * 2 * T * D;  // elements
      return (plane == 0 ? head_slice + t : head_slice + T * D + uint64_t(t) * D) * E;
    }
  }
  return 0;
}

/// Elements between consecutive head_dim elements of one engine row (see engine_row_offset).
KVTIER_HD uint32_t engine_elem_stride(EngineLayout engine, uint32_t page_tokens, uint32_t plane) {
  return engine == EngineLayout::kVllmCpu && plane == 0 ? page_tokens : 1;
}

/// CPU references (host pointers); they also bounds-check slots and pages.
Status pack_pages_cpu(const PagePackArgs& args);
Status unpack_pages_cpu(const PagePackArgs& args);

}  // namespace kvtier::kernels
