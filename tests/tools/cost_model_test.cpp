// The seed's cost model against the seed's own figures (../shared/seeds/000_*: Yi-34B-200K on an
// A100-80G) and the KV-cache explainer's Llama-3-70B, then `kvtier plan` as a user runs it.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>

#include "temp_dir.h"
#include "tools/cost_model.h"

using namespace kvtier;
using namespace kvtier::plan;
using Catch::Matchers::WithinRel;

namespace {

PlanInputs yi_34b_on_a100() {
  PlanInputs in;
  in.model.layout = *KvLayout::standard(60, 8, 128, Dtype::kBf16);
  in.model.hidden = 7168;
  in.model.params = in.model.active_params = 34e9;
  in.gpu = *gpu_preset("A100-80G-SXM");
  return in;
}

std::string run(const std::string& args, int* status) {
  std::string out;
  FILE* p = ::popen((std::string(KVTIER_KVTIER) + " plan " + args + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  while (size_t n = std::fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  *status = WEXITSTATUS(::pclose(p));
  return out;
}

}  // namespace

TEST_CASE("The seed's Yi-34B on an A100-80G: prefill, decode and concurrency within 5%") {
  const PlanInputs in = yi_34b_on_a100();
  REQUIRE(validate(in).is_ok());
  const PlanRow at4k = plan_for(in, 4096), at50k = plan_for(in, 50000);
  CHECK(at4k.kv_bytes_per_token == 245760);  // 240 KiB
  // Seed: prefill ≈0.89 s at 4K and ≈14.1 s at 50K.
  CHECK_THAT(at4k.prefill_s, WithinRel(0.89, 0.05));
  CHECK_THAT(at50k.prefill_s, WithinRel(14.1, 0.05));
  // Seed: 250 decoded tokens ≈8.5 s at 4K and ≈9.8 s at 50K.
  CHECK_THAT(at4k.decode_s_per_screen, WithinRel(8.5, 0.05));
  CHECK_THAT(at50k.decode_s_per_screen, WithinRel(9.8, 0.05));
  // Seed: one 50K user beside the weights. Its ≈20 users at 4K do not follow: 80 GiB − 68 GB
  // leaves 17.9 GB, 17 sequences of 1.01 GB (docs/cost-model.md).
  CHECK(at50k.max_sequences == 1);
  CHECK(at4k.max_sequences == 17);
}

TEST_CASE("The explainer's Llama-3-70B: 8K tokens of bf16 KV are 2.7 GB, 16 of them 43 GB") {
  PlanInputs in;
  in.model.layout = *KvLayout::standard(80, 8, 128, Dtype::kBf16);
  in.model.hidden = 8192;
  in.model.params = in.model.active_params = 70.6e9;
  in.gpu = *gpu_preset("H100-SXM");
  const PlanRow r = plan_for(in, 8192);
  CHECK_THAT(double(r.kv_bytes_per_sequence) / 1e9, WithinRel(2.7, 0.02));
  CHECK_THAT(16.0 * double(r.kv_bytes_per_sequence) / 1e9, WithinRel(43.0, 0.02));
  in.model.layout.dtype = Dtype::kFp8E4M3;  // fp8 KV halves it
  CHECK(plan_for(in, 8192).kv_bytes_per_sequence * 2 == r.kv_bytes_per_sequence);
  CHECK(plan_for(in, 8192).max_sequences == 0);  // 141 GB of bf16 weights do not fit in 80 GiB
}

TEST_CASE("Restore beats recompute: always over PCIe, from a break-even on a slow tier, never without one") {
  PlanInputs in = yi_34b_on_a100();
  in.nvme_bw = 100e6;  // a slow disk: 2.5 ms per token of KV against 0.22 ms per token of prefill
  const PlanRow r = plan_for(in, 50000);
  REQUIRE(r.tiers.size() == 2);
  CHECK(r.tiers[0].tier == "host");
  CHECK(r.tiers[0].restore_beats_recompute_from == 0u);
  CHECK_THAT(r.tiers[0].switch_s, WithinRel(12.288e9 / 25e9, 1e-9));
  REQUIRE(r.tiers[1].restore_beats_recompute_from.has_value());
  const uint64_t p = *r.tiers[1].restore_beats_recompute_from;
  CHECK(p > 1'000'000);
  // At the break-even, restoring and recomputing the prefix take the same time.
  const double restore = double(p) * 245760 / 100e6;
  CHECK_THAT(prefill_seconds(in, p), WithinRel(restore, 1e-3));
  CHECK(prefill_seconds(in, p - 1000) < double(p - 1000) * 245760 / 100e6);
  // Without the attention term, recompute cost per token is constant: a slow tier never wins.
  in.attention_flops_factor = 0;
  CHECK(!plan_for(in, 50000).tiers[1].restore_beats_recompute_from.has_value());
  // No NVMe figure without a bandwidth.
  in.nvme_bw.reset();
  CHECK(plan_for(in, 50000).tiers.size() == 1);
}

TEST_CASE("Bad plan inputs are refused with the reason") {
  PlanInputs in = yi_34b_on_a100();
  in.model.params = 0;
  CHECK(validate(in).code() == StatusCode::kInvalidArgument);
  in = yi_34b_on_a100();
  in.model.active_params = 2 * in.model.params;
  CHECK(validate(in).code() == StatusCode::kInvalidArgument);
  in = yi_34b_on_a100();
  in.utilization = 1.5;
  CHECK(validate(in).code() == StatusCode::kInvalidArgument);
  in = yi_34b_on_a100();
  in.gpu.hbm_bw = 0;
  CHECK(validate(in).code() == StatusCode::kInvalidArgument);
  auto unknown = gpu_preset("V100");
  CHECK(unknown.status().code() == StatusCode::kNotFound);
  CHECK(std::string(unknown.status().message()).find("H200") != std::string::npos);  // the names, listed
  CHECK(gpu_preset("h100-sxm").is_ok());
  for (const GpuSpec& g : gpu_presets()) CHECK(!g.source.empty());
}

TEST_CASE("A parameter estimate from a config: Llama-3-8B is 8.03B") {
  CHECK_THAT(estimate_params(32, 4096, 32, 8, 128, 14336, 128256, false), WithinRel(8.03e9, 0.01));
}

TEST_CASE("kvtier plan: a config.json and a preset, as text and as JSON, and bad flags exit 2") {
  testing::TempDir dir("kvtier_plan");
  const std::string config = dir.path() + "/config.json";
  std::ofstream(config) << R"({"hidden_size": 7168, "intermediate_size": 20480, "num_attention_heads": 56,
    "num_hidden_layers": 60, "num_key_value_heads": 8, "vocab_size": 64000, "torch_dtype": "bfloat16"})";
  int status = -1;
  const std::string text = run("--model " + config + " --params 34e9 --gpu A100-80G-SXM --context 4K,50000 --nvme-bw 3G",
                               &status);
  CHECK(status == 0);
  CHECK(text.find("A100-80G-SXM") != std::string::npos);
  CHECK(text.find("restore wins nvme") != std::string::npos);
  const std::string out = run("--model " + config + " --params 34e9 --gpu A100-80G-SXM --context 4K,50000 --json", &status);
  REQUIRE(status == 0);
  const auto j = nlohmann::json::parse(out);
  REQUIRE(j.size() == 2);
  CHECK(j[0]["context"] == 4096);  // K is 1024 tokens
  for (const char* key : {"kv_bytes_per_token", "kv_bytes_per_sequence", "max_sequences", "prefill_s", "decode_s_per_token",
                          "decode_s_per_screen", "switch_s", "restore_beats_recompute_from"}) {
    CHECK(j[1].contains(key));
  }
  CHECK(j[1]["max_sequences"] == 1);
  CHECK_THAT(j[1]["prefill_s"].get<double>(), WithinRel(14.1, 0.05));
  CHECK(j[1]["restore_beats_recompute_from"]["host"] == 0);
  // The parameter count estimated from the config when --params is not given: 34.4B.
  const auto est = nlohmann::json::parse(run("--model " + config + " --gpu A100-80G-SXM --context 4K --json", &status));
  CHECK_THAT(est[0]["weights_bytes"].get<double>() / 2, WithinRel(34.4e9, 0.01));
  // --plot writes the figure (kvtier.plan_plot, matplotlib from the checkout's .venv).
  const std::string svg = dir.path() + "/plan.svg";
  run("--model " + config + " --gpu A100-80G-SXM --context 1K,4K,50000,200K --nvme-bw 3G --plot " + svg, &status);
  CHECK(status == 0);
  std::ifstream plotted(svg);
  const std::string figure((std::istreambuf_iterator<char>(plotted)), std::istreambuf_iterator<char>());
  CHECK(figure.find("<svg") != std::string::npos);
  CHECK(figure.find("restore from nvme") != std::string::npos);
  // --measure: this machine's disk read bandwidth stands in for --nvme-bw.
  const auto measured = nlohmann::json::parse(
      run("--model " + config + " --gpu A100-80G-SXM --context 50000 --json --measure /var/tmp", &status));
  REQUIRE(status == 0);
  CHECK(measured[0]["tier_bandwidth"]["nvme"].get<double>() > 1e6);
  CHECK(measured[0]["switch_s"].contains("nvme"));
  CHECK(run("--model " + config + " --gpu H200 --context 4K --measure /nonexistent/dir", &status).find("cannot open") !=
        std::string::npos);
  CHECK(status == 2);
  // Bad input: a clear message and exit status 2.
  for (const std::string& bad : {std::string("--gpu A100-80G-SXM --context 4K"),             // no model
                                 "--model " + config + " --gpu V100 --context 4K",           // unknown GPU
                                 "--model " + config + " --gpu H200 --context four",         // bad length
                                 "--model " + config + " --gpu H200 --context 4K --nvme-bw '3 parsecs'",
                                 "--model " + config + " --gpu H200"}) {                     // no context
    const std::string msg = run(bad, &status);
    INFO(bad << " -> " << msg);
    CHECK(status == 2);
    CHECK(msg.find("kvtier plan: ") != std::string::npos);
  }
}
