// Metrics: the exact Prometheus text format (labels escaped, cumulative buckets), one object per
// name and labels, exact sums under concurrent updates, and the HTTP endpoint serving it.
#include <catch2/catch.hpp>

#include <httplib.h>

#include <atomic>
#include <cmath>
#include <thread>
#include <vector>

#include "api/metrics/metrics.h"

using namespace kvtier;

namespace {

/// Registers the metrics whose rendering the format test spells out.
void fill(MetricsRegistry& r) {
  r.counter("kvtier_requests_total", "Requests served.", {{"op", "lookup"}}).add(3);
  r.counter("kvtier_requests_total", "Requests served.", {{"op", "save"}}).add();
  r.gauge("kvtier_up", "1 while serving.").set(1);
  r.gauge("kvtier_tier_used_bytes", "Bytes in use,\nper tier \\ kind.",
          {{"tier", "host"}, {"kind", "a\"b\\c\nd"}})
      .set(1.5);
  const std::vector<double> bounds{1.0, 0.25, 0.5, 0.5};  // unsorted, with a duplicate
  Histogram& h = r.histogram("kvtier_load_seconds", "Load latency.", bounds, {{"tier", "nvme"}});
  for (double v : {0.125, 0.25 /* on a bound: le is inclusive */, 0.75, 2.0}) h.observe(v);
}

constexpr const char* kExpected =
    "# HELP kvtier_requests_total Requests served.\n"
    "# TYPE kvtier_requests_total counter\n"
    "kvtier_requests_total{op=\"lookup\"} 3\n"
    "kvtier_requests_total{op=\"save\"} 1\n"
    "# HELP kvtier_up 1 while serving.\n"
    "# TYPE kvtier_up gauge\n"
    "kvtier_up 1\n"
    "# HELP kvtier_tier_used_bytes Bytes in use,\\nper tier \\\\ kind.\n"
    "# TYPE kvtier_tier_used_bytes gauge\n"
    "kvtier_tier_used_bytes{kind=\"a\\\"b\\\\c\\nd\",tier=\"host\"} 1.5\n"
    "# HELP kvtier_load_seconds Load latency.\n"
    "# TYPE kvtier_load_seconds histogram\n"
    "kvtier_load_seconds_bucket{tier=\"nvme\",le=\"0.25\"} 2\n"
    "kvtier_load_seconds_bucket{tier=\"nvme\",le=\"0.5\"} 2\n"
    "kvtier_load_seconds_bucket{tier=\"nvme\",le=\"1\"} 3\n"
    "kvtier_load_seconds_bucket{tier=\"nvme\",le=\"+Inf\"} 4\n"
    "kvtier_load_seconds_sum{tier=\"nvme\"} 3.125\n"
    "kvtier_load_seconds_count{tier=\"nvme\"} 4\n";

}  // namespace

TEST_CASE("The registry renders Prometheus text format 0.0.4 exactly") {
  MetricsRegistry r;
  fill(r);
  CHECK(r.render() == kExpected);
}

TEST_CASE("The same name and labels return the same object, whatever the label order") {
  MetricsRegistry r;
  Counter& a = r.counter("c_total", "c", {{"x", "1"}, {"y", "2"}});
  Counter& b = r.counter("c_total", "c", {{"y", "2"}, {"x", "1"}});
  Counter& other = r.counter("c_total", "c", {{"x", "2"}, {"y", "2"}});
  CHECK(&a == &b);
  CHECK(&a != &other);
  CHECK(&r.gauge("g", "g") == &r.gauge("g", "g"));
  CHECK(&r.histogram("h_seconds", "h") == &r.histogram("h_seconds", "h"));

  // A name reused with another type is a bug: the caller gets a working, unrendered metric.
  Gauge& clash = r.gauge("c_total", "oops");
  clash.set(7);
  CHECK(r.render().find("oops") == std::string::npos);
  CHECK(r.render().find("# TYPE c_total counter\n") != std::string::npos);

  // Invalid characters become '_' rather than breaking the exposition.
  r.counter("bad-name.total", "b", {{"bad key", "v"}}).add();
  CHECK(r.render().find("bad_name_total{bad_key=\"v\"} 1\n") != std::string::npos);
}

