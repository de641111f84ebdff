#include "tools/serve.h"

#include <csignal>
#include <cstdio>
#include <pthread.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include "kvtier/client.h"
#include "api/metrics/metrics.h"
#include "api/server/server.h"
#include "api/server/service_config.h"

namespace kvtier {

void add_serve_flags(CLI::App& app, ServeFlags& f) {
  app.add_option("--config", f.config, "kvtierd.toml (see docs/service.md); flags override it");
  app.add_option("--data-dir", f.data_dir, "NVMe slot files, catalog, secret (default /var/lib/kvtier)");
  app.add_option("--socket", f.socket, "Unix socket path (default DATA_DIR/kvtierd.sock)");
  app.add_option("--socket-mode", f.socket_mode, "socket file mode, octal (default 0660)");
  app.add_option("--metrics", f.metrics, "Prometheus endpoint host:port, or off (default 127.0.0.1:9477)");
  app.add_option("--host-bytes", f.host_bytes, "host DRAM tier size, e.g. 8GiB (default: 25% of free RAM)");
  app.add_option("--nvme-bytes", f.nvme_bytes, "NVMe tier size, or off (default: 50% of free disk)");
  app.add_option("--hbm-bytes", f.hbm_bytes, "HBM tier size, or off (default: half of free GPU memory, none without a GPU)");
  app.add_option("--hf-config", f.hf_config, "model config.json that sets the KV layout");
  app.add_option("--layers", f.layers, "KV layout: layers");
  app.add_option("--kv-heads", f.kv_heads, "KV layout: kv heads");
  app.add_option("--head-dim", f.head_dim, "KV layout: head dim");
  app.add_option("--dtype", f.dtype, "KV layout: element type (bf16, fp16, fp8_e4m3, ...)");
  app.add_option("--block-tokens", f.block_tokens, "KV layout: tokens per block (default 16)");
  app.add_flag("--write-through", f.write_through, "persist every saved block to NVMe before save returns");
  app.add_option("--ready-fd", f.ready_fd, "write 'ready' to this descriptor once serving (for supervisors)");
  app.add_option("--log-level", f.log_level, "trace, debug, info, warn, error (default info)");
}

namespace {

Result<ServiceConfig> build_config(const ServeFlags& f) {
  ServiceConfig c;
  if (!f.config.empty()) {
    auto loaded = load_config_file(f.config);
    if (!loaded) return loaded.status();
    c = std::move(*loaded);
  }
  if (!f.data_dir.empty()) c.data_dir = f.data_dir;
  if (!f.socket.empty()) c.socket_path = f.socket;
  if (!f.socket_mode.empty()) {
    try {
      c.socket_mode = static_cast<uint32_t>(std::stoul(f.socket_mode, nullptr, 8));
    } catch (...) {
      return invalid_argument("--socket-mode must be octal, e.g. 0660");
    }
  }
  if (!f.metrics.empty()) c.metrics_listen = f.metrics == "off" ? "" : f.metrics;
  auto size = [](const std::string& text, uint64_t& bytes, bool* enabled) -> Status {
    if (text.empty()) return Status::ok();
    if (text == "off" && enabled) {
      *enabled = false;
      return Status::ok();
    }
    auto b = parse_bytes(text);
    if (!b) return b.status();
    bytes = *b;
    return Status::ok();
  };
  KVTIER_RETURN_IF_ERROR(size(f.host_bytes, c.host_bytes, nullptr));
  KVTIER_RETURN_IF_ERROR(size(f.nvme_bytes, c.nvme_bytes, &c.nvme_enabled));
  KVTIER_RETURN_IF_ERROR(size(f.hbm_bytes, c.hbm_bytes, &c.hbm_enabled));
  if (!f.hf_config.empty()) c.hf_config = f.hf_config;
  if (f.layers) c.layout.num_layers = f.layers;
  if (f.kv_heads) c.layout.num_kv_heads = f.kv_heads;
  if (f.head_dim) c.layout.head_dim = f.head_dim;
  if (f.block_tokens) c.layout.block_tokens = f.block_tokens;
  if (!f.dtype.empty()) {
    auto d = parse_dtype(f.dtype);
    if (!d) return d.status();
    c.layout.dtype = *d;
    c.kv_dtype = *d;
  }
  if (f.write_through) c.write_policy = WritePolicy::kWriteThrough;
  KVTIER_RETURN_IF_ERROR(resolve(c));
  return c;
}

}  // namespace

int run_serve(const ServeFlags& flags) {
  // Block the stop signals before any thread starts — resolving the config may start the CUDA
  // runtime's threads — so every thread inherits the mask and only the sigwait below sees them.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::signal(SIGPIPE, SIG_IGN);
  spdlog::set_level(spdlog::level::from_str(flags.log_level));
  auto config = build_config(flags);
  if (!config) {
    std::fprintf(stderr, "kvtierd: %s\n", config.status().to_string().c_str());
    return 2;
  }

  auto server = Server::start(std::move(*config));
  if (!server) {
    std::fprintf(stderr, "kvtierd: %s\n", server.status().to_string().c_str());
    return 1;
  }
  if (flags.ready_fd >= 0) {
    [[maybe_unused]] ssize_t w = ::write(flags.ready_fd, "ready\n", 6);
    ::close(flags.ready_fd);
  }
  int sig = 0;
  sigwait(&stop_signals, &sig);
  spdlog::info("kvtierd: {} received: finishing in-flight requests and flushing to NVMe", strsignal(sig));
  (*server)->request_stop();
  Status st = (*server)->wait();
  const auto stats = (*server)->store().tiers().stats();
  spdlog::info("kvtierd: stopped; {} blocks on NVMe", stats.nvme.blocks);
  return st.is_ok() ? 0 : 1;
}

int run_stats(const std::string& socket, bool raw) {
  ClientOptions o;
  if (!socket.empty()) o.socket_path = socket;
  o.window_bytes = 0;
  o.name = "kvtier-stats";
  auto client = Client::connect(std::move(o));
  if (!client) {
    std::fprintf(stderr, "kvtier stats: %s\n", client.status().to_string().c_str());
    return 1;
  }
  auto text = (*client)->metrics_text();
  if (!text) {
    std::fprintf(stderr, "kvtier stats: %s\n", text.status().to_string().c_str());
    return 1;
  }
  std::fputs(raw ? text->c_str() : format_for_humans(*text).c_str(), stdout);
  return 0;
}

}  // namespace kvtier
