#include "api/src/server.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
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

#include "api/src/mailbox.h"
#include "api/src/protocol.h"
#include "api/src/socket_io.h"

namespace kvtier {

using proto::Op;

namespace {

constexpr size_t kMaxLeasesPerSession = 4096;
constexpr size_t kMaxLeasedBlocksPerSession = 256 * 1024;  // ~18 MiB of match state
constexpr size_t kMaxNamespacesPerSession = 1024;  // each is recorded in the catalog
constexpr size_t kMaxPinnedBlocksPerSession = 256 * 1024;  // pins a client may hold at once

Status invalid(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }

std::string_view op_name(uint16_t op) {
  switch (static_cast<Op>(op)) {
    case Op::kHello: return "hello";
    case Op::kOpenNamespace: return "open_namespace";
    case Op::kLookup: return "lookup";
    case Op::kLoad: return "load";
    case Op::kRelease: return "release";
    case Op::kSave: return "save";
    case Op::kPrefetch: return "prefetch";
    case Op::kPin: return "pin";
    case Op::kUnpin: return "unpin";
    case Op::kStats: return "stats";
    case Op::kDoorbell: return "doorbell";
  }
  return "unknown";
}

constexpr Op kAllOps[] = {Op::kHello, Op::kOpenNamespace, Op::kLookup, Op::kLoad, Op::kRelease,
                          Op::kSave, Op::kPrefetch, Op::kPin, Op::kUnpin, Op::kStats};

}  // namespace

struct Server::Session {
  uint64_t id = 0;
  int fd = -1;
  uint32_t uid = 0, gid = 0;
  pid_t pid = 0;
  std::string name;
  bool hello_done = false;
  std::byte* window = nullptr;
  uint64_t window_bytes = 0;
  uint64_t mapped_bytes = 0;      // the window and the mailbox after it
  proto::Mailbox mailbox;         // the client's fast path for small requests (mailbox.h)
  uint32_t mailbox_seen = 0;      // the last request sequence number taken from it
  proto::AdaptiveSpin spin;       // how long to spin for the next request before parking
  std::unordered_set<NamespaceId> namespaces;  // opened by this session (tenant checked)
  std::unordered_map<LeaseId, Match> leases;
  size_t leased_blocks = 0;  // blocks over all entries of `leases`
  PinLedger pins;  // the priority pins this session holds

  /// The window bytes [offset, offset + bytes), or kInvalidArgument when outside the window.
  Result<std::byte*> window_span(uint64_t offset, uint64_t bytes) const {
    if (!window || window_bytes == 0) return invalid("this client handed over no shared-memory window");
    if (offset > window_bytes || bytes > window_bytes - offset) {
      return invalid("window range [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                     ") is outside the " + std::to_string(window_bytes) + "-byte window");
    }
    return window + offset;
  }
};

struct Server::Instruments {
  struct PerOp {
    Counter* requests = nullptr;
    Counter* errors = nullptr;
    Histogram* seconds = nullptr;
  };
  PerOp ops[16];
  Counter* tokens_restored = nullptr;
  Counter* bytes_loaded = nullptr;
  Counter* bytes_saved = nullptr;
  Counter* blocks_from_nvme = nullptr;
  Counter* lookup_hit_tokens = nullptr;
  Counter* lookup_tokens = nullptr;
  Counter* clients_total = nullptr;
  Counter* clients_refused = nullptr;
  Counter* protocol_errors = nullptr;
  Gauge* clients_connected = nullptr;
  Histogram* load_seconds_per_block = nullptr;

