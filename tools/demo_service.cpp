#include "tools/demo_service.h"

#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <type_traits>
#include <vector>

#include "kvtier/client.h"
#include "api/metrics/metrics.h"
#include "tiers/catalog.h"
#include "tools/synthetic_kv.h"

namespace kvtier {

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string errno_text(const char* what) { return std::string(what) + ": " + std::strerror(errno); }

// ---- the workload: every process derives the same prompts and the same KV -------------------

/// Request (user, turn): the shared system prompt, a shared document, the user's own question.
std::vector<TokenId> request_prompt(const ServiceDemoWorkload& w, uint32_t user, uint32_t turn) {
  auto prompt = synthetic_tokens(1, w.system_tokens);
  const auto document = synthetic_tokens(100 + (user + turn) % std::max(w.documents, 1u), w.document_tokens);
  const auto question = synthetic_tokens(1'000'000 + uint64_t(user) * 1000 + turn, w.question_tokens);
  prompt.insert(prompt.end(), document.begin(), document.end());
  prompt.insert(prompt.end(), question.begin(), question.end());
  return prompt;
}

/// What a user process reports per request through the shared pipe. Smaller than PIPE_BUF, so
/// the reports of several users writing the same pipe never interleave.
struct TurnReport {
  uint32_t user = 0, turn = 0;
  uint64_t prompt_tokens = 0, restored_tokens = 0, restored_bytes = 0;
  uint64_t checked_blocks = 0, bad_blocks = 0, saved_blocks = 0;
  double restore_s = 0;  // lookup + load + release
  double save_s = 0;
};
static_assert(sizeof(TurnReport) <= PIPE_BUF && std::is_trivially_copyable_v<TurnReport>);

/// One request the way an engine makes it: lookup, load the cached prefix, release; check every
/// restored byte; compute the rest; save the new blocks. `kv` is the engine's KV memory.
Result<TurnReport> serve_request(Client& client, NamespaceId ns, const std::vector<TokenId>& prompt,
                                 std::vector<std::byte>& kv) {
  const KvLayout& layout = client.layout();
  const uint64_t bpb = layout.bytes_per_block();
  const size_t blocks = prompt.size() / layout.block_tokens;
  if (kv.size() < blocks * bpb) kv.resize(blocks * bpb);
  // Poisoned first, so a load that wrote nothing cannot pass the check with an earlier turn's KV.
  std::memset(kv.data(), 0xEE, blocks * bpb);

  TurnReport r;
  r.prompt_tokens = prompt.size();
  const auto t0 = Clock::now();
  auto match = client.lookup(ns, prompt);
  if (!match) return match.status();
  const size_t hit = match->blocks.size();
  if (hit > 0) {
    auto loaded = client.load(*match, KvBuffer::contiguous(kv.data(), hit, bpb));
    Status done = loaded ? loaded->wait() : loaded.status();
    if (!done) {
      client.release(*match).ignore();  // the load's error is the one to report
      return done;
    }
  }
  KVTIER_RETURN_IF_ERROR(client.release(*match));
  r.restore_s = seconds_since(t0);
  r.restored_tokens = match->tokens;
  r.restored_bytes = hit * bpb;

  std::vector<std::byte> expected(bpb);
  for (size_t b = 0; b < hit; ++b) {
    synthetic_block_kv(prompt, b, layout.block_tokens, expected.data(), bpb);
    r.bad_blocks += std::memcmp(expected.data(), kv.data() + b * bpb, bpb) != 0;
    ++r.checked_blocks;
  }
  for (size_t b = hit; b < blocks; ++b) synthetic_block_kv(prompt, b, layout.block_tokens, kv.data() + b * bpb, bpb);
  if (hit < blocks) {
    const auto t1 = Clock::now();
    auto saved = client.save(ns, prompt, KvBuffer::contiguous(kv.data() + hit * bpb, blocks - hit, bpb),
                             Priority::kNormal, {}, hit);
    if (!saved) return saved.status();
    r.save_s = seconds_since(t1);
    r.saved_blocks = *saved;
  }
  return r;
}

// ---- processes ---------------------------------------------------------------------------------

/// Starts this program again (fork + exec of /proc/self/exe) with `args`. `inherit_fd` (opened
/// close-on-exec) stays open in the child: its flag is cleared after the fork, in the child only,
/// so children started meanwhile do not inherit it.
Result<pid_t> spawn_self(const std::vector<std::string>& args, int inherit_fd) {
  std::vector<std::string> storage = args;
  storage.insert(storage.begin(), "kvtier");
  std::vector<char*> argv;
  for (auto& a : storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::fflush(stdout);  // or the child's output could come before ours
  std::fflush(stderr);
  const pid_t pid = ::fork();
  if (pid < 0) return Status(StatusCode::kUnavailable, errno_text("fork"));
  if (pid == 0) {  // only async-signal-safe calls until exec
    if (inherit_fd >= 0) ::fcntl(inherit_fd, F_SETFD, 0);
    ::execv("/proc/self/exe", argv.data());
    _exit(127);
  }
  return pid;
}

std::string describe_exit(int wait_status) {
  if (WIFEXITED(wait_status)) return "exit status " + std::to_string(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) return std::string("killed by ") + strsignal(WTERMSIG(wait_status));
  return "wait status " + std::to_string(wait_status);
}

Result<int> wait_child(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return Status(StatusCode::kInternal, errno_text("waitpid"));
  }
  return status;
}

/// A kvtierd process the demo started. Stopping it is the demo's job; the destructor only makes
/// sure an early error never leaves one running.
class DaemonProcess {
 public:
  /// Starts `kvtier serve` and waits for "ready" on its --ready-fd pipe.
  /// `kv_heads` and `head_dim` set the demo layout (8 layers, bf16); `extra` goes to serve as is.
  static Result<std::unique_ptr<DaemonProcess>> start(const ServiceDemoOptions& o, const std::string& socket,
                                                      std::string kv_heads = "8", std::string head_dim = "128",
                                                      const std::vector<std::string>& extra = {}) {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return Status(StatusCode::kUnavailable, errno_text("pipe"));
    // The service runs on its defaults except for where it lives, a small demo KV layout
    // (8 layers x 8 kv heads x 128, bf16: 512 KiB blocks) and tier sizes the demo can afford.
    std::vector<std::string> args = {
        "serve", "--data-dir", o.dir, "--socket", socket, "--metrics", "off",
        "--layers", "8", "--kv-heads", kv_heads, "--head-dim", head_dim, "--dtype", "bf16",
        "--host-bytes", o.host_bytes, "--nvme-bytes", o.nvme_bytes,
        "--ready-fd", std::to_string(fds[1]), "--log-level", "warn"};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto t0 = Clock::now();
    auto pid = spawn_self(args, fds[1]);
    ::close(fds[1]);
    if (!pid) {
      ::close(fds[0]);
      return pid.status();
    }
    std::unique_ptr<DaemonProcess> d(new DaemonProcess(*pid));
    char buf[16] = {};
    ssize_t n = -1;
    pollfd p{fds[0], POLLIN, 0};
    if (::poll(&p, 1, 60'000) == 1) {
      do n = ::read(fds[0], buf, sizeof(buf) - 1);
      while (n < 0 && errno == EINTR);
    }
    ::close(fds[0]);
    if (n > 0 && std::string_view(buf).starts_with("ready")) {
      d->ready_s_ = seconds_since(t0);
      return d;
    }
    if (n != 0) {  // no word for a minute
      ::kill(d->pid_, SIGKILL);
      wait_child(d->pid_).ignore();
      d->pid_ = -1;
      return Status(StatusCode::kUnavailable, "kvtierd did not become ready within 60 s");
    }
    auto status = wait_child(d->pid_);  // it closed the pipe without a word: it exited
    d->pid_ = -1;
    return Status(StatusCode::kUnavailable, "kvtierd exited before it was ready (" +
                                                (status ? describe_exit(*status) : status.status().to_string()) +
                                                "); its error is above");
  }

  ~DaemonProcess() {
    if (pid_ > 0) stop().ignore();
  }

  pid_t pid() const noexcept { return pid_; }

  /// SIGKILL, then waits for the exit: a crash at whatever the daemon was doing.
  Status kill() {
    if (pid_ <= 0) return Status::ok();
    ::kill(pid_, SIGKILL);
    auto status = wait_child(pid_);
    pid_ = -1;
    return status ? Status::ok() : status.status();
  }
  double ready_s() const noexcept { return ready_s_; }

  /// SIGTERM, then waits for the exit: ok only for exit status 0 (in-flight requests answered,
  /// write-back blocks flushed to NVMe, store closed).
  Status stop() {
    if (pid_ <= 0) return Status::ok();
    ::kill(pid_, SIGTERM);
    auto status = wait_child(pid_);
    pid_ = -1;
    if (!status) return status.status();
    if (WIFEXITED(*status) && WEXITSTATUS(*status) == 0) return Status::ok();
    return Status(StatusCode::kInternal, "kvtierd stopped with " + describe_exit(*status));
  }

 private:
  explicit DaemonProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  double ready_s_ = 0;
};

std::vector<std::string> workload_args(const ServiceDemoWorkload& w) {
  return {"--users", std::to_string(w.users), "--turns", std::to_string(w.turns),
          "--documents", std::to_string(w.documents), "--system-tokens", std::to_string(w.system_tokens),
          "--document-tokens", std::to_string(w.document_tokens), "--question-tokens", std::to_string(w.question_tokens)};
}

/// Starts one user process per entry of `users` (the arguments after `service-demo-user`), all
/// writing reports into one pipe, and collects the reports until the last one exits. Fails when
/// a user process did not exit 0 (its error is on stderr).
Result<std::vector<TurnReport>> run_users(const std::vector<std::vector<std::string>>& users) {
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) != 0) return Status(StatusCode::kUnavailable, errno_text("pipe"));
  std::vector<pid_t> pids;
  Status spawned;
  for (const auto& user_args : users) {
    std::vector<std::string> args = {"service-demo-user", "--report-fd", std::to_string(fds[1])};
    args.insert(args.end(), user_args.begin(), user_args.end());
    auto pid = spawn_self(args, fds[1]);
    if (!pid) {
      spawned = pid.status();
      break;
    }
    pids.push_back(*pid);
  }
  ::close(fds[1]);  // the pipe ends when the last user exits
  std::vector<TurnReport> reports;
  TurnReport r;
  size_t have = 0;
  for (;;) {
    const ssize_t n = ::read(fds[0], reinterpret_cast<char*>(&r) + have, sizeof(r) - have);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    have += static_cast<size_t>(n);
    if (have == sizeof(r)) {
      reports.push_back(r);
      have = 0;
    }
  }
  ::close(fds[0]);
  std::string failed;
  for (pid_t pid : pids) {
    auto status = wait_child(pid);
    if (!status) return status.status();
    if (!WIFEXITED(*status) || WEXITSTATUS(*status) != 0) {
      failed += " pid " + std::to_string(pid) + ": " + describe_exit(*status) + ";";
    }
  }
  KVTIER_RETURN_IF_ERROR(spawned);
  if (!failed.empty()) return Status(StatusCode::kInternal, "user processes failed:" + failed);
  return reports;
}

