#include "tools/cost_model.h"

#include <algorithm>
#include <cctype>
#include <cmath>

namespace kvtier::plan {

namespace {
constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

std::string lower(std::string_view s) {
  std::string out(s);
  std::transform(out.begin(), out.end(), out.begin(), [](unsigned char c) { return std::tolower(c); });
  return out;
}
}  // namespace

const std::vector<GpuSpec>& gpu_presets() {
  // Dense bf16 tensor FLOP/s (the datasheets' "with sparsity" figures halved), memory and its
  // bandwidth from NVIDIA's datasheets. 80 GB parts hold 80 GiB (nvidia-smi: 81920 MiB). The
  // practical PCIe figures are what pinned cudaMemcpy reaches: ~25 GB/s on Gen4 x16 (32 GB/s
  // raw), ~50 GB/s on Gen5 x16 (64 GB/s raw).
  static const std::vector<GpuSpec> presets = {
      {"A100-80G-SXM", 312e12, 80 * kGiB, 2.039e12, "Gen4 x16", 25e9,
       "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM: BF16 312 TFLOPS dense, HBM2e 2,039 GB/s)"},
      {"H100-SXM", 989.4e12, 80 * kGiB, 3.35e12, "Gen5 x16", 50e9,
       "NVIDIA H100 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity, HBM3 3.35 TB/s)"},
      {"H100-PCIe", 756e12, 80 * kGiB, 2.0e12, "Gen5 x16", 50e9,
       "NVIDIA H100 Tensor Core GPU datasheet (PCIe: BF16 1,513 TFLOPS with sparsity, HBM2e 2 TB/s)"},
      {"H200", 989.4e12, 141e9, 4.8e12, "Gen5 x16", 50e9,
       "NVIDIA H200 Tensor Core GPU datasheet (SXM: BF16 1,979 TFLOPS with sparsity, 141 GB HBM3e, 4.8 TB/s)"},
      {"B200", 2.25e15, 180e9, 8.0e12, "Gen5 x16", 50e9,
       "NVIDIA HGX B200 datasheet, per GPU (FP16/BF16 4.5 PFLOPS with sparsity, 180 GB HBM3e, 8 TB/s)"},
      {"L40S", 362.05e12, 48e9, 864e9, "Gen4 x16", 25e9,
       "NVIDIA L40S datasheet (BF16 733 TFLOPS with sparsity, 48 GB GDDR6, 864 GB/s)"},
  };
  return presets;
}

Result<GpuSpec> gpu_preset(std::string_view name) {
  std::string names;
  for (const GpuSpec& g : gpu_presets()) {
    if (lower(g.name) == lower(name)) return g;
    names += (names.empty() ? "" : ", ") + g.name;
  }
  return Status(StatusCode::kNotFound, "no GPU preset '" + std::string(name) + "': " + names +
                                           ", or give --flops, --hbm-bytes, --hbm-bw and --pcie-bw");
}

double estimate_params(uint32_t layers, uint32_t hidden, uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                       uint32_t intermediate, uint32_t vocab, bool tied_embeddings) {
  const double h = hidden, q = double(heads) * head_dim, kv = double(kv_heads) * head_dim;
  const double attention = h * q + 2 * h * kv + q * h;  // q, k, v, o projections
  const double mlp = 3 * h * intermediate;               // gate, up, down
  const double norms = 2 * h;
  const double embeddings = double(vocab) * h * (tied_embeddings ? 1 : 2);
  return layers * (attention + mlp + norms) + embeddings + h;
}

Status validate(const PlanInputs& in) {
  KVTIER_RETURN_IF_ERROR(in.model.layout.validate());
  if (in.model.hidden == 0) return invalid_argument("the model's hidden size is needed (--hidden, or a config.json)");
  if (!(in.model.params > 0)) return invalid_argument("the model's parameter count is needed (--params)");
  if (!(in.model.active_params > 0) || in.model.active_params > in.model.params) {
    return invalid_argument("active parameters must be in (0, params]");
  }
  if (!(in.gpu.bf16_flops > 0) || !(in.gpu.hbm_bytes > 0) || !(in.gpu.hbm_bw > 0) || !(in.gpu.pcie_bw > 0)) {
    return invalid_argument("the GPU needs FLOP/s, HBM bytes, HBM bandwidth and PCIe bandwidth, all > 0");
  }
  if (in.nvme_bw && !(*in.nvme_bw > 0)) return invalid_argument("--nvme-bw must be > 0");
  if (!(in.utilization > 0) || in.utilization > 1) return invalid_argument("--utilization must be in (0, 1]");
  if (!(in.attention_flops_factor >= 0)) return invalid_argument("the attention FLOPs factor must be >= 0");
  if (in.screen_tokens == 0) return invalid_argument("a screen has at least one token");
  return Status::ok();
}

double prefill_seconds(const PlanInputs& in, uint64_t tokens) {
  const double s = static_cast<double>(tokens);
  const double flops = 2 * in.model.active_params * s +
                       in.attention_flops_factor * in.model.layout.num_layers * double(in.model.hidden) * s * s;
  return flops / (in.gpu.bf16_flops * in.utilization);
}

PlanRow plan_for(const PlanInputs& in, uint64_t context) {
  const KvLayout& l = in.model.layout;
  PlanRow r;
  r.context = context;
  r.kv_bytes_per_token = l.bytes_per_token();
  r.kv_bytes_per_sequence = l.bytes_for_tokens(context);
  r.weights_bytes = in.model.params * in.model.weight_bytes;
  const double room = in.gpu.hbm_bytes - r.weights_bytes;
  r.max_sequences = room <= 0 || r.kv_bytes_per_sequence == 0
                        ? 0
                        : static_cast<uint64_t>(std::floor(room / double(r.kv_bytes_per_sequence)));
  r.users_fit = r.max_sequences >= in.users;
  r.prefill_s = prefill_seconds(in, context);
  // A decoded token reads the active weights and the sequence's whole KV cache once.
  const double read = in.model.active_params * in.model.weight_bytes + double(r.kv_bytes_per_sequence);
  r.decode_s_per_token = read / (in.gpu.hbm_bw * in.utilization);
  r.decode_s_per_screen = r.decode_s_per_token * in.screen_tokens;

  auto tier = [&](std::string name, double bw) {
    TierFigures t{.tier = std::move(name), .bandwidth = bw * in.utilization};
    t.switch_s = double(r.kv_bytes_per_sequence) / t.bandwidth;
    // restore(p) = p·kv/B; recompute(p) = (2·N·p + c·L·h·p²)/F. Restoring wins once
    // p > (kv/B − 2N/F)·F / (c·L·h), from the first token when kv/B ≤ 2N/F.
    const double flops = in.gpu.bf16_flops * in.utilization;
    const double per_token_restore = double(r.kv_bytes_per_token) / t.bandwidth;
    const double per_token_linear = 2 * in.model.active_params / flops;
    if (per_token_restore <= per_token_linear) {
      t.restore_beats_recompute_from = 0;
    } else {
      const double quad = in.attention_flops_factor * l.num_layers * double(in.model.hidden) / flops;
      if (quad > 0) t.restore_beats_recompute_from = static_cast<uint64_t>(
                        std::ceil((per_token_restore - per_token_linear) / quad));
    }
    r.tiers.push_back(std::move(t));
  };
  tier("host", in.gpu.pcie_bw);
  if (in.nvme_bw) tier("nvme", std::min(*in.nvme_bw, in.gpu.pcie_bw));  // NVMe → host → HBM: the slower hop
  return r;
}

}  // namespace kvtier::plan
