// KvBuffer: where an engine keeps the KV of the blocks one call saves or loads, in host or device
// memory. Either kvtier's canonical block layout — one pointer per block, bytes_per_block each — or
// an engine's paged layout: one tensor per layer and, per block, the page that holds it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/export.h"

namespace kvtier {

/// What memory a pointer points into.
enum class LocationKind : uint8_t {
  kHost,     // host memory the CPU may read and write (host arena slot, a caller's buffer)
  kDevice,   // GPU memory: a CUDA device pointer (or, without a GPU, emulated device memory)
  kStorage,  // a byte offset on a storage device (kvtier's transfer engine only; never a KvBuffer's)
};

/// An engine's paged KV layout, per layer (one tensor per layer):
///   kVllm           [2][num_pages][page_tokens][kv_heads][head_dim]   (K plane, then V plane)
///   kFlashInferNhd  [num_pages][2][page_tokens][kv_heads][head_dim]
///   kFlashInferHnd  [num_pages][2][kv_heads][page_tokens][head_dim]
///   kVllmCpu        [num_pages][kv_heads][page_tokens × 2 × head_dim]: vLLM's CPU attention
///                   backend; inside each (page, head), K transposed as [head_dim][page_tokens],
///                   then V as [page_tokens][head_dim]. Host memory only.
/// A page holds page_tokens tokens, a multiple of KvLayout::block_tokens (vLLM's CPU backend
/// needs 32 or more): a block is a block_tokens-long piece of a page.
enum class EngineLayout : uint8_t { kVllm = 0, kFlashInferNhd = 1, kFlashInferHnd = 2, kVllmCpu = 3 };
inline constexpr uint8_t kNumEngineLayouts = 4;

struct KVTIER_API KvBuffer {
  LocationKind memory = LocationKind::kHost;  // kHost or kDevice
  std::vector<std::byte*> blocks;             // canonical: [blocks]

  EngineLayout engine = EngineLayout::kVllm;
  std::vector<void*> layer_base;  // paged: [num_layers] engine tensor per layer
  uint32_t engine_num_pages = 0;  // paged: pages per engine tensor
  uint32_t page_tokens = 0;       // paged: tokens per page, a multiple of block_tokens (0: equal)
  /// paged: [blocks] where each block is, counted in block-sized pieces of pages: piece p is
  /// tokens [(p % r) × block_tokens, +block_tokens) of page p / r, r = page_tokens / block_tokens
  /// (with r = 1, simply the page of each block).
  std::vector<int32_t> pages;

  static KvBuffer canonical(std::span<std::byte* const> blocks,
                            LocationKind memory = LocationKind::kHost);
  /// `count` canonical blocks back to back from `base`.
  static KvBuffer contiguous(std::byte* base, size_t count, uint64_t block_bytes,
                             LocationKind memory = LocationKind::kHost);
  static KvBuffer paged(EngineLayout engine, std::vector<void*> layer_base,
                        uint32_t engine_num_pages, std::vector<int32_t> pages,
                        LocationKind memory = LocationKind::kHost, uint32_t page_tokens = 0);

  bool is_paged() const noexcept { return !layer_base.empty(); }
  size_t block_count() const noexcept { return is_paged() ? pages.size() : blocks.size(); }
};

}  // namespace kvtier
