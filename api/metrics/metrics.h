// Prometheus metrics for kvtierd: lock-free counters, gauges and histograms, a registry that
// renders the text exposition format 0.0.4, and a small HTTP server for GET /metrics.
//
// Updating a metric is one or two relaxed atomic operations, cheap enough for the request path;
// only registration and rendering take the registry's lock. Metrics live as long as the registry
// and never move, so callers keep the references registration returns.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kvtier/status.h"

namespace kvtier {

/// Label pairs {key, value}. Order does not matter: {a,b} and {b,a} name the same series.
using MetricLabels = std::vector<std::pair<std::string, std::string>>;

/// A monotonically increasing count.
class Counter {
 public:
  void add(uint64_t n = 1) noexcept { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

/// A value that goes up and down.
class Gauge {
 public:
  void set(double v) noexcept { value_.store(v, std::memory_order_relaxed); }
  void add(double d) noexcept { value_.fetch_add(d, std::memory_order_relaxed); }
  double value() const noexcept { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<double> value_{0.0};
};

/// 5 µs … 10 s in 1-2.5-5 steps (20 buckets): restores from host DRAM through NVMe misses.
std::span<const double> default_latency_buckets() noexcept;

/// Observations in fixed buckets (upper bounds in seconds, inclusive, as Prometheus' `le`).
/// observe() is lock-free: one bucket increment and one add to the sum.
class Histogram {
 public:
  /// `upper_bounds` are sorted and deduplicated; +Inf, NaN and non-finite bounds are dropped
  /// (the +Inf bucket always exists).
  explicit Histogram(std::span<const double> upper_bounds);

  /// Records one observation; NaN is ignored.
  void observe(double seconds) noexcept;

  const std::vector<double>& upper_bounds() const noexcept { return bounds_; }
  /// Observations in bucket i alone (not cumulative); i == upper_bounds().size() is +Inf.
  uint64_t bucket_count(size_t i) const noexcept {
    return counts_[i].load(std::memory_order_relaxed);
  }
  /// Sum of the bucket counts, so it always equals the +Inf bucket when rendered.
  uint64_t count() const noexcept;
  double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }

 private:
  std::vector<double> bounds_;
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // bounds_.size() + 1
  std::atomic<double> sum_{0.0};
};

/// Named metrics and their rendering. Thread-safe.
///
/// Names must match [a-zA-Z_:][a-zA-Z0-9_:]* and label keys [a-zA-Z_][a-zA-Z0-9_]*; other
/// characters are replaced by '_' (names come from kvtier's code, not from users). Registering a
/// name again with the same labels returns the same object. Registering a name already used by
/// another metric type is a bug: it is logged and a detached metric, never rendered, returned.
class MetricsRegistry {
 public:
  MetricsRegistry();
  ~MetricsRegistry();
  MetricsRegistry(const MetricsRegistry&) = delete;
  MetricsRegistry& operator=(const MetricsRegistry&) = delete;

  Counter& counter(std::string_view name, std::string_view help, MetricLabels labels = {});
  Gauge& gauge(std::string_view name, std::string_view help, MetricLabels labels = {});
  /// `buckets` applies when the family is first registered; later series of the family share it.
  Histogram& histogram(std::string_view name, std::string_view help,
                       std::span<const double> buckets = default_latency_buckets(),
                       MetricLabels labels = {});

  /// A series whose value another component keeps (the index's lookups, a tier's capacity),
  /// registered here once so it renders with the rest: `read` runs at every render, outside the
  /// registry's lock, possibly concurrently with itself. Registering the same name and labels
  /// again replaces `read`. A family may mix these with counters (gauges) registered above.
  void counter_fn(std::string_view name, std::string_view help, MetricLabels labels, std::function<double()> read);
  void gauge_fn(std::string_view name, std::string_view help, MetricLabels labels, std::function<double()> read);

  /// Runs before every render, outside the registry's lock (it may register and set metrics):
  /// for gauges that mirror other components' stats at scrape time. Collectors may run
  /// concurrently when renders do.
  void add_collector(std::function<void(MetricsRegistry&)> collector);

  /// Text exposition format 0.0.4: families in registration order, series in registration order,
  /// "# HELP" and "# TYPE" once per family, histogram buckets cumulative with "+Inf", _sum, _count.
  std::string render();

 private:
  struct Family;
  enum class Kind : uint8_t { kCounter, kGauge, kHistogram };
  Family& family_locked(std::string_view name, std::string_view help, Kind kind, bool& kind_clash);
  void sampled(std::string_view name, std::string_view help, Kind kind, MetricLabels labels,
               std::function<double()> read);

  std::mutex mu_;
  std::vector<std::unique_ptr<Family>> families_;  // registration order; never moves a metric
  std::map<std::string, Family*, std::less<>> by_name_;
  std::vector<std::function<void(MetricsRegistry&)>> collectors_;
  // Handed out on a type clash; never rendered.
  std::deque<Counter> detached_counters_;
  std::deque<Gauge> detached_gauges_;
  std::deque<Histogram> detached_histograms_;
};

/// "host:port", "[v6addr]:port", ":port" (all interfaces). Port 0 = pick a free one.
struct ListenAddress {
  std::string host;
  uint16_t port = 0;
};
Result<ListenAddress> parse_listen_address(std::string_view text);

/// Serves GET /metrics (the registry's render()) and GET /healthz ("ok") on its own thread.
class MetricsHttpServer {
 public:
  /// Binds `listen` ("host:port"; port 0 picks a free one) and returns once the server accepts
  /// connections. kInvalidArgument for a malformed address, kUnavailable when binding fails
  /// (port in use, unknown host). The registry must outlive the server.
  static Result<std::unique_ptr<MetricsHttpServer>> start(MetricsRegistry& registry,
                                                          std::string_view listen);
  /// The same, serving whatever `render` returns (a registry plus text rendered elsewhere).
  static Result<std::unique_ptr<MetricsHttpServer>> start(std::function<std::string()> render,
                                                          std::string_view listen);
  /// Stops and joins.
  ~MetricsHttpServer();
  MetricsHttpServer(const MetricsHttpServer&) = delete;
  MetricsHttpServer& operator=(const MetricsHttpServer&) = delete;

  /// The bound port (the one picked when asked for 0).
  uint16_t port() const noexcept { return port_; }
  const std::string& host() const noexcept { return host_; }
  /// Stops accepting, finishes the requests in flight and joins the thread. Idempotent.
  void stop();

 private:
  struct Impl;
  explicit MetricsHttpServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  std::string host_;
  uint16_t port_ = 0;
};

/// A readable summary of Prometheus text for `kvtier stats`: one line per series; a histogram
/// shows its count, mean, and p50/p99 interpolated within buckets (as histogram_quantile does).
std::string format_for_humans(std::string_view prometheus_text);

}  // namespace kvtier
