#include "tools/plan_cli.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>
#include <fstream>
#include <sstream>

#include "tools/cost_model.h"
#include "tools/layout_spec.h"

namespace kvtier {

namespace {

using nlohmann::json;

// "34e9", "34B", "312T", "2.039e12", "25G": decimal SI suffixes K M G/B T P.
Result<double> parse_si(const std::string& what, const std::string& text) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(text, &used);
  } catch (const std::exception&) {
    return invalid_argument(what + ": '" + text + "' is not a number");
  }
  std::string rest = text.substr(used);
  for (const char* unit : {"B/s", "/s", "FLOPS", "FLOP/s"}) {  // "25GB/s", "312TFLOPS"
    const std::string u(unit);
    if (rest.size() >= u.size() && rest.compare(rest.size() - u.size(), u.size(), u) == 0) rest.resize(rest.size() - u.size());
  }
  double scale = 1;
  if (rest == "K" || rest == "k") scale = 1e3;
  else if (rest == "M") scale = 1e6;
  else if (rest == "G" || rest == "B") scale = 1e9;
  else if (rest == "T") scale = 1e12;
  else if (rest == "P") scale = 1e15;
  else if (!rest.empty()) return invalid_argument(what + ": unknown unit in '" + text + "' (K, M, G or B, T, P)");
  if (!(v > 0) || !std::isfinite(v)) return invalid_argument(what + " must be > 0");
  return v * scale;
}

// Token counts: "4096", "4K" (4096), "128K", "1M" (1048576) — K and M are binary here, as context
// lengths are spoken of.
Result<std::vector<uint64_t>> parse_contexts(const std::string& text) {
  std::vector<uint64_t> out;
  std::stringstream in(text);
  std::string part;
  while (std::getline(in, part, ',')) {
    double scale = 1;
    if (!part.empty() && (part.back() == 'K' || part.back() == 'k')) scale = 1024, part.pop_back();
    else if (!part.empty() && part.back() == 'M') scale = 1024 * 1024, part.pop_back();
    auto v = parse_si("--context", part);
    if (v) v = *v * scale;
    if (!v) return v.status();
    if (*v < 1 || *v > 1e9) return invalid_argument("--context: " + part + " tokens is out of range");
    out.push_back(static_cast<uint64_t>(std::llround(*v)));
  }
  if (out.empty()) return invalid_argument("--context needs at least one length");
  return out;
}

Result<Dtype> kv_dtype_of(const std::string& name) {
  if (name == "fp8") return Dtype::kFp8E4M3;
  return parse_dtype(name);
}

template <typename T>
T get_or(const json& j, const char* key, T fallback) {
  auto it = j.find(key);
  return it != j.end() && !it->is_null() ? it->get<T>() : fallback;
}

