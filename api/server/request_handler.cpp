#include "api/server/request_handler.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <unordered_set>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "api/wire/socket_io.h"
#include "api/kv_copy/kv_copy.h"
#include "transfer/shared_device_memory.h"

namespace kvtier::server_detail {

namespace {

constexpr size_t kMaxLeasesPerSession = 4096;
constexpr size_t kMaxLeasedBlocksPerSession = 256 * 1024;  // ~18 MiB of match state
constexpr size_t kMaxNamespacesPerSession = 1024;  // each is recorded in the catalog
constexpr size_t kMaxPinnedBlocksPerSession = 256 * 1024;  // pins a client may hold at once
constexpr size_t kMaxRegionsPerSession = 4096;  // registered memory regions (per-layer tensors)

}  // namespace

Status Handler::hello(std::span<const std::byte> payload) {
  proto::HelloRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  if (s.hello_done) {
    fatal = true;
    return Status(StatusCode::kProtocolError, "hello sent twice");
  }
  if (req.min_version > proto::kVersion || req.max_version < proto::kVersion) {
    fatal = true;
    return Status(StatusCode::kProtocolError, "client speaks protocol versions " + std::to_string(req.min_version) +
                                                  ".." + std::to_string(req.max_version) + "; this kvtierd speaks " +
                                                  std::to_string(proto::kVersion));
  }
  if (req.window_bytes > config.client_window_max_bytes) {
    fatal = true;
    return Status(StatusCode::kResourceExhausted, "window of " + std::to_string(req.window_bytes) +
                                                      " bytes exceeds the daemon's limit of " +
                                                      std::to_string(config.client_window_max_bytes));
  }
  if (!proto::valid_mailbox_bytes(req.mailbox_bytes)) {
    fatal = true;
    return Status(StatusCode::kProtocolError, "a mailbox of " + std::to_string(req.mailbox_bytes) +
                                                  " bytes: it must be a multiple of 4096 in [" +
                                                  std::to_string(proto::kMinMailboxBytes) + ", " +
                                                  std::to_string(proto::kMaxMailboxBytes) + "]");
  }
  const uint64_t mapped = proto::memfd_bytes(req.window_bytes, req.mailbox_bytes);
  if (mapped > 0) {
    if (passed_fd < 0) {
      fatal = true;
      return Status(StatusCode::kProtocolError, "hello announced a window or mailbox but passed no descriptor");
    }
    // Only a memfd sealed against shrinking: a window the client could truncate would make the
    // daemon's copies into it fault (SIGBUS) and take every client down.
    struct stat st{};
    const int seals = ::fcntl(passed_fd, F_GET_SEALS);
    if (::fstat(passed_fd, &st) != 0 || !S_ISREG(st.st_mode) || static_cast<uint64_t>(st.st_size) < mapped) {
      fatal = true;
      return invalid_argument("the window descriptor is not a memory file of at least " + std::to_string(mapped) + " bytes");
    }
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
      fatal = true;
      return invalid_argument("the window must be a memfd sealed with F_SEAL_SHRINK");
    }
    void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, passed_fd, 0);
    if (p == MAP_FAILED) {
      fatal = true;
      return Status(StatusCode::kResourceExhausted, std::string("cannot map the client's window: ") + std::strerror(errno));
    }
    s.window = static_cast<std::byte*>(p);
    s.window_bytes = req.window_bytes;
    s.mapped_bytes = mapped;
    if (req.mailbox_bytes) {
      s.mailbox = proto::Mailbox(s.window + proto::mailbox_offset(req.window_bytes), req.mailbox_bytes);
      s.mailbox_seen = s.mailbox.seq(proto::Mailbox::kRequest);
    }
  }
  s.name = req.client_name;
  s.hello_done = true;
  proto::HelloReply reply{.version = proto::kVersion, .layout = store.layout(), .client_id = s.id,
                          .uid = s.uid, .gid = s.gid, .tenants = tenants_for(config, s.uid, s.gid)};
  proto::encode(reply, body);
  spdlog::debug("kvtierd: client {} '{}' pid {} uid {} window {} bytes", s.id, s.name, s.pid, s.uid, s.window_bytes);
  return Status::ok();
}

