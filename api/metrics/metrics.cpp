#include "api/metrics/metrics.h"

#include <httplib.h>
#include <spdlog/spdlog.h>
#include <sys/socket.h>

#include <algorithm>
#include <charconv>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <limits>
#include <system_error>
#include <thread>
#include <unordered_map>

namespace kvtier {

namespace {

/// Text as the exposition format wants it: \ and newline escaped, and " too in a label value
/// (inside double quotes) but not in a HELP line.
std::string escape_text(std::string_view v, bool quoted) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"' && quoted) out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}
std::string escape_label_value(std::string_view v) { return escape_text(v, true); }
std::string escape_help(std::string_view v) { return escape_text(v, false); }

constexpr double kDefaultLatencyBuckets[] = {
    5e-6,  10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3,
    10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0,   2.5,  5.0,    10.0};

/// Prometheus' float spelling: shortest round-trip decimal, "+Inf", "-Inf", "NaN".
std::string format_value(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v);
  return std::string(buf, r.ptr);
}

bool name_char(char c, bool first, bool allow_colon) {
  const bool alpha = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
  const bool digit = c >= '0' && c <= '9';
  return alpha || (allow_colon && c == ':') || (!first && digit);
}

std::string sanitize_name(std::string_view name, bool allow_colon) {
  std::string out(name.empty() ? std::string_view("_") : name);
  for (size_t i = 0; i < out.size(); ++i) {
    if (!name_char(out[i], i == 0, allow_colon)) out[i] = '_';
  }
  return out;
}


/// Canonical label text without braces: keys sanitized, sorted, first of duplicates kept.
/// Doubles as the series identity, so {a,b} and {b,a} name one series.
std::string canonical_labels(MetricLabels labels, bool histogram) {
  for (auto& [k, v] : labels) {
    k = sanitize_name(k, /*allow_colon=*/false);
    if (histogram && k == "le") k = "le_";  // "le" is the bucket label of a histogram
  }
  std::stable_sort(labels.begin(), labels.end(),
                   [](const auto& a, const auto& b) { return a.first < b.first; });
  std::string out;
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0 && labels[i].first == labels[i - 1].first) continue;
    if (!out.empty()) out += ',';
    out += labels[i].first;
    out += "=\"";
    out += escape_label_value(labels[i].second);
    out += '"';
  }
  return out;
}

std::string braces(const std::string& inner) { return inner.empty() ? "" : "{" + inner + "}"; }