  explicit Instruments(MetricsRegistry& r) {
    for (Op op : kAllOps) {
      const std::string name(op_name(static_cast<uint16_t>(op)));
      PerOp& p = ops[static_cast<int>(op)];
      p.requests = &r.counter("kvtierd_requests_total", "Requests answered, per operation.", {{"op", name}});
      p.errors = &r.counter("kvtierd_request_errors_total", "Requests answered with an error, per operation.", {{"op", name}});
      p.seconds = &r.histogram("kvtierd_request_seconds", "Time to answer a request, per operation.",
                               default_latency_buckets(), {{"op", name}});
    }
    tokens_restored = &r.counter("kvtierd_tokens_restored_total", "Tokens whose KV was restored instead of recomputed.");
    bytes_loaded = &r.counter("kvtierd_load_bytes_total", "KV bytes copied into client windows.");
    bytes_saved = &r.counter("kvtierd_save_bytes_total", "KV bytes saved from client windows.");
    blocks_from_nvme = &r.counter("kvtierd_load_nvme_blocks_total", "Loaded blocks that were restored from NVMe.");
    lookup_hit_tokens = &r.counter("kvtierd_lookup_hit_tokens_total", "Tokens found cached by client lookups.");
    lookup_tokens = &r.counter("kvtierd_lookup_tokens_total", "Tokens asked about by client lookups.");
    clients_total = &r.counter("kvtierd_clients_total", "Client connections accepted.");
    clients_refused = &r.counter("kvtierd_clients_refused_total", "Connections refused (credentials or client limit).");
    protocol_errors = &r.counter("kvtierd_protocol_errors_total", "Connections closed for malformed input.");
    clients_connected = &r.gauge("kvtierd_clients_connected", "Client connections now open.");
    load_seconds_per_block = &r.histogram("kvtierd_load_block_seconds", "Load time divided by blocks loaded.",
                                          default_latency_buckets());
  }
};

Server::Server(ServiceConfig config)
    : config_(std::move(config)),
      max_spinning_(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1)),
      m_(std::make_unique<Instruments>(metrics_)) {}

Server::~Server() {
  request_stop();
  wait().ignore();
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

Result<std::unique_ptr<Server>> Server::start(ServiceConfig config) {
  auto tier_options = to_tier_options(config);
  if (!tier_options) return tier_options.status();
  std::unique_ptr<Server> server(new Server(std::move(config)));
  auto store = Store::open({.tiers = std::move(*tier_options), .secret = server->config_.secret});
  if (!store) return store.status();
  server->store_ = std::move(*store);
  server->stop_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (server->stop_fd_ < 0) return Status(StatusCode::kUnavailable, std::string("eventfd: ") + std::strerror(errno));
  KVTIER_RETURN_IF_ERROR(server->bind_socket());
  if (!server->config_.metrics_listen.empty()) {
    Server* self = server.get();
    auto http = MetricsHttpServer::start([self] { return self->metrics_text(); }, server->config_.metrics_listen);
    if (!http) return http.status();
    server->http_ = std::move(*http);
  }
  server->acceptor_ = std::thread([s = server.get()] { s->accept_loop(); });
  spdlog::info("kvtierd: serving {} on {} (metrics {})", server->store_->layout().describe(),
               server->config_.socket_path,
               server->http_ ? "http://" + server->config_.metrics_listen.substr(0, server->config_.metrics_listen.rfind(':')) +
                                   ":" + std::to_string(server->http_->port()) + "/metrics"
                             : std::string("off"));
  return server;
}

uint16_t Server::metrics_port() const noexcept { return http_ ? http_->port() : 0; }

Status Server::bind_socket() {
  const std::string& path = config_.socket_path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return invalid("socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // A live daemon answers a connect; a stale socket from a crash does not and is replaced. Any
  // other kind of file at the path is the operator's, never deleted.
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
    return invalid(path + " exists and is not a socket; choose another socket_path");
  }
  if (auto probe = proto::connect_unix(path)) {
    ::close(*probe);
    return Status(StatusCode::kUnavailable, "another kvtierd is already serving " + path);
  }
  ::unlink(path.c_str());
  listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) return Status(StatusCode::kUnavailable, std::string("socket: ") + std::strerror(errno));
  // The socket is created with the final mode (umask), so no peer can connect in between.
  const mode_t old_umask = ::umask(static_cast<mode_t>(~config_.socket_mode & 0777));
  const int rc = ::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  const int bind_errno = errno;
  ::umask(old_umask);
  if (rc != 0) {
    return Status(StatusCode::kUnavailable, "bind " + path + ": " + std::strerror(bind_errno));
  }
  ::chmod(path.c_str(), static_cast<mode_t>(config_.socket_mode));
  if (::listen(listen_fd_, 256) != 0) {
    return Status(StatusCode::kUnavailable, std::string("listen: ") + std::strerror(errno));
  }
  return Status::ok();
}