// The model from a config.json: layout, hidden size, and a parameter estimate when none is given.
Status model_from_config(const PlanFlags& f, plan::ModelSpec& m) {
  std::ifstream in(f.model);
  if (!in) return Status(StatusCode::kNotFound, "cannot read --model " + f.model);
  std::stringstream text;
  text << in.rdbuf();
  json j = json::parse(text.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return invalid_argument(f.model + " is not a JSON object");
  if (!j.contains("num_hidden_layers") && j.contains("text_config")) j = j["text_config"];
  auto layout = KvLayout::from_hf_config(text.str(), 16);
  if (!layout) return layout.status();
  m.layout = *layout;
  m.hidden = get_or<uint32_t>(j, "hidden_size", 0);
  if (f.params.empty()) {
    const uint32_t heads = get_or<uint32_t>(j, "num_attention_heads", 0);
    const uint32_t experts = get_or<uint32_t>(j, "num_local_experts", get_or<uint32_t>(j, "num_experts", 1));
    const uint32_t per_token = get_or<uint32_t>(j, "num_experts_per_tok", 1);
    const uint32_t inter = get_or<uint32_t>(j, "intermediate_size", 4 * m.hidden);
    const uint32_t vocab = get_or<uint32_t>(j, "vocab_size", 0);
    const bool tied = get_or<bool>(j, "tie_word_embeddings", false);
    const uint32_t head_dim = get_or<uint32_t>(j, "head_dim", heads ? m.hidden / heads : 0);
    const double dense = plan::estimate_params(m.layout.num_layers, m.hidden, heads, m.layout.num_kv_heads, head_dim,
                                               inter, vocab, tied);
    const double expert_mlp = double(m.layout.num_layers) * 3.0 * m.hidden * inter;
    m.params = dense + (experts > 1 ? (experts - 1) * expert_mlp : 0);
    m.active_params = dense + (experts > 1 ? (per_token - 1) * expert_mlp : 0);
  }
  return Status::ok();
}

std::string bytes_text(double b) {
  char buf[64];
  if (b >= 1e12) std::snprintf(buf, sizeof buf, "%.2f TB", b / 1e12);
  else if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
  else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f KB", b / 1e3);
  return buf;
}

std::string seconds_text(double s) {
  char buf[32];
  if (s < 1e-3) std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else if (s < 1) std::snprintf(buf, sizeof buf, "%.1f ms", s * 1e3);
  else std::snprintf(buf, sizeof buf, "%.2f s", s);
  return buf;
}

json rows_json(const plan::PlanInputs& in, const std::vector<plan::PlanRow>& rows) {
  json out = json::array();
  for (const auto& r : rows) {
    json switch_s = json::object(), beats = json::object(), bw = json::object();
    for (const auto& t : r.tiers) {
      switch_s[t.tier] = t.switch_s;
      bw[t.tier] = t.bandwidth;
      beats[t.tier] = t.restore_beats_recompute_from ? json(*t.restore_beats_recompute_from) : json(nullptr);
    }
    out.push_back({{"context", r.context}, {"kv_bytes_per_token", r.kv_bytes_per_token},
                   {"kv_bytes_per_sequence", r.kv_bytes_per_sequence}, {"weights_bytes", r.weights_bytes},
                   {"max_sequences", r.max_sequences}, {"users", in.users}, {"users_fit", r.users_fit},
                   {"prefill_s", r.prefill_s}, {"decode_s_per_token", r.decode_s_per_token},
                   {"decode_s_per_screen", r.decode_s_per_screen}, {"screen_tokens", in.screen_tokens},
                   {"switch_s", switch_s}, {"tier_bandwidth", bw}, {"restore_beats_recompute_from", beats},
                   {"gpu", in.gpu.name}, {"utilization", in.utilization},
                   {"attention_flops_factor", in.attention_flops_factor}});
  }
  return out;
}

// --plot: the rows through kvtier.plan_plot (matplotlib). Python: $KVTIER_PYTHON, else the
// checkout's .venv when this kvtier was built in one (build/<preset>/tools/kvtier), else python3.
Status plot(const json& rows, const std::string& file) {
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  const std::filesystem::path root = ec ? std::filesystem::path() : exe.parent_path().parent_path().parent_path().parent_path();
  std::string python = "python3", env;
  if (const char* p = std::getenv("KVTIER_PYTHON"); p && *p) python = p;
  else if (!root.empty() && std::filesystem::exists(root / ".venv/bin/python")) python = (root / ".venv/bin/python").string();
  if (!root.empty() && std::filesystem::exists(root / "python/kvtier/plan_plot.py")) {
    env = "PYTHONPATH='" + (root / "python").string() + "' ";
  }
  const std::string cmd = env + "'" + python + "' -m kvtier.plan_plot '" + file + "'";
  FILE* p = ::popen(cmd.c_str(), "w");
  if (!p) return Status(StatusCode::kUnavailable, "--plot: cannot run " + python);
  const std::string text = rows.dump();
  std::fwrite(text.data(), 1, text.size(), p);
  const int rc = ::pclose(p);
  if (rc != 0) {
    return Status(StatusCode::kUnavailable, "--plot: " + python + " -m kvtier.plan_plot failed (it needs matplotlib "
                                            "and the kvtier package: set KVTIER_PYTHON to scripts/setup.sh's .venv/bin/python)");
  }
  return Status::ok();
}

// --measure DIR: the read bandwidth of the file system under DIR, as kvtier's NVMe tier reads it
// (O_DIRECT, 2 MiB blocks, 8 reads in flight). A 512 MiB file is written, flushed and read back
// three times; the best pass counts. Refused where O_DIRECT is (tmpfs).
Result<double> measure_nvme_read(const std::string& dir) {
  constexpr size_t kBlock = 2u << 20, kBlocks = 256, kThreads = 8;
  const std::string path = dir + "/kvtier-plan-measure." + std::to_string(::getpid());
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_DIRECT, 0600);
  if (fd < 0) return Status(StatusCode::kUnavailable, "--measure: cannot open " + path + " with O_DIRECT: " + std::strerror(errno));
  ::unlink(path.c_str());  // gone when closed
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  void* raw = nullptr;
  if (::posix_memalign(&raw, 4096, kBlock * kThreads) != 0) return Status(StatusCode::kResourceExhausted, "--measure: no memory");
  std::unique_ptr<std::byte, decltype(&std::free)> buf(static_cast<std::byte*>(raw), &std::free);
  std::memset(buf.get(), 0x5A, kBlock * kThreads);
  for (size_t b = 0; b < kBlocks; ++b) {
    if (::pwrite(fd, buf.get(), kBlock, static_cast<off_t>(b * kBlock)) != static_cast<ssize_t>(kBlock)) {
      return Status(StatusCode::kIoError, std::string("--measure: writing the test file: ") + std::strerror(errno));
    }
  }
  if (::fdatasync(fd) != 0) return Status(StatusCode::kIoError, std::string("--measure: fdatasync: ") + std::strerror(errno));
  double best = 0;
  for (int pass = 0; pass < 3; ++pass) {
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> readers;
    for (size_t t = 0; t < kThreads; ++t) {
      readers.emplace_back([&, t] {
        for (size_t b; (b = next.fetch_add(1)) < kBlocks;) {
          if (::pread(fd, buf.get() + t * kBlock, kBlock, static_cast<off_t>(b * kBlock)) != static_cast<ssize_t>(kBlock)) {
            failed = true;
          }
        }
      });
    }
    for (auto& r : readers) r.join();
    if (failed) return Status(StatusCode::kIoError, "--measure: a read of the test file failed");
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, double(kBlock * kBlocks) / s);
  }
  return best;
}