TEST_CASE("Default latency buckets run from 5 us to 10 s in increasing steps") {
  auto b = default_latency_buckets();
  REQUIRE(b.size() == 20);
  CHECK(b.front() == 5e-6);
  CHECK(b.back() == 10.0);
  for (size_t i = 1; i < b.size(); ++i) {
    CHECK(b[i] > b[i - 1]);
    CHECK(b[i] / b[i - 1] <= 2.5 + 1e-9);
  }
  Histogram h(b);
  h.observe(3e-6);
  h.observe(20.0);
  h.observe(std::nan(""));  // ignored
  CHECK(h.bucket_count(0) == 1);
  CHECK(h.bucket_count(b.size()) == 1);
  CHECK(h.count() == 2);
}

TEST_CASE("Concurrent updates from several threads sum exactly") {
  MetricsRegistry r;
  constexpr int kThreads = 4;
  constexpr int kPerThread = 100000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&r] {
      // Registration races too: every thread must get the same objects.
      Counter& c = r.counter("ops_total", "ops");
      Gauge& g = r.gauge("level", "level");
      Histogram& h = r.histogram("lat_seconds", "lat", std::vector<double>{0.5});
      for (int i = 0; i < kPerThread; ++i) {
        c.add();
        g.add(1.0);
        h.observe(i % 2 ? 1.0 : 0.25);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(r.counter("ops_total", "ops").value() == uint64_t(kThreads) * kPerThread);
  CHECK(r.gauge("level", "level").value() == double(kThreads) * kPerThread);
  Histogram& h = r.histogram("lat_seconds", "lat");
  CHECK(h.count() == uint64_t(kThreads) * kPerThread);
  CHECK(h.bucket_count(0) == uint64_t(kThreads) * kPerThread / 2);
  CHECK(h.sum() == (0.25 + 1.0) * kThreads * kPerThread / 2);  // exact in binary
}

TEST_CASE("Collectors run before each render") {
  MetricsRegistry r;
  int scrapes = 0;
  r.add_collector([&scrapes](MetricsRegistry& reg) {
    ++scrapes;
    reg.gauge("kvtier_scrapes", "Renders so far.").set(scrapes);
  });
  CHECK(r.render().find("kvtier_scrapes 1\n") != std::string::npos);
  CHECK(r.render().find("kvtier_scrapes 2\n") != std::string::npos);
}

TEST_CASE("A sampled series reads its source at each render, beside the registry's own series") {
  MetricsRegistry r;
  std::atomic<uint64_t> lookups{0};  // kept by another component
  double level = 0.5;
  r.counter("kvtier_dropped_total", "Dropped.", {{"cause", "owned"}}).add(2);
  r.counter_fn("kvtier_dropped_total", "Dropped.", {{"cause", "mirrored"}}, [&] { return 7.0; });
  r.counter_fn("kvtier_lookups_total", "Lookups.", {}, [&] { return double(lookups.load()); });
  r.gauge_fn("kvtier_level", "Level.", {{"tier", "host"}}, [&] { return level; });
  CHECK(r.render() ==
        "# HELP kvtier_dropped_total Dropped.\n# TYPE kvtier_dropped_total counter\n"
        "kvtier_dropped_total{cause=\"owned\"} 2\nkvtier_dropped_total{cause=\"mirrored\"} 7\n"
        "# HELP kvtier_lookups_total Lookups.\n# TYPE kvtier_lookups_total counter\nkvtier_lookups_total 0\n"
        "# HELP kvtier_level Level.\n# TYPE kvtier_level gauge\nkvtier_level{tier=\"host\"} 0.5\n");
  lookups = 12;
  level = 3;
  const std::string text = r.render();
  CHECK_THAT(text, Catch::Contains("kvtier_lookups_total 12\n"));
  CHECK_THAT(text, Catch::Contains("kvtier_level{tier=\"host\"} 3\n"));
  SECTION("registering it again replaces the read") {
    r.gauge_fn("kvtier_level", "Level.", {{"tier", "host"}}, [] { return 9.0; });
    CHECK_THAT(r.render(), Catch::Contains("kvtier_level{tier=\"host\"} 9\n"));
  }
  SECTION("a read that takes the registry does not deadlock a render") {
    r.gauge_fn("kvtier_families", "Counters registered.", {},
               [&r] { return double(r.counter("kvtier_lookups_total", "Lookups.").value()); });
    CHECK_THAT(r.render(), Catch::Contains("kvtier_families 0\n"));
  }
  SECTION("another metric type under a sampled name is refused, and the sampled one stays") {
    r.gauge("kvtier_lookups_total", "Lookups.").set(99);
    CHECK_THAT(r.render(), Catch::Contains("kvtier_lookups_total 12\n"));
    CHECK_THAT(r.render(), !Catch::Contains("99"));
  }
}

TEST_CASE("format_for_humans shows one line per series, histograms as count, mean, p50, p99") {
  MetricsRegistry r;
  fill(r);
  const std::string text = format_for_humans(r.render());
  INFO(text);
  CHECK(text.find("kvtier_requests_total{op=\"lookup\"}") != std::string::npos);
  CHECK(text.find("kvtier_up ") != std::string::npos);
  // 4 observations, sum 3.125: mean 781.25 ms; rank 2 ends in the 0.25 bucket; rank 3.96 lies
  // beyond the last finite bound, reported as that bound.
  const size_t row = text.find("kvtier_load_seconds{tier=\"nvme\"} ");
  REQUIRE(row != std::string::npos);
  CHECK(text.find(" count=4 mean=781.25ms p50=250.00ms p99=1.00s\n", row) != std::string::npos);
  size_t lines = 0;
  for (char c : text) lines += c == '\n';
  CHECK(lines == 5);  // 2 counters, 2 gauges, 1 histogram
}

TEST_CASE("parse_listen_address accepts host and port or an IPv6 address in brackets or only a port") {
  auto a = parse_listen_address("127.0.0.1:9477");
  REQUIRE(a.is_ok());
  CHECK(a->host == "127.0.0.1");
  CHECK(a->port == 9477);
  auto v6 = parse_listen_address("[::1]:0");
  REQUIRE(v6.is_ok());
  CHECK(v6->host == "::1");
  CHECK(v6->port == 0);
  auto any = parse_listen_address(":80");
  REQUIRE(any.is_ok());
  CHECK(any->host == "0.0.0.0");
  for (const char* bad : {"", "localhost", "::1:80", "host:", "host:65536", "host:12x", "[::1]80"}) {
    INFO(bad);
    CHECK(parse_listen_address(bad).status().code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("The HTTP server serves /metrics and /healthz and a taken port is a Status") {
  MetricsRegistry r;
  fill(r);
  auto server = MetricsHttpServer::start(r, "127.0.0.1:0");
  REQUIRE(server.is_ok());
  const uint16_t port = (*server)->port();
  REQUIRE(port != 0);

  httplib::Client client("127.0.0.1", port);
  auto metrics = client.Get("/metrics");
  REQUIRE(metrics);
  CHECK(metrics->status == 200);
  CHECK(metrics->body == kExpected);
  CHECK_THAT(metrics->get_header_value("Content-Type"), Catch::StartsWith("text/plain; version=0.0.4"));

  auto health = client.Get("/healthz");
  REQUIRE(health);
  CHECK(health->status == 200);
  CHECK(health->body == "ok");
  auto missing = client.Get("/nope");
  REQUIRE(missing);
  CHECK(missing->status == 404);

  auto second = MetricsHttpServer::start(r, "127.0.0.1:" + std::to_string(port));
  REQUIRE_FALSE(second.is_ok());
  CHECK(second.status().code() == StatusCode::kUnavailable);
  CHECK_THAT(std::string(second.status().message()), Catch::Contains(std::to_string(port)));

  CHECK(MetricsHttpServer::start(r, "nonsense").status().code() == StatusCode::kInvalidArgument);

  // After stop() the port is free again, and stop() twice is harmless.
  (*server)->stop();
  (*server)->stop();
  auto again = MetricsHttpServer::start(r, "127.0.0.1:" + std::to_string(port));
  REQUIRE(again.is_ok());
  httplib::Client client2("127.0.0.1", port);
  auto health2 = client2.Get("/healthz");
  REQUIRE(health2);
  CHECK(health2->body == "ok");
}

TEST_CASE("A server stopped right after start shuts down cleanly") {
  MetricsRegistry r;
  for (int i = 0; i < 20; ++i) {
    auto s = MetricsHttpServer::start(r, "127.0.0.1:0");
    REQUIRE(s.is_ok());
  }  // the destructor stops and joins each
}
