// The seed's cost model (../shared/seeds/000_*, docs/cost-model.md): what one long-context sequence
// costs on a GPU — concurrency (HBM size), prefill (FLOPs), decode (HBM bandwidth) and context
// switching (PCIe, NVMe) — all from the KV cache's size, and where restoring a cached prefix beats
// recomputing it. Theoretical peak figures: `utilization` scales FLOP/s and bandwidths alike.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

namespace kvtier::plan {

/// One GPU's figures, with where they come from.
struct GpuSpec {
  std::string name;
  double bf16_flops = 0;  // dense (no sparsity) bf16 tensor FLOP/s
  double hbm_bytes = 0;   // memory, bytes
  double hbm_bw = 0;      // memory bandwidth, bytes/s
  std::string pcie;       // "Gen4 x16"
  double pcie_bw = 0;     // practical host<->device bandwidth, bytes/s (pinned cudaMemcpy)
  std::string source;
};

/// A100-80G-SXM, H100-SXM, H100-PCIe, H200, B200, L40S.
const std::vector<GpuSpec>& gpu_presets();
/// A preset by name, case-insensitive; kNotFound lists the names.
Result<GpuSpec> gpu_preset(std::string_view name);

struct ModelSpec {
  KvLayout layout;            // the KV cache: layers, kv heads, head dim, KV dtype
  uint32_t hidden = 0;        // hidden size (the attention FLOPs' width)
  double params = 0;          // all parameters (the weights HBM holds)
  double active_params = 0;   // parameters one token uses (MoE: the active ones; dense: params)
  double weight_bytes = 2;    // bytes per weight (bf16: 2)
};

/// The parameters of a dense decoder from its config: embeddings (and an untied head), attention
/// (q, k, v, o with GQA) and a gated MLP per layer. An estimate for when --params is not given.
double estimate_params(uint32_t layers, uint32_t hidden, uint32_t heads, uint32_t kv_heads, uint32_t head_dim,
                       uint32_t intermediate, uint32_t vocab, bool tied_embeddings);

struct PlanInputs {
  ModelSpec model;
  GpuSpec gpu;
  std::optional<double> nvme_bw;  // bytes/s; no NVMe figures without it
  double utilization = 1.0;       // of peak FLOP/s and bandwidth (1: the theoretical peak)
  /// Attention FLOPs of a prefill of s tokens: factor × layers × hidden × s². 1 counts each
  /// multiply-add of QKᵀ and PV over the causal half once, which reproduces the seed's figures; 2
  /// counts both FLOPs of every multiply-add (docs/cost-model.md).
  double attention_flops_factor = 1.0;
  uint32_t screen_tokens = 250;   // one screen of decoded text
  uint32_t users = 1;             // sequences that must fit at once
};

struct TierFigures {
  std::string tier;                              // "host" (over PCIe) or "nvme"
  double bandwidth = 0;                          // bytes/s
  double switch_s = 0;                           // one sequence's KV back into HBM
  /// The prefix length (tokens) from which restoring from this tier beats recomputing it: 0 when
  /// restoring always wins; nullopt when it never does within the model's context.
  std::optional<uint64_t> restore_beats_recompute_from;
};

struct PlanRow {
  uint64_t context = 0;
  uint64_t kv_bytes_per_token = 0;
  uint64_t kv_bytes_per_sequence = 0;
  double weights_bytes = 0;
  uint64_t max_sequences = 0;     // whole sequences in the HBM beside the weights
  bool users_fit = false;         // PlanInputs::users of them
  double prefill_s = 0;
  double decode_s_per_token = 0;
  double decode_s_per_screen = 0;
  std::vector<TierFigures> tiers;
};

/// kInvalidArgument for missing or non-positive figures.
Status validate(const PlanInputs& in);
PlanRow plan_for(const PlanInputs& in, uint64_t context);

/// Seconds to recompute (prefill) a prefix of `tokens`.
double prefill_seconds(const PlanInputs& in, uint64_t tokens);

}  // namespace kvtier::plan
