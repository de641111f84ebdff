#include "api/store/store.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "api/kv_copy/kv_copy.h"
#include "api/metrics/metrics.h"

namespace kvtier {
namespace {


}  // namespace

Store::Store(StoreOptions options) : options_(std::move(options)), keys_(options_.secret) {}

Result<std::unique_ptr<Store>> Store::open(StoreOptions options) {
  if (options.scratch_blocks == 0) return invalid_argument("scratch_blocks must be at least 1");
  std::unique_ptr<Store> store(new Store(std::move(options)));
  auto tiers = TierManager::open(store->keys_, store->options_.tiers);
  if (!tiers) return tiers.status();
  store->tiers_ = std::move(*tiers);
  const uint64_t bpb = store->layout().bytes_per_block();
  store->packer_ = create_page_packer(store->tiers_->transfer().copy_engine().device_memory_is_host(),
                                      std::min<uint64_t>(uint64_t(store->options_.scratch_blocks) * bpb, 64ull << 20),
                                      bpb);
  store->copier_ = std::make_unique<EngineCopier>(store->tiers_->transfer());
  store->objects_ = std::make_unique<ObjectStore>(*store->tiers_, store->keys_);
  return store;
}

Store::~Store() { close().ignore(); }

Status Store::close() {
  std::lock_guard lock(close_mu_);
  if (closed_) return Status::ok();
  closed_ = true;
  if (!tiers_) return Status::ok();  // open() failed before the tiers were there: nothing to flush
  auto flushed = tiers_->flush();
  tiers_->close();
  return flushed ? Status::ok() : flushed.status();
}

Result<Namespace> Store::namespace_of(NamespaceId id) const {
  std::shared_lock lock(ns_mu_);
  if (id >= namespaces_.size()) {
    return Status(StatusCode::kNotFound, "unknown namespace id " + std::to_string(id) + ": open_namespace first");
  }
  return namespaces_[id];
}

Result<NamespaceId> Store::open_namespace_spec(const NamespaceSpec& spec, std::string_view tenant) {
  auto key = std::make_tuple(spec.model_id, spec.tenant_salt, spec.adapter_id, spec.revision);
  {
    std::shared_lock lock(ns_mu_);
    if (auto it = ns_ids_.find(key); it != ns_ids_.end()) return it->second;
  }
  auto ns = tiers_->add_namespace(spec, tenant);
  if (!ns) return ns.status();
  std::unique_lock lock(ns_mu_);
  if (auto it = ns_ids_.find(key); it != ns_ids_.end()) return it->second;  // lost a race: same root
  const auto id = static_cast<NamespaceId>(namespaces_.size());
  namespaces_.push_back(*ns);
  prefill_speed_.push_back(0);
  opened_.push_back({spec, std::string(tenant)});
  ns_ids_.emplace(std::move(key), id);
  return id;
}

std::vector<Store::OpenedNamespace> Store::opened_namespaces() const {
  std::shared_lock lock(ns_mu_);
  return opened_;
}

Result<NamespaceId> Store::open_namespace(const NamespaceRequest& request) {
  const double speed = request.prefill_tokens_per_second;
  if (!std::isfinite(speed) || speed < 0) {
    return invalid_argument("prefill_tokens_per_second must be finite and >= 0, got " + std::to_string(speed));
  }
  // In-process, the tenant is its own salt, and names it in StoreOptions::tiers.tenants too.
  auto id = open_namespace_spec({.model_id = request.model_id, .layout = layout(),
                                 .tenant_salt = request.tenant, .adapter_id = request.adapter_id,
                                 .revision = request.revision},
                                request.tenant);
  if (!id) return id.status();
  std::unique_lock lock(ns_mu_);
  prefill_speed_[*id] = speed;  // the last declaration wins (an engine that measured itself)
  return id;
}

Result<Match> Store::lookup(NamespaceId id, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  double speed = 0;
  {
    std::shared_lock lock(ns_mu_);
    speed = prefill_speed_[id];
  }
  return match(*ns, tokens, extras, {.take_lease = true}, speed);
}

Result<Match> Store::match(const Namespace& ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras,
                           const MatchOptions& options, double prefill_tokens_per_second) {
  auto m = tiers_->index().match(ns, tokens, extras, options);
  if (!m || !(prefill_tokens_per_second > 0) || m->blocks.empty()) return m;
  const RestoreOffer offer = tiers_->plan_restore(m->blocks, prefill_tokens_per_second);
  // A lease that expired already (lease_ns tiny) leaves the match shortened all the same.
  tiers_->index().shorten(*m, offer.keep).ignore();
  m->held_back_blocks = static_cast<uint32_t>(offer.held_back);
  m->seconds_saved = offer.seconds_saved;
  return m;
}

Status Store::release(const Match& match) {
  if (match.lease == kNoLease) return Status::ok();
  return tiers_->index().release(match.lease);
}

Result<TransferHandle> Store::load(const Match& match, const KvBuffer& dst) { return load_layers(match, dst, {}); }

Result<TransferHandle> Store::load_layers(const Match& match, const KvBuffer& dst, LayerRange range) {
  KVTIER_RETURN_IF_ERROR(check_load(layout(), match, dst));
  const size_t n = dst.block_count();
  if (n == match.blocks.size()) return load_part(match, dst, range);
  Match part;
  part.lease = match.lease;
  part.tokens = uint64_t(n) * layout().block_tokens;
  part.blocks.assign(match.blocks.begin(), match.blocks.begin() + n);
  return load_part(part, dst, range);
}

Result<TransferHandle> Store::load_part(const Match& part, const KvBuffer& dst, LayerRange range) {
  const uint32_t layers = range.size(layout().num_layers);
  if (layers == 0) return invalid_argument("load: the layer range is outside the layout's layers");
  const uint64_t layer_bytes = layout().bytes_per_block_layer();
  const size_t n = dst.block_count();
  if (!dst.is_paged()) {
    // The tier manager writes the range's layers from each destination on.
    std::vector<std::byte*> dsts;
    dsts.reserve(n);
    for (std::byte* b : dst.blocks) dsts.push_back(b + uint64_t(range.begin) * layer_bytes);
    return tiers_->load(part, dsts, dst.memory, {}, range);
  }

  const uint64_t bytes = uint64_t(layers) * layer_bytes;  // of one block in scratch
  if (n == 0) return finished_handle(layers);
  // Paged: restore the range's layers of `window` blocks at a time into scratch (host memory, or
  // a packer lane's device staging: host tier → GPU by DMA, HBM tier device to device), then
  // unpack them into the engine's pages (on the CPU, or with the kernel).
  auto restore_in_windows = [&](std::byte* scratch, LocationKind kind, size_t window, auto&& unpack) -> Status {
    for (size_t b0 = 0; b0 < n; b0 += window) {
      const size_t count = std::min(window, n - b0);
      Match chunk;
      chunk.lease = part.lease;
      chunk.blocks.assign(part.blocks.begin() + b0, part.blocks.begin() + b0 + count);
      std::vector<std::byte*> dsts;
      for (size_t i = 0; i < count; ++i) dsts.push_back(scratch + i * bytes);
      auto h = tiers_->load(chunk, dsts, kind, {}, range);
      if (!h) return h.status();
      KVTIER_RETURN_IF_ERROR(h->wait());
      KVTIER_RETURN_IF_ERROR(unpack(b0, count));
    }
    return Status::ok();
  };
  Status st;
  if (dst.memory == LocationKind::kDevice) {
    auto lane = packer_->acquire();
    if (!lane) return lane.status();
    const size_t window = std::min<size_t>(n, lane->staging_bytes() / bytes);
    if (window == 0) return invalid_argument("load: a block does not fit the device staging");
    st = restore_in_windows(lane->staging(), LocationKind::kDevice, window, [&](size_t b0, size_t count) {
      return unpack_in_device(layout(), lane->staging(), dst, b0, count, *lane, range);
    });
  } else {
    const size_t window = std::min<size_t>(n, options_.scratch_blocks);
    auto scratch = std::make_unique<std::byte[]>(window * bytes);
    st = restore_in_windows(scratch.get(), LocationKind::kHost, window, [&](size_t b0, size_t count) {
      auto done = scatter_blocks(layout(), scratch.get(), dst, b0, count, {copier_.get(), packer_.get()}, range);
      return done ? done->wait() : done.status();
    });
  }
  if (!st) return st;
  return finished_handle(layers);
}

Result<size_t> Store::save_host(NamespaceId id, std::span<const TokenId> tokens, std::span<const std::byte> kv,
                                Priority priority, std::span<const BlockExtra> extras, size_t first_block) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  return tiers_->save(*ns, tokens, kv, Tier::kHost, priority, extras, first_block);
}

