// Shared by the service tests and their child processes (service_child): a small KV layout and
// the KV of a prompt's blocks (tools/synthetic_kv.h), so any process can check a restored block
// without talking to the one that saved it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

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

}  // namespace kvtier::testing