// ---- the report ----------------------------------------------------------------------------------

/// Nearest-rank percentile of `v` (q in (0, 1]); 0 for none.
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(q * double(v.size())));
  return v[std::clamp<size_t>(rank, 1, v.size()) - 1];
}

struct Totals {
  uint64_t requests = 0, prompt_tokens = 0, restored_tokens = 0, restored_bytes = 0;
  uint64_t checked_blocks = 0, bad_blocks = 0, saved_blocks = 0;
  double restore_s = 0;
  std::vector<double> restore_ms;  // requests that restored something

  void add(const TurnReport& r) {
    ++requests;
    prompt_tokens += r.prompt_tokens;
    restored_tokens += r.restored_tokens;
    restored_bytes += r.restored_bytes;
    checked_blocks += r.checked_blocks;
    bad_blocks += r.bad_blocks;
    saved_blocks += r.saved_blocks;
    if (r.restored_tokens > 0) {
      restore_s += r.restore_s;
      restore_ms.push_back(r.restore_s * 1e3);
    }
  }
  double hit_percent() const { return 100.0 * double(restored_tokens) / double(std::max<uint64_t>(prompt_tokens, 1)); }
  double restore_gbps() const { return restore_s > 0 ? double(restored_bytes) / restore_s / 1e9 : 0.0; }
};

