// `kvtier`: the command line. Subcommands: service-demo, crash-loop, demo, tier-demo, keys, layout, info, serve,
// stats, plan, warm, fsck, inspect, doctor, prefetch, export, import (and the hidden service-demo-user, the user processes service-demo starts).
#include <CLI/CLI.hpp>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <sstream>
#include <string_view>
#include <vector>

#include "prefix_index/key_chain.h"
#include "tiers/device_probe.h"
#include "tools/demo_index.h"
#include "tools/demo_service.h"
#include "tools/demo_tiers.h"
#include "tools/layout_spec.h"
#include "tools/plan_cli.h"
#include "tools/serve.h"

using namespace kvtier;

namespace {

// "layers,kv_heads,head_dim,dtype[,block_tokens]" or a path to a Hugging Face config.json.
Result<KvLayout> parse_layout(const std::string& spec, uint32_t block_tokens) {
  if (spec.find(',') == std::string::npos) return KvLayout::from_hf_config_file(spec, block_tokens);
  return parse_layout_list(spec, block_tokens, "layout", "layers,kv_heads,head_dim,dtype or a config.json path");
}

std::vector<TokenId> parse_tokens(const std::string& text) {
  std::vector<TokenId> tokens;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, ',')) {
    if (!part.empty()) tokens.push_back(static_cast<TokenId>(std::stoul(part)));
  }
  return tokens;
}

