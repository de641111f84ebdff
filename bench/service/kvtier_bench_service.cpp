// Service benchmark: kvtierd's socket path next to the in-process Store it serves, same run.
//   a) lookup of a cached 4K-token prompt: Client over the Unix socket (the lookup takes a lease;
//      release is a second round trip) vs Store::lookup in-process; lookup alone and lookup +
//      release, p50 and p99                                          goal: socket lookup p50 < 20 µs
//      The floor under any round trip, a raw 16-byte ping-pong over a socketpair, is measured too.
//   b) 64 clients at once, a mixed workload for a fixed time: ~70% lookup + load + release of
//      shared (pinned) prefixes, ~20% save of new prompts, ~10% lookup of misses; vs the same
//      workload on 64 threads calling the Store directly              goal: 0 errors
//   c) one large load through the daemon, a 1K-token prompt of a Llama-3.1-8B layout (32 layers,
//      2 MiB blocks, 128 MiB): time until wait_layer(0) returns and until the whole load is in
//      place, for the Client (the load streams a slice of layers at a time through the window)
//      and the in-process Store, next to one memcpy of the same bytes; and for a Client whose
//      destination is registered memory (Client::register_memory), which the daemon fills itself
//   e) NVMe admission: one workload — a few popular prompts asked for again and again among many
//      one-off ones, through a host tier far smaller than the prompts — on a Store with NVMe
//      admission at its default (a block reaches NVMe once used twice) and off (every demoted
//      block written), alternated A B A B: NVMe bytes written and the hit rate of each
// The daemon is a Server started in this process (its own accept and per-connection threads);
// the clients are threads of this process, each with its own Client connection and window.
// NVMe is off: this measures the socket path, not the disk. Median of repeats, with min and max.
// Rerun: build/default/bench/service/kvtier_bench_service [repeats] [seconds] [lookup | layered | admission: a), c)+d) or e) only]
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <spdlog/spdlog.h>

#include "kvtier/client.h"
#include "api/server/server.h"
#include "api/server/service_config.h"
#include "api/store/store.h"
#include "transfer/shared_device_memory.h"
#include "bench/bench_stats.h"
#include "tools/synthetic_kv.h"

using namespace kvtier;
using namespace kvtier::bench;
using Clock = std::chrono::steady_clock;

namespace {

constexpr size_t kLookupPromptTokens = 4096;  // a) 256 blocks
constexpr int kLookupCalls = 2000;            // a) per repeat, after kLookupWarmup
constexpr int kLookupWarmup = 200;
constexpr int kClients = 64;                  // b)
constexpr size_t kSharedPrompts = 16;         // b) shared prefixes, pinned
constexpr size_t kMixedPromptTokens = 512;    // b) 32 blocks (4 MiB) per load or save

void must(const Status& s, const char* what) {
  if (!s.is_ok()) {
    std::fprintf(stderr, "kvtier_bench_service: %s: %s\n", what, s.to_string().c_str());
    std::exit(1);
  }
}

double us_since(Clock::time_point t0) { return std::chrono::duration<double, std::micro>(Clock::now() - t0).count(); }

/// Nearest-rank percentile (q in (0, 1]); 0 for none.
double percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t rank = static_cast<size_t>(std::ceil(q * double(v.size())));
  return v[std::clamp<size_t>(rank, 1, v.size()) - 1];
}

/// The word at `word` of block `b` of shared prompt `p`: what a load must bring back.
uint64_t shared_word(size_t p, size_t b, uint64_t word) { return (uint64_t(p + 1) << 48) ^ (uint64_t(b) << 32) ^ word; }

// ---- a) lookup round trip ------------------------------------------------------------------------

struct LookupSeries {
  std::vector<double> lookup_p50, lookup_p99, both_p50, both_p99;  // per repeat, µs
};

/// kLookupCalls lookups (+ releases) of `prompt` on `store`; appends this repeat's percentiles.
void time_lookups(KvStore& store, NamespaceId ns, const std::vector<TokenId>& prompt, LookupSeries& out) {
  std::vector<double> lookup_us, both_us;
  lookup_us.reserve(kLookupCalls);
  both_us.reserve(kLookupCalls);
  for (int i = 0; i < kLookupWarmup + kLookupCalls; ++i) {
    const auto t0 = Clock::now();
    auto m = store.lookup(ns, prompt);
    const double looked = us_since(t0);
    must(m.status(), "lookup");
    must(store.release(*m), "release");
    const double both = us_since(t0);
    if (m->tokens != prompt.size()) must(Status(StatusCode::kInternal, "the cached prompt matched short"), "lookup");
    if (i < kLookupWarmup) continue;
    lookup_us.push_back(looked);
    both_us.push_back(both);
  }
  out.lookup_p50.push_back(percentile(lookup_us, 0.5));
  out.lookup_p99.push_back(percentile(lookup_us, 0.99));
  out.both_p50.push_back(percentile(both_us, 0.5));
  out.both_p99.push_back(percentile(both_us, 0.99));
}