double gib(double bytes) { return bytes / double(1ull << 30); }
double mib(double bytes) { return bytes / double(1ull << 20); }

/// The value of one series (`series` exactly as rendered, labels included); 0 when absent.
double metric(std::string_view text, std::string_view series) {
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.size() > series.size() && line.starts_with(series) && line[series.size()] == ' ') {
      return std::strtod(std::string(line.substr(series.size() + 1)).c_str(), nullptr);
    }
  }
  return 0;
}

/// The sum of every series of a family (`name{...} value` lines).
double metric_sum(std::string_view text, std::string_view name) {
  double sum = 0;
  for (size_t pos = 0; pos < text.size();) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    pos = end + 1;
    if (line.size() > name.size() && line.starts_with(name) && (line[name.size()] == '{' || line[name.size()] == ' ')) {
      const size_t sp = line.rfind(' ');
      sum += std::strtod(std::string(line.substr(sp + 1)).c_str(), nullptr);
    }
  }
  return sum;
}

Result<std::string> daemon_metrics(const std::string& socket) {
  auto client = Client::connect({.socket_path = socket, .window_bytes = 0, .name = "service-demo"});
  if (!client) return client.status();
  return (*client)->metrics_text();
}

void print_turn_table(const std::vector<TurnReport>& reports, uint32_t turns) {
  std::printf("  %-5s %8s %11s %13s %6s %14s %14s %12s %14s\n", "turn", "requests", "prompt tok", "restored tok",
              "hit%", "restore p50 ms", "restore p99 ms", "restore GB/s", "bytes checked");
  for (uint32_t t = 0; t < turns; ++t) {
    Totals tt;
    for (const auto& r : reports) {
      if (r.turn == t) tt.add(r);
    }
    std::printf("  %-5u %8llu %11llu %13llu %5.1f%% %14.1f %14.1f %12.2f %10.0f MiB%s\n", t + 1,
                static_cast<unsigned long long>(tt.requests), static_cast<unsigned long long>(tt.prompt_tokens),
                static_cast<unsigned long long>(tt.restored_tokens), tt.hit_percent(), percentile(tt.restore_ms, 0.5),
                percentile(tt.restore_ms, 0.99), tt.restore_gbps(), mib(double(tt.restored_bytes)),
                tt.bad_blocks ? "  DIFFER" : "");
  }
}

