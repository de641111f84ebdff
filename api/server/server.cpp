#include "api/server/server.h"

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

namespace kvtier {

using proto::Op;

namespace {

constexpr size_t kMaxLeasesPerSession = 4096;
constexpr size_t kMaxLeasedBlocksPerSession = 256 * 1024;  // ~18 MiB of match state
constexpr size_t kMaxNamespacesPerSession = 1024;  // each is recorded in the catalog
constexpr size_t kMaxPinnedBlocksPerSession = 256 * 1024;  // pins a client may hold at once
constexpr size_t kMaxRegionsPerSession = 4096;  // registered memory regions (per-layer tensors)


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
    case Op::kRegisterMemory: return "register_memory";
    case Op::kUnregisterMemory: return "unregister_memory";
    case Op::kLoadTo: return "load_to";
    case Op::kSaveFrom: return "save_from";
  }
  return "unknown";
}

constexpr Op kAllOps[] = {Op::kHello, Op::kOpenNamespace, Op::kLookup, Op::kLoad, Op::kRelease,
                          Op::kSave, Op::kPrefetch, Op::kPin, Op::kUnpin, Op::kStats,
                          Op::kRegisterMemory, Op::kUnregisterMemory, Op::kLoadTo, Op::kSaveFrom};

}  // namespace

struct Server::Session {
  uint64_t id = 0;
  int fd = -1;
  uint32_t uid = 0, gid = 0;
  pid_t pid = 0;
  std::chrono::steady_clock::time_point accepted_at;  // the hello deadline counts from here
  std::string name;
  bool hello_done = false;
  std::byte* window = nullptr;
  uint64_t window_bytes = 0;
  uint64_t mapped_bytes = 0;      // the window and the mailbox after it
  proto::Mailbox mailbox;         // the client's fast path for small requests (mailbox.h)
  uint32_t mailbox_seen = 0;      // the last request sequence number taken from it
  proto::AdaptiveSpin spin;       // how long to spin for the next request before parking
  std::unordered_map<NamespaceId, const TenantRule*> namespaces;  // opened by this session, and their tenant
  std::unordered_map<const TenantRule*, uint64_t> tenant_pins;    // pins held here, per tenant (quotas)
  struct HeldLease {
    Match match;
    const TenantRule* tenant;  // of the namespace it was matched in (per-tenant metrics)
  };
  std::unordered_map<LeaseId, HeldLease> leases;
  size_t leased_blocks = 0;  // blocks over all entries of `leases`
  PinLedger pins;  // the priority pins this session holds
  // Memory the client registered (kRegisterMemory): the daemon loads into and saves from it.
  std::unordered_map<uint32_t, std::unique_ptr<MappedDeviceMemory>> regions;
  uint32_t next_region = 1;