/// The floor under any round trip on this machine: 16-byte ping-pong over a Unix socketpair
/// between two threads (what kvtierd's framing adds nothing to). Appends this repeat's p50/p99.
void time_socket_floor(std::vector<double>& p50, std::vector<double>& p99) {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) must(Status(StatusCode::kUnavailable, "socketpair"), "floor");
  std::thread echo([fd = fds[1]] {
    char buf[16];
    while (::recv(fd, buf, sizeof(buf), MSG_WAITALL) == sizeof(buf)) {
      if (::send(fd, buf, sizeof(buf), MSG_NOSIGNAL) != sizeof(buf)) break;
    }
  });
  std::vector<double> us;
  char buf[16] = {};
  for (int i = 0; i < kLookupWarmup + kLookupCalls; ++i) {
    const auto t0 = Clock::now();
    if (::send(fds[0], buf, sizeof(buf), MSG_NOSIGNAL) != sizeof(buf) ||
        ::recv(fds[0], buf, sizeof(buf), MSG_WAITALL) != sizeof(buf)) {
      must(Status(StatusCode::kUnavailable, "ping-pong failed"), "floor");
    }
    if (i >= kLookupWarmup) us.push_back(us_since(t0));
  }
  ::shutdown(fds[0], SHUT_RDWR);
  echo.join();
  ::close(fds[0]);
  ::close(fds[1]);
  p50.push_back(percentile(us, 0.5));
  p99.push_back(percentile(us, 0.99));
}

void print_lookup_row(const char* what, const std::vector<double>& p50, const std::vector<double>& p99) {
  const Summary a = summarize(p50), b = summarize(p99);
  std::printf("  %-34s %8.1f (%6.1f .. %6.1f)  %8.1f (%6.1f .. %6.1f)\n", what, a.median, a.min, a.max, b.median,
              b.min, b.max);
}

// ---- b) 64 clients, mixed workload ------------------------------------------------------------

enum OpKind { kHit = 0, kSave = 1, kMiss = 2, kNumKinds = 3 };
constexpr const char* kKindNames[kNumKinds] = {"lookup+load+release (shared prefix)", "save (new prompt)",
                                               "lookup+release (miss)"};

struct MixedResult {
  double seconds = 0;
  uint64_t ops = 0, errors = 0;
  std::vector<double> us[kNumKinds];
  std::string first_error;
  double ops_per_s() const { return seconds > 0 ? double(ops) / seconds : 0; }
};

/// One worker of the mixed workload: `store` is its own Client, or the shared in-process Store.
struct Worker {
  KvStore* store = nullptr;
  NamespaceId ns = 0;
  std::vector<std::byte> load_buf, save_buf;
  std::vector<double> us[kNumKinds];
  uint64_t errors = 0;
  std::string first_error;

  void error(std::string what) {
    if (errors++ == 0) first_error = std::move(what);
  }

  void run(int id, const std::vector<std::vector<TokenId>>& shared, Clock::time_point deadline, uint64_t seed_base) {
    const uint64_t bpb = store->layout().bytes_per_block();
    const size_t blocks = kMixedPromptTokens / store->layout().block_tokens;
    std::mt19937_64 rng(uint64_t(id) * 7919 + seed_base);
    uint64_t fresh = 0;
    while (Clock::now() < deadline) {
      const unsigned pick = rng() % 100;
      const OpKind kind = pick < 70 ? kHit : pick < 90 ? kSave : kMiss;
      const auto t0 = Clock::now();
      if (kind == kHit) {
        const size_t p = rng() % shared.size();
        auto m = store->lookup(ns, shared[p]);
        if (!m) {
          error("lookup: " + m.status().to_string());
          continue;
        }
        if (m->blocks.size() != blocks) error("a pinned shared prefix matched " + std::to_string(m->blocks.size()) + " blocks");
        const size_t n = std::min(m->blocks.size(), blocks);
        if (n > 0) {
          auto h = store->load(*m, KvBuffer::contiguous(load_buf.data(), n, bpb));
          Status done = h ? h->wait() : h.status();
          if (!done) error("load: " + done.to_string());
        }
        if (Status s = store->release(*m); !s) error("release: " + s.to_string());
        us[kind].push_back(us_since(t0));
        for (size_t b = 0; b < n; ++b) {  // first and last word of every block
          uint64_t first = 0, last = 0;
          std::memcpy(&first, load_buf.data() + b * bpb, 8);
          std::memcpy(&last, load_buf.data() + (b + 1) * bpb - 8, 8);
          if (first != shared_word(p, b, 0) || last != shared_word(p, b, bpb / 8 - 1)) {
            error("loaded bytes differ from the saved ones");
            break;
          }
        }
      } else {
        // A prompt nobody saved before: unique to this worker, this run and this op.
        const auto prompt = synthetic_tokens((seed_base << 40) ^ (uint64_t(id) << 24) ^ ++fresh, kMixedPromptTokens);
        if (kind == kSave) {
          auto saved = store->save(ns, prompt, KvBuffer::contiguous(save_buf.data(), blocks, bpb));
          if (!saved) error("save: " + saved.status().to_string());
        } else {
          auto m = store->lookup(ns, prompt);
          if (!m) {
            error("lookup: " + m.status().to_string());
            continue;
          }
          if (!m->blocks.empty()) error("a prompt never saved matched");
          if (Status s = store->release(*m); !s) error("release: " + s.to_string());
        }
        us[kind].push_back(us_since(t0));
      }
    }
  }
};