int fail(const Status& s) {
  std::fprintf(stderr, "kvtier plan: %s\n", s.to_string().c_str());
  return 2;
}

}  // namespace

void add_plan_flags(CLI::App& cmd, PlanFlags& f) {
  cmd.add_option("--model", f.model, "a Hugging Face config.json: layers, heads, hidden size, dtype");
  cmd.add_option("--layout", f.layout, "instead of --model: layers,kv_heads,head_dim,dtype (needs --hidden, --params)");
  cmd.add_option("--hidden", f.hidden, "hidden size (with --layout)");
  cmd.add_option("--params", f.params, "parameters, e.g. 34e9 or 34B (default: estimated from --model)");
  cmd.add_option("--active-params", f.active_params, "parameters one token uses (MoE; default: --params)");
  cmd.add_option("--gpu", f.gpu, "a GPU preset (--list-gpus), or give the four figures below");
  cmd.add_option("--flops", f.flops, "dense bf16 FLOP/s, e.g. 312T (overrides the preset's)");
  cmd.add_option("--hbm-bytes", f.hbm_bytes, "GPU memory bytes, e.g. 80e9");
  cmd.add_option("--hbm-bw", f.hbm_bw, "GPU memory bandwidth, bytes/s, e.g. 2.039T");
  cmd.add_option("--pcie-bw", f.pcie_bw, "practical host-to-GPU bandwidth, bytes/s, e.g. 25G");
  cmd.add_option("--nvme-bw", f.nvme_bw, "NVMe read bandwidth, bytes/s (no NVMe figures without it)");
  cmd.add_option("--measure", f.measure, "measure the NVMe read bandwidth of the file system under this directory");
  cmd.add_option("--context", f.contexts, "context lengths, comma-separated: 4096,50000 or 4K,128K (required)");
  cmd.add_option("--users", f.users, "sequences that must fit in HBM at once")->capture_default_str();
  cmd.add_option("--kv-dtype", f.kv_dtype, "KV cache element type: bf16, fp16, fp8, int8 (default: the model's)");
  cmd.add_option("--utilization", f.utilization, "fraction of peak FLOP/s and bandwidth reached")->capture_default_str();
  cmd.add_option("--attention-flops-factor", f.attention_flops_factor,
                 "prefill attention FLOPs = factor x layers x hidden x context^2")->capture_default_str();
  cmd.add_flag("--json", f.json, "one JSON object per context length, in an array");
  cmd.add_option("--plot", f.plot, "also write a plot (.svg or .png): time and concurrency against context length");
  cmd.add_flag("--list-gpus", f.list_gpus, "print the GPU presets and their sources");
}