Result<size_t> Store::save(NamespaceId id, std::span<const TokenId> tokens, const KvBuffer& src,
                           Priority priority, std::span<const BlockExtra> extras, size_t first_block) {
  auto checked = check_save(layout(), tokens.size(), src, extras, first_block);
  if (!checked) return checked.status();
  const size_t full = *checked;
  const uint32_t bt = layout().block_tokens;
  const uint64_t bpb = layout().bytes_per_block();
  if (src.is_paged() && first_block >= full) return size_t{0};  // nothing to pack
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  if (!src.is_paged()) {
    // Canonical blocks, host or device, back to back or not: each is copied once, into its slot.
    std::vector<const std::byte*> blocks(src.blocks.begin(), src.blocks.end());
    return tiers_->save_blocks(*ns, tokens.first(full * bt), blocks, src.memory, Tier::kHost, priority, extras,
                               first_block);
  }
  // Paged: pack `window` blocks at a time into a canonical buffer (host scratch, or a packer
  // lane's device staging), then save them from there, each block copied once into its slot.
  auto save_in_windows = [&](std::byte* buf, LocationKind kind, size_t window, auto&& pack) -> Result<size_t> {
    size_t saved = 0;
    std::vector<const std::byte*> blocks;
    for (size_t b0 = first_block; b0 < full; b0 += window) {
      const size_t count = std::min(window, full - b0);
      KVTIER_RETURN_IF_ERROR(pack(b0 - first_block, count));
      blocks.clear();
      for (size_t i = 0; i < count; ++i) blocks.push_back(buf + i * bpb);
      const size_t end = b0 + count;
      auto r = tiers_->save_blocks(*ns, tokens.first(end * bt), blocks, kind, Tier::kHost, priority,
                                   extras_below(extras, end), b0);
      if (!r) return r.status();
      saved += *r;
    }
    return saved;
  };
  if (src.memory == LocationKind::kDevice) {
    // The pack kernel fills the lane's staging; each block goes from there into its slot by one
    // DMA. The lane stays held through each window's save, which reads its staging.
    auto lane = packer_->acquire();
    if (!lane) return lane.status();
    const size_t window = lane->staging_bytes() / bpb;
    if (window == 0) return invalid_argument("save: a block does not fit the device staging");
    return save_in_windows(lane->staging(), LocationKind::kDevice, window, [&](size_t first, size_t count) {
      return pack_in_device(layout(), src, first, count, lane->staging(), *lane);
    });
  }
  const size_t window = std::min<size_t>(src.block_count(), options_.scratch_blocks);
  auto scratch = std::make_unique<std::byte[]>(window * bpb);
  return save_in_windows(scratch.get(), LocationKind::kHost, window, [&](size_t first, size_t count) {
    return gather_blocks(layout(), src, first, count, scratch.get(), {copier_.get(), packer_.get()});
  });
}