MixedResult run_mixed(std::vector<Worker>& workers, const std::vector<std::vector<TokenId>>& shared, double seconds,
                      uint64_t seed_base) {
  std::barrier start(static_cast<std::ptrdiff_t>(workers.size() + 1));
  Clock::time_point deadline;
  std::vector<std::thread> threads;
  for (size_t i = 0; i < workers.size(); ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      workers[i].run(static_cast<int>(i), shared, deadline, seed_base);
    });
  }
  const auto t0 = Clock::now();
  deadline = t0 + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
  start.arrive_and_wait();  // publishes `deadline` to the workers
  for (auto& t : threads) t.join();
  MixedResult r;
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  for (auto& w : workers) {
    for (int k = 0; k < kNumKinds; ++k) {
      r.ops += w.us[k].size();
      r.us[k].insert(r.us[k].end(), w.us[k].begin(), w.us[k].end());
      w.us[k].clear();
    }
    if (w.errors && r.first_error.empty()) r.first_error = w.first_error;
    r.errors += w.errors;
    w.errors = 0;
  }
  return r;
}

void print_mixed(const char* title, const MixedResult& r, uint64_t bytes_per_load) {
  std::printf("  %s: %.0f ops/s (%llu ops in %.2f s), errors %llu%s%s\n", title, r.ops_per_s(),
              static_cast<unsigned long long>(r.ops), r.seconds, static_cast<unsigned long long>(r.errors),
              r.errors ? ": first: " : "", r.first_error.c_str());
  std::printf("    loads moved %.2f GB/s of KV (every load's bytes pass the transfer engine's host copy engine)\n",
              double(r.us[kHit].size() * bytes_per_load) / r.seconds / 1e9);
  for (int k = 0; k < kNumKinds; ++k) {
    std::printf("    %-38s %6zu ops (%4.1f%%)  p50 %8.1f µs  p99 %8.1f µs\n", kKindNames[k], r.us[k].size(),
                100.0 * double(r.us[k].size()) / double(std::max<uint64_t>(r.ops, 1)), percentile(r.us[k], 0.5),
                percentile(r.us[k], 0.99));
  }
}

/// A kvtierd Server started in this process on a fresh temporary data directory, NVMe and HBM
/// off; stopped (its shutdown must succeed) and its directory removed when it goes.
struct BenchServer {
  std::string dir;
  std::unique_ptr<Server> server;

