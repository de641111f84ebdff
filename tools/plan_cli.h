// `kvtier plan`: the seed's cost model on the command line (tools/cost_model.h, docs/cost-model.md).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace kvtier {

struct PlanFlags {
  std::string model, layout, params, active_params, gpu, flops, hbm_bytes, hbm_bw, pcie_bw, nvme_bw, contexts;
  std::string kv_dtype, plot, measure;
  uint32_t hidden = 0;
  uint32_t users = 1;
  double utilization = 1.0;
  double attention_flops_factor = 1.0;
  bool json = false;
  bool list_gpus = false;
};

void add_plan_flags(CLI::App& cmd, PlanFlags& flags);
/// 0, or 2 with the reason on stderr for bad input.
int run_plan(const PlanFlags& flags);

}  // namespace kvtier