  /// The window bytes [offset, offset + bytes), or kInvalidArgument when outside the window.
  Result<std::byte*> window_span(uint64_t offset, uint64_t bytes) const {
    if (!window || window_bytes == 0) return invalid_argument("this client handed over no shared-memory window");
    if (offset > window_bytes || bytes > window_bytes - offset) {
      return invalid_argument("window range [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
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
  PerOp ops[proto::kLastOp + 1];
  Counter* tokens_restored = nullptr;
  Counter* bytes_loaded = nullptr;
  Counter* bytes_saved = nullptr;
  Counter* blocks_from_nvme = nullptr;
  Counter* lookup_hit_tokens = nullptr;
  Counter* lookup_tokens = nullptr;
  Counter* clients_total = nullptr;
  Counter* clients_refused = nullptr;
  Counter* protocol_errors = nullptr;
  Counter* hello_timeouts = nullptr;
  Counter* idle_timeouts = nullptr;
  Counter* requests_over_budget = nullptr;
  Gauge* clients_connected = nullptr;
  Histogram* load_seconds_per_block = nullptr;
  // Per tenant, in config order: how much of its prompts its clients found cached, and saved.
  struct PerTenant {
    Counter* lookup_tokens = nullptr;
    Counter* hit_tokens = nullptr;
    Counter* save_bytes = nullptr;
    Counter* restored_tokens = nullptr;
  };
  std::vector<PerTenant> tenants;
  const TenantRule* first_tenant = nullptr;

  /// The counters of a tenant of the config; null for any other rule.
  PerTenant* of(const TenantRule* rule) {
    const std::less<const TenantRule*> before;  // a total order, also for find_tenant's static rule
    if (rule == nullptr || tenants.empty() || before(rule, first_tenant) ||
        !before(rule, first_tenant + tenants.size())) {
      return nullptr;
    }
    return &tenants[static_cast<size_t>(rule - first_tenant)];
  }

  Instruments(MetricsRegistry& r, const std::vector<TenantRule>& rules) {
    first_tenant = rules.data();
    for (const TenantRule& rule : rules) {
      const MetricLabels labels{{"tenant", rule.name}};
      tenants.push_back({
          .lookup_tokens = &r.counter("kvtierd_tenant_lookup_tokens_total",
                                      "Tokens the tenant's clients asked about by lookups.", labels),
          .hit_tokens = &r.counter("kvtierd_tenant_hit_tokens_total",
                                   "Tokens the tenant's lookups found cached.", labels),
          .save_bytes = &r.counter("kvtierd_tenant_save_bytes_total", "KV bytes the tenant's clients saved.", labels),
          .restored_tokens = &r.counter("kvtierd_tenant_tokens_restored_total",
                                        "Tokens whose KV the tenant's clients restored instead of recomputing.", labels),
      });
    }
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
    hello_timeouts = &r.counter("kvtierd_connections_timed_out_total",
                                "Connections closed at a deadline, per reason.", {{"reason", "hello"}});
    idle_timeouts = &r.counter("kvtierd_connections_timed_out_total",
                               "Connections closed at a deadline, per reason.", {{"reason", "idle"}});
    requests_over_budget = &r.counter("kvtierd_requests_over_budget_total",
                                      "Request frames refused because max_inflight_request_bytes was held.");
    clients_connected = &r.gauge("kvtierd_clients_connected", "Client connections now open.");
    load_seconds_per_block = &r.histogram("kvtierd_load_block_seconds", "Load time divided by blocks loaded.",
                                          default_latency_buckets());
  }
};

Server::Server(ServiceConfig config)
    : config_(std::move(config)),
      max_spinning_(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) - 1)),
      request_budget_(std::make_unique<proto::RequestBudget>(config_.max_inflight_request_bytes)),
      m_(std::make_unique<Instruments>(metrics_, config_.tenants)) {
  // The budget keeps its own counts; the gauges read them at every scrape.
  metrics_.add_collector([budget = request_budget_.get()](MetricsRegistry& r) {
    r.gauge("kvtierd_request_bytes_held", "Payload bytes of request frames being received or handled.")
        .set(static_cast<double>(budget->held()));
    r.gauge("kvtierd_request_bytes_charged",
            "The part of kvtierd_request_bytes_held charged to max_inflight_request_bytes.")
        .set(static_cast<double>(budget->charged()));
  });
}

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
  if (path.size() >= sizeof(addr.sun_path)) return invalid_argument("socket path too long: " + path);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  // A live daemon answers a connect; a stale socket from a crash does not and is replaced. Any
  // other kind of file at the path is the operator's, never deleted.
  struct stat st{};
  if (::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
    return invalid_argument(path + " exists and is not a socket; choose another socket_path");
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
    session->accepted_at = std::chrono::steady_clock::now();
    {
      std::lock_guard lock(mu_);
      if (active_ >= config_.max_clients) {
        refuse(Status(StatusCode::kResourceExhausted, "kvtierd serves at most " +
                                                          std::to_string(config_.max_clients) + " clients"));
        continue;
      }
      // uid 0 is bounded by max_clients only (service_config.h).
      const uint32_t per_uid = clients_per_uid_limit(config_);
      if (cred.uid != 0 && clients_of_uid_[cred.uid] >= per_uid) {
        refuse(Status(StatusCode::kResourceExhausted, "kvtierd serves at most " + std::to_string(per_uid) +
                                                          " clients of one uid (max_clients_per_uid); uid " +
                                                          std::to_string(cred.uid) + " has that many"));
        continue;
      }
      if (cred.uid != 0) ++clients_of_uid_[cred.uid];
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
  const TenantRule* tenant = nullptr;  // the tenant of the namespace the request named

  template <class M>
  Status decode(std::span<const std::byte> payload, M& m) {
    Status st = proto::decode(payload, m);
    if (!st) fatal = true;  // malformed input: answer, then close the connection
    return st;
  }

  Result<Namespace> ns(uint32_t id) {
    auto it = s.namespaces.find(id);
    if (it == s.namespaces.end()) {
      return Status(StatusCode::kNotFound, "namespace " + std::to_string(id) + " was not opened on this connection");
    }
    tenant = it->second;
    return store.namespace_of(id);
  }

  /// kPermissionDenied when namespace `id`'s tenant may not save or pin at `p`.
  Status check_priority(uint32_t id, Priority p) const {
    auto it = s.namespaces.find(id);
    if (it == s.namespaces.end() || p <= it->second->max_priority) return Status::ok();
    return Status(StatusCode::kPermissionDenied,
                  "tenant '" + it->second->name + "' may save and pin at priority up to '" +
                      std::string(priority_name(it->second->max_priority)) + "', not '" +
                      std::string(priority_name(p)) + "'");
  }

  Status hello(std::span<const std::byte> payload);
  Status open_namespace(std::span<const std::byte> payload);
  Status lookup(std::span<const std::byte> payload);
  Status load(std::span<const std::byte> payload);
  Status load_to(std::span<const std::byte> payload);
  Status save_from(std::span<const std::byte> payload);
  Status register_memory(std::span<const std::byte> payload);
  Status unregister_memory(std::span<const std::byte> payload);

  /// Blocks [first_block, +block_count) of one of this session's leases.
  Result<Match> leased_blocks(uint64_t lease, uint32_t first_block, uint64_t block_count);
  /// How many layers [begin, +count) names (count 0: to the last); kInvalidArgument for none.
  Result<uint32_t> layer_count(uint32_t begin, uint32_t count) const;
  /// Pins `part` for `copy`, then fills the reply and the load's measurements.
  Status pinned_load(const Match& part, uint32_t layer_begin, uint32_t layers, const std::function<Status()>& copy);
  /// A KV buffer in this session's registered regions, every place checked against its region.
  Result<KvBuffer> region_buffer(const proto::RegionBuffer& rb);
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
                                       .tenant_salt = tenant->salt, .adapter_id = req.adapter_id},
                                      tenant->name);
  if (!id) return id.status();
  s.namespaces.emplace(*id, tenant);
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
  auto m = store.tiers().index().match(*n, req.tokens, req.extras, {.take_lease = lease});
  if (!m) return m.status();
  proto::LookupReply reply{.lease = m->lease, .tokens = m->tokens};
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
    // Every engine layout holds pages × (K and V of a block's tokens) per layer tensor.
    const uint64_t tensor = uint64_t(rb.engine_num_pages) * layout.bytes_per_block_layer();
    for (const proto::RegionRef& p : rb.places) {
      auto at = place(p, tensor, "a layer tensor");
      if (!at) return at.status();
      buf.layer_base.push_back(*at);
    }
    buf.engine = static_cast<kernels::EngineLayout>(rb.layout - 1);
    buf.engine_num_pages = rb.engine_num_pages;
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
    const TenantRule& tenant = *s.namespaces.at(req.namespace_id);
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

enum class Arrival { kMailbox, kSocket, kDeadline };

/// Waits for the session's next request: kMailbox when it is in the mailbox, kSocket when the
/// socket has something (a frame, a doorbell, the end of the stream), kDeadline when neither came
/// by `deadline`. Polls both for the session's spin budget (AdaptiveSpin), the socket every 64
/// rounds, then parks (mailbox.h) and blocks on the socket until the deadline. It spins only
/// while it holds one of the `max_spinning` places in `spinning`.
Arrival wait_request(Server::Session& s, proto::FrameReader& reader, std::atomic<int>& spinning,
                     int max_spinning, proto::FrameReader::Deadline deadline) {
  using proto::Mailbox;
  const auto start = std::chrono::steady_clock::now();
  const auto budget = s.spin.budget();
  auto arrived = [&] {
    s.spin.observe(start, s.mailbox.published_at(Mailbox::kRequest));
    return Arrival::kMailbox;
  };
  if (budget.count() > 0 && spinning.fetch_add(1, std::memory_order_relaxed) < max_spinning) {
    struct Leave {
      std::atomic<int>& n;
      ~Leave() { n.fetch_sub(1, std::memory_order_relaxed); }
    } leave{spinning};
    for (uint32_t i = 1;; ++i) {
      if (s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen) return arrived();
      if (i % 64 == 0) {
        if (reader.try_fill()) return Arrival::kSocket;
        if (std::chrono::steady_clock::now() - start > budget) break;
      }
      proto::cpu_relax();
    }
  } else if (budget.count() > 0) {
    spinning.fetch_sub(1, std::memory_order_relaxed);  // every place is taken: park at once
  }
  bool readable = true;
  if (s.mailbox.park(Mailbox::kRequest) == s.mailbox_seen) readable = reader.wait_readable(deadline);
  s.mailbox.unpark(Mailbox::kRequest);
  // A request published as the deadline passed is still served.
  if (s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen) return arrived();
  return readable ? Arrival::kSocket : Arrival::kDeadline;
}

/// True when the idle deadline may close the session: it holds nothing a client would lose
/// (service_config.h idle_timeout_ms).
bool may_idle_out(const Server::Session& s) {
  return s.leases.empty() && s.pins.size() == 0 && s.regions.empty();
}

}  // namespace

