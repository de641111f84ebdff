// Pack and unpack between serving-engine page layouts and kvtier's canonical block layout, for a
// batch of blocks and a range of layers in one call (one launch on the GPU).
//
// Engine layouts, per layer (one tensor per layer, `layer_base[layer]` points at it):
//   kVllm           [2][num_pages][page_tokens][kv_heads][head_dim]   (K plane, then V plane)
//   kFlashInferNhd  [num_pages][2][page_tokens][kv_heads][head_dim]
//   kFlashInferHnd  [num_pages][2][kv_heads][page_tokens][head_dim]
// Canonical slot: [layer][K|V][token][kv_head][head_dim]. Engine pages hold as many tokens as a
// block (page_tokens == layout.block_tokens). Element bytes are copied unchanged.
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
  const int32_t* engine_pages = nullptr;  // [num_blocks]
  uint32_t num_blocks = 0;
  uint32_t layer_begin = 0;        // layers [layer_begin, layer_begin + layer_count)
  uint32_t layer_count = 0;        // 0 = every layer from layer_begin
};

/// Checks the layout, pointers and layer range; reads no device memory.
Status check_page_pack(const PagePackArgs& args);
/// Checks every slot against num_slots and every page against engine_num_pages; reads
/// arena_slots and engine_pages, so they must be host memory here.
Status check_page_pack_indices(const PagePackArgs& args);

/// Byte offset of plane `plane`, token `t`, kv head `h`, element 0 of page `page` inside the
/// engine tensor of one layer. Shared by the CPU reference and the CUDA kernel.
KVTIER_HD uint64_t engine_row_offset(EngineLayout engine, uint32_t engine_num_pages,
                                     uint32_t block_tokens, uint32_t kv_heads, uint64_t row_bytes,
                                     uint32_t page, uint32_t plane, uint32_t t, uint32_t h) {
  const uint64_t T = block_tokens, Hk = kv_heads;
  uint64_t row = 0;
  switch (engine) {
    case EngineLayout::kVllm:
      row = ((uint64_t(plane) * engine_num_pages + page) * T + t) * Hk + h;
      break;
    case EngineLayout::kFlashInferNhd:
      row = ((uint64_t(page) * 2 + plane) * T + t) * Hk + h;
      break;
    case EngineLayout::kFlashInferHnd:
      row = ((uint64_t(page) * 2 + plane) * Hk + h) * T + t;
      break;
  }
  return row * row_bytes;
}

/// CPU references (host pointers); they also bounds-check slots and pages.
Status pack_pages_cpu(const PagePackArgs& args);
Status unpack_pages_cpu(const PagePackArgs& args);

}  // namespace kvtier::kernels