Status Handler::open_namespace(std::span<const std::byte> payload) {
  proto::OpenNamespaceRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  const TenantRule* tenant = find_tenant(config, req.tenant);
  if (!tenant || !tenant_allows(*tenant, s.uid, s.gid)) {
    // The same answer for "no such tenant" and "not yours": a client learns nothing by probing.
    return Status(StatusCode::kPermissionDenied, "tenant '" + req.tenant + "' is not bound to uid " +
                                                     std::to_string(s.uid) + " gid " + std::to_string(s.gid));
  }
  if (s.namespaces.size() >= kMaxNamespacesPerSession) {
    return Status(StatusCode::kResourceExhausted, "this client opened " + std::to_string(kMaxNamespacesPerSession) +
                                                      " namespaces, the most one connection may");
  }
  if (req.layout_fingerprint != store.layout().fingerprint()) {
    return Status(StatusCode::kLayoutMismatch, "the client's KV layout differs from the daemon's " + store.layout().describe());
  }
  auto id = store.open_namespace_spec({.model_id = req.model_id, .layout = store.layout(),
                                       .tenant_salt = tenant->salt, .adapter_id = req.adapter_id,
                                       .revision = req.revision},
                                      tenant->name);
  if (!id) return id.status();
  // Opening it again declares a new prefill speed (an engine that measured itself).
  s.namespaces.insert_or_assign(*id, Server::Session::OpenedNamespace{tenant, req.prefill_tokens_per_second});
  proto::encode(proto::OpenNamespaceReply{.namespace_id = *id}, body);
  return Status::ok();
}

Status Handler::lookup(std::span<const std::byte> payload) {
  proto::LookupRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto n = ns(req.namespace_id);
  if (!n) return n.status();
  const size_t new_blocks = req.tokens.size() / store.layout().block_tokens;
  auto over_budget = [&] {
    return s.leases.size() >= kMaxLeasesPerSession || s.leased_blocks + new_blocks > kMaxLeasedBlocksPerSession;
  };
  if (req.take_lease && over_budget()) {
    // Leases the client forgot have expired in the index by now: forget them here too.
    const uint64_t now = static_cast<uint64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count());
    for (auto it = s.leases.begin(); it != s.leases.end();) {
      if (it->second.match.lease_expiry_ns <= now) {
        s.leased_blocks -= it->second.match.blocks.size();
        it = s.leases.erase(it);
      } else {
        ++it;
      }
    }
  }
  const bool lease = req.take_lease && !over_budget();
  if (req.take_lease && !lease) {
    return Status(StatusCode::kResourceExhausted, "this client holds " + std::to_string(s.leases.size()) +
                                                      " leases over " + std::to_string(s.leased_blocks) +
                                                      " blocks: release some");
  }
  auto m = store.match(*n, req.tokens, req.extras, {.take_lease = lease}, prefill_tokens_per_second);
  if (!m) return m.status();
  proto::LookupReply reply{.lease = m->lease, .tokens = m->tokens, .held_back_blocks = m->held_back_blocks,
                           .saved_ns = static_cast<uint64_t>(m->seconds_saved * 1e9)};
  reply.tier_masks.reserve(m->blocks.size());
  for (const BlockResidency& b : m->blocks) reply.tier_masks.push_back(b.tier_mask);
  asked_tokens = req.tokens.size() / store.layout().block_tokens * store.layout().block_tokens;
  hit_tokens = m->tokens;
  if (m->lease != kNoLease) {
    s.leased_blocks += m->blocks.size();
    s.leases.emplace(m->lease, Server::Session::HeldLease{std::move(*m), tenant});
  }
  proto::encode(reply, body);
  return Status::ok();
}