void Server::request_stop() noexcept {
  if (stop_fd_ < 0) return;
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t w = ::write(stop_fd_, &one, sizeof(one));
}

void Server::accept_loop() {
  int backoff_ms = -1;
  for (;;) {
    // Out of descriptors, the listen socket stays readable: wait on the stop event only, a while.
    pollfd fds[2] = {{stop_fd_, POLLIN, 0}, {listen_fd_, backoff_ms < 0 ? short(POLLIN) : short(0), 0}};
    if (::poll(fds, 2, backoff_ms) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("kvtierd: poll: {}", std::strerror(errno));
      break;
    }
    if (fds[0].revents) break;
    backoff_ms = -1;
    if (!(fds[1].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE) backoff_ms = 100;
      continue;
    }
    ucred cred{};
    socklen_t len = sizeof(cred);
    if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {  // no identity, no service
      ::close(fd);
      continue;
    }
    // A client that stops reading must not block its connection thread forever (a graceful
    // shutdown waits for every thread): a send that cannot progress for 10 s ends the session.
    const timeval send_timeout{10, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof(send_timeout));
    auto refuse = [&](Status why) {
      m_->clients_refused->add(1);
      spdlog::warn("kvtierd: refused pid {} uid {}: {}", cred.pid, cred.uid, why.to_string());
      std::vector<std::byte> body;
      proto::encode_status(why, body);
      proto::send_frame(fd, static_cast<uint16_t>(Op::kHello) | proto::kReplyBit, 0, body).ignore();
      ::close(fd);
    };
    if (!peer_allowed(config_, cred.uid, cred.gid)) {
      refuse(Status(StatusCode::kPermissionDenied, "uid " + std::to_string(cred.uid) + " gid " +
                                                       std::to_string(cred.gid) + " may not use this kvtierd"));
      continue;
    }
    auto session = std::make_shared<Session>();
    session->id = next_client_id_.fetch_add(1);
    session->fd = fd;
    session->uid = cred.uid;
    session->gid = cred.gid;
    session->pid = cred.pid;
    {
      std::lock_guard lock(mu_);
      if (active_ >= config_.max_clients) {
        refuse(Status(StatusCode::kResourceExhausted, "kvtierd serves at most " +
                                                          std::to_string(config_.max_clients) + " clients"));
        continue;
      }
      sessions_.emplace(session->id, session);
      ++active_;
    }
    m_->clients_total->add(1);
    m_->clients_connected->add(1);
    std::thread([this, session] { serve(session); }).detach();
  }
  // Stop: no new connections; wake every session's read so it ends after its current request.
  ::close(listen_fd_);
  listen_fd_ = -1;
  ::unlink(config_.socket_path.c_str());
  std::lock_guard lock(mu_);
  for (auto& [id, s] : sessions_) ::shutdown(s->fd, SHUT_RD);
}

namespace {

/// Answers one decoded request of a session. Fills `body` with the reply body; a non-ok Status
/// becomes the reply's status. `fatal` is set when the connection must close after replying.
struct Handler {
  Server& server;
  Store& store;
  const ServiceConfig& config;
  Server::Session& s;
  int& passed_fd;
  bool fatal = false;
  std::vector<std::byte> body;
  // Measured by the request loop:
  uint64_t restored_tokens = 0, loaded_bytes = 0, saved_bytes = 0, nvme_blocks = 0;
  double loaded_blocks = 0;  // whole-block equivalents (a request may carry some layers only)
  uint64_t asked_tokens = 0, hit_tokens = 0;