// Subcommands the Python package implements, because they run a model: `kvtier warm ...` is
// `python -m kvtier.warm ...`. The python is $KVTIER_PYTHON, else the one this build was configured
// with (the project's .venv when there is one, else python3); a build tree's python/ joins
// PYTHONPATH so its own package is the one that runs.
int run_python_tool(const char* module, int argc, char** argv) {
  const char* env_python = std::getenv("KVTIER_PYTHON");
  std::string python = env_python && *env_python ? env_python : KVTIER_DEFAULT_PYTHON;
  if (python.front() == '/' && !std::filesystem::exists(python) && !(env_python && *env_python)) {
    python = "python3";  // the configured venv is not on this machine (an installed package)
  }
  const std::string package_dir = KVTIER_SOURCE_PYTHON_DIR;
  if (!package_dir.empty() && std::filesystem::exists(package_dir + "/kvtier/__init__.py")) {
    const char* old = std::getenv("PYTHONPATH");
    const std::string path = old && *old ? package_dir + ":" + old : package_dir;
    ::setenv("PYTHONPATH", path.c_str(), 1);
  }
  std::vector<char*> args{const_cast<char*>(python.c_str()), const_cast<char*>("-m"), const_cast<char*>(module)};
  for (int i = 2; i < argc; ++i) args.push_back(argv[i]);
  args.push_back(nullptr);
  ::execvp(python.c_str(), args.data());
  std::fprintf(stderr,
               "kvtier %s: cannot run %s (%s): this command runs the kvtier Python package; set KVTIER_PYTHON to a "
               "python that has it (pip install kvtier)\n",
               argv[1], python.c_str(), std::strerror(errno));
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  // The operator commands that live in the Python package (a model, tqdm's progress bar).
  // `import` is a Python keyword: its module is kvtier.import_.
  for (std::string_view tool : {"warm", "fsck", "inspect", "doctor", "prefetch", "export", "import"}) {
    if (argc >= 2 && std::string_view(argv[1]) == tool) {
      const std::string module = "kvtier." + std::string(tool) + (tool == "import" ? "_" : "");
      return run_python_tool(module.c_str(), argc, argv);
    }
  }
  CLI::App app{"kvtier: hierarchical KV-cache storage tier for LLM serving"};
  app.require_subcommand(1);

  ServiceDemoOptions service_demo;
  auto add_workload = [](CLI::App& cmd, ServiceDemoWorkload& w) {
    cmd.add_option("--users", w.users, "user processes at once")->capture_default_str();
    cmd.add_option("--turns", w.turns, "requests per user")->capture_default_str();
    cmd.add_option("--documents", w.documents, "shared documents")->capture_default_str();
    cmd.add_option("--system-tokens", w.system_tokens, "shared system prompt")->capture_default_str();
    cmd.add_option("--document-tokens", w.document_tokens, "tokens per document")->capture_default_str();
    cmd.add_option("--question-tokens", w.question_tokens, "each request's own question")->capture_default_str();
  };
  auto* service_demo_cmd = app.add_subcommand(
      "service-demo", "Start kvtierd, run user processes that share prompts through it, restart it: the cache survives");
  service_demo_cmd->add_option("--dir", service_demo.dir, "the daemon's data dir (wiped)")->capture_default_str();
  add_workload(*service_demo_cmd, service_demo.workload);
  service_demo_cmd->add_option("--host-bytes", service_demo.host_bytes, "daemon's host tier")->capture_default_str();
  service_demo_cmd->add_option("--nvme-bytes", service_demo.nvme_bytes, "daemon's NVMe tier")->capture_default_str();
  service_demo_cmd->add_option("--window-mib", service_demo.window_mib, "each user's shared-memory window")
      ->capture_default_str();

  CrashLoopOptions crash_loop;
  auto* crash_loop_cmd = app.add_subcommand(
      "crash-loop", "SIGKILL kvtierd under load again and again: every block committed to NVMe must come back");
  crash_loop_cmd->add_option("--dir", crash_loop.dir, "the daemon's data dir (wiped)")->capture_default_str();
  crash_loop_cmd->add_option("--cycles", crash_loop.cycles, "SIGKILLs and restarts")->capture_default_str();
  crash_loop_cmd->add_option("--seed", crash_loop.seed, "workload and kill-point seed")->capture_default_str();
  crash_loop_cmd->add_option("--host-bytes", crash_loop.host_bytes, "daemon's host tier")->capture_default_str();
  crash_loop_cmd->add_option("--nvme-bytes", crash_loop.nvme_bytes, "daemon's NVMe tier")->capture_default_str();
  crash_loop_cmd->add_flag("--write-through", crash_loop.write_through, "run the daemon in write-through mode");
  crash_loop_cmd->add_option("--fill-blocks", crash_loop.fill_blocks, "blocks saved before the first crash")
      ->capture_default_str();

  ServiceDemoUserOptions service_user;
  auto* service_user_cmd = app.add_subcommand("service-demo-user", "one user process of service-demo");
  service_user_cmd->group("");  // hidden: service-demo starts it
  service_user_cmd->add_option("--socket", service_user.socket)->required();
  service_user_cmd->add_option("--user", service_user.user);
  service_user_cmd->add_flag("--replay", service_user.replay);
  service_user_cmd->add_option("--report-fd", service_user.report_fd)->required();
  service_user_cmd->add_option("--window-mib", service_user.window_mib);
  add_workload(*service_user_cmd, service_user.workload);

  IndexDemoOptions demo;
  auto* demo_cmd = app.add_subcommand("demo", "Simulated users sharing prompts: prefix hits and evictions");
  demo_cmd->add_option("--users", demo.users, "simulated users")->capture_default_str();
  demo_cmd->add_option("--turns", demo.turns, "turns per user")->capture_default_str();
  demo_cmd->add_option("--documents", demo.documents, "shared documents")->capture_default_str();
  demo_cmd->add_option("--host-capacity-blocks", demo.host_capacity_blocks, "host tier capacity")
      ->capture_default_str();

  TierDemoOptions tier_demo;
  auto* tier_demo_cmd = app.add_subcommand(
      "tier-demo", "Users sharing prompts with real KV bytes across host, HBM and NVMe, then a restart");
  tier_demo_cmd->add_option("--dir", tier_demo.dir, "NVMe tier directory (wiped)")->capture_default_str();
  tier_demo_cmd->add_option("--users", tier_demo.users, "simulated users")->capture_default_str();
  tier_demo_cmd->add_option("--turns", tier_demo.turns, "turns per user")->capture_default_str();
  tier_demo_cmd->add_option("--host-mib", tier_demo.host_mib, "host tier capacity")->capture_default_str();
  tier_demo_cmd->add_option("--nvme-mib", tier_demo.nvme_mib, "NVMe tier capacity")->capture_default_str();

  std::string secret, model = "demo-model", salt, adapter, layout_spec = "32,8,128,bf16", token_text;
  uint32_t block_tokens = 16;
  auto* keys_cmd = app.add_subcommand("keys", "Print the root and block keys of a token sequence");
  keys_cmd->add_option("--secret", secret, "deployment secret");
  keys_cmd->add_option("--model", model, "model id")->capture_default_str();
  keys_cmd->add_option("--salt", salt, "tenant salt");
  keys_cmd->add_option("--adapter", adapter, "adapter id");
  keys_cmd->add_option("--layout", layout_spec, "layers,kv_heads,head_dim,dtype or config.json")
      ->capture_default_str();
  keys_cmd->add_option("--block-tokens", block_tokens, "tokens per block")->capture_default_str();
  keys_cmd->add_option("--tokens", token_text, "comma-separated token ids")->required();

  std::string config_path;
  auto* layout_cmd = app.add_subcommand("layout", "KV sizes of a model from its config.json");
  layout_cmd->add_option("config", config_path, "Hugging Face config.json")->required();
  layout_cmd->add_option("--block-tokens", block_tokens, "tokens per block")->capture_default_str();

  auto* info_cmd = app.add_subcommand("info", "Build and device information");

  ServeFlags serve;
  auto* serve_cmd = app.add_subcommand("serve", "Run the kvtierd daemon (the same as the kvtierd program)");
  add_serve_flags(*serve_cmd, serve);

  PlanFlags plan;
  auto* plan_cmd = app.add_subcommand(
      "plan", "The seed's cost model: concurrency, prefill, decode and context switching per context length, "
              "and where restoring a prefix beats recomputing it (docs/cost-model.md)");
  add_plan_flags(*plan_cmd, plan);

  std::string stats_socket;
  bool stats_raw = false;
  auto* stats_cmd = app.add_subcommand("stats", "Print a running kvtierd's metrics");
  stats_cmd->add_option("--socket", stats_socket, "daemon socket (default /var/lib/kvtier/kvtierd.sock)");
  stats_cmd->add_flag("--raw", stats_raw, "Prometheus text instead of the summary");

  // Listed for --help; main() hands these to the Python package before parsing.
  app.add_subcommand("warm", "Compute and store the KV of a list of prompts ahead of traffic, with a model "
                             "(kvtier warm --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("fsck", "Check a data dir's NVMe slots against its catalog; --repair fixes what is safe "
                             "(kvtier fsck --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("inspect", "What a running kvtierd or a data dir holds: namespaces, tiers, the most reused "
                                "prefixes (kvtier inspect --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("doctor", "Explain why a prompt's lookup missed: where its chain breaks and why "
                               "(kvtier doctor --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("prefetch", "Promote warmed prefixes to host or HBM before a traffic peak "
                                 "(kvtier prefetch --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("export", "Write kvtierd's or a data dir's cached KV to a portable archive "
                               "(kvtier export --help; runs the Python package)")
      ->allow_extras();
  app.add_subcommand("import", "Load an archive into a kvtierd or a data dir, re-keyed under its secret "
                               "(kvtier import --help; runs the Python package)")
      ->allow_extras();

  CLI11_PARSE(app, argc, argv);

  if (*service_demo_cmd) return run_service_demo(service_demo);
  if (*crash_loop_cmd) return run_crash_loop(crash_loop);
  if (*service_user_cmd) return run_service_demo_user(service_user);
  if (*demo_cmd) return run_index_demo(demo);
  if (*serve_cmd) return run_serve(serve);
  if (*stats_cmd) return run_stats(stats_socket, stats_raw);
  if (*plan_cmd) return run_plan(plan);
  if (*tier_demo_cmd) return run_tier_demo(tier_demo);

  if (*keys_cmd) {
    auto layout = parse_layout(layout_spec, block_tokens);
    if (!layout) {
      std::fprintf(stderr, "kvtier keys: %s\n", layout.status().to_string().c_str());
      return 2;
    }
    KeyChain chain(secret);
    auto ns = chain.make_namespace({model, *layout, salt, adapter});
    if (!ns) {
      std::fprintf(stderr, "kvtier keys: %s\n", ns.status().to_string().c_str());
      return 2;
    }
    std::vector<TokenId> tokens;
    try {
      tokens = parse_tokens(token_text);
    } catch (const std::exception&) {
      std::fprintf(stderr, "kvtier keys: --tokens must be comma-separated unsigned integers\n");
      return 2;
    }
    std::vector<BlockKey> keys;
    if (auto st = chain.chain(*ns, tokens, {}, keys); !st) {
      std::fprintf(stderr, "kvtier keys: %s\n", st.to_string().c_str());
      return 2;
    }
    std::printf("root %s\n", ns->root.to_hex().c_str());
    for (size_t i = 0; i < keys.size(); ++i) std::printf("block %zu %s\n", i, keys[i].to_hex().c_str());
    return 0;
  }

  if (*layout_cmd) {
    auto layout = KvLayout::from_hf_config_file(config_path, block_tokens);
    if (!layout) {
      std::fprintf(stderr, "kvtier layout: %s\n", layout.status().to_string().c_str());
      return 2;
    }
    std::printf("%s\nfingerprint %016llx\nper token %llu bytes\n", layout->describe().c_str(),
                static_cast<unsigned long long>(layout->fingerprint()),
                static_cast<unsigned long long>(layout->bytes_per_token()));
    for (uint64_t t : {4096ull, 8192ull, 32768ull, 131072ull}) {
      std::printf("%7llu tokens: %.2f GiB\n", static_cast<unsigned long long>(t),
                  layout->bytes_for_tokens(t) / 1073741824.0);
    }
    return 0;
  }

  if (*info_cmd) {
    std::printf("kvtier %s\n", "0.1.0");
    const auto& probe = probe_devices();
    std::printf("cuda built: %s\n", probe.cuda_built ? "yes" : "no");
    for (const auto& g : probe.gpus) std::printf("gpu %d: %s sm_%d%d\n", g.ordinal, g.name.c_str(), g.sm_major, g.sm_minor);
    if (!probe.has_gpu()) std::printf("no gpu: %s\n", probe.reason.c_str());
    return 0;
  }
  return 0;
}