Result<Match> Handler::leased_blocks(uint64_t lease, uint32_t first_block, uint64_t block_count) {
  auto it = s.leases.find(lease);
  if (it == s.leases.end()) return Status(StatusCode::kNotFound, "lease " + std::to_string(lease) + " is not held by this client");
  const Match& m = it->second.match;
  tenant = it->second.tenant;
  if (first_block > m.blocks.size() || block_count > m.blocks.size() - first_block) {
    return invalid_argument("blocks [" + std::to_string(first_block) + ", +" + std::to_string(block_count) +
                   ") are outside the lease's " + std::to_string(m.blocks.size()) + " blocks");
  }
  Match part;
  part.lease = m.lease;
  part.blocks.assign(m.blocks.begin() + first_block, m.blocks.begin() + first_block + block_count);
  part.tokens = block_count * store.layout().block_tokens;
  return part;
}

Result<uint32_t> Handler::layer_count(uint32_t begin, uint32_t count) const {
  const uint32_t all_layers = store.layout().num_layers;
  const uint32_t layers = LayerRange{begin, count}.size(all_layers);
  if (layers == 0) {
    return invalid_argument("layers [" + std::to_string(begin) + ", +" + std::to_string(count) + ") are outside the layout's " +
                   std::to_string(all_layers));
  }
  return layers;
}

Status Handler::pinned_load(const Match& part, uint32_t layer_begin, uint32_t layers,
                            const std::function<Status()>& copy) {
  uint32_t from_nvme = 0;
  for (const BlockResidency& b : part.blocks) {
    auto now = store.tiers().index().get(b.key);
    if (now && !now->resident_in(Tier::kHost) && !now->resident_in(Tier::kHbm)) ++from_nvme;
  }
  // Pin for the copy itself: the lease may have expired (a client can wait it out), and an
  // unpinned block's slot could be reused by another tenant's save mid-copy.
  PrefixIndex& index = store.tiers().index();
  std::vector<BlockKey> held;
  held.reserve(part.blocks.size());
  auto unpin_all = [&] {
    for (const BlockKey& k : held) index.unpin(k).ignore();
  };
  for (const BlockResidency& b : part.blocks) {
    if (!index.pin(b.key).is_ok()) {
      unpin_all();
      return Status(StatusCode::kNotFound, "a leased block left the cache: the lease expired; look the prompt up again");
    }
    held.push_back(b.key);
  }
  Status st = part.blocks.empty() ? Status::ok() : copy();
  unpin_all();
  KVTIER_RETURN_IF_ERROR(st);
  const uint32_t all_layers = store.layout().num_layers;
  // A load in layer slices restores its tokens once: with the slice that ends at the last layer.
  if (layer_begin + layers == all_layers) restored_tokens = part.tokens;
  loaded_bytes = part.blocks.size() * layers * store.layout().bytes_per_block_layer();
  loaded_blocks = double(part.blocks.size()) * layers / all_layers;
  nvme_blocks = from_nvme;
  proto::encode(proto::LoadReply{.blocks = static_cast<uint32_t>(part.blocks.size()), .from_nvme = from_nvme}, body);
  return Status::ok();
}

Status Handler::load(std::span<const std::byte> payload) {
  proto::LoadRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto part = leased_blocks(req.lease, req.first_block, req.block_count);
  if (!part) return part.status();
  auto layers = layer_count(req.layer_begin, req.layer_count);
  if (!layers) return layers.status();
  const uint64_t block_bytes = uint64_t(*layers) * store.layout().bytes_per_block_layer();  // in the window
  auto base = s.window_span(req.window_offset, uint64_t(req.block_count) * block_bytes);
  if (!base) return base.status();
  std::vector<std::byte*> dsts;
  for (size_t i = 0; i < part->blocks.size(); ++i) dsts.push_back(*base + i * block_bytes);
  return pinned_load(*part, req.layer_begin, *layers, [&] {
    auto h = store.tiers().load(*part, dsts, LocationKind::kHost, {}, {req.layer_begin, *layers});
    return h ? h->wait() : h.status();
  });
}