  BenchServer(const std::string& name, const KvLayout& layout, uint64_t host_bytes) {
    std::string dir_template = "/tmp/" + name + ".XXXXXX";
    if (!::mkdtemp(dir_template.data())) must(Status(StatusCode::kIoError, "mkdtemp failed"), "temp dir");
    dir = dir_template;
    ServiceConfig config;
    config.data_dir = dir;
    config.layout = layout;
    config.host_bytes = host_bytes;
    config.nvme_enabled = false;
    config.hbm_enabled = false;
    config.metrics_listen = "";
    config.secret = name;
    must(resolve(config), "resolve");
    auto started = Server::start(config);
    must(started.status(), "server");
    server = std::move(*started);
  }
  ~BenchServer() {
    server->request_stop();
    must(server->wait(), "server stop");
    server.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  BenchServer(const BenchServer&) = delete;
  BenchServer& operator=(const BenchServer&) = delete;
};

/// A client whose 4 KiB window cannot hold one layer, with `memory` registered, and its namespace
/// `model`: every byte it loads or saves goes straight between the daemon's tiers and `memory`
/// (cudaMalloc with a GPU, else emulated device memory in a memfd).
struct RegisteredClient {
  std::unique_ptr<Client> client;
  NamespaceId ns = 0;
};

RegisteredClient connect_registered(const BenchServer& bench, DeviceAllocation& memory, const std::string& model,
                                    const std::string& name) {
  auto client = Client::connect({.socket_path = bench.server->socket_path(), .window_bytes = 4096, .name = name});
  must(client.status(), "connect");
  must((*client)->register_memory(memory.data(), memory.size()), "register_memory");
  auto ns = (*client)->open_namespace({.model_id = model, .tenant = "", .adapter_id = ""});
  must(ns.status(), (name + " open_namespace").c_str());
  return {std::move(*client), *ns};
}

/// `memory` seen as a vLLM paged cache of `blocks` pages: one layer tensor [2][blocks][T][H][D]
/// after another, the blocks on pages in reverse order, so the daemon's page packer reorders.
KvBuffer vllm_pages_over(DeviceAllocation& memory, const KvLayout& layout, size_t blocks) {
  std::vector<void*> layer_tensors;
  for (uint32_t l = 0; l < layout.num_layers; ++l) {
    layer_tensors.push_back(memory.data() + uint64_t(l) * blocks * layout.bytes_per_block_layer());
  }
  std::vector<int32_t> page_of(blocks);
  for (size_t b = 0; b < blocks; ++b) page_of[b] = static_cast<int32_t>(blocks - 1 - b);
  return KvBuffer::paged(kernels::EngineLayout::kVllm, std::move(layer_tensors), static_cast<uint32_t>(blocks),
                         std::move(page_of), LocationKind::kDevice);
}

// ---- c) one large load, layer by layer -----------------------------------------------------------

struct LayeredResult {
  std::vector<double> sock_first, sock_all, proc_first, proc_all, memcpy_all;  // ms per repeat
  std::vector<double> reg_first, reg_all;  // into registered memory (DeviceAllocation)
  std::vector<double> paged_first, paged_all;  // the same memory as vLLM pages
  bool reg_is_cuda = false;
};

LayeredResult run_layered(int repeats) {
  constexpr size_t kTokens = 1024;
  BenchServer bench("kvtier_bench_layered", KvLayout{AttentionKind::kStandard, 32, 8, 128, Dtype::kBf16, 16},
                    192ull << 20);  // 2 MiB blocks
  Store& store = bench.server->store();
  const KvLayout layout = store.layout();
  const uint64_t bpb = layout.bytes_per_block();
  const size_t blocks = kTokens / layout.block_tokens;
  auto ns = store.open_namespace({.model_id = "bench-layered", .tenant = "", .adapter_id = ""});
  must(ns.status(), "open_namespace");
  const auto prompt = synthetic_tokens(77, kTokens);
  std::vector<std::byte> kv(blocks * bpb, std::byte{0x21}), out(blocks * bpb), copy(blocks * bpb);
  must(store.save(*ns, prompt, KvBuffer::contiguous(kv.data(), blocks, bpb)).status(), "save");
  auto client = Client::connect({.socket_path = bench.server->socket_path(), .window_bytes = 64ull << 20,
                                 .name = "bench-layered"});
  must(client.status(), "connect");
  auto cns = (*client)->open_namespace({.model_id = "bench-layered", .tenant = "", .adapter_id = ""});
  must(cns.status(), "client open_namespace");
  // Registered memory: a second client whose window cannot hold one layer, so every byte it loads
  // went straight from the daemon's tier into the registered memory (cudaMalloc with a GPU, else
  // emulated device memory in a memfd).
  auto reg = DeviceAllocation::create(blocks * bpb);
  must(reg.status(), "allocate registered memory");
  RegisteredClient registered = connect_registered(bench, *reg, "bench-layered", "bench-registered");
  // The same registered memory seen as a vLLM paged cache of 64 pages: the daemon unpacks into it
  // with the page packer.
  const KvBuffer paged = vllm_pages_over(*reg, layout, blocks);
  auto time_paged = [&](std::vector<double>& first, std::vector<double>& all) {
    auto m = registered.client->lookup(registered.ns, prompt);
    must(m.status(), "lookup");
    const auto t0 = Clock::now();
    auto h = registered.client->load(*m, paged);
    must(h.status(), "paged load");
    must(h->wait_layer(0), "wait_layer");
    first.push_back(us_since(t0) / 1000);
    must(h->wait(), "paged load");
    all.push_back(us_since(t0) / 1000);
    must(registered.client->release(*m), "release");
  };
  auto time_load = [&](KvStore& s, NamespaceId n, std::byte* into, LocationKind kind, std::vector<double>& first,
                       std::vector<double>& all) {
    auto m = s.lookup(n, prompt);
    must(m.status(), "lookup");
    if (m->blocks.size() != blocks) must(Status(StatusCode::kInternal, "the prompt matched short"), "lookup");
    const auto t0 = Clock::now();
    auto h = s.load(*m, KvBuffer::contiguous(into, blocks, bpb, kind));
    must(h.status(), "load");
    must(h->wait_layer(0), "wait_layer");
    first.push_back(us_since(t0) / 1000);
    must(h->wait(), "load");
    all.push_back(us_since(t0) / 1000);
    must(s.release(*m), "release");
    const bool readable = kind == LocationKind::kHost || !reg->is_cuda();
    if (readable && std::memcmp(into, kv.data(), kv.size()) != 0) {
      must(Status(StatusCode::kInternal, "bytes differ"), "load");
    }
    if (readable) std::memset(into, 0, kv.size());  // the next load must write every byte again
  };
  LayeredResult r;
  r.reg_is_cuda = reg->is_cuda();
  std::vector<double> warm;
  time_load(**client, *cns, out.data(), LocationKind::kHost, warm, warm);  // first touch of the window and the output
  time_load(store, *ns, out.data(), LocationKind::kHost, warm, warm);
  time_load(*registered.client, registered.ns, reg->data(), LocationKind::kDevice, warm, warm);
  time_paged(warm, warm);
  for (int i = 0; i < repeats; ++i) {
    time_load(**client, *cns, out.data(), LocationKind::kHost, r.sock_first, r.sock_all);
    time_load(*registered.client, registered.ns, reg->data(), LocationKind::kDevice, r.reg_first, r.reg_all);
    time_paged(r.paged_first, r.paged_all);
    time_load(store, *ns, out.data(), LocationKind::kHost, r.proc_first, r.proc_all);
    const auto t0 = Clock::now();
    std::memcpy(copy.data(), kv.data(), kv.size());
    do_not_optimize(copy[copy.size() / 2]);
    r.memcpy_all.push_back(us_since(t0) / 1000);
  }
  client->reset();
  registered.client.reset();
  std::printf("\nc) one load of a cached %zu-token prompt, %s (%zu blocks, %.0f MiB), %d repeats\n"
              "   median (min .. max), ms                first layer in place        whole load in place\n",
              kTokens, layout.describe().c_str(), blocks, blocks * bpb / 1048576.0, repeats);
  auto row = [](const char* what, const std::vector<double>& a, const std::vector<double>& b) {
    const Summary x = summarize(a), y = summarize(b);
    std::printf("  %-34s %8.2f (%6.2f .. %6.2f)  %8.2f (%6.2f .. %6.2f)\n", what, x.median, x.min, x.max, y.median,
                y.min, y.max);
  };
  row("socket Client::load (64 MiB window)", r.sock_first, r.sock_all);
  row(r.reg_is_cuda ? "socket, registered GPU memory" : "socket, registered memory (memfd)", r.reg_first, r.reg_all);
  row(r.reg_is_cuda ? "  as vLLM pages (unpack kernel)" : "  as vLLM pages (CPU unpack)", r.paged_first,
      r.paged_all);
  row("in-process Store::load", r.proc_first, r.proc_all);
  row("reference: one memcpy of the bytes", r.memcpy_all, r.memcpy_all);
  return r;
}

// ---- d) saves from registered memory -----------------------------------------------------------

struct SaveResult {
  std::vector<double> canonical, paged, memcpy_all;  // ms per save
  bool reg_is_cuda = false;
};

SaveResult run_saves(int repeats) {
  constexpr size_t kBlocks = 16;  // 32 MiB per save, a new prompt each time
  const KvLayout layout{AttentionKind::kStandard, 32, 8, 128, Dtype::kBf16, 16};
  const uint64_t bpb = layout.bytes_per_block();
  // Room for every save of the run: no eviction or write-back inside a timed save.
  BenchServer bench("kvtier_bench_saves", layout, (2 * uint64_t(repeats) + 4) * kBlocks * bpb);
  auto reg = DeviceAllocation::create(kBlocks * bpb);
  must(reg.status(), "allocate registered memory");
  if (!reg->is_cuda()) std::memset(reg->data(), 0x5A, reg->size());
  RegisteredClient registered = connect_registered(bench, *reg, "bench-saves", "bench-saves");
  const KvBuffer canonical = KvBuffer::contiguous(reg->data(), kBlocks, bpb, LocationKind::kDevice);
  // The same memory as a vLLM paged cache of 16 pages: the daemon packs it with the page packer.
  const KvBuffer paged = vllm_pages_over(*reg, layout, kBlocks);
  uint64_t seed = 9000;
  auto time_save = [&](const KvBuffer& src, std::vector<double>& ms) {
    const auto prompt = synthetic_tokens(seed++, kBlocks * layout.block_tokens);
    const auto t0 = Clock::now();
    auto saved = registered.client->save(registered.ns, prompt, src);
    must(saved.status(), "save");
    ms.push_back(us_since(t0) / 1000);
    if (*saved != kBlocks) must(Status(StatusCode::kInternal, "a save stored fewer blocks"), "save");
  };
  std::vector<std::byte> from(kBlocks * bpb, std::byte{0x21}), to(kBlocks * bpb);
  SaveResult r;
  r.reg_is_cuda = reg->is_cuda();
  std::vector<double> warm;
  time_save(canonical, warm);
  time_save(paged, warm);
  for (int i = 0; i < repeats; ++i) {
    time_save(canonical, r.canonical);
    time_save(paged, r.paged);
    const auto t0 = Clock::now();
    std::memcpy(to.data(), from.data(), from.size());
    do_not_optimize(to[to.size() / 2]);
    r.memcpy_all.push_back(us_since(t0) / 1000);
  }
  registered.client.reset();
  std::printf("\nd) one save of a new %zu-token prompt from registered memory (%zu blocks, %.0f MiB), %d repeats\n"
              "   median (min .. max), ms                whole save\n",
              kBlocks * layout.block_tokens, kBlocks, kBlocks * bpb / 1048576.0, repeats);
  auto row = [](const char* what, const std::vector<double>& a) {
    const Summary x = summarize(a);
    std::printf("  %-34s %8.2f (%6.2f .. %6.2f)\n", what, x.median, x.min, x.max);
  };
  row(r.reg_is_cuda ? "registered GPU memory, canonical" : "registered memory (memfd), canonical", r.canonical);
  row(r.reg_is_cuda ? "  as vLLM pages (pack kernel)" : "  as vLLM pages (CPU pack)", r.paged);
  row("reference: one memcpy of the bytes", r.memcpy_all);
  return r;
}

}  // namespace

