// Store: the in-process KvStore — one TierManager (index, tiers, transfer engine) in the engine's
// own process. kvtierd serves one Store to many processes; Client talks to it.
#pragma once

#include <map>
#include <memory>
#include <shared_mutex>
#include <string>
#include <tuple>
#include <vector>

#include "api/store/engine_copier.h"
#include "api/store/object_store.h"
#include "api/store/tier_manager.h"
#include "kernels/page_packer.h"
#include "kvtier/kv_store.h"

namespace kvtier {

struct StoreOptions {
  /// The tiers, the index and the transfer engine (layout and host capacity required).
  TierManagerOptions tiers;
  /// The deployment secret every key derives from: the same secret gives the same keys across
  /// processes and restarts. "" gives well-known keys (a single trusted deployment only).
  std::string secret;
  /// Host scratch a save or load of device or paged KV is staged through, in blocks (default 64).
  /// Paged KV in device memory is staged in device memory instead, as many blocks up to 64 MiB.
  uint32_t scratch_blocks = 64;
};

class Store final : public KvStore {
 public:
  /// Opens the tiers (and recovers the NVMe catalog). kInvalidArgument for bad options.
  static Result<std::unique_ptr<Store>> open(StoreOptions options);
  /// close() if it was not called.
  ~Store() override;

  TierManager& tiers() noexcept { return *tiers_; }
  /// Key-addressed objects in this store's tiers (object_store.h).
  ObjectStore& objects() noexcept { return *objects_; }
  const KeyChain& keys() const noexcept { return keys_; }
  /// The namespace an id stands for; kNotFound for an unknown id.
  Result<Namespace> namespace_of(NamespaceId id) const;
  /// Resolves a namespace from its full spec (the daemon passes the tenant's salt here), its
  /// blocks counted under `tenant` (TierManager::add_namespace).
  Result<NamespaceId> open_namespace_spec(const NamespaceSpec& spec, std::string_view tenant = {});
  /// A namespace opened since the store opened: its spec (the tenant's salt in it) and the tenant
  /// name it was opened under.
  struct OpenedNamespace {
    NamespaceSpec spec;
    std::string tenant;
  };
  std::vector<OpenedNamespace> opened_namespaces() const;

  /// Writes back every memory-only block to NVMe and stops the transfer engine: what a graceful
  /// shutdown calls. Idempotent; the store refuses work afterwards.
  Status close();

  // KvStore
  const KvLayout& layout() const noexcept override { return tiers_->layout(); }
  Result<NamespaceId> open_namespace(const NamespaceRequest& request) override;
  Result<Match> lookup(NamespaceId ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras = {}) override;
  Result<TransferHandle> load(const Match& match, const KvBuffer& dst) override;
  Status release(const Match& match) override;
  Result<size_t> save(NamespaceId ns, std::span<const TokenId> tokens, const KvBuffer& src,
                      Priority priority = Priority::kNormal, std::span<const BlockExtra> extras = {},
                      size_t first_block = 0) override;
  Result<size_t> prefetch(NamespaceId ns, std::span<const TokenId> tokens, Tier to,
                          std::span<const BlockExtra> extras = {}) override;
  Result<size_t> pin(NamespaceId ns, std::span<const TokenId> tokens, Priority priority = Priority::kRetained,
                     std::span<const BlockExtra> extras = {}) override;
  Result<size_t> unpin(NamespaceId ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras = {}) override;
  Result<std::string> metrics_text() override;
  Result<bool> object_put(NamespaceId ns, std::string_view key, std::span<const std::byte> bytes,
                          Priority priority = Priority::kNormal) override;
  Result<uint64_t> object_get(NamespaceId ns, std::string_view key, std::span<std::byte> dst) override;
  Result<size_t> object_exists(NamespaceId ns, std::span<const std::string> keys) override;
  Result<size_t> object_remove(NamespaceId ns, std::span<const std::string> keys) override;

  /// The index's match, then restore or recompute for an engine that prefills
  /// `prefill_tokens_per_second` (TierManager::plan_restore): the blocks not worth restoring
  /// leave the match (and its lease), counted in held_back_blocks. 0: the index's match as is.
  Result<Match> match(const Namespace& ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras,
                      const MatchOptions& options, double prefill_tokens_per_second);
  /// The keys of the cached prefix of `tokens` (no lease, recency untouched).
  Result<std::vector<BlockKey>> cached_prefix(NamespaceId ns, std::span<const TokenId> tokens,
                                              std::span<const BlockExtra> extras = {});
  /// KvStore::load_layers; also the daemon's slices into a client's registered memory. Paged host
  /// buffers go through host scratch and the CPU unpack; paged device buffers through a packer
  /// lane's device staging and the unpack kernel.
  Result<TransferHandle> load_layers(const Match& match, const KvBuffer& dst, LayerRange layers) override;
  /// Saves canonical KV already in host memory (`kv` holds blocks [first_block, n) back to back):
  /// the zero-gather path the daemon uses for a client's shared window.
  Result<size_t> save_host(NamespaceId ns, std::span<const TokenId> tokens, std::span<const std::byte> kv,
                           Priority priority, std::span<const BlockExtra> extras, size_t first_block);

 private:
  Store(StoreOptions options);
  /// load_layers of a checked `part`: one matched block per block of dst.
  Result<TransferHandle> load_part(const Match& part, const KvBuffer& dst, LayerRange layers);

  StoreOptions options_;
  KeyChain keys_;
  std::unique_ptr<TierManager> tiers_;
  std::unique_ptr<kernels::DevicePagePacker> packer_;  // paged KV in device memory
  std::unique_ptr<EngineCopier> copier_;               // canonical KV in device memory, via tiers_
  std::unique_ptr<ObjectStore> objects_;
  mutable std::shared_mutex ns_mu_;
  std::vector<Namespace> namespaces_;                                   // id → namespace
  std::vector<double> prefill_speed_;  // id → the prefill speed its last open_namespace declared
  std::vector<OpenedNamespace> opened_;  // id → how it was opened
  // (model, tenant salt, adapter, revision) → id
  std::map<std::tuple<std::string, std::string, std::string, std::string>, NamespaceId> ns_ids_;
  bool closed_ = false;
  std::mutex close_mu_;
  std::mutex pins_mu_;
  PinLedger pins_;  // the pins pin() took, for unpin(); guarded by pins_mu_
};

}  // namespace kvtier