Status Handler::register_memory(std::span<const std::byte> payload) {
  proto::RegisterMemoryRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  const auto kind = static_cast<ShareKind>(req.kind);
  if ((kind == ShareKind::kMemfd) != (passed_fd >= 0)) {
    return invalid_argument(kind == ShareKind::kMemfd ? "a memfd registration came without its descriptor"
                                             : "a CUDA IPC registration passes no descriptor");
  }
  if (s.regions.size() >= kMaxRegionsPerSession) {
    return Status(StatusCode::kResourceExhausted, "this client registered " + std::to_string(kMaxRegionsPerSession) +
                                                      " memory regions, the most one client may");
  }
  // A client in this very process (SO_PEERCRED's pid cannot be forged) is served at its own
  // address: CUDA opens no IPC handle where it was made.
  auto mapped = map_device_memory(DeviceShare{.kind = kind, .ipc_handle = req.ipc_handle, .offset = req.offset,
                                              .bytes = req.bytes, .fd = passed_fd, .address = req.address},
                                  s.pid == ::getpid());
  if (!mapped) return mapped.status();
  uint32_t id = s.next_region++;
  if (id == 0) id = s.next_region++;  // 0 never names a region
  s.regions.emplace(id, std::move(*mapped));
  proto::encode(proto::RegisterMemoryReply{.region = id}, body);
  return Status::ok();
}

Status Handler::unregister_memory(std::span<const std::byte> payload) {
  proto::UnregisterMemoryRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  if (s.regions.erase(req.region) == 0) {
    return Status(StatusCode::kNotFound, "region " + std::to_string(req.region) + " is not registered by this client");
  }
  proto::encode(proto::CountReply{.count = 1}, body);
  return Status::ok();
}

Result<KvBuffer> Handler::region_buffer(const proto::RegionBuffer& rb) {
  const KvLayout& layout = store.layout();
  const bool device_is_host = store.tiers().transfer().copy_engine().device_memory_is_host();
  // Every place must lie in one of this client's regions, `bytes` long from its offset.
  std::optional<bool> cuda;
  auto place = [&](const proto::RegionRef& p, uint64_t bytes, const char* what) -> Result<std::byte*> {
    auto it = s.regions.find(p.region);
    if (it == s.regions.end()) {
      return Status(StatusCode::kNotFound, "region " + std::to_string(p.region) + " is not registered by this client");
    }
    const MappedDeviceMemory& m = *it->second;
    if (p.offset > m.size() || bytes > m.size() - p.offset) {
      return invalid_argument(std::string(what) + " [" + std::to_string(p.offset) + ", +" + std::to_string(bytes) +
                     ") runs past region " + std::to_string(p.region) + " of " + std::to_string(m.size()) + " bytes");
    }
    if (cuda && *cuda != m.is_cuda()) return invalid_argument("one KV buffer spans GPU memory and emulated device memory");
    cuda = m.is_cuda();
    return m.data() + p.offset;
  };
  KvBuffer buf;
  if (rb.layout == 0) {
    buf.blocks.reserve(rb.places.size());
    for (const proto::RegionRef& p : rb.places) {
      auto at = place(p, layout.bytes_per_block(), "a block");
      if (!at) return at.status();
      buf.blocks.push_back(*at);
    }
  } else {
    if (layout.kind != AttentionKind::kStandard) return invalid_argument("paged KV buffers need a standard (non-MLA) layout");
    if (rb.places.size() != layout.num_layers) {
      return invalid_argument("a paged KV buffer has one tensor per layer: " + std::to_string(rb.places.size()) + " for " +
                     std::to_string(layout.num_layers) + " layers");
    }
    if (rb.engine_num_pages == 0) return invalid_argument("a paged KV buffer has no pages");
    if (rb.page_tokens % layout.block_tokens != 0) {
      return invalid_argument("engine pages of " + std::to_string(rb.page_tokens) + " tokens are not whole blocks of " +
                              std::to_string(layout.block_tokens));
    }
    // Every engine layout holds pages × (K and V of a page's tokens) per layer tensor.
    const uint64_t pieces = rb.page_tokens ? rb.page_tokens / layout.block_tokens : 1;
    const uint64_t tensor = uint64_t(rb.engine_num_pages) * pieces * layout.bytes_per_block_layer();
    for (const proto::RegionRef& p : rb.places) {
      auto at = place(p, tensor, "a layer tensor");
      if (!at) return at.status();
      buf.layer_base.push_back(*at);
    }
    buf.engine = static_cast<kernels::EngineLayout>(rb.layout - 1);
    buf.engine_num_pages = rb.engine_num_pages;
    buf.page_tokens = rb.page_tokens;
    buf.pages = rb.pages;
  }
  // GPU memory is device memory; a memfd stands in for it where the daemon's copies run on the
  // host too, and is plain host memory to a daemon with a GPU.
  buf.memory = cuda.value_or(false) || device_is_host ? LocationKind::kDevice : LocationKind::kHost;
  KVTIER_RETURN_IF_ERROR(check_kv_buffer(layout, buf));
  return buf;
}

