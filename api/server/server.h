// kvtierd: the daemon that owns the tiers and serves them to many engine processes over a Unix
// socket (api/wire/protocol.h). One thread accepts; each client connection gets a thread that
// answers its requests in order. KV bytes move through the client's shared-memory window, which
// the daemon maps at hello — never through the socket, and the client never maps the daemon's
// arenas, so a client sees only the blocks its own lookups and tenants lead it to.
//
// Connections are bounded (docs/service.md "Limits"): at most max_clients, at most
// max_clients_per_uid of one uid (uid 0 excepted), a hello within hello_timeout_ms, an idle
// connection without leases, pins or registered memory closed after idle_timeout_ms, and request
// payloads held in memory under one daemon-wide budget (max_inflight_request_bytes).
//
// A client's leases and pins are its session's: they are released when it disconnects or dies.
// request_stop() begins a graceful shutdown: no new connections, every in-flight request finishes
// and is answered, sessions end, write-back blocks are flushed to NVMe, and the store closes.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>

#include "api/metrics/metrics.h"
#include "api/server/service_config.h"
#include "api/store/store.h"

namespace kvtier {

namespace proto {
class RequestBudget;
}

struct ServerCounters {
  uint64_t clients_connected = 0;  // sessions now open
  uint64_t clients_total = 0;      // sessions ever accepted
  uint64_t clients_refused = 0;    // peers refused by credentials, the client or the per-uid limit
  uint64_t protocol_errors = 0;    // connections closed for malformed input
  uint64_t hello_timeouts = 0;     // connections closed for no hello within hello_timeout_ms
  uint64_t idle_timeouts = 0;      // connections closed after idle_timeout_ms without a request
  uint64_t requests_over_budget = 0;  // frames refused: max_inflight_request_bytes was held
  uint64_t request_bytes_held = 0;     // payload bytes of frames being received or handled, now
  uint64_t request_bytes_charged = 0;  // the part of them charged to the budget, now
};

class Server {
 public:
  /// Opens the store from a resolve()d config, binds the socket (mode config.socket_mode),
  /// starts the metrics endpoint when configured, and starts accepting. kUnavailable when the
  /// socket is in use by a live daemon; a stale socket file is replaced.
  static Result<std::unique_ptr<Server>> start(ServiceConfig config);
  /// request_stop() and wait() when the owner did not.
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Begins the graceful shutdown. Async-signal-safe (it writes an eventfd).
  void request_stop() noexcept;
  /// Blocks until request_stop(), then drains: answers in-flight requests, ends every session,
  /// flushes write-back blocks to NVMe and closes the store. Returns the flush's status.
  /// Idempotent.
  Status wait();

  const std::string& socket_path() const noexcept { return config_.socket_path; }
  /// The bound metrics port, 0 when the endpoint is off.
  uint16_t metrics_port() const noexcept;
  Store& store() noexcept { return *store_; }
  const ServiceConfig& config() const noexcept { return config_; }
  ServerCounters counters() const;
  /// Blocks until at most `n` client sessions are open — the event a disconnect signals once its
  /// leases and pins are released. False when `timeout` passed first.
  bool wait_sessions_at_most(size_t n, std::chrono::milliseconds timeout);
  /// Blocks until `ready(request_bytes_held, request_bytes_charged)` is true (ServerCounters),
  /// re-checked at every change of the request budget. False when `timeout` passed first.
  bool wait_request_bytes(const std::function<bool(uint64_t held, uint64_t charged)>& ready,
                          std::chrono::milliseconds timeout);
  /// Counters, occupancy and latencies in Prometheus text format (also served over HTTP).
  std::string metrics_text();

  struct Session;

  /// Tenant pin quotas (TenantRule::max_pinned_blocks), shared by every session of a tenant.
  /// take_tenant_pins takes `n` of the tenant's quota, or none and returns false when that would
  /// pass it; give_tenant_pins returns what a session no longer holds.
  bool take_tenant_pins(const TenantRule& tenant, uint64_t n);
  void give_tenant_pins(const TenantRule& tenant, uint64_t n);
  /// Pinned blocks the tenant's clients hold now.
  uint64_t tenant_pins(const TenantRule& tenant) const;

 private:
  explicit Server(ServiceConfig config);
  Status bind_socket();
  void accept_loop();
  void serve(std::shared_ptr<Session> session);
  void end_session(Session& s);

  ServiceConfig config_;
  std::unique_ptr<Store> store_;
  int listen_fd_ = -1;
  int stop_fd_ = -1;
  std::thread acceptor_;
  std::atomic<bool> stopping_{false};

  std::mutex wait_mu_;     // one wait() at a time: a second caller gets the first one's result
  mutable std::mutex mu_;  // guards sessions_, active_
  std::condition_variable drained_;
  std::unordered_map<uint64_t, std::shared_ptr<Session>> sessions_;
  std::unordered_map<uint32_t, uint32_t> clients_of_uid_;  // sessions_ per uid (max_clients_per_uid)
  size_t active_ = 0;  // connection threads still running
  bool waited_ = false;
  Status wait_status_;
  std::atomic<uint64_t> next_client_id_{1};
  mutable std::mutex tenant_pins_mu_;
  std::unordered_map<const TenantRule*, uint64_t> tenant_pins_;  // by rule in config_.tenants
  // Connection threads spinning on their mailboxes right now, and the most that may: one core
  // fewer than the machine has (at least one), so spinning never takes every core from the
  // threads doing the work. The others park at once.
  std::atomic<int> spinning_{0};
  const int max_spinning_;

  std::unique_ptr<proto::RequestBudget> request_budget_;  // max_inflight_request_bytes

  MetricsRegistry metrics_;
  std::unique_ptr<MetricsHttpServer> http_;
  struct Instruments;
  std::unique_ptr<Instruments> m_;
};

}  // namespace kvtier