struct AdmissionRun {
  uint64_t nvme_bytes_written = 0;
  uint64_t asked_tokens = 0, hit_tokens = 0, nvme_hit_blocks = 0;
  uint64_t admitted = 0, refused = 0;
  double seconds = 0;
};

/// e) One run of the admission workload on a fresh Store with NVMe admission at `min_uses`.
AdmissionRun run_admission_once(uint32_t min_uses) {
  const KvLayout layout{AttentionKind::kStandard, 2, 8, 128, Dtype::kBf16, 16};  // 128 KiB blocks
  const uint64_t bpb = layout.bytes_per_block();
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("kvtier-bench-admission-" + std::to_string(::getpid()));
  std::filesystem::remove_all(dir);
  TierManagerOptions o;
  o.layout = layout;
  o.host.capacity_bytes = 96 * bpb;  // 96 blocks of host DRAM: 12 prompts
  o.nvme.dir = dir.string();
  o.nvme.durability = Durability::kNone;  // bytes written are the figure, not the disk's sync time
  o.nvme_limits.capacity_bytes = 4096 * (bpb + 2 * 4096);
  o.nvme_admission_min_uses = min_uses;
  o.background_reclaim = false;  // the same demotions in every run
  auto store = Store::open({.tiers = o, .secret = "bench-admission"});
  must(store.status(), "open the admission store");
  auto ns = (*store)->open_namespace({.model_id = "bench-model"});
  must(ns.status(), "open_namespace");
  // 1,000 requests of 8-block prompts: 70% one of 16 popular prompts, 30% a prompt never seen again.
  constexpr size_t kRequests = 1000, kPopular = 16, kPromptBlocks = 8;
  std::mt19937_64 rng(7);
  std::vector<std::byte> kv(kPromptBlocks * bpb, std::byte{0x42}), out(kPromptBlocks * bpb);
  AdmissionRun run;
  const auto start = Clock::now();
  for (size_t r = 0; r < kRequests; ++r) {
    const bool popular = rng() % 10 < 7;
    const uint64_t id = popular ? rng() % kPopular : 1'000'000 + r;
    const auto tokens = synthetic_tokens(5000 + id, kPromptBlocks * layout.block_tokens);
    auto m = (*store)->lookup(*ns, tokens);
    must(m.status(), "lookup");
    run.asked_tokens += tokens.size();
    run.hit_tokens += m->tokens;
    for (const BlockResidency& b : m->blocks) run.nvme_hit_blocks += b.tier_mask == tier_bit(Tier::kNvme);
    if (!m->blocks.empty()) {
      auto h = (*store)->load(*m, KvBuffer::contiguous(out.data(), m->blocks.size(), bpb));
      must(h.status(), "load");
      must(h->wait(), "load wait");
    }
    must((*store)->release(*m), "release");
    if (m->blocks.size() < kPromptBlocks) {
      must((*store)->save(*ns, tokens, KvBuffer::contiguous(kv.data(), kPromptBlocks, bpb), Priority::kNormal, {},
                          m->blocks.size())
               .status(),
           "save");
    }
  }
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const TierManagerStats st = (*store)->tiers().stats();
  run.nvme_bytes_written = st.nvme_blocks_written * bpb;
  run.admitted = st.nvme_admitted;
  run.refused = st.nvme_refused;
  store->reset();  // the flush at close is not part of the workload's writes
  std::filesystem::remove_all(dir);
  return run;
}