Status Handler::load_to(std::span<const std::byte> payload) {
  proto::LoadToRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto part = leased_blocks(req.lease, req.first_block, req.dst.block_count());
  if (!part) return part.status();
  auto layers = layer_count(req.layer_begin, req.layer_count);
  if (!layers) return layers.status();
  auto dst = region_buffer(req.dst);
  if (!dst) return dst.status();
  return pinned_load(*part, req.layer_begin, *layers, [&] {
    auto h = store.load_layers(*part, *dst, {req.layer_begin, *layers});
    return h ? h->wait() : h.status();
  });
}

Status Handler::save_from(std::span<const std::byte> payload) {
  proto::SaveFromRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  if (auto n = ns(req.namespace_id); !n) return n.status();
  KVTIER_RETURN_IF_ERROR(check_priority(req.namespace_id, static_cast<Priority>(req.priority)));
  auto src = region_buffer(req.src);
  if (!src) return src.status();
  auto saved = store.save(req.namespace_id, req.tokens, *src, static_cast<Priority>(req.priority), req.extras,
                          req.first_block);
  if (!saved) return saved.status();
  saved_bytes = *saved * store.layout().bytes_per_block();
  proto::encode(proto::SaveReply{.saved = static_cast<uint32_t>(*saved)}, body);
  return Status::ok();
}

Status Handler::release(std::span<const std::byte> payload) {
  proto::ReleaseRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto it = s.leases.find(req.lease);
  if (it == s.leases.end()) return Status(StatusCode::kNotFound, "lease " + std::to_string(req.lease) + " is not held by this client");
  s.leased_blocks -= it->second.match.blocks.size();
  s.leases.erase(it);
  // kNotFound here means the lease expired in the index already: released either way.
  store.tiers().index().release(req.lease).ignore();
  proto::encode(proto::CountReply{.count = 1}, body);
  return Status::ok();
}

Status Handler::save(std::span<const std::byte> payload) {
  proto::SaveRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  if (auto n = ns(req.namespace_id); !n) return n.status();
  KVTIER_RETURN_IF_ERROR(check_priority(req.namespace_id, static_cast<Priority>(req.priority)));
  const uint32_t bt = store.layout().block_tokens;
  const size_t full = req.tokens.size() / bt;
  if (req.first_block > full) return invalid_argument("first_block is past the prompt's full blocks");
  const uint64_t bytes = uint64_t(full - req.first_block) * store.layout().bytes_per_block();
  auto base = s.window_span(req.window_offset, bytes);
  if (!base) return base.status();
  auto saved = store.save_host(req.namespace_id, req.tokens, {*base, bytes}, static_cast<Priority>(req.priority),
                               req.extras, req.first_block);
  if (!saved) return saved.status();
  saved_bytes = *saved * store.layout().bytes_per_block();
  proto::encode(proto::SaveReply{.saved = static_cast<uint32_t>(*saved)}, body);
  return Status::ok();
}

