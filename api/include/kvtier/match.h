// A match: the longest cached prefix of a prompt, and where each of its blocks lives.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/tier.h"

namespace kvtier {

/// A lease pins every block of a match until it is released or expires.
using LeaseId = uint64_t;
inline constexpr LeaseId kNoLease = 0;

/// Where one block lives, as a match reports it.
/// 64 bytes: one cache line per block of a match (a 128K-token match returns 8192 of them).
struct BlockResidency {
  BlockKey key;
  std::array<SlotId, kNumTiers> slots{kNoSlot, kNoSlot, kNoSlot};
  uint64_t byte_size = 0;
  uint64_t checksum = 0;
  uint8_t tier_mask = 0;  // bit tier_bit(t) set when resident in tier t
  Priority priority = Priority::kNormal;
  bool damaged = false;  // its only copy failed a checksum: no match returns it (mark_damaged)

  bool resident_in(Tier t) const noexcept { return tier_mask & tier_bit(t); }
  SlotId slot(Tier t) const noexcept { return slots[static_cast<int>(t)]; }
};
static_assert(sizeof(BlockResidency) == 64);

/// The longest cached prefix of a prompt.
struct Match {
  std::vector<BlockResidency> blocks;  // in prompt order; blocks.size() full blocks matched
  uint64_t tokens = 0;                 // blocks.size() × block_tokens
  LeaseId lease = kNoLease;            // pins every matched block until released or expired
  uint64_t lease_expiry_ns = 0;
  uint32_t first_block = 0;            // blocks[0] is this block of the prompt (tail() sets it)
  /// Restore or recompute (NamespaceRequest::prefill_tokens_per_second): the cached blocks
  /// after `blocks` that were not offered, slower to restore from where they live than to
  /// recompute, and the estimated seconds the offered blocks save over recomputing them.
  /// Both 0 when the namespace declares no prefill speed.
  uint32_t held_back_blocks = 0;
  double seconds_saved = 0;

  /// The blocks from `skip` on, under the same lease: a load of it fills the blocks an engine
  /// does not hold yet. Releasing either releases the lease. `skip` past the end gives no blocks.
  Match tail(size_t skip) const {
    Match m;
    const size_t k = skip < blocks.size() ? skip : blocks.size();
    m.blocks.assign(blocks.begin() + static_cast<std::ptrdiff_t>(k), blocks.end());
    m.tokens = blocks.empty() ? 0 : tokens / blocks.size() * m.blocks.size();
    m.lease = lease;
    m.lease_expiry_ns = lease_expiry_ns;
    m.first_block = first_block + static_cast<uint32_t>(k);
    m.held_back_blocks = held_back_blocks;
    return m;
  }
};

}  // namespace kvtier