/// e) Admission on (the default, 2 uses) and off (1), alternated: NVMe bytes written and hits.
void run_admission(int repeats) {
  std::printf("\ne) NVMe admission: 1,000 requests of 8-block prompts (128 KiB blocks), 70%% one of 16 popular "
              "prompts, 30%% one-off; 96 blocks of host DRAM, NVMe below; a miss saves the prompt. Admission on "
              "(min uses 2, the default) and off (1), alternated, %d pairs\n",
              repeats);
  std::vector<double> bytes_ratio, hit_on, hit_off;
  AdmissionRun on{}, off{};
  for (int r = 0; r < repeats; ++r) {
    on = run_admission_once(2);
    off = run_admission_once(1);
    bytes_ratio.push_back(double(on.nvme_bytes_written) / double(std::max<uint64_t>(off.nvme_bytes_written, 1)));
    hit_on.push_back(double(on.hit_tokens) / double(on.asked_tokens));
    hit_off.push_back(double(off.hit_tokens) / double(off.asked_tokens));
  }
  const Summary ratio = summarize(bytes_ratio);
  std::printf("   %-34s %14s %10s %10s %12s %9s\n", "", "NVMe written", "admitted", "refused", "hit tokens", "seconds");
  std::printf("   %-34s %10.1f MiB %10llu %10llu %11.1f%% %9.2f\n", "admission on (min uses 2)",
              on.nvme_bytes_written / 1048576.0, static_cast<unsigned long long>(on.admitted),
              static_cast<unsigned long long>(on.refused), 100 * summarize(hit_on).median, on.seconds);
  std::printf("   %-34s %10.1f MiB %10llu %10llu %11.1f%% %9.2f\n", "admission off (every demoted block)",
              off.nvme_bytes_written / 1048576.0, static_cast<unsigned long long>(off.admitted),
              static_cast<unsigned long long>(off.refused), 100 * summarize(hit_off).median, off.seconds);
  std::printf("   NVMe bytes written, on / off: median %.2f (min %.2f .. max %.2f over %d pairs); hit tokens %.1f%% vs "
              "%.1f%%\n",
              ratio.median, ratio.min, ratio.max, repeats, 100 * summarize(hit_on).median, 100 * summarize(hit_off).median);
}

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::max(1, std::atoi(argv[1])) : 5;
  const double seconds = argc > 2 ? std::max(0.5, std::atof(argv[2])) : 3.0;
  const bool lookup_only = argc > 3 && std::strcmp(argv[3], "lookup") == 0;  // a) alone, for profiling
  const bool layered_only = argc > 3 && std::strcmp(argv[3], "layered") == 0;  // c) alone
  const bool admission_only = argc > 3 && std::strcmp(argv[3], "admission") == 0;  // e) alone
  std::printf("rerun: %s %d %g%s\n", argv[0], repeats, seconds, argc > 3 ? (std::string(" ") + argv[3]).c_str() : "");
  if (layered_only) {
    spdlog::set_level(spdlog::level::warn);
    run_layered(repeats);
    run_saves(repeats);
    return 0;
  }
  if (admission_only) {
    spdlog::set_level(spdlog::level::warn);
    run_admission(repeats);
    return 0;
  }
  spdlog::set_level(spdlog::level::warn);  // the server's startup lines; its warnings still show

  BenchServer bench("kvtier_bench_service", KvLayout{AttentionKind::kStandard, 2, 8, 128, Dtype::kBf16, 16},
                    512ull << 20);  // 128 KiB blocks
  Store& store = bench.server->store();
  const std::string socket = bench.server->socket_path();
  const KvLayout layout = store.layout();
  const uint64_t bpb = layout.bytes_per_block();
  auto ns = store.open_namespace({.model_id = "bench-model", .tenant = "", .adapter_id = ""});
  must(ns.status(), "open_namespace");
  std::printf("kvtier service benchmark: an in-process kvtierd Server (its own accept and connection threads) "
              "on %s;\nclients are threads of this process, each with its own Client connection; layout %s, "
              "%.0f KiB blocks; host tier %.0f MiB, NVMe off\n",
              socket.c_str(), layout.describe().c_str(), bpb / 1024.0, bench.server->config().host_bytes / 1048576.0);

  // ---- a) lookup round trip -----------------------------------------------------------------
  const auto long_prompt = synthetic_tokens(42, kLookupPromptTokens);
  {
    const size_t blocks = kLookupPromptTokens / layout.block_tokens;
    std::vector<std::byte> kv(blocks * bpb, std::byte{0x5a});
    auto saved = store.save(*ns, long_prompt, KvBuffer::contiguous(kv.data(), blocks, bpb));
    must(saved.status(), "save the 4K-token prompt");
  }
  auto lookup_client = Client::connect({.socket_path = socket, .window_bytes = 0, .name = "bench-lookup"});
  must(lookup_client.status(), "connect");
  auto client_ns = (*lookup_client)->open_namespace({.model_id = "bench-model", .tenant = "", .adapter_id = ""});
  must(client_ns.status(), "client open_namespace");
  LookupSeries in_process, socket_series;
  std::vector<double> floor_p50, floor_p99;
  for (int r = 0; r < repeats; ++r) {
    time_lookups(store, *ns, long_prompt, in_process);
    time_lookups(**lookup_client, *client_ns, long_prompt, socket_series);
    time_socket_floor(floor_p50, floor_p99);
  }
  lookup_client->reset();
  std::printf("\na) lookup of a cached %zu-token prompt (%zu blocks): %d calls per repeat after %d warm-up, %d "
              "repeats\n   median over repeats (min .. max), µs        p50                          p99\n",
              kLookupPromptTokens, kLookupPromptTokens / layout.block_tokens, kLookupCalls, kLookupWarmup, repeats);
  print_lookup_row("in-process Store::lookup", in_process.lookup_p50, in_process.lookup_p99);
  print_lookup_row("in-process lookup + release", in_process.both_p50, in_process.both_p99);
  print_lookup_row("socket Client::lookup", socket_series.lookup_p50, socket_series.lookup_p99);
  print_lookup_row("socket lookup + release (2 trips)", socket_series.both_p50, socket_series.both_p99);
  print_lookup_row("floor: raw socketpair round trip", floor_p50, floor_p99);
  const double lookup_sock = summarize(socket_series.lookup_p50).median, lookup_proc = summarize(in_process.lookup_p50).median;
  const double both_sock = summarize(socket_series.both_p50).median, both_proc = summarize(in_process.both_p50).median;
  const double p99_sock = summarize(socket_series.lookup_p99).median, p99_proc = summarize(in_process.lookup_p99).median;
  std::printf("  socket / in-process, lookup p50          %6.2f\n", lookup_sock / lookup_proc);
  std::printf("  socket / in-process, lookup+release p50  %6.2f\n", both_sock / both_proc);
  const double floor_rtt = summarize(floor_p50).median;
  std::printf("  socket lookup p50 - in-process p50       %6.1f µs (one round trip; the raw floor is %.1f µs)\n",
              lookup_sock - lookup_proc, floor_rtt);
  const bool lookup_goal = lookup_sock < 20.0;
  std::printf("  goal: socket lookup p50 < 20 µs: %.1f µs, %s\n", lookup_sock, lookup_goal ? "met" : "NOT MET");
  if (lookup_only) return 0;

  // ---- b) 64 clients, mixed workload --------------------------------------------------------
  const size_t mixed_blocks = kMixedPromptTokens / layout.block_tokens;
  std::vector<std::vector<TokenId>> shared;
  {
    std::vector<std::byte> kv(mixed_blocks * bpb);
    for (size_t p = 0; p < kSharedPrompts; ++p) {
      shared.push_back(synthetic_tokens(1000 + p, kMixedPromptTokens));
      for (size_t b = 0; b < mixed_blocks; ++b) {
        for (uint64_t w = 0; w < bpb / 8; ++w) {
          const uint64_t v = shared_word(p, b, w);
          std::memcpy(kv.data() + b * bpb + w * 8, &v, 8);
        }
      }
      must(store.save(*ns, shared.back(), KvBuffer::contiguous(kv.data(), mixed_blocks, bpb)).status(), "save shared");
      auto pinned = store.pin(*ns, shared.back());  // saves of new prompts must not evict them
      must(pinned.status(), "pin shared");
    }
  }
  std::vector<Worker> workers(kClients);
  std::vector<std::unique_ptr<Client>> clients;
  for (int i = 0; i < kClients; ++i) {
    auto c = Client::connect({.socket_path = socket, .window_bytes = mixed_blocks * bpb,
                              .name = "bench-" + std::to_string(i)});
    must(c.status(), "connect");
    auto cns = (*c)->open_namespace({.model_id = "bench-model", .tenant = "", .adapter_id = ""});
    must(cns.status(), "client open_namespace");
    workers[i].store = c->get();
    workers[i].ns = *cns;
    workers[i].load_buf.assign(mixed_blocks * bpb, std::byte{0});
    workers[i].save_buf.assign(mixed_blocks * bpb, std::byte{0x33});
    clients.push_back(std::move(*c));
  }
  std::printf("\nb) %d clients at once for %.1f s, %zu-token prompts (%zu blocks, %.0f MiB per load or save): ~70%% "
              "lookup+load+release of %zu pinned shared prefixes, ~20%% save of new prompts, ~10%% lookup of misses\n",
              kClients, seconds, kMixedPromptTokens, mixed_blocks, mixed_blocks * bpb / 1048576.0, kSharedPrompts);
  const MixedResult over_socket = run_mixed(workers, shared, seconds, 1);
  print_mixed("socket: 64 Client connections (64 threads)", over_socket, mixed_blocks * bpb);
  for (auto& w : workers) {  // the reference: the same threads calling the Store directly
    w.store = &store;
    w.ns = *ns;
  }
  const MixedResult direct = run_mixed(workers, shared, seconds, 2);
  print_mixed("in-process: 64 threads on the Store", direct, mixed_blocks * bpb);
  clients.clear();

  const LayeredResult layered = run_layered(repeats);
  const SaveResult saves = run_saves(repeats);
  run_admission(repeats);

  // ---- summary --------------------------------------------------------------------------------
  const uint64_t errors = over_socket.errors + direct.errors;
  std::printf("\nsummary                                  kvtier (socket)  reference (in-process)    ratio  goal\n");
  std::printf("  lookup p50, 4K-token prompt            %10.1f µs  %16.1f µs  %9.2f  < 20 µs: %s\n", lookup_sock,
              lookup_proc, lookup_sock / lookup_proc, lookup_goal ? "met" : "NOT MET");
  std::printf("  lookup + release p50                   %10.1f µs  %16.1f µs  %9.2f  -\n", both_sock, both_proc,
              both_sock / both_proc);
  std::printf("  lookup p99                             %10.1f µs  %16.1f µs  %9.2f  -\n", p99_sock, p99_proc,
              p99_sock / p99_proc);
  std::printf("  round trip p50 over raw floor           %10.1f µs  %16.1f µs  %9.2f  -\n", lookup_sock - lookup_proc,
              floor_rtt, (lookup_sock - lookup_proc) / floor_rtt);
  std::printf("  64 clients mixed, ops/s                %13.0f  %19.0f  %9.2f  errors 0: %s (%llu)\n",
              over_socket.ops_per_s(), direct.ops_per_s(), over_socket.ops_per_s() / std::max(direct.ops_per_s(), 1.0),
              errors == 0 ? "met" : "NOT MET", static_cast<unsigned long long>(errors));
  for (int k = 0; k < kNumKinds; ++k) {
    const double s = percentile(over_socket.us[k], 0.5), d = percentile(direct.us[k], 0.5);
    std::printf("  mixed p50 %-28s %10.1f µs  %16.1f µs  %9.2f  -\n", kKindNames[k], s, d, d > 0 ? s / d : 0.0);
  }
  const double sf = summarize(layered.sock_first).median, sa = summarize(layered.sock_all).median;
  const double pf = summarize(layered.proc_first).median, pa = summarize(layered.proc_all).median;
  const double mc = summarize(layered.memcpy_all).median;
  std::printf("  128 MiB load, first layer in place      %10.2f ms  %16.2f ms  %9.2f  -\n", sf, pf, sf / pf);
  std::printf("  128 MiB load, whole load in place       %10.2f ms  %16.2f ms  %9.2f  -\n", sa, pa, sa / pa);
  std::printf("  128 MiB load, socket vs one memcpy      %10.2f ms  %16.2f ms  %9.2f  -\n", sa, mc, sa / mc);
  const double ra = summarize(layered.reg_all).median, rf = summarize(layered.reg_first).median;
  std::printf("  128 MiB load into registered memory     %10.2f ms  %16.2f ms  %9.2f  - (vs the window path)\n", ra, sa,
              ra / sa);
  std::printf("  registered, first layer in place        %10.2f ms  %16.2f ms  %9.2f  - (vs the window path)\n", rf, sf,
              rf / sf);
  std::printf("  registered vs one memcpy                %10.2f ms  %16.2f ms  %9.2f  -\n", ra, mc, ra / mc);
  const double ga = summarize(layered.paged_all).median;
  std::printf("  registered vLLM pages vs canonical      %10.2f ms  %16.2f ms  %9.2f  - (the unpack's cost)\n", ga, ra,
              ga / ra);
  const double sc = summarize(saves.canonical).median, sp = summarize(saves.paged).median;
  std::printf("  32 MiB save, registered vLLM pages vs canonical %6.2f ms  %11.2f ms  %9.2f  - (the pack's cost)\n", sp,
              sc, sp / sc);
  std::printf("  32 MiB save, registered canonical vs one memcpy %6.2f ms  %11.2f ms  %9.2f  -\n", sc,
              summarize(saves.memcpy_all).median, sc / summarize(saves.memcpy_all).median);
  return errors == 0 ? 0 : 1;
}