Status Handler::prefix_op(Op op, std::span<const std::byte> payload) {
  proto::PrefixRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  if (auto n = ns(req.namespace_id); !n) return n.status();
  uint64_t count = 0;
  if (op == Op::kPrefetch) {
    if (req.arg >= kNumTiers) return invalid_argument("prefetch tier " + std::to_string(req.arg) + " is not a tier");
    auto r = store.prefetch(req.namespace_id, req.tokens, static_cast<Tier>(req.arg), req.extras);
    if (!r) return r.status();
    count = *r;
  } else {
    if (op == Op::kPin && req.arg >= kNumPriorities) return invalid_argument("pin priority " + std::to_string(req.arg) + " is not a priority");
    auto keys = store.cached_prefix(req.namespace_id, req.tokens, req.extras);
    if (!keys) return keys.status();
    PrefixIndex& index = store.tiers().index();
    const TenantRule& tenant = *s.namespaces.at(req.namespace_id).tenant;
    if (op == Op::kPin) {
      KVTIER_RETURN_IF_ERROR(check_priority(req.namespace_id, static_cast<Priority>(req.arg)));
      if (s.pins.size() + keys->size() > kMaxPinnedBlocksPerSession) {
        return Status(StatusCode::kResourceExhausted, "pinning " + std::to_string(keys->size()) +
                                                          " more blocks would pass the " +
                                                          std::to_string(kMaxPinnedBlocksPerSession) + " one client may pin");
      }
      if (!server.take_tenant_pins(tenant, keys->size())) {
        return Status(StatusCode::kResourceExhausted,
                      "pinning " + std::to_string(keys->size()) + " more blocks would pass tenant '" + tenant.name +
                          "''s quota of " + std::to_string(tenant.max_pinned_blocks) + " pinned blocks (" +
                          std::to_string(server.tenant_pins(tenant)) + " held now)");
      }
    }
    for (const BlockKey& k : *keys) {
      if (op == Op::kPin) {
        if (!s.pins.pin(index, k, static_cast<Priority>(req.arg)).is_ok()) break;  // evicted meanwhile
        ++count;
      } else {
        count += s.pins.unpin(index, k).is_ok();  // only this session's own pins
      }
    }
    if (op == Op::kPin) {
      server.give_tenant_pins(tenant, keys->size() - count);  // taken for blocks evicted meanwhile
      s.tenant_pins[&tenant] += count;
    } else {
      server.give_tenant_pins(tenant, count);
      s.tenant_pins[&tenant] -= count;
    }
  }
  proto::encode(proto::CountReply{.count = count}, body);
  return Status::ok();
}

// ---- operator calls: kvtier inspect, kvtier doctor and kvtier export --------------------------------------------

Status Handler::check_operator(std::string_view what) const {
  // They show every tenant's namespaces and prompts' cache state: the daemon's own uid and root only.
  if (s.uid == 0 || s.uid == ::geteuid()) return Status::ok();
  return Status(StatusCode::kPermissionDenied, std::string(what) + " is for operators: uid " + std::to_string(s.uid) +
                                                   " is neither root nor kvtierd's own uid " +
                                                   std::to_string(::geteuid()));
}

std::vector<TenantSalt> Handler::config_tenants() const {
  std::vector<TenantSalt> out;
  for (const TenantRule& t : config.tenants) out.push_back({t.name, t.salt});
  return out;
}

Status Handler::inspect(std::span<const std::byte> payload) {
  proto::InspectRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  KVTIER_RETURN_IF_ERROR(check_operator("inspect"));
  proto::encode(proto::JsonReply{inspect_json(store, req.top_prefixes, "kvtierd", config_tenants())}, body);
  return Status::ok();
}

Status Handler::doctor(std::span<const std::byte> payload) {
  proto::DoctorRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  KVTIER_RETURN_IF_ERROR(check_operator("doctor"));
  const TenantRule* rule = find_tenant(config, req.tenant);
  if (!rule) return Status(StatusCode::kNotFound, "kvtierd's config has no tenant named '" + req.tenant + "'");
  const std::vector<TenantSalt> tenants = config_tenants();
  kvtier::DoctorRequest d{.spec = {.model_id = req.model_id, .layout = store.layout(), .tenant_salt = rule->salt,
                                   .adapter_id = req.adapter_id, .revision = req.revision},
                          .tenant = rule->name,
                          .tokens = std::move(req.tokens),
                          .extras = std::move(req.extras),
                          .engine_block_tokens = req.engine_block_tokens,
                          .engine_layout_fingerprint = req.engine_layout_fingerprint};
  auto text = doctor_json(store, d, tenants);
  if (!text) return text.status();
  proto::encode(proto::JsonReply{std::move(text).value()}, body);
  return Status::ok();
}

