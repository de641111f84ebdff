// The interface a serving engine uses, in-process (kvtier::Store, api/store/store.h) or through the
// kvtierd daemon (kvtier::Client, kvtier/client.h). Both implement KvStore, so an engine switches
// between them without other changes.
//
// A request's life: lookup() the prompt → a Match of the longest cached prefix under a lease that
// pins its blocks; load() the matched blocks into the engine's KV memory (per-layer completion on
// the handle); release() the match; compute the rest of the prompt; save() its new full blocks.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "kvtier/export.h"
#include "kvtier/kv_buffer.h"
#include "kvtier/kv_layout.h"
#include "kvtier/match.h"
#include "kvtier/object.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "kvtier/tokens.h"
#include "kvtier/transfer_handle.h"

namespace kvtier {

using NamespaceId = uint32_t;

/// What a namespace is made of. The tenant names a tenant of the deployment: in-process it is the
/// salt itself; through kvtierd it must be a tenant the client's identity is bound to.
struct NamespaceRequest {
  std::string model_id;
  std::string tenant;
  std::string adapter_id;
  /// The model weights' revision: a commit hash, or a digest of the weight files when none is
  /// known. Part of the namespace's root key, so KV computed with other weights of the same model
  /// id never matches. "" for none (every revision then shares the namespace).
  std::string revision;
  /// Restore or recompute: the engine's prefill speed in tokens per second, declared (or
  /// measured by the engine integration). With it, a lookup offers only the cached prefix that
  /// restores faster than the engine would recompute it, from each tier's measured restore
  /// bandwidth, and the match says what it held back (Match::held_back_blocks). Opening the
  /// namespace again with another speed replaces it. 0 (the default) declares nothing: every
  /// cached block is offered. Must be finite and >= 0.
  double prefill_tokens_per_second = 0;
};

class KVTIER_API KvStore {
 public:
  virtual ~KvStore() = default;

  /// The KV layout of every block this store holds.
  virtual const KvLayout& layout() const noexcept = 0;

  /// Resolves a namespace: kPermissionDenied for a tenant the caller may not use.
  virtual Result<NamespaceId> open_namespace(const NamespaceRequest& request) = 0;

  /// The longest cached prefix of `tokens` (full blocks only), under a lease that keeps every
  /// matched block from eviction until release() or the lease's expiry. An empty match has no
  /// lease. Only `tokens`, `blocks[i].key` (in-process) and `blocks[i].tier_mask` are meaningful.
  virtual Result<Match> lookup(NamespaceId ns, std::span<const TokenId> tokens,
                               std::span<const BlockExtra> extras = {}) = 0;

  /// Copies the first dst.block_count() blocks of a leased match into `dst` (at most
  /// match.blocks.size()). The handle reports per-layer completion: wait_layer(l) returns once
  /// layer l of every block is in place. Blocks found only on NVMe are restored (checksum
  /// verified) first; a corrupt block fails the load with kChecksumMismatch.
  virtual Result<TransferHandle> load(const Match& match, const KvBuffer& dst) = 0;

  /// load() of layers [layers.begin, layers.begin + count) only (count 0: to the last layer): each
  /// block of `dst` is whole and only those layers of it are written (a pipeline-parallel rank that
  /// holds some layers, or layers restored as they are needed). The handle's layer i is layer
  /// layers.begin + i. kInvalidArgument for a range outside the layout.
  virtual Result<TransferHandle> load_layers(const Match& match, const KvBuffer& dst, LayerRange layers) = 0;

  /// Releases a match's lease (a no-op for a match without one).
  virtual Status release(const Match& match) = 0;

  /// Saves the full blocks of `tokens` whose KV `src` holds. src covers blocks
  /// [first_block, tokens/block_tokens); earlier blocks must be cached already. Blocks already
  /// cached are skipped. Returns the number newly saved.
  virtual Result<size_t> save(NamespaceId ns, std::span<const TokenId> tokens, const KvBuffer& src,
                              Priority priority = Priority::kNormal,
                              std::span<const BlockExtra> extras = {}, size_t first_block = 0) = 0;

  /// Copies the cached prefix of `tokens` up into `to` (kHost or kHbm) ahead of a request.
  /// Returns the number of blocks moved.
  virtual Result<size_t> prefetch(NamespaceId ns, std::span<const TokenId> tokens, Tier to,
                                  std::span<const BlockExtra> extras = {}) = 0;

  /// Pins the cached prefix of `tokens` so it is never evicted, and holds it at priority class
  /// `priority` or above while pinned (a pin never lowers a block's class). Through kvtierd the
  /// pins end when the client disconnects. Returns the number of blocks pinned.
  virtual Result<size_t> pin(NamespaceId ns, std::span<const TokenId> tokens,
                             Priority priority = Priority::kRetained,
                             std::span<const BlockExtra> extras = {}) = 0;
  /// Undoes pin() for the cached prefix of `tokens`: one of this store's (or this client's) own
  /// pins per block, the latest first, and each block's priority class goes back to what it was
  /// without that pin. Returns the number of blocks unpinned.
  virtual Result<size_t> unpin(NamespaceId ns, std::span<const TokenId> tokens,
                               std::span<const BlockExtra> extras = {}) = 0;

  /// Counters, occupancy and latencies in Prometheus text format.
  virtual Result<std::string> metrics_text() = 0;

  /// Key-addressed objects: bytes an engine names by a key of its own (SGLang's page hashes,
  /// LMCache's chunk keys) instead of by tokens, kept in namespace `ns`'s tiers like its blocks:
  /// persisted, checksummed, evicted and counted against its tenant the same way. A key is
  /// 1..kMaxObjectKeyBytes bytes, any. An object takes whole blocks (its bytes and an 8-byte
  /// length); through kvtierd it must fit the client's window so laid out.
  /// Stores `bytes` under `key`. False when the key was stored whole already: keys name content,
  /// so what is there is kept.
  virtual Result<bool> object_put(NamespaceId ns, std::string_view key, std::span<const std::byte> bytes,
                                  Priority priority = Priority::kNormal) = 0;
  /// Copies the object named `key` into `dst` and returns its length. kNotFound when it is not
  /// stored (never put, or evicted: an object loses its tail first and is then not stored);
  /// kInvalidArgument when `dst` is shorter than the object (the message gives its length).
  virtual Result<uint64_t> object_get(NamespaceId ns, std::string_view key, std::span<std::byte> dst) = 0;
  /// How many of `keys`, from the first, are stored: the first missing one ends the count.
  virtual Result<size_t> object_exists(NamespaceId ns, std::span<const std::string> keys) = 0;
  /// Erases the objects named `keys`: how many of them were stored. kBusy while one is being read.
  virtual Result<size_t> object_remove(NamespaceId ns, std::span<const std::string> keys) = 0;
};

}  // namespace kvtier