std::vector<double> clean_bounds(std::span<const double> bounds) {
  std::vector<double> out;
  for (double b : bounds) {
    if (std::isfinite(b)) out.push_back(b);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace

std::span<const double> default_latency_buckets() noexcept { return kDefaultLatencyBuckets; }

// ---- Histogram ------------------------------------------------------------------------------

Histogram::Histogram(std::span<const double> upper_bounds)
    : bounds_(clean_bounds(upper_bounds)),
      counts_(std::make_unique<std::atomic<uint64_t>[]>(bounds_.size() + 1)) {
  for (size_t i = 0; i <= bounds_.size(); ++i) counts_[i].store(0, std::memory_order_relaxed);
}

void Histogram::observe(double seconds) noexcept {
  if (std::isnan(seconds)) return;
  // `le` is inclusive: the first bound >= the value.
  const size_t i = static_cast<size_t>(
      std::lower_bound(bounds_.begin(), bounds_.end(), seconds) - bounds_.begin());
  counts_[i].fetch_add(1, std::memory_order_relaxed);
  sum_.fetch_add(seconds, std::memory_order_relaxed);
}

uint64_t Histogram::count() const noexcept {
  uint64_t total = 0;
  for (size_t i = 0; i <= bounds_.size(); ++i) total += bucket_count(i);
  return total;
}

// ---- MetricsRegistry ------------------------------------------------------------------------

struct MetricsRegistry::Family {
  struct Series {
    std::string labels;  // canonical, without braces
    std::unique_ptr<Counter> counter;
    std::unique_ptr<Gauge> gauge;
    std::unique_ptr<Histogram> histogram;
    std::function<double()> read;  // a sampled series (counter_fn, gauge_fn): rendered from this
  };

  std::string name, help;
  Kind kind = Kind::kCounter;
  std::vector<double> buckets;  // histograms: fixed by the first registration
  std::vector<std::unique_ptr<Series>> series;
  std::map<std::string, Series*, std::less<>> by_labels;

  Series& series_for(std::string labels) {
    auto it = by_labels.find(labels);
    if (it != by_labels.end()) return *it->second;
    auto s = std::make_unique<Series>();
    s->labels = std::move(labels);
    if (kind == Kind::kCounter) s->counter = std::make_unique<Counter>();
    if (kind == Kind::kGauge) s->gauge = std::make_unique<Gauge>();
    if (kind == Kind::kHistogram) s->histogram = std::make_unique<Histogram>(buckets);
    Series* raw = s.get();
    series.push_back(std::move(s));
    by_labels.emplace(raw->labels, raw);
    return *raw;
  }
};

MetricsRegistry::MetricsRegistry() = default;
MetricsRegistry::~MetricsRegistry() = default;

MetricsRegistry::Family& MetricsRegistry::family_locked(std::string_view name, std::string_view help,
                                                        Kind kind, bool& kind_clash) {
  std::string clean = sanitize_name(name, /*allow_colon=*/true);
  auto it = by_name_.find(clean);
  if (it != by_name_.end()) {
    kind_clash = it->second->kind != kind;
    if (kind_clash) spdlog::error("metrics: {} registered again as another metric type", clean);
    return *it->second;
  }
  kind_clash = false;
  auto f = std::make_unique<Family>();
  f->name = std::move(clean);
  f->help = std::string(help);
  f->kind = kind;
  Family* raw = f.get();
  families_.push_back(std::move(f));
  by_name_.emplace(raw->name, raw);
  return *raw;
}

Counter& MetricsRegistry::counter(std::string_view name, std::string_view help, MetricLabels labels) {
  std::lock_guard lock(mu_);
  bool clash = false;
  Family& f = family_locked(name, help, Kind::kCounter, clash);
  if (clash) return detached_counters_.emplace_back();
  return *f.series_for(canonical_labels(std::move(labels), false)).counter;
}

Gauge& MetricsRegistry::gauge(std::string_view name, std::string_view help, MetricLabels labels) {
  std::lock_guard lock(mu_);
  bool clash = false;
  Family& f = family_locked(name, help, Kind::kGauge, clash);
  if (clash) return detached_gauges_.emplace_back();
  return *f.series_for(canonical_labels(std::move(labels), false)).gauge;
}

Histogram& MetricsRegistry::histogram(std::string_view name, std::string_view help,
                                      std::span<const double> buckets, MetricLabels labels) {
  std::lock_guard lock(mu_);
  bool clash = false;
  Family& f = family_locked(name, help, Kind::kHistogram, clash);
  if (clash) return detached_histograms_.emplace_back(buckets);
  if (f.series.empty() && f.buckets.empty()) f.buckets = clean_bounds(buckets);
  return *f.series_for(canonical_labels(std::move(labels), true)).histogram;
}

void MetricsRegistry::sampled(std::string_view name, std::string_view help, Kind kind, MetricLabels labels,
                              std::function<double()> read) {
  std::lock_guard lock(mu_);
  bool clash = false;
  Family& f = family_locked(name, help, kind, clash);
  if (clash) return;  // logged: never rendered
  f.series_for(canonical_labels(std::move(labels), false)).read = std::move(read);
}

void MetricsRegistry::counter_fn(std::string_view name, std::string_view help, MetricLabels labels,
                                 std::function<double()> read) {
  sampled(name, help, Kind::kCounter, std::move(labels), std::move(read));
}

void MetricsRegistry::gauge_fn(std::string_view name, std::string_view help, MetricLabels labels,
                               std::function<double()> read) {
  sampled(name, help, Kind::kGauge, std::move(labels), std::move(read));
}

void MetricsRegistry::add_collector(std::function<void(MetricsRegistry&)> collector) {
  std::lock_guard lock(mu_);
  collectors_.push_back(std::move(collector));
}

std::string MetricsRegistry::render() {
  std::vector<std::function<void(MetricsRegistry&)>> collectors;
  {
    std::lock_guard lock(mu_);
    collectors = collectors_;
  }
  for (auto& c : collectors) c(*this);  // unlocked: collectors register and set metrics

  // Sampled series read unlocked too (their sources take their own locks); series never move.
  std::vector<std::pair<const Family::Series*, std::function<double()>>> reads;
  {
    std::lock_guard lock(mu_);
    for (const auto& f : families_) {
      for (const auto& s : f->series) {
        if (s->read) reads.emplace_back(s.get(), s->read);
      }
    }
  }
  std::unordered_map<const Family::Series*, double> sampled;
  for (auto& [series, read] : reads) sampled.emplace(series, read());

  std::lock_guard lock(mu_);
  std::string out;
  for (const auto& f : families_) {
    if (f->series.empty()) continue;
    out += "# HELP " + f->name + " " + escape_help(f->help) + "\n";
    out += "# TYPE " + f->name + " ";
    out += f->kind == Kind::kCounter ? "counter\n" : f->kind == Kind::kGauge ? "gauge\n" : "histogram\n";
    for (const auto& s : f->series) {
      if (s->read) {
        auto it = sampled.find(s.get());  // absent: registered since the reads
        out += f->name + braces(s->labels) + " " + format_value(it != sampled.end() ? it->second : 0.0) + "\n";
      } else if (s->counter) {
        out += f->name + braces(s->labels) + " " + std::to_string(s->counter->value()) + "\n";
      } else if (s->gauge) {
        out += f->name + braces(s->labels) + " " + format_value(s->gauge->value()) + "\n";
      } else {
        const Histogram& h = *s->histogram;
        const std::string prefix = s->labels.empty() ? "{" : "{" + s->labels + ",";
        uint64_t cumulative = 0;
        for (size_t i = 0; i < h.upper_bounds().size(); ++i) {
          cumulative += h.bucket_count(i);
          out += f->name + "_bucket" + prefix + "le=\"" + format_value(h.upper_bounds()[i]) +
                 "\"} " + std::to_string(cumulative) + "\n";
        }
        cumulative += h.bucket_count(h.upper_bounds().size());
        out += f->name + "_bucket" + prefix + "le=\"+Inf\"} " + std::to_string(cumulative) + "\n";
        out += f->name + "_sum" + braces(s->labels) + " " + format_value(h.sum()) + "\n";
        out += f->name + "_count" + braces(s->labels) + " " + std::to_string(cumulative) + "\n";
      }
    }
  }
  return out;
}

// ---- listen addresses -----------------------------------------------------------------------

Result<ListenAddress> parse_listen_address(std::string_view text) {
  auto bad = [&](std::string_view why) {
    return invalid_argument("listen address '" + std::string(text) + "': " + std::string(why));
  };
  ListenAddress a;
  std::string_view port_text;
  if (!text.empty() && text.front() == '[') {
    const size_t close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return bad("expected [address]:port");
    }
    a.host = std::string(text.substr(1, close - 1));
    port_text = text.substr(close + 2);
  } else {
    const size_t colon = text.rfind(':');
    if (colon == std::string_view::npos) return bad("expected host:port");
    a.host = std::string(text.substr(0, colon));
    if (a.host.find(':') != std::string::npos) return bad("write IPv6 addresses as [address]:port");
    port_text = text.substr(colon + 1);
  }
  if (a.host.empty()) a.host = "0.0.0.0";
  unsigned port = 0;
  auto r = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || r.ec != std::errc() || r.ptr != port_text.data() + port_text.size() ||
      port > 65535) {
    return bad("the port must be a number from 0 to 65535");
  }
  a.port = static_cast<uint16_t>(port);
  return a;
}