void Server::serve(std::shared_ptr<Session> session) {
  Session& s = *session;
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  std::vector<std::byte> reply;
  std::vector<std::byte> frame;  // a mailbox frame, in or out
  proto::FrameReader reader(s.fd, request_budget_.get());
  proto::RequestBudget& budget = *request_budget_;
  uint64_t mailbox_bytes = 0;  // of the mailbox request being handled, counted in `budget`
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
  using Clock = std::chrono::steady_clock;
  // The next request must be whole by this time: the hello deadline counts from the accept, the
  // idle one from the last reply, and only while the session holds nothing (may_idle_out).
  auto request_deadline = [&]() -> proto::FrameReader::Deadline {
    if (!s.hello_done) {
      if (config_.hello_timeout_ms == 0) return proto::FrameReader::kNoDeadline;
      return s.accepted_at + std::chrono::milliseconds(config_.hello_timeout_ms);
    }
    if (config_.idle_timeout_ms == 0 || !may_idle_out(s)) return proto::FrameReader::kNoDeadline;
    return Clock::now() + std::chrono::milliseconds(config_.idle_timeout_ms);
  };
  auto timed_out = [&] {
    if (!s.hello_done) {
      m_->hello_timeouts->add(1);
      spdlog::warn("kvtierd: closing connection {} (pid {} uid {}): no hello within {} ms", s.id, s.pid, s.uid,
                   config_.hello_timeout_ms);
      // Answered like a refused peer (accept_loop), so a client that is merely slow sees why.
      reply.clear();
      proto::encode_status(Status(StatusCode::kUnavailable, "no hello within hello_timeout_ms (" +
                                                                std::to_string(config_.hello_timeout_ms) + " ms)"),
                           reply);
      proto::send_frame(s.fd, static_cast<uint16_t>(Op::kHello) | proto::kReplyBit, 0, reply).ignore();
    } else {
      m_->idle_timeouts->add(1);
      spdlog::warn("kvtierd: closing client {} '{}' (pid {} uid {}): idle for {} ms with no lease, pin or "
                   "registered memory", s.id, s.name, s.pid, s.uid, config_.idle_timeout_ms);
    }
  };
  // Ends the handling of a request: its bytes leave the budget, large buffers are freed.
  auto request_done = [&] {
    reader.release_frame(payload);
    budget.give_back(mailbox_bytes);
    mailbox_bytes = 0;
    if (frame.capacity() > proto::FrameReader::kKeptPayloadCapacity) std::vector<std::byte>().swap(frame);
  };
  for (;;) {
    request_done();
    int passed_fd = -1;
    Status got;
    const proto::FrameReader::Deadline deadline = request_deadline();
    Arrival arrival = Arrival::kSocket;
    if (s.mailbox && !reader.buffered()) arrival = wait_request(s, reader, spinning_, max_spinning_, deadline);
    if (arrival == Arrival::kDeadline) {
      timed_out();
      break;
    }
    from_mailbox = arrival == Arrival::kMailbox;
    if (from_mailbox) {
      s.mailbox_seen = s.mailbox.seq(proto::Mailbox::kRequest);
      s.mailbox.read(proto::Mailbox::kRequest, frame);
      std::span<const std::byte> body;
      got = proto::split_frame(frame, header, body);
      // A mailbox frame (at most a slot, which the client sized at hello) is charged like a
      // socket frame while it is handled; both copies of it are freed after.
      if (got && !budget.grow(0, body.size())) {
        got = Status(StatusCode::kResourceExhausted,
                     "kvtierd holds its limit of " + std::to_string(budget.limit()) +
                         " bytes of requests in flight (max_inflight_request_bytes); a frame of " +
                         std::to_string(body.size()) + " bytes is refused");
      } else if (got) {
        mailbox_bytes = body.size();
        payload.assign(body.begin(), body.end());
      }
    } else {
      got = reader.next(header, payload, passed_fd, deadline);
    }
    if (!got) {
      if (passed_fd >= 0) ::close(passed_fd);
      if (!from_mailbox && reader.deadline_passed()) {
        timed_out();
        break;
      }
      if (got.code() == StatusCode::kProtocolError || got.code() == StatusCode::kResourceExhausted) {
        if (got.code() == StatusCode::kProtocolError) {
          m_->protocol_errors->add(1);
        } else {
          m_->requests_over_budget->add(1);
          spdlog::warn("kvtierd: closing client {} (pid {} uid {}): {}", s.id, s.pid, s.uid, got.to_string());
        }
        reply.clear();
        proto::encode_status(got, reply);
        send_reply(header.op | proto::kReplyBit, header.request_id).ignore();
      }
      break;  // end of stream, a frame we cannot parse or hold: close
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
        case Op::kLoadTo: st = h.load_to(payload); break;
        case Op::kSaveFrom: st = h.save_from(payload); break;
        case Op::kRegisterMemory: st = h.register_memory(payload); break;
        case Op::kUnregisterMemory: st = h.unregister_memory(payload); break;
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
    if (Instruments::PerTenant* t = m_->of(h.tenant)) {
      if (h.asked_tokens) t->lookup_tokens->add(h.asked_tokens);
      if (h.hit_tokens) t->hit_tokens->add(h.hit_tokens);
      if (h.saved_bytes) t->save_bytes->add(h.saved_bytes);
      if (h.restored_tokens) t->restored_tokens->add(h.restored_tokens);
    }
    if (h.loaded_blocks > 0) m_->load_seconds_per_block->observe(secs / h.loaded_blocks);
    if (h.fatal) {
      m_->protocol_errors->add(1);
      spdlog::warn("kvtierd: closing client {} (pid {}): {}", s.id, s.pid, st.to_string());
      break;
    }
    if (!sent) break;
  }
  request_done();
  end_session(s);
}

void Server::end_session(Session& s) {
  PrefixIndex& index = store_->tiers().index();
  for (auto& [lease, held] : s.leases) index.release(lease).ignore();  // kNotFound: expired already
  s.leases.clear();
  s.pins.unpin_all(index);
  for (const auto& [tenant, n] : s.tenant_pins) give_tenant_pins(*tenant, n);
  s.tenant_pins.clear();
  s.regions.clear();  // unmapped: the client's memory is its own again
  if (s.window) ::munmap(s.window, s.mapped_bytes);
  s.window = nullptr;
  m_->clients_connected->add(-1);
  std::lock_guard lock(mu_);
  // Closed under mu_, after leaving sessions_: the stop path shuts down every listed session's
  // fd under the same lock, and must never touch a descriptor number already reused.
  sessions_.erase(s.id);
  if (s.uid != 0) {
    auto it = clients_of_uid_.find(s.uid);
    if (it != clients_of_uid_.end() && --it->second == 0) clients_of_uid_.erase(it);
  }
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

bool Server::take_tenant_pins(const TenantRule& tenant, uint64_t n) {
  std::lock_guard lock(tenant_pins_mu_);
  uint64_t& held = tenant_pins_[&tenant];
  if (tenant.max_pinned_blocks != 0 && held + n > tenant.max_pinned_blocks) return false;
  held += n;
  return true;
}

void Server::give_tenant_pins(const TenantRule& tenant, uint64_t n) {
  std::lock_guard lock(tenant_pins_mu_);
  tenant_pins_[&tenant] -= n;
}

uint64_t Server::tenant_pins(const TenantRule& tenant) const {
  std::lock_guard lock(tenant_pins_mu_);
  auto it = tenant_pins_.find(&tenant);
  return it == tenant_pins_.end() ? 0 : it->second;
}

bool Server::wait_request_bytes(const std::function<bool(uint64_t held, uint64_t charged)>& ready,
                                std::chrono::milliseconds timeout) {
  proto::RequestBudget& b = *request_budget_;
  return b.wait_until([&] { return ready(b.held(), b.charged()); }, timeout);
}

ServerCounters Server::counters() const {
  ServerCounters c;
  c.clients_connected = static_cast<uint64_t>(m_->clients_connected->value());
  c.clients_total = m_->clients_total->value();
  c.clients_refused = m_->clients_refused->value();
  c.protocol_errors = m_->protocol_errors->value();
  c.hello_timeouts = m_->hello_timeouts->value();
  c.idle_timeouts = m_->idle_timeouts->value();
  c.requests_over_budget = m_->requests_over_budget->value();
  c.request_bytes_held = request_budget_->held();
  c.request_bytes_charged = request_budget_->charged();
  return c;
}

std::string Server::metrics_text() { return metrics_.render() + render_tier_metrics(store_->tiers()); }

}  // namespace kvtier