  template <class M>
  Status decode(std::span<const std::byte> payload, M& m) {
    Status st = proto::decode(payload, m);
    if (!st) fatal = true;  // malformed input: answer, then close the connection
    return st;
  }

  Result<Namespace> ns(uint32_t id) {
    if (!s.namespaces.count(id)) {
      return Status(StatusCode::kNotFound, "namespace " + std::to_string(id) + " was not opened on this connection");
    }
    return store.namespace_of(id);
  }

  Status hello(std::span<const std::byte> payload);
  Status open_namespace(std::span<const std::byte> payload);
  Status lookup(std::span<const std::byte> payload);
  Status load(std::span<const std::byte> payload);
  Status release(std::span<const std::byte> payload);
  Status save(std::span<const std::byte> payload);
  Status prefix_op(Op op, std::span<const std::byte> payload);
};

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
      return invalid("the window descriptor is not a memory file of at least " + std::to_string(mapped) + " bytes");
    }
    if (seals < 0 || !(seals & F_SEAL_SHRINK)) {
      fatal = true;
      return invalid("the window must be a memfd sealed with F_SEAL_SHRINK");
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
                                       .tenant_salt = tenant->salt, .adapter_id = req.adapter_id});
  if (!id) return id.status();
  s.namespaces.insert(*id);
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
      if (it->second.lease_expiry_ns <= now) {
        s.leased_blocks -= it->second.blocks.size();
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
  auto m = store.tiers().index().match(*n, req.tokens, req.extras, {.take_lease = lease});
  if (!m) return m.status();
  proto::LookupReply reply{.lease = m->lease, .tokens = m->tokens};
  reply.tier_masks.reserve(m->blocks.size());
  for (const BlockResidency& b : m->blocks) reply.tier_masks.push_back(b.tier_mask);
  asked_tokens = req.tokens.size() / store.layout().block_tokens * store.layout().block_tokens;
  hit_tokens = m->tokens;
  if (m->lease != kNoLease) {
    s.leased_blocks += m->blocks.size();
    s.leases.emplace(m->lease, std::move(*m));
  }
  proto::encode(reply, body);
  return Status::ok();
}