// ---- MetricsHttpServer ----------------------------------------------------------------------

struct MetricsHttpServer::Impl {
  httplib::Server server;
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool accepting = false;  // the accept loop runs: stop() now reaches it
  bool finished = false;   // listen_after_bind returned
  std::once_flag stopped;
};

MetricsHttpServer::MetricsHttpServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

MetricsHttpServer::~MetricsHttpServer() { stop(); }

void MetricsHttpServer::stop() {
  if (!impl_) return;
  std::call_once(impl_->stopped, [this] {
    impl_->server.stop();
    if (impl_->thread.joinable()) impl_->thread.join();
  });
}

Result<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::start(MetricsRegistry& registry,
                                                                   std::string_view listen) {
  return start([&registry] { return registry.render(); }, listen);
}

Result<std::unique_ptr<MetricsHttpServer>> MetricsHttpServer::start(std::function<std::string()> render,
                                                                    std::string_view listen) {
  auto addr = parse_listen_address(listen);
  if (!addr.is_ok()) return addr.status();
  auto impl = std::make_unique<Impl>();
  Impl* raw = impl.get();

  // httplib's default sets SO_REUSEPORT, which would let a second kvtierd bind the same port and
  // silently take half the scrapes. SO_REUSEADDR alone still allows a quick restart.
  raw->server.set_socket_options([](socket_t sock) {
    int yes = 1;
    (void)::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
  });
  raw->server.Get("/metrics", [render = std::move(render)](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  raw->server.Get("/healthz", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("ok", "text/plain");
  });
  // httplib (0.11) sets its running flag and then builds the task queue, before accepting: this
  // hook is the moment stop() starts to work, signalled instead of polled.
  raw->server.new_task_queue = [raw] {
    // Scrapes are rare; two workers cover a scraper and a CLI. Built before signalling, so a
    // failure to start its threads reads as "finished without accepting".
    auto* pool = new httplib::ThreadPool(2);
    {
      std::lock_guard lock(raw->mu);
      raw->accepting = true;
    }
    raw->cv.notify_all();
    return pool;
  };

  errno = 0;
  int port = -1;
  if (addr->port == 0) {
    port = raw->server.bind_to_any_port(addr->host);
  } else if (raw->server.bind_to_port(addr->host, addr->port)) {
    port = addr->port;
  }
  if (port < 0) {
    const int err = errno;
    return Status(StatusCode::kUnavailable,
                  "metrics: cannot listen on " + std::string(listen) + ": " +
                      (err != 0 ? std::string(std::strerror(err)) : std::string("bind failed")));
  }

  try {
    raw->thread = std::thread([raw] {
      try {
        raw->server.listen_after_bind();
      } catch (const std::exception& e) {  // e.g. its worker threads could not start
        spdlog::error("kvtier: metrics server: {}", e.what());
      }
      {
        std::lock_guard lock(raw->mu);
        raw->finished = true;
      }
      raw->cv.notify_all();
    });
  } catch (const std::system_error& e) {
    return Status(StatusCode::kUnavailable, std::string("metrics: cannot start a thread: ") + e.what());
  }
  bool accepting = false;
  {
    std::unique_lock lock(raw->mu);
    raw->cv.wait(lock, [raw] { return raw->accepting || raw->finished; });
    accepting = raw->accepting;
  }
  std::unique_ptr<MetricsHttpServer> server(new MetricsHttpServer(std::move(impl)));
  if (!accepting) {
    server->stop();
    return Status(StatusCode::kUnavailable,
                  "metrics: the server on " + std::string(listen) + " stopped before accepting");
  }
  server->host_ = addr->host;
  server->port_ = static_cast<uint16_t>(port);
  spdlog::info("kvtier: metrics on http://{}:{}/metrics", addr->host, port);
  return server;
}

// ---- format_for_humans ----------------------------------------------------------------------

namespace {

struct Sample {
  std::string name;
  std::vector<std::pair<std::string, std::string>> labels;  // values unescaped
  double value = 0;
};

/// Parses "name{k="v",...} value [timestamp]"; false for anything else.
bool parse_sample(std::string_view line, Sample& s) {
  size_t i = 0;
  while (i < line.size() && line[i] != '{' && line[i] != ' ') ++i;
  s.name = std::string(line.substr(0, i));
  s.labels.clear();
  if (s.name.empty()) return false;
  if (i < line.size() && line[i] == '{') {
    ++i;
    while (i < line.size() && line[i] != '}') {
      const size_t eq = line.find('=', i);
      if (eq == std::string_view::npos || eq + 1 >= line.size() || line[eq + 1] != '"') return false;
      std::string key(line.substr(i, eq - i));
      std::string value;
      i = eq + 2;
      while (i < line.size() && line[i] != '"') {
        if (line[i] == '\\' && i + 1 < line.size()) {
          ++i;
          value += line[i] == 'n' ? '\n' : line[i];
        } else {
          value += line[i];
        }
        ++i;
      }
      if (i >= line.size()) return false;
      ++i;  // closing quote
      if (i < line.size() && line[i] == ',') ++i;
      s.labels.emplace_back(std::move(key), std::move(value));
    }
    if (i >= line.size()) return false;
    ++i;  // '}'
  }
  while (i < line.size() && line[i] == ' ') ++i;
  const size_t end = line.find(' ', i);
  const std::string value(line.substr(i, end == std::string_view::npos ? end : end - i));
  if (value == "+Inf") s.value = std::numeric_limits<double>::infinity();
  else if (value == "-Inf") s.value = -std::numeric_limits<double>::infinity();
  else if (value == "NaN") s.value = std::numeric_limits<double>::quiet_NaN();
  else {
    auto r = std::from_chars(value.data(), value.data() + value.size(), s.value);
    if (value.empty() || r.ec != std::errc()) return false;
  }
  return true;
}

std::string label_text(const std::vector<std::pair<std::string, std::string>>& labels) {
  std::string out;
  for (const auto& [k, v] : labels) {
    out += out.empty() ? "{" : ",";
    out += k + "=\"" + escape_label_value(v) + "\"";
  }
  return out.empty() ? out : out + "}";
}

std::string format_number(double v) {
  if (std::isfinite(v) && v == std::floor(v) && std::fabs(v) < 1e15) {
    return std::to_string(static_cast<long long>(v));
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.4g", v);
  return buf;
}

std::string format_seconds(double s) {
  char buf[32];
  if (!std::isfinite(s)) return format_value(s);
  if (s < 1e-3) std::snprintf(buf, sizeof(buf), "%.1fus", s * 1e6);
  else if (s < 1.0) std::snprintf(buf, sizeof(buf), "%.2fms", s * 1e3);
  else std::snprintf(buf, sizeof(buf), "%.2fs", s);
  return buf;
}

struct HistogramSeries {
  std::string key;  // family + labels without le
  size_t row = 0;   // its line in the output, where it first appeared
  std::vector<std::pair<double, double>> buckets;  // (le, cumulative count)
  double sum = 0, count = 0;
};

/// histogram_quantile: linear interpolation inside the bucket that holds rank q × count.
double estimate_quantile(double q, std::vector<std::pair<double, double>> buckets) {
  std::sort(buckets.begin(), buckets.end());
  if (buckets.empty() || buckets.back().second <= 0) return std::nan("");
  const double rank = q * buckets.back().second;
  double prev_bound = 0, prev_count = 0;
  for (const auto& [le, cumulative] : buckets) {
    if (cumulative >= rank) {
      if (std::isinf(le)) return prev_bound;  // beyond the largest finite bound: report it
      if (cumulative == prev_count) return le;
      const double lower = prev_bound < le ? prev_bound : 0;
      return lower + (le - lower) * (rank - prev_count) / (cumulative - prev_count);
    }
    prev_bound = le;
    prev_count = cumulative;
  }
  return prev_bound;
}

}  // namespace

std::string format_for_humans(std::string_view text) {
  std::map<std::string, std::string, std::less<>> types;
  std::vector<std::pair<std::string, std::string>> rows;  // (series, value text)
  std::vector<HistogramSeries> histograms;
  std::map<std::string, size_t> histogram_index;

  auto histogram_family = [&](const std::string& name, std::string& family,
                              std::string& part) -> bool {
    for (std::string_view suffix : {"_bucket", "_sum", "_count"}) {
      if (name.size() > suffix.size() && name.ends_with(suffix)) {
        family = name.substr(0, name.size() - suffix.size());
        auto t = types.find(family);
        if (t != types.end() && t->second == "histogram") {
          part = std::string(suffix);
          return true;
        }
      }
    }
    return false;
  };

  size_t pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty()) continue;
    if (line.starts_with("# TYPE ")) {
      std::string_view rest = line.substr(7);
      const size_t sp = rest.find(' ');
      if (sp != std::string_view::npos) {
        types[std::string(rest.substr(0, sp))] = std::string(rest.substr(sp + 1));
      }
      continue;
    }
    if (line.front() == '#') continue;
    Sample s;
    if (!parse_sample(line, s)) continue;
    std::string family, part;
    if (!histogram_family(s.name, family, part)) {
      rows.emplace_back(s.name + label_text(s.labels), format_number(s.value));
      continue;
    }
    double le = 0;
    bool has_le = false;
    std::vector<std::pair<std::string, std::string>> rest;
    for (auto& [k, v] : s.labels) {
      if (k == "le") {
        has_le = true;
        le = v == "+Inf" ? std::numeric_limits<double>::infinity() : std::strtod(v.c_str(), nullptr);
      } else {
        rest.emplace_back(k, v);
      }
    }
    const std::string key = family + label_text(rest);
    auto [it, inserted] = histogram_index.emplace(key, histograms.size());
    if (inserted) {
      histograms.push_back({key, rows.size(), {}, 0, 0});
      rows.emplace_back(key, "");  // filled in below, keeping the input's order
    }
    HistogramSeries& h = histograms[it->second];
    if (part == "_bucket" && has_le) h.buckets.emplace_back(le, s.value);
    if (part == "_sum") h.sum = s.value;
    if (part == "_count") h.count = s.value;
  }

  for (const HistogramSeries& h : histograms) {
    const bool seconds = h.key.find("seconds") != std::string::npos;
    auto fmt = [&](double v) { return seconds ? format_seconds(v) : format_number(v); };
    std::string text_value = "count=" + format_number(h.count);
    if (h.count > 0) {
      text_value += " mean=" + fmt(h.sum / h.count) + " p50=" + fmt(estimate_quantile(0.5, h.buckets)) +
                    " p99=" + fmt(estimate_quantile(0.99, h.buckets));
    }
    rows[h.row].second = std::move(text_value);
  }

  size_t width = 0;
  for (const auto& row : rows) width = std::max(width, row.first.size());
  std::string out;
  for (const auto& [series, value] : rows) {
    out += series;
    out.append(width - series.size() + 2, ' ');
    out += value + "\n";
  }
  return out;
}

}  // namespace kvtier