/// The lines of format_for_humans() that mention `needle`.
void print_human_lines(const std::string& text, std::string_view needle) {
  const std::string human = format_for_humans(text);
  for (size_t pos = 0; pos < human.size();) {
    size_t end = human.find('\n', pos);
    if (end == std::string::npos) end = human.size();
    std::string_view line(human.data() + pos, end - pos);
    pos = end + 1;
    if (line.find(needle) != std::string_view::npos) std::printf("    %.*s\n", int(line.size()), line.data());
  }
}

int fail(const Status& s) {
  std::fprintf(stderr, "kvtier service-demo: %s\n", s.to_string().c_str());
  return 1;
}

}  // namespace

int run_service_demo_user(const ServiceDemoUserOptions& o) {
  const ServiceDemoWorkload& w = o.workload;
  auto fail_user = [&](const std::string& what, const Status& s) {
    std::fprintf(stderr, "kvtier service-demo-user %u: %s: %s\n", o.user, what.c_str(), s.to_string().c_str());
    return 1;
  };
  auto client = Client::connect({.socket_path = o.socket, .window_bytes = o.window_mib << 20,
                                 .name = "service-demo-user-" + std::to_string(o.user)});
  if (!client) return fail_user("connect", client.status());
  auto ns = (*client)->open_namespace({.model_id = "demo/llama-like-8x8x128", .tenant = "", .adapter_id = ""});
  if (!ns) return fail_user("open_namespace", ns.status());
  std::vector<std::byte> kv;  // this engine's KV memory, reused across requests
  auto one = [&](uint32_t user, uint32_t turn) -> Status {
    auto r = serve_request(**client, *ns, request_prompt(w, user, turn), kv);
    if (!r) return r.status();
    r->user = user;
    r->turn = turn;
    if (::write(o.report_fd, &*r, sizeof(TurnReport)) != static_cast<ssize_t>(sizeof(TurnReport))) {
      return Status(StatusCode::kIoError, errno_text("report pipe"));
    }
    return Status::ok();
  };
  if (o.replay) {
    for (uint32_t u = 0; u < w.users; ++u) {
      if (Status s = one(u, 0); !s) return fail_user("replay of user " + std::to_string(u) + " turn 1", s);
    }
    return 0;
  }
  for (uint32_t t = 0; t < w.turns; ++t) {
    if (Status s = one(o.user, t); !s) return fail_user("turn " + std::to_string(t + 1), s);
  }
  return 0;
}