Result<std::vector<BlockKey>> Store::cached_prefix(NamespaceId id, std::span<const TokenId> tokens,
                                                   std::span<const BlockExtra> extras) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  auto m = tiers_->index().match(*ns, tokens, extras, {.take_lease = false, .touch = false});
  if (!m) return m.status();
  std::vector<BlockKey> keys;
  keys.reserve(m->blocks.size());
  for (const BlockResidency& r : m->blocks) keys.push_back(r.key);
  return keys;
}

Result<size_t> Store::prefetch(NamespaceId id, std::span<const TokenId> tokens, Tier to,
                               std::span<const BlockExtra> extras) {
  if (to == Tier::kNvme || !tiers_->has_tier(to)) {
    return invalid_argument("prefetch goes to a memory tier this store has; " + std::string(tier_name(to)) + " is not one");
  }
  auto keys = cached_prefix(id, tokens, extras);
  if (!keys) return keys.status();
  return tiers_->promote(*keys, to);
}

Result<size_t> Store::pin(NamespaceId id, std::span<const TokenId> tokens, Priority priority,
                          std::span<const BlockExtra> extras) {
  auto keys = cached_prefix(id, tokens, extras);
  if (!keys) return keys.status();
  if (static_cast<int>(priority) >= kNumPriorities) return invalid_argument("unknown priority class");
  size_t pinned = 0;
  std::lock_guard lock(pins_mu_);
  for (const BlockKey& k : *keys) {
    if (!pins_.pin(tiers_->index(), k, priority).is_ok()) break;  // evicted meanwhile: the prefix ends here
    ++pinned;
  }
  return pinned;
}

Result<size_t> Store::unpin(NamespaceId id, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  auto keys = cached_prefix(id, tokens, extras);
  if (!keys) return keys.status();
  size_t unpinned = 0;
  std::lock_guard lock(pins_mu_);
  // Only pins pin() took, each at the class it was taken with.
  for (const BlockKey& k : *keys) unpinned += pins_.unpin(tiers_->index(), k).is_ok();
  return unpinned;
}

Result<std::string> Store::metrics_text() { return tiers_->metrics().render(); }

Result<bool> Store::object_put(NamespaceId id, std::string_view key, std::span<const std::byte> bytes,
                               Priority priority) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  const uint64_t bpb = layout().bytes_per_block();
  std::vector<std::byte> laid(object_blocks(bytes.size(), bpb) * bpb);
  lay_out_object(bytes, laid);
  return objects_->put(*ns, key, bytes.size(), laid, priority);
}

Result<uint64_t> Store::object_get(NamespaceId id, std::string_view key, std::span<std::byte> dst) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  return objects_->get(*ns, key, dst);
}

Result<size_t> Store::object_exists(NamespaceId id, std::span<const std::string> keys) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  return objects_->exists(*ns, keys);
}

Result<size_t> Store::object_remove(NamespaceId id, std::span<const std::string> keys) {
  auto ns = namespace_of(id);
  if (!ns) return ns.status();
  return objects_->remove(*ns, keys);
}

}  // namespace kvtier