Status Handler::load(std::span<const std::byte> payload) {
  proto::LoadRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto it = s.leases.find(req.lease);
  if (it == s.leases.end()) return Status(StatusCode::kNotFound, "lease " + std::to_string(req.lease) + " is not held by this client");
  const Match& m = it->second;
  if (req.first_block > m.blocks.size() || req.block_count > m.blocks.size() - req.first_block) {
    return invalid("blocks [" + std::to_string(req.first_block) + ", +" + std::to_string(req.block_count) +
                   ") are outside the lease's " + std::to_string(m.blocks.size()) + " blocks");
  }
  const uint32_t all_layers = store.layout().num_layers;
  const uint32_t layers = LayerRange{req.layer_begin, req.layer_count}.size(all_layers);
  if (layers == 0) {
    return invalid("layers [" + std::to_string(req.layer_begin) + ", +" + std::to_string(req.layer_count) +
                   ") are outside the layout's " + std::to_string(all_layers));
  }
  const uint64_t block_bytes = uint64_t(layers) * store.layout().bytes_per_block_layer();  // in the window
  if (req.block_count > UINT64_MAX / block_bytes) return invalid("block count overflows");
  auto base = s.window_span(req.window_offset, uint64_t(req.block_count) * block_bytes);
  if (!base) return base.status();
  Match part;
  part.lease = m.lease;
  part.blocks.assign(m.blocks.begin() + req.first_block, m.blocks.begin() + req.first_block + req.block_count);
  part.tokens = uint64_t(req.block_count) * store.layout().block_tokens;
  uint32_t from_nvme = 0;
  std::vector<std::byte*> dsts;
  for (size_t i = 0; i < part.blocks.size(); ++i) {
    dsts.push_back(*base + i * block_bytes);
    auto now = store.tiers().index().get(part.blocks[i].key);
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
  if (!part.blocks.empty()) {
    auto h = store.tiers().load(part, dsts, LocationKind::kHost, {}, {req.layer_begin, layers});
    Status st = h ? h->wait() : h.status();
    unpin_all();
    KVTIER_RETURN_IF_ERROR(st);
  } else {
    unpin_all();
  }
  // A load in layer slices restores its tokens once: with the slice that ends at the last layer.
  if (req.layer_begin + layers == all_layers) restored_tokens = part.tokens;
  loaded_bytes = uint64_t(req.block_count) * block_bytes;
  loaded_blocks = double(req.block_count) * layers / all_layers;
  nvme_blocks = from_nvme;
  proto::encode(proto::LoadReply{.blocks = req.block_count, .from_nvme = from_nvme}, body);
  return Status::ok();
}

Status Handler::release(std::span<const std::byte> payload) {
  proto::ReleaseRequest req;
  KVTIER_RETURN_IF_ERROR(decode(payload, req));
  auto it = s.leases.find(req.lease);
  if (it == s.leases.end()) return Status(StatusCode::kNotFound, "lease " + std::to_string(req.lease) + " is not held by this client");
  s.leased_blocks -= it->second.blocks.size();
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
  const uint32_t bt = store.layout().block_tokens;
  const size_t full = req.tokens.size() / bt;
  if (req.first_block > full) return invalid("first_block is past the prompt's full blocks");
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
    if (req.arg >= kNumTiers) return invalid("prefetch tier " + std::to_string(req.arg) + " is not a tier");
    auto r = store.prefetch(req.namespace_id, req.tokens, static_cast<Tier>(req.arg), req.extras);
    if (!r) return r.status();
    count = *r;
  } else {
    if (op == Op::kPin && req.arg >= kNumPriorities) return invalid("pin priority " + std::to_string(req.arg) + " is not a priority");
    auto keys = store.cached_prefix(req.namespace_id, req.tokens, req.extras);
    if (!keys) return keys.status();
    PrefixIndex& index = store.tiers().index();
    if (op == Op::kPin && s.pins.size() + keys->size() > kMaxPinnedBlocksPerSession) {
      return Status(StatusCode::kResourceExhausted, "pinning " + std::to_string(keys->size()) + " more blocks would pass the " +
                                                        std::to_string(kMaxPinnedBlocksPerSession) + " one client may pin");
    }
    for (const BlockKey& k : *keys) {
      if (op == Op::kPin) {
        if (!s.pins.pin(index, k, static_cast<Priority>(req.arg)).is_ok()) break;  // evicted meanwhile
        ++count;
      } else {
        count += s.pins.unpin(index, k).is_ok();  // only this session's own pins
      }
    }
  }
  proto::encode(proto::CountReply{.count = count}, body);
  return Status::ok();
}

/// Waits for the session's next request: true when it is in the mailbox, false when the socket
/// has something (a frame, a doorbell, the end of the stream). Polls both for the session's spin
/// budget (AdaptiveSpin), the socket every 64 rounds, then parks (mailbox.h) and blocks on the
/// socket. It spins only while it holds one of the `max_spinning` places in `spinning`.
bool wait_request(Server::Session& s, proto::FrameReader& reader, int& passed_fd, std::atomic<int>& spinning,
                  int max_spinning) {
  using proto::Mailbox;
  const auto start = std::chrono::steady_clock::now();
  const auto budget = s.spin.budget();
  auto arrived = [&] {
    s.spin.observe(start, s.mailbox.published_at(Mailbox::kRequest));
    return true;
  };
  if (budget.count() > 0 && spinning.fetch_add(1, std::memory_order_relaxed) < max_spinning) {
    struct Leave {
      std::atomic<int>& n;
      ~Leave() { n.fetch_sub(1, std::memory_order_relaxed); }
    } leave{spinning};
    for (uint32_t i = 1;; ++i) {
      if (s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen) return arrived();
      if (i % 64 == 0) {
        if (reader.try_fill(passed_fd)) return false;
        if (std::chrono::steady_clock::now() - start > budget) break;
      }
      proto::cpu_relax();
    }
  } else if (budget.count() > 0) {
    spinning.fetch_sub(1, std::memory_order_relaxed);  // every place is taken: park at once
  }
  if (s.mailbox.park(Mailbox::kRequest) == s.mailbox_seen) reader.wait_readable();
  s.mailbox.unpark(Mailbox::kRequest);
  return s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen && arrived();
}

}  // namespace