int run_service_demo(const ServiceDemoOptions& o) {
  const auto demo_start = Clock::now();
  const ServiceDemoWorkload& w = o.workload;
  if (w.users == 0 || w.turns == 0 || w.documents == 0) {
    return fail(invalid_argument("--users, --turns and --documents must be at least 1"));
  }
  std::error_code ec;
  std::filesystem::remove_all(o.dir, ec);
  if (!std::filesystem::create_directories(o.dir, ec) && ec) {
    return fail(Status(StatusCode::kIoError, "cannot create " + o.dir + ": " + ec.message()));
  }
  const std::string socket = o.dir + "/kvtierd.sock";
  const uint64_t prompt_tokens = uint64_t(w.system_tokens) + w.document_tokens + w.question_tokens;

  std::printf("kvtier service demo: %u user processes x %u requests through one kvtierd process\n"
              "each request: a %u-token system prompt (shared by all) + one of %u documents of %u tokens "
              "(shared) + its own %u-token question = %llu tokens\n\n",
              w.users, w.turns, w.system_tokens, w.documents, w.document_tokens, w.question_tokens,
              static_cast<unsigned long long>(prompt_tokens));

  auto daemon = DaemonProcess::start(o, socket);
  if (!daemon) return fail(daemon.status());
  std::printf("started kvtierd (pid %d, ready in %.0f ms): data dir %s, host tier %s, NVMe tier %s, write-back\n",
              (*daemon)->pid(), (*daemon)->ready_s() * 1e3, o.dir.c_str(), o.host_bytes.c_str(), o.nvme_bytes.c_str());
  {
    auto probe = Client::connect({.socket_path = socket, .window_bytes = 0, .name = "service-demo"});
    if (!probe) return fail(probe.status());
    const KvLayout& layout = (*probe)->layout();
    std::printf("KV layout %s; one request's prompt is %.0f MiB of KV\n\n", layout.describe().c_str(),
                mib(double(layout.bytes_for_tokens(prompt_tokens))));
  }

  // ---- round 1: the users, at once --------------------------------------------------------------
  std::vector<std::vector<std::string>> users;
  for (uint32_t u = 0; u < w.users; ++u) {
    std::vector<std::string> args = {"--socket", socket, "--user", std::to_string(u), "--window-mib",
                                     std::to_string(o.window_mib)};
    const auto wl = workload_args(w);
    args.insert(args.end(), wl.begin(), wl.end());
    users.push_back(std::move(args));
  }
  const auto users_start = Clock::now();
  auto reports = run_users(users);
  if (!reports) return fail(reports.status());
  const double users_s = seconds_since(users_start);
  Totals total;
  for (const auto& r : *reports) total.add(r);
  std::printf("%u user processes (each its own kvtier::Client and shared-memory window) finished in %.1f s:\n",
              w.users, users_s);
  print_turn_table(*reports, w.turns);
  std::printf("  (turn 1 starts cold: every user computes the system prompt at the same moment; from turn 2\n"
              "   on the system prompt and the documents other users saved are restored)\n");
  bool ok = total.bad_blocks == 0 && total.requests == uint64_t(w.users) * w.turns;
  std::printf("\n  requests              %llu\n", static_cast<unsigned long long>(total.requests));
  std::printf("  hit rate              %.1f%% of prompt tokens restored (%llu of %llu)\n", total.hit_percent(),
              static_cast<unsigned long long>(total.restored_tokens), static_cast<unsigned long long>(total.prompt_tokens));
  std::printf("  not recomputed        %llu tokens: %.2f GiB of KV restored instead of prefilled\n",
              static_cast<unsigned long long>(total.restored_tokens), gib(double(total.restored_bytes)));
  std::printf("  restore latency       p50 %.1f ms, p99 %.1f ms (lookup + load + release, per request)\n",
              percentile(total.restore_ms, 0.5), percentile(total.restore_ms, 0.99));
  std::printf("  restore throughput    %.2f GB/s (restored bytes / restore time)\n", total.restore_gbps());
  std::printf("  byte check            %llu restored blocks (%.2f GiB) against the KV their prefix stands for: %s\n",
              static_cast<unsigned long long>(total.checked_blocks), gib(double(total.restored_bytes)),
              total.bad_blocks ? (std::to_string(total.bad_blocks) + " DIFFER").c_str() : "all identical");

  auto text = daemon_metrics(socket);
  if (!text) return fail(text.status());
  {
    const double host_used = metric(*text, "kvtier_tier_used_bytes{tier=\"host\"}");
    const double host_cap = metric(*text, "kvtier_tier_capacity_bytes{tier=\"host\"}");
    const double nvme_used = metric(*text, "kvtier_tier_used_bytes{tier=\"nvme\"}");
    const double nvme_cap = metric(*text, "kvtier_tier_capacity_bytes{tier=\"nvme\"}");
    const double daemon_restored = metric(*text, "kvtierd_tokens_restored_total");
    const double errors = metric_sum(*text, "kvtierd_request_errors_total");
    std::printf("\nkvtierd's metrics (Client::metrics_text):\n");
    std::printf("  host tier             %.0f of %.0f MiB used (%.0f blocks)\n", mib(host_used), mib(host_cap),
                metric(*text, "kvtier_tier_blocks{tier=\"host\"}"));
    std::printf("  NVMe tier             %.0f of %.0f MiB used (%.0f blocks)\n", mib(nvme_used), mib(nvme_cap),
                metric(*text, "kvtier_tier_blocks{tier=\"nvme\"}"));
    std::printf("  demoted host -> NVMe  %.0f blocks; promoted back to host on a hit: %.0f\n",
                metric(*text, "kvtier_tier_demotions_total{tier=\"host\"}"),
                metric(*text, "kvtier_tier_promotions_total{tier=\"host\"}"));
    std::printf("  loaded from NVMe      %.0f blocks (kvtierd_load_nvme_blocks_total)\n",
                metric(*text, "kvtierd_load_nvme_blocks_total"));
    std::printf("  tokens restored       %.0f (kvtierd_tokens_restored_total)%s\n", daemon_restored,
                daemon_restored == double(total.restored_tokens) ? ", the users' count" : ", NOT the users' count");
    std::printf("  request errors        %.0f\n", errors);
    std::printf("  daemon time per request (format_for_humans):\n");
    print_human_lines(*text, "kvtierd_request_seconds{op=\"lookup\"}");
    print_human_lines(*text, "kvtierd_request_seconds{op=\"load\"}");
    print_human_lines(*text, "kvtierd_request_seconds{op=\"save\"}");
    ok &= daemon_restored == double(total.restored_tokens) && errors == 0;
  }

  // ---- restart: SIGTERM flushes write-back blocks; a new daemon recovers them -----------------
  auto t_stop = Clock::now();
  if (Status s = (*daemon)->stop(); !s) return fail(s);
  std::printf("\nSIGTERM: kvtierd flushed its write-back blocks to NVMe and exited 0 in %.0f ms\n",
              seconds_since(t_stop) * 1e3);
  daemon = DaemonProcess::start(o, socket);
  if (!daemon) return fail(daemon.status());
  auto before = daemon_metrics(socket);
  if (!before) return fail(before.status());
  std::printf("restarted kvtierd on the same data dir (pid %d, ready in %.0f ms): %.0f blocks recovered from the "
              "NVMe catalog\n",
              (*daemon)->pid(), (*daemon)->ready_s() * 1e3, metric(*before, "kvtier_recovered_blocks_total"));
  std::vector<std::string> replay_args = {"--socket", socket, "--replay", "--window-mib", std::to_string(o.window_mib)};
  const auto wl = workload_args(w);
  replay_args.insert(replay_args.end(), wl.begin(), wl.end());
  auto replay = run_users({replay_args});
  if (!replay) return fail(replay.status());
  Totals again;
  for (const auto& r : *replay) again.add(r);
  auto after = daemon_metrics(socket);
  if (!after) return fail(after.status());
  std::printf("one user process replayed the first round's %llu prompts:\n",
              static_cast<unsigned long long>(again.requests));
  std::printf("  restored              %llu of %llu prompt tokens (%.1f%%), %.2f GiB of KV\n",
              static_cast<unsigned long long>(again.restored_tokens), static_cast<unsigned long long>(again.prompt_tokens),
              again.hit_percent(), gib(double(again.restored_bytes)));
  std::printf("  from NVMe             %.0f blocks (kvtierd_load_nvme_blocks_total)\n",
              metric(*after, "kvtierd_load_nvme_blocks_total"));
  std::printf("  restore latency       p50 %.1f ms, p99 %.1f ms; %.2f GB/s\n", percentile(again.restore_ms, 0.5),
              percentile(again.restore_ms, 0.99), again.restore_gbps());
  std::printf("  byte check            %llu restored blocks: %s\n", static_cast<unsigned long long>(again.checked_blocks),
              again.bad_blocks ? (std::to_string(again.bad_blocks) + " DIFFER").c_str() : "all identical");
  ok &= again.bad_blocks == 0 && again.restored_tokens > 0 && again.requests == w.users;

  if (Status s = (*daemon)->stop(); !s) return fail(s);
  std::printf("stopped kvtierd (exit 0)\n\nservice demo %s in %.1f s\n", ok ? "passed" : "FAILED",
              seconds_since(demo_start));
  if (ok) std::filesystem::remove_all(o.dir, ec);
  return ok ? 0 : 1;
}

}  // namespace kvtier

