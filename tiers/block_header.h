// BlockHeader: the self-describing header at the start of every NVMe slot (DESIGN.md
// "Persistence"). After a crash the catalog entry and the header must agree before a block is
// served, and the payload must match the checksums recorded here.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"

namespace kvtier {

/// A token id, as prefix_index/key_chain.h has it (redeclared: tiers sit below prefix_index).
using TokenId = uint32_t;

/// "KVTB" read as a little-endian word.
inline constexpr uint32_t kSlotMagic = 0x4254564Bu;
/// Bump kSlotFormatVersion when this layout changes. Version 1, little-endian, fixed width:
///   off  size  field
///     0     4  magic (kSlotMagic)
///     4     2  format version
///     6     2  reserved, zero
///     8     4  header bytes: the slot's header region (a multiple of kIoAlignment)
///    12     4  encoded bytes: everything up to and including the header checksum
///    16    16  key (lo, hi)
///    32    16  parent key
///    48    16  namespace root key
///    64     4  block index
///    68     1  priority
///    69     3  reserved, zero
///    72     8  layout fingerprint
///    80     4  num_layers
///    84     4  token count T
///    88     4  extras count E
///    92     4  reserved, zero
///    96     8  payload length in bytes
///   104     8  payload checksum: XXH3-64 of the whole payload
///   112  4*T  token ids
///     .  16*E extras (BlockKey each)
///     .  8*L  per-layer checksums: XXH3-64 of each layer's payload_length / num_layers bytes
///     .     8  header checksum: XXH3-64 of every byte before it
/// The rest of the header region is zero (checked on decode).
inline constexpr uint16_t kSlotFormatVersion = 1;
inline constexpr uint32_t kHeaderFixedBytes = 112;
/// Most extras one block may carry (bounds the header region of a layout).
inline constexpr uint32_t kMaxHeaderExtras = 16;

struct BlockHeaderInfo {
  BlockKey key;
  BlockKey parent;    // zero for the first block of a prefix
  BlockKey ns_root;   // the namespace root the chain starts from
  uint32_t block_index = 0;
  std::vector<TokenId> tokens;
  std::vector<BlockKey> extras;
  uint64_t layout_fingerprint = 0;
  uint32_t num_layers = 0;
  uint64_t payload_bytes = 0;
  uint64_t payload_checksum = 0;
  std::vector<uint64_t> layer_checksums;  // num_layers entries
  Priority priority = Priority::kNormal;

  friend bool operator==(const BlockHeaderInfo&, const BlockHeaderInfo&) = default;
};

/// Bytes the header of `info` encodes to (before rounding to a page).
uint64_t encoded_header_bytes(const BlockHeaderInfo& info) noexcept;
/// The header region of a slot for `layout`: room for block_tokens tokens, kMaxHeaderExtras
/// extras and num_layers checksums, rounded up to kIoAlignment.
uint64_t header_bytes_for(const KvLayout& layout) noexcept;

/// XXH3-64 of `bytes`: the payload and per-layer checksum.
uint64_t payload_checksum(std::span<const std::byte> bytes) noexcept;
/// Sets payload_bytes, payload_checksum and layer_checksums (num_layers must be set and divide
/// the payload; kInvalidArgument otherwise).
Status compute_checksums(BlockHeaderInfo& info, std::span<const std::byte> payload);

/// Writes the header into `out` (its first `header_bytes` bytes; the rest of the region zeroed).
/// kInvalidArgument when the header does not fit, counts are out of range, or the per-layer
/// checksums do not number num_layers.
Status encode_block_header(const BlockHeaderInfo& info, uint32_t header_bytes,
                           std::span<std::byte> out);
/// Reads and validates a header region: magic, version, sizes, counts, zero padding, and the
/// header checksum. kChecksumMismatch for damaged bytes, kInvalidArgument for an unsupported
/// version or impossible sizes; the message says which.
Result<BlockHeaderInfo> decode_block_header(std::span<const std::byte> in);

/// Checks a whole payload against the header: length and checksum. kChecksumMismatch if not.
Status verify_payload(const BlockHeaderInfo& info, std::span<const std::byte> payload);
/// Checks one layer's bytes against its per-layer checksum.
Status verify_layer(const BlockHeaderInfo& info, uint32_t layer, std::span<const std::byte> bytes);

}  // namespace kvtier
