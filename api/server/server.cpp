// kvtierd's lifecycle: start (store, socket, metrics endpoint), the accept loop that admits
// connections, stop and wait, and the daemon-wide counts (tenant pins, counters). A session's
// request loop is session.cpp, its requests request_handler.cpp, the metrics instruments.cpp.
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

#include "api/server/instruments.h"
#include "api/server/session.h"

namespace kvtier {

using proto::Op;

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

std::string Server::metrics_text() { return metrics_.render() + store_->tiers().metrics().render(); }

}  // namespace kvtier