Status Handler::export_list(std::span<const std::byte> payload) {
  proto::ExportListRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  KVTIER_RETURN_IF_ERROR(check_operator("export"));
  PrefixIndex& index = store.tiers().index();
  if (req.restart) {
    s.export_walk = IndexExport::start(index, req.roots);
  } else if (!s.export_walk) {
    return invalid_argument("no export walk is under way on this connection: restart one");
  }
  uint64_t gone = 0;
  const std::vector<ExportedBlock> page = s.export_walk->next(index, req.max_blocks, gone);
  proto::encode(proto::JsonReply{export_page_json(*s.export_walk, page, gone)}, body);
  if (s.export_walk->done()) s.export_walk.reset();
  return Status::ok();
}

Status Handler::export_read(std::span<const std::byte> payload) {
  proto::ExportReadRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  KVTIER_RETURN_IF_ERROR(check_operator("export"));
  const uint64_t bpb = store.layout().bytes_per_block();
  if (req.keys.size() > s.window_bytes / bpb) {
    return invalid_argument(std::to_string(req.keys.size()) + " blocks do not fit the " +
                            std::to_string(s.window_bytes) + "-byte window");
  }
  auto base = s.window_span(req.window_offset, uint64_t(req.keys.size()) * bpb);
  if (!base) return base.status();
  std::vector<std::byte*> dsts;
  for (size_t i = 0; i < req.keys.size(); ++i) dsts.push_back(*base + i * bpb);
  proto::ExportReadReply reply{store.tiers().read_blocks(req.keys, dsts)};
  for (const Status& st : reply.blocks) loaded_bytes += st.is_ok() ? bpb : 0;
  proto::encode(reply, body);
  return Status::ok();
}

Status Handler::object_put(std::span<const std::byte> payload) {
  proto::ObjectPutRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto n = ns(req.namespace_id);
  if (!n) return n.status();
  KVTIER_RETURN_IF_ERROR(check_priority(req.namespace_id, static_cast<Priority>(req.priority)));
  const uint64_t bpb = store.layout().bytes_per_block();
  const uint64_t blocks = object_blocks(req.length, bpb);
  if (blocks > s.window_bytes / bpb) {
    return invalid_argument("an object of " + std::to_string(req.length) + " bytes (" + std::to_string(blocks) +
                            " blocks) does not fit the " + std::to_string(s.window_bytes) + "-byte window");
  }
  auto base = s.window_span(req.window_offset, blocks * bpb);
  if (!base) return base.status();
  auto stored = store.objects().put(*n, req.key, req.length, {*base, blocks * bpb}, static_cast<Priority>(req.priority));
  if (!stored) return stored.status();
  if (*stored) saved_bytes = blocks * bpb;
  proto::encode(proto::ObjectPutReply{.stored = *stored}, body);
  return Status::ok();
}

Status Handler::object_get(std::span<const std::byte> payload) {
  proto::ObjectGetRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto n = ns(req.namespace_id);
  if (!n) return n.status();
  auto base = s.window_span(req.window_offset, req.window_bytes);
  if (!base) return base.status();
  auto length = store.objects().get(*n, req.key, {*base, req.window_bytes});
  if (!length) return length.status();
  loaded_bytes = *length;
  proto::encode(proto::ObjectGetReply{.length = *length}, body);
  return Status::ok();
}

Status Handler::object_keys(Op op, std::span<const std::byte> payload) {
  proto::ObjectKeysRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto n = ns(req.namespace_id);
  if (!n) return n.status();
  // Whoever opened the namespace may erase from it, as it may save into it.
  auto count = op == Op::kObjectExists ? store.objects().exists(*n, req.keys) : store.objects().remove(*n, req.keys);
  if (!count) return count.status();
  proto::encode(proto::CountReply{.count = *count}, body);
  return Status::ok();
}

}  // namespace kvtier::server_detail