int run_plan(const PlanFlags& f) {
  if (f.list_gpus) {
    for (const auto& g : plan::gpu_presets()) {
      std::printf("%-14s %7.1f TFLOP/s bf16  %7s HBM at %5.0f GB/s  PCIe %s ~%.0f GB/s\n    source: %s\n",
                  g.name.c_str(), g.bf16_flops / 1e12, bytes_text(g.hbm_bytes).c_str(), g.hbm_bw / 1e9, g.pcie.c_str(),
                  g.pcie_bw / 1e9, g.source.c_str());
    }
    return 0;
  }
  if (f.contexts.empty()) return fail(invalid_argument("--context is required: the context lengths to plan for"));
  plan::PlanInputs in;
  if (f.model.empty() == f.layout.empty()) return fail(invalid_argument("give one of --model CONFIG.json or --layout"));
  if (!f.model.empty()) {
    if (Status s = model_from_config(f, in.model); !s.is_ok()) return fail(s);
  } else {
    auto l = parse_layout_list(f.layout, 16, "--layout", "layers,kv_heads,head_dim,dtype");
    if (!l) return fail(l.status());
    in.model.layout = *l;
  }
  if (f.hidden) in.model.hidden = f.hidden;
  if (!f.params.empty()) {
    auto p = parse_si("--params", f.params);
    if (!p) return fail(p.status());
    in.model.params = in.model.active_params = *p;
  }
  if (!f.active_params.empty()) {
    auto p = parse_si("--active-params", f.active_params);
    if (!p) return fail(p.status());
    in.model.active_params = *p;
  }
  if (!f.kv_dtype.empty()) {
    auto d = kv_dtype_of(f.kv_dtype);
    if (!d) return fail(d.status());
    in.model.layout.dtype = *d;
  }
  if (!f.gpu.empty()) {
    auto g = plan::gpu_preset(f.gpu);
    if (!g) return fail(g.status());
    in.gpu = *g;
  } else {
    in.gpu.name = "custom";
    in.gpu.source = "given on the command line";
  }
  auto figure = [&](const std::string& flag, const std::string& text, double& out) -> Status {
    if (text.empty()) return Status::ok();
    auto v = parse_si(flag, text);
    if (!v) return v.status();
    out = *v;
    return Status::ok();
  };
  double nvme = 0;
  for (auto [flag, text, out] : {std::tuple{"--flops", &f.flops, &in.gpu.bf16_flops},
                                 std::tuple{"--hbm-bytes", &f.hbm_bytes, &in.gpu.hbm_bytes},
                                 std::tuple{"--hbm-bw", &f.hbm_bw, &in.gpu.hbm_bw},
                                 std::tuple{"--pcie-bw", &f.pcie_bw, &in.gpu.pcie_bw},
                                 std::tuple{"--nvme-bw", &f.nvme_bw, &nvme}}) {
    if (Status s = figure(flag, *text, *out); !s.is_ok()) return fail(s);
  }
  if (!f.nvme_bw.empty()) in.nvme_bw = nvme;
  if (!f.measure.empty()) {
    if (!f.nvme_bw.empty()) return fail(invalid_argument("give --nvme-bw or --measure, not both"));
    auto measured = measure_nvme_read(f.measure);
    if (!measured) return fail(measured.status());
    in.nvme_bw = *measured;
    if (!f.json) {
      std::printf("measured: NVMe (the file system under %s) reads %.2f GB/s with O_DIRECT, 2 MiB blocks, 8 in "
                  "flight; the GPU and its host link are the preset's or the flags'\n", f.measure.c_str(), *measured / 1e9);
    }
  }
  in.users = f.users;
  in.utilization = f.utilization;
  in.attention_flops_factor = f.attention_flops_factor;
  if (Status s = plan::validate(in); !s.is_ok()) return fail(s);
  auto contexts = parse_contexts(f.contexts);
  if (!contexts) return fail(contexts.status());

  std::vector<plan::PlanRow> rows;
  for (uint64_t c : *contexts) rows.push_back(plan::plan_for(in, c));
  if (!f.plot.empty()) {
    if (Status s = plot(rows_json(in, rows), f.plot); !s.is_ok()) return fail(s);
  }
  if (f.json) {
    const json out = rows_json(in, rows);
    std::printf("%s\n", out.dump(2).c_str());
    return 0;
  }
  const KvLayout& l = in.model.layout;
  std::printf("kvtier plan: %s, %.3g parameters (%.3g active), weights %s\n", l.describe().c_str(), in.model.params,
              in.model.active_params, bytes_text(rows[0].weights_bytes).c_str());
  std::printf("on %s: %.0f TFLOP/s bf16, %s HBM at %.0f GB/s, host link %.0f GB/s%s\n", in.gpu.name.c_str(),
              in.gpu.bf16_flops / 1e12, bytes_text(in.gpu.hbm_bytes).c_str(), in.gpu.hbm_bw / 1e9, in.gpu.pcie_bw / 1e9,
              in.nvme_bw ? (", NVMe " + std::to_string(int(*in.nvme_bw / 1e6)) + " MB/s").c_str() : "");
  std::printf("assumptions: peak x %.2f; prefill FLOPs = 2 x active params x s + %.3g x layers x hidden x s^2; a decoded\n"
              "token reads the active weights and the whole KV cache; restore = KV bytes / the tier's bandwidth\n\n",
              in.utilization, in.attention_flops_factor);
  std::printf("%9s %10s %9s %9s %11s %11s", "context", "KV/seq", "max seqs", "prefill", "decode/tok", "decode/250");
  for (const auto& t : rows[0].tiers) std::printf(" %11s", ("switch " + t.tier).c_str());
  for (const auto& t : rows[0].tiers) std::printf(" %16s", ("restore wins " + t.tier).c_str());
  std::printf("\n");
  for (const auto& r : rows) {
    std::printf("%9llu %10s %6llu%3s %9s %11s %11s", static_cast<unsigned long long>(r.context),
                bytes_text(double(r.kv_bytes_per_sequence)).c_str(), static_cast<unsigned long long>(r.max_sequences),
                r.users_fit ? "" : " !", seconds_text(r.prefill_s).c_str(), seconds_text(r.decode_s_per_token).c_str(),
                seconds_text(r.decode_s_per_screen).c_str());
    for (const auto& t : r.tiers) std::printf(" %11s", seconds_text(t.switch_s).c_str());
    for (const auto& t : r.tiers) {
      std::string from = !t.restore_beats_recompute_from ? "never"
                         : *t.restore_beats_recompute_from == 0 ? "always"
                         : "> " + std::to_string(*t.restore_beats_recompute_from) + " tok";
      std::printf(" %16s", from.c_str());
    }
    std::printf("\n");
  }
  if (std::any_of(rows.begin(), rows.end(), [](const plan::PlanRow& r) { return !r.users_fit; })) {
    std::printf("\n! marks lengths at which %u sequence%s not fit in HBM beside the weights\n", in.users,
                in.users == 1 ? " does" : "s do");
  }
  return 0;
}

}  // namespace kvtier