void Server::serve(std::shared_ptr<Session> session) {
  Session& s = *session;
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  std::vector<std::byte> reply;
  std::vector<std::byte> frame;  // a mailbox frame, in or out
  proto::FrameReader reader(s.fd);
  bool from_mailbox = false;
  // A reply goes back the way its request came; one too large for the mailbox goes over the
  // socket and the mailbox says so.
  auto send_reply = [&](uint16_t op, uint32_t id) -> Status {
    if (!from_mailbox) return proto::send_frame(s.fd, op, id, reply);
    using proto::Mailbox;
    bool ring;
    if (proto::kHeaderBytes + reply.size() <= s.mailbox.slot_bytes()) {
      proto::build_frame(op, id, reply, frame);
      ring = s.mailbox.publish(Mailbox::kReply, frame, s.mailbox_seen);
    } else {
      KVTIER_RETURN_IF_ERROR(proto::send_frame(s.fd, op, id, reply));
      ring = s.mailbox.publish_elsewhere(Mailbox::kReply, s.mailbox_seen);
    }
    if (!ring) return Status::ok();
    return proto::send_frame(s.fd, static_cast<uint16_t>(Op::kDoorbell) | proto::kReplyBit, 0, {});
  };
  for (;;) {
    int passed_fd = -1;
    Status got;
    from_mailbox = s.mailbox && !reader.buffered() && wait_request(s, reader, passed_fd, spinning_, max_spinning_);
    if (from_mailbox) {
      s.mailbox_seen = s.mailbox.seq(proto::Mailbox::kRequest);
      s.mailbox.read(proto::Mailbox::kRequest, frame);
      std::span<const std::byte> body;
      got = proto::split_frame(frame, header, body);
      payload.assign(body.begin(), body.end());
    } else {
      got = reader.next(header, payload, passed_fd);
    }
    if (!got) {
      if (passed_fd >= 0) ::close(passed_fd);
      if (got.code() == StatusCode::kProtocolError) {
        m_->protocol_errors->add(1);
        reply.clear();
        proto::encode_status(got, reply);
        send_reply(header.op | proto::kReplyBit, header.request_id).ignore();
      }
      break;  // end of stream, or a frame we cannot parse: close
    }
    if (header.op == static_cast<uint16_t>(Op::kDoorbell) && header.version == proto::kVersion &&
        payload.empty() && !from_mailbox && passed_fd < 0) {
      continue;  // look at the mailbox again
    }
    const auto t0 = std::chrono::steady_clock::now();
    Handler h{*this, *store_, config_, s, passed_fd};
    Status st;
    if (header.version != proto::kVersion) {
      st = Status(StatusCode::kProtocolError, "unsupported protocol version " + std::to_string(header.version) +
                                                  "; this kvtierd speaks " + std::to_string(proto::kVersion));
      h.fatal = true;
    } else if (!proto::is_known_op(header.op) || header.op == static_cast<uint16_t>(Op::kDoorbell)) {
      st = Status(StatusCode::kProtocolError, "unknown operation " + std::to_string(header.op));
      h.fatal = true;
    } else if (!s.hello_done && header.op != static_cast<uint16_t>(Op::kHello)) {
      st = Status(StatusCode::kProtocolError, "the first request must be hello");
      h.fatal = true;
    } else {
      switch (static_cast<Op>(header.op)) {
        case Op::kHello: st = h.hello(payload); break;
        case Op::kOpenNamespace: st = h.open_namespace(payload); break;
        case Op::kLookup: st = h.lookup(payload); break;
        case Op::kLoad: st = h.load(payload); break;
        case Op::kRelease: st = h.release(payload); break;
        case Op::kSave: st = h.save(payload); break;
        case Op::kPrefetch:
        case Op::kPin:
        case Op::kUnpin: st = h.prefix_op(static_cast<Op>(header.op), payload); break;
        case Op::kDoorbell: break;  // refused above: it never reaches a handler
        case Op::kStats:
          if (!payload.empty()) {
            st = Status(StatusCode::kProtocolError, "stats takes no payload");
            h.fatal = true;
          } else {
            proto::encode(proto::StatsReply{.prometheus_text = metrics_text()}, h.body);
          }
          break;
      }
    }
    if (passed_fd >= 0) ::close(passed_fd);  // mapped (hello) or unexpected: either way not kept
    reply.clear();
    proto::encode_status(st, reply);
    if (st.is_ok()) reply.insert(reply.end(), h.body.begin(), h.body.end());
    const Status sent = send_reply(header.op | proto::kReplyBit, header.request_id);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (proto::is_known_op(header.op) && m_->ops[header.op].requests != nullptr) {  // not doorbells
      Instruments::PerOp& p = m_->ops[header.op];
      p.requests->add(1);
      if (!st) p.errors->add(1);
      p.seconds->observe(secs);
    }
    m_->tokens_restored->add(h.restored_tokens);
    m_->bytes_loaded->add(h.loaded_bytes);
    m_->bytes_saved->add(h.saved_bytes);
    m_->blocks_from_nvme->add(h.nvme_blocks);
    m_->lookup_tokens->add(h.asked_tokens);
    m_->lookup_hit_tokens->add(h.hit_tokens);
    if (h.loaded_blocks > 0) m_->load_seconds_per_block->observe(secs / h.loaded_blocks);
    if (h.fatal) {
      m_->protocol_errors->add(1);
      spdlog::warn("kvtierd: closing client {} (pid {}): {}", s.id, s.pid, st.to_string());
      break;
    }
    if (!sent) break;
  }
  end_session(s);
}

