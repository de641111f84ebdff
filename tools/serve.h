// `kvtier serve` / `kvtierd` and `kvtier stats`: the daemon's command line.
#pragma once

#include <cstdint>
#include <string>

namespace CLI {
class App;
}

namespace kvtier {

struct ServeFlags {
  std::string config;        // kvtierd.toml; flags below override it
  std::string data_dir;
  std::string socket;
  std::string metrics;       // host:port, "off" disables
  std::string host_bytes;    // e.g. "8GiB"
  std::string nvme_bytes;
  std::string hbm_bytes;
  std::string hf_config;     // model config.json for the KV layout
  uint32_t layers = 0, kv_heads = 0, head_dim = 0, block_tokens = 0;
  std::string dtype;
  std::string socket_mode;   // octal, e.g. 0666
  bool write_through = false;
  int ready_fd = -1;         // written "ready\n" once the socket accepts
  std::string log_level = "info";
};

/// Adds serve's flags to `app`.
void add_serve_flags(CLI::App& app, ServeFlags& flags);
/// Runs the daemon until SIGTERM or SIGINT; returns a process exit code.
int run_serve(const ServeFlags& flags);

/// Prints the daemon's metrics for a person (or raw Prometheus text); returns an exit code.
int run_stats(const std::string& socket, bool raw);

}  // namespace kvtier
