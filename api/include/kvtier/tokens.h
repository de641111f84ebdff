// Tokens and block extras: what a prompt is made of, as kvtier keys it.
#pragma once

#include <cstdint>

#include "kvtier/block_key.h"

namespace kvtier {

using TokenId = uint32_t;

/// A per-block extra folded into that block's key: a multimodal item hash, for example.
struct BlockExtra {
  uint32_t block_index = 0;  // which full block of the prompt it belongs to
  BlockKey item_hash;        // the item's own content hash
};

}  // namespace kvtier