namespace kvtier {

// ---- kvtier crash-loop: SIGKILL a real kvtierd under load, again and again --------------------

namespace {

/// Committed catalog entries in `nvme_dir` (read while no daemon holds it).
Result<uint64_t> catalog_blocks(const std::string& nvme_dir) {
  auto catalog = Catalog::open(nvme_dir + "/catalog", {.create = false});
  if (!catalog) return catalog.status();
  uint64_t n = 0;
  KVTIER_RETURN_IF_ERROR((*catalog)->for_each([&](const CatalogEntry&) { ++n; }));
  return n;
}

}  // namespace

int run_crash_loop(const CrashLoopOptions& o) {
  std::error_code ec;
  std::filesystem::remove_all(o.dir, ec);
  if (!std::filesystem::create_directories(o.dir, ec) && ec) {
    return fail(Status(StatusCode::kIoError, "cannot create " + o.dir + ": " + ec.message()));
  }
  ServiceDemoOptions daemon_options;
  daemon_options.dir = o.dir;
  daemon_options.host_bytes = o.host_bytes;
  daemon_options.nvme_bytes = o.nvme_bytes;
  const std::string socket = o.dir + "/kvtierd.sock";
  std::vector<std::string> extra;
  if (o.write_through) extra.push_back("--write-through");
  std::mt19937_64 rng(o.seed);
  // The workload: a shared system prompt, one of `documents` shared documents, a question of
  // one to three blocks; prompts long enough that the host tier overflows onto NVMe.
  const auto system = synthetic_tokens(1, 64);
  auto make_prompt = [&](uint64_t request) {
    auto p = system;
    const auto doc = synthetic_tokens(100 + rng() % 8, 64 + 16 * (rng() % 4));
    const auto question = synthetic_tokens(1'000'000 + request, 16 * (1 + rng() % 3));
    p.insert(p.end(), doc.begin(), doc.end());
    p.insert(p.end(), question.begin(), question.end());
    return p;
  };
  uint64_t request = 0, checked = 0, bad = 0, restored = 0, max_recovered = 0;
  double restart_s_max = 0;
  std::vector<std::byte> kv;
  std::printf("kvtier crash loop: %u SIGKILLs of kvtierd under load (%s, host tier %s, NVMe tier %s)\n",
              o.cycles, o.write_through ? "write-through" : "write-back", o.host_bytes.c_str(), o.nvme_bytes.c_str());
  for (uint32_t cycle = 0; cycle <= o.cycles; ++cycle) {
    // What the catalog holds now, before a daemon opens it: after the restart every one of
    // these blocks must be indexed again (NVMe is prefix-closed), none dropped, none orphaned.
    uint64_t committed = 0;
    if (cycle > 0) {
      auto n = catalog_blocks(o.dir + "/nvme");
      if (!n) return fail(n.status());
      committed = *n;
    }
    const auto t0 = Clock::now();
    auto daemon = DaemonProcess::start(daemon_options, socket, "4", "64", extra);
    if (!daemon) return fail(daemon.status());
    restart_s_max = std::max(restart_s_max, seconds_since(t0));
    auto client = Client::connect({.socket_path = socket, .window_bytes = 8ull << 20, .name = "crash-loop"});
    if (!client) return fail(client.status());
    auto metrics = (*client)->metrics_text();
    if (!metrics) return fail(metrics.status());
    const double recovered = metric(*metrics, "kvtier_recovered_blocks_total");
    const double orphans = metric(*metrics, "kvtier_orphan_blocks");
    const double dropped = metric_sum(*metrics, "kvtier_recovery_dropped_blocks_total");
    max_recovered = std::max<uint64_t>(max_recovered, static_cast<uint64_t>(recovered));
    if (cycle > 0 && (recovered != double(committed) || orphans != 0 || dropped != 0)) {
      std::fprintf(stderr,
                   "kvtier crash loop: restart %u lost NVMe blocks: the catalog held %llu, %.0f were indexed again, "
                   "%.0f orphaned, %.0f dropped\n",
                   cycle, static_cast<unsigned long long>(committed), recovered, orphans, dropped);
      return 1;
    }
    if (cycle == o.cycles) {
      if (Status s = (*daemon)->stop(); !s) return fail(s);
      break;
    }
    auto ns = (*client)->open_namespace({.model_id = "crash-loop"});
    if (!ns) return fail(ns.status());
    // Before the first crash: fill the tiers with prompts of their own (restart time over a full tier).
    for (uint64_t filled = 0, i = 0; cycle == 0 && filled < o.fill_blocks; ++i) {
      const auto p = synthetic_tokens(2'000'000'000ull + i, 64 * 16);
      auto report = serve_request(**client, *ns, p, kv);
      if (!report) return fail(report.status());
      filled += report->saved_blocks;
    }
    // Requests until a random moment, then SIGKILL: between requests, or in the middle of one
    // (a second thread kills while this one saves), so write-back is cut at any point.
    const uint64_t requests = 4 + rng() % 24;
    const bool mid_request = rng() % 2;
    for (uint64_t r = 0; r < requests; ++r) {
      const auto p = make_prompt(request++);
      std::thread killer;
      if (mid_request && r + 1 == requests) {
        const auto delay = std::chrono::microseconds(rng() % 3000);
        killer = std::thread([&, delay] {
          std::this_thread::sleep_for(delay);  // picks the moment of the crash; waits for nothing
          (*daemon)->kill().ignore();
        });
      }
      auto report = serve_request(**client, *ns, p, kv);
      if (killer.joinable()) killer.join();
      if (!report) {
        if (mid_request && r + 1 == requests) break;  // the daemon died under this request
        return fail(report.status());
      }
      checked += report->checked_blocks;
      bad += report->bad_blocks;
      restored += report->restored_tokens;
    }
    client->reset();
    if (Status s = (*daemon)->kill(); !s) return fail(s);
  }
  // Every restart after a crash leaves RocksDB files behind unless the open cleans up after it.
  size_t catalog_files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(o.dir + "/nvme/catalog", ec)) ++catalog_files;
  if (catalog_files > 32) {
    std::fprintf(stderr, "kvtier crash loop: %zu files in the catalog after %u crashes: they pile up\n", catalog_files,
                 o.cycles);
    return 1;
  }
  if (o.fill_blocks > 0) std::printf("  filled with %llu blocks before the first crash\n",
                                     static_cast<unsigned long long>(o.fill_blocks));
  std::printf("  %u restarts after SIGKILL: every block committed to NVMe was indexed again (up to %llu blocks), "
              "none orphaned or dropped; slowest start %.0f ms\n",
              o.cycles, static_cast<unsigned long long>(max_recovered), restart_s_max * 1e3);
  std::printf("  %llu requests, %llu tokens restored, %llu restored blocks checked byte for byte: %llu wrong\n",
              static_cast<unsigned long long>(request), static_cast<unsigned long long>(restored),
              static_cast<unsigned long long>(checked), static_cast<unsigned long long>(bad));
  return bad == 0 ? 0 : 1;
}

}  // namespace kvtier
