// Key-addressed objects: bytes an engine names by a key of its own (SGLang's page hashes,
// LMCache's cache-engine keys) instead of by tokens. An object is a chain of blocks in a
// namespace, so it lives in the same tiers as prompts' blocks and persists, recovers, is
// checksummed, evicted, counted against its tenant's share and shown in the metrics the same way.
//
// Block i of the object named K (i = 0, 1, ...) is keyed like a prompt's block whose tokens are
//   [kObjectTag, h0, h1, h2, h3, i, last, 0, ...]
// with h = XXH3-128 of K and last = 1 on the object's final block only, so the chain of K is
// found from the key alone: walk i = 0, 1, ... and stop at the block marked last (exists and get
// ask the index only). The object's bytes fill the chain's blocks in order; the final block's
// last 8 bytes hold the object's length (little endian), the bytes between are zero. An object
// of L bytes takes blocks_for(L) = ceil((L + 8) / bytes_per_block) blocks.
//
// Keys name content, as both engines make them: a put of a key that is stored whole keeps what
// is there. Eviction goes leaf first, so an object loses its tail first and is then gone for
// exists and get alike (a put stores it whole again).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "api/store/tier_manager.h"
#include "kvtier/object.h"

namespace kvtier {

class Counter;

inline constexpr TokenId kObjectTag = 0x6F6B766Bu;  // "kvko": a token no tokenizer makes here
inline constexpr uint32_t kObjectKeyTokens = 7;  // tag, four hash words, index, last
/// The most blocks one object may take (so a walk and a put are bounded).
inline constexpr uint64_t kMaxObjectBlocks = 1u << 16;

class ObjectStore {
 public:
  /// Needs block_tokens >= kObjectKeyTokens (checked by put and friends: kInvalidArgument).
  ObjectStore(TierManager& tiers, const KeyChain& keys);
  ~ObjectStore();

  /// Stores the object laid out in `blocks` (lay_out_object: object_blocks(length) blocks) under
  /// `key` in `ns`, in host DRAM first like a save. True when stored; false when the key was
  /// stored whole already (kept as it is). A tail left of an earlier copy is replaced.
  /// kInvalidArgument for a bad key, a layout that does not end in `length`, or an object over
  /// kMaxObjectBlocks; kResourceExhausted as save when everything is pinned.
  Result<bool> put(const Namespace& ns, std::string_view key, uint64_t length, std::span<const std::byte> blocks,
                   Priority priority = Priority::kNormal);
  /// Copies the object named `key` into `dst[0, length)` and returns its length. Each block is
  /// pinned while read and checked against its checksum; the blocks count as used. The blocks
  /// land in `dst` itself when it holds them all (laid out: kvtierd's window), else in scratch.
  /// kNotFound when it is not stored whole; kInvalidArgument when dst is shorter than the object
  /// (the message gives its length); kChecksumMismatch for a bad copy (quarantined on NVMe) or a
  /// length that does not fit the blocks.
  Result<uint64_t> get(const Namespace& ns, std::string_view key, std::span<std::byte> dst);
  /// How many of `keys`, from the first, are stored whole (the first missing one ends the count).
  Result<size_t> exists(const Namespace& ns, std::span<const std::string> keys);
  /// Erases the object named `key` (what is left of it): the number of blocks erased, 0 when
  /// nothing was stored. kBusy while a reader holds one of its blocks.
  Result<size_t> remove(const Namespace& ns, std::string_view key);
  /// remove() of each of `keys` in order: how many of them had anything stored. Stops at the
  /// first error (the keys before it stay removed).
  Result<size_t> remove(const Namespace& ns, std::span<const std::string> keys);

  /// The keys of the object's blocks in chain order, and whether the chain ends in its last
  /// block (false: only a part is stored, or nothing).
  struct Chain {
    std::vector<BlockKey> keys;
    bool whole = false;
  };
  Result<Chain> chain(const Namespace& ns, std::string_view key) const;

 private:
  Status check_layout(const Namespace& ns) const;
  /// Tokens of blocks [0, n) of `key`'s chain, as an n-block object's.
  std::vector<TokenId> tokens(std::string_view key, uint64_t n, uint32_t block_tokens) const;

  TierManager& tiers_;
  const KeyChain& keys_;
  Counter& puts_;
  Counter& kept_;
  Counter& hits_;
  Counter& misses_;
  Counter& removed_;
};

}  // namespace kvtier
