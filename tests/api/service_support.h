// Shared by the service tests and their child processes (service_child): a small KV layout and
// the KV of a prompt's blocks (tools/synthetic_kv.h), so any process can check a restored block
// without talking to the one that saved it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/page_pack.h"
#include "kvtier/kv_layout.h"
#include "prefix_index/key_chain.h"
#include "tools/synthetic_kv.h"

namespace kvtier::testing {

/// 2 layers × 2 kv heads × head dim 16, fp16, 16 tokens: 4 KiB blocks, 2 KiB per layer.
inline KvLayout service_test_layout() {
  return KvLayout{AttentionKind::kStandard, 2, 2, 16, Dtype::kFp16, 16};
}

/// Blocks [first, first + count) of `prompt` back to back.
inline std::vector<std::byte> prompt_kv(const std::vector<TokenId>& prompt, const KvLayout& layout, size_t first,
                                        size_t count) {
  const uint64_t bpb = layout.bytes_per_block();
  std::vector<std::byte> kv(count * bpb);
  for (size_t i = 0; i < count; ++i) synthetic_block_kv(prompt, first + i, layout.block_tokens, kv.data() + i * bpb, bpb);
  return kv;
}

/// True when every block b of `expect` (canonical, back to back) sits in page page_of[b] of the
/// vLLM layer tensors `tensors` (host copies, `pages` pages each).
inline bool vllm_pages_hold(const KvLayout& layout, const std::vector<std::vector<std::byte>>& tensors,
                            uint32_t pages, const std::vector<int32_t>& page_of, const std::vector<std::byte>& expect) {
  const uint64_t row = uint64_t(layout.num_kv_heads) * layout.head_dim * dtype_bits(layout.dtype) / 8;
  const uint64_t bpb = layout.bytes_per_block(), lb = layout.bytes_per_block_layer();
  for (uint32_t l = 0; l < layout.num_layers; ++l) {
    for (size_t b = 0; b < page_of.size(); ++b) {
      for (uint32_t plane = 0; plane < 2; ++plane) {
        for (uint32_t t = 0; t < layout.block_tokens; ++t) {
          const uint64_t at = kernels::engine_row_offset(kernels::EngineLayout::kVllm, pages, layout.block_tokens, 1,
                                                         static_cast<uint32_t>(row), 1, static_cast<uint32_t>(page_of[b]),
                                                         plane, t, 0);
          const uint64_t want = b * bpb + l * lb + (uint64_t(plane) * layout.block_tokens + t) * row;
          if (std::memcmp(tensors[l].data() + at, expect.data() + want, row) != 0) return false;
        }
      }
    }
  }
  return true;
}

}  // namespace kvtier::testing