void Server::end_session(Session& s) {
  PrefixIndex& index = store_->tiers().index();
  for (auto& [lease, match] : s.leases) index.release(lease).ignore();  // kNotFound: expired already
  s.leases.clear();
  s.pins.unpin_all(index);
  if (s.window) ::munmap(s.window, s.mapped_bytes);
  s.window = nullptr;
  m_->clients_connected->add(-1);
  std::lock_guard lock(mu_);
  // Closed under mu_, after leaving sessions_: the stop path shuts down every listed session's
  // fd under the same lock, and must never touch a descriptor number already reused.
  sessions_.erase(s.id);
  ::close(s.fd);
  s.fd = -1;
  --active_;
  drained_.notify_all();
}

Status Server::wait() {
  std::lock_guard once(wait_mu_);
  if (waited_) return wait_status_;
  if (acceptor_.joinable()) acceptor_.join();  // returns once request_stop() was called
  {
    std::unique_lock lock(mu_);
    drained_.wait(lock, [&] { return active_ == 0; });
  }
  if (listen_fd_ >= 0) {  // start() failed before the acceptor ran: nobody may connect now
    ::close(listen_fd_);
    listen_fd_ = -1;
    ::unlink(config_.socket_path.c_str());
  }
  if (http_) http_->stop();
  Status st = store_ ? store_->close() : Status::ok();
  if (!st) spdlog::error("kvtierd: flushing write-back blocks failed: {}", st.to_string());
  waited_ = true;
  wait_status_ = st;
  return st;
}

bool Server::wait_sessions_at_most(size_t n, std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return drained_.wait_for(lock, timeout, [&] { return active_ <= n; });
}

ServerCounters Server::counters() const {
  ServerCounters c;
  c.clients_connected = static_cast<uint64_t>(m_->clients_connected->value());
  c.clients_total = m_->clients_total->value();
  c.clients_refused = m_->clients_refused->value();
  c.protocol_errors = m_->protocol_errors->value();
  return c;
}

std::string Server::metrics_text() { return metrics_.render() + render_tier_metrics(store_->tiers()); }

}  // namespace kvtier
