// decode_attention_cpu against naive float64 attention: every K/V dtype, head dims 64/128/256,
// MHA/GQA/MQA, uneven lengths with blocks shuffled in the arena, one-token and empty sequences,
// split-K forced and planned, and long contexts up to 128K tokens.
#include <catch2/catch.hpp>

#include "kernel_test_support.h"
#include "kernels/decode_attention.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

namespace {

struct DecodeCase {
  Dtype q_dtype;
  Dtype kv_dtype;
  uint32_t head_dim;
  uint32_t kv_heads;
  uint32_t qo_heads;
  std::vector<int32_t> lens;
  uint32_t force_splits;  // 0 = planned
  uint32_t num_layers = 2;
};

// Runs one case and returns the largest error measured in units of the tolerance.
double run_case(const DecodeCase& c, Rng& rng) {
  auto layout = KvLayout::standard(c.num_layers, c.kv_heads, c.head_dim, c.kv_dtype);
  REQUIRE(layout.is_ok());
  const uint32_t layer = c.num_layers - 1;
  PagedFixture f = make_paged(*layout, layer, c.lens, rng);
  const uint32_t S = uint32_t(c.lens.size()), H = c.qo_heads, D = c.head_dim;
  std::vector<uint16_t> q, out(uint64_t(S) * H * D, 0x7e00);  // poisoned: NaN in fp16 and bf16
  const std::vector<double> qx = random_activations(q, uint64_t(S) * H * D, c.q_dtype, rng);

  DecodeAttentionArgs args{f.kv, q.data(), out.data(), c.q_dtype, H, 0.0f};
  const uint32_t max_len = uint32_t(*std::max_element(c.lens.begin(), c.lens.end()));
  DecodePlanOptions opt;
  opt.force_splits = c.force_splits;
  auto plan = plan_decode_attention(args, max_len, opt);
  REQUIRE(plan.is_ok());
  std::vector<float> ws(plan->workspace_bytes / 4 + 1);
  const Status st = decode_attention_cpu(args, *plan, Workspace{ws.data(), plan->workspace_bytes});
  INFO(st.to_string());
  REQUIRE(st.is_ok());

  double worst = 0;
  const uint32_t group = H / c.kv_heads;
  std::vector<double> ref(D);
  for (uint32_t s = 0; s < S; ++s) {
    for (uint32_t h = 0; h < H; ++h) {
      const uint32_t kh = h / group;
      naive_attention_row(&qx[(uint64_t(s) * H + h) * D], D, uint32_t(c.lens[s]), 1.0 / std::sqrt(double(D)),
                          [&](uint32_t t, uint32_t d) { return f.at(s, 0, t, kh, d); },
                          [&](uint32_t t, uint32_t d) { return f.at(s, 1, t, kh, d); }, ref.data());
      double vmax = 1e-30;
      for (int32_t t = 0; t < c.lens[s]; ++t)
        for (uint32_t d = 0; d < D; ++d) vmax = std::max(vmax, std::fabs(f.at(s, 1, t, kh, d)));
      for (uint32_t d = 0; d < D; ++d) {
        const uint64_t i = (uint64_t(s) * H + h) * D + d;
        const double got = c.q_dtype == Dtype::kFp16 ? fp16_to_float(out[i]) : bf16_to_float(out[i]);
        const double err = std::fabs(got - ref[d]);
        const double tol = attention_tolerance(c.q_dtype, ref[d], vmax);
        if (!(err <= tol)) {
          INFO("seq " << s << " head " << h << " dim " << d << " got " << got << " want " << ref[d]);
          CHECK(err <= tol);
          return 1e9;
        }
        worst = std::max(worst, err / tol);
      }
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("Decode attention matches float64 for every dtype, head dim and head grouping") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  struct Kv { Dtype q, kv; };
  const Kv dtypes[] = {{Dtype::kFp16, Dtype::kFp16}, {Dtype::kBf16, Dtype::kBf16},
                       {Dtype::kFp16, Dtype::kInt8}, {Dtype::kBf16, Dtype::kInt8},
                       {Dtype::kBf16, Dtype::kFp8E4M3}, {Dtype::kFp16, Dtype::kFp8E4M3}};
  struct Heads { uint32_t kv, qo; };
  const Heads heads[] = {{3, 3} /*MHA*/, {2, 8} /*GQA*/, {1, 12} /*MQA*/};
  for (const Kv& dt : dtypes) {
    for (uint32_t D : {64u, 128u, 256u}) {
      for (const Heads& hd : heads) {
        for (uint32_t splits : {1u, 3u}) {
          CAPTURE(dtype_name(dt.q), dtype_name(dt.kv), D, hd.kv, hd.qo, splits);
          // Uneven: one token, a block and one, a non-multiple, exactly two blocks.
          const double worst = run_case({dt.q, dt.kv, D, hd.kv, hd.qo, {1, 17, 45, 32}, splits}, rng);
          CHECK(worst <= 1.0);
        }
      }
    }
  }
}

TEST_CASE("Decode attention: an empty sequence gives zeros, others unaffected") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (uint32_t splits : {1u, 2u}) {
    CHECK(run_case({Dtype::kBf16, Dtype::kBf16, 64, 2, 4, {20, 0, 5}, splits}, rng) <= 1.0);
  }
}

TEST_CASE("Decode attention: planned split-K at long context, 16-bit and quantized K/V") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  // 32K tokens at GQA 4:1, and a 3-sequence batch with very uneven lengths.
  CHECK(run_case({Dtype::kBf16, Dtype::kBf16, 128, 1, 4, {32768}, 0, 1}, rng) <= 1.0);
  CHECK(run_case({Dtype::kFp16, Dtype::kInt8, 128, 1, 2, {9000, 3, 2500}, 0, 1}, rng) <= 1.0);
  CHECK(run_case({Dtype::kBf16, Dtype::kFp8E4M3, 64, 1, 2, {4099, 1}, 0, 1}, rng) <= 1.0);
}

TEST_CASE("Decode attention: the longest supported context (128K tokens), split and unsplit") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  CHECK(run_case({Dtype::kFp16, Dtype::kFp16, 64, 1, 1, {131072}, 0, 1}, rng) <= 1.0);
  CHECK(run_case({Dtype::kBf16, Dtype::kBf16, 64, 1, 1, {131072}, 1, 1}, rng) <= 1.0);
}

TEST_CASE("Decode plan sizes workspace and whole-block splits") {
  auto layout = KvLayout::standard(1, 8, 128, Dtype::kBf16);
  REQUIRE(layout.is_ok());
  std::vector<uint8_t> arena(layout->bytes_per_block());
  std::vector<int32_t> table(4096, 0), lens(2, 1);
  auto kv = PagedKv::create(*layout, 0, {arena.data(), 1}, {table.data(), 2048, lens.data(), 2});
  REQUIRE(kv.is_ok());
  DecodeAttentionArgs args{*kv, arena.data(), arena.data(), Dtype::kBf16, 32, 0.0f};
  auto plan = plan_decode_attention(args, 32768);
  REQUIRE(plan.is_ok());
  CHECK(plan->num_splits > 1);
  CHECK(plan->tokens_per_split % 16 == 0);
  CHECK(uint64_t(plan->num_splits) * plan->tokens_per_split >= 32768);
  CHECK(plan->workspace_bytes == uint64_t(2) * 32 * plan->num_splits * (128 + 1) * 4);
  // 2 seqs × 8 kv heads in groups of 4 heads = 16 items; an H100's 132 SMs hold 4 each, so 33
  // splits fill one wave exactly, and a GPU of 16 SMs (64 slots) gets 4.
  CHECK(plan->num_splits == 33);
  DecodePlanOptions small;
  small.num_sms = 16;
  auto fewer = plan_decode_attention(args, 32768, small);
  REQUIRE(fewer.is_ok());
  CHECK(fewer->num_splits == 4);
  auto one = plan_decode_attention(args, 16);
  REQUIRE(one.is_ok());
  CHECK(one->num_splits == 1);
  CHECK(one->workspace_bytes == 0);
  CHECK_FALSE(plan_decode_attention(args, 2048 * 16 + 1).is_ok());
}

TEST_CASE("Decode attention refuses bad arguments with a status, never a crash") {
  auto layout = KvLayout::standard(1, 2, 96, Dtype::kBf16);
  REQUIRE(layout.is_ok());
  std::vector<uint8_t> arena(layout->bytes_per_block() * 2);
  std::vector<int32_t> table{0, 5}, lens{20};
  auto kv = PagedKv::create(*layout, 0, {arena.data(), 2}, {table.data(), 2, lens.data(), 1});
  REQUIRE(kv.is_ok());
  std::vector<uint16_t> q(4 * 96), out(4 * 96);
  DecodeAttentionArgs args{*kv, q.data(), out.data(), Dtype::kBf16, 4, 0.0f};
  auto plan = plan_decode_attention(args, 20);
  REQUIRE(plan.is_ok());
  CHECK(decode_attention_cpu(args, *plan, {}).code() == StatusCode::kInvalidArgument);  // head_dim 96

  auto l128 = KvLayout::standard(1, 2, 128, Dtype::kBf16);
  std::vector<uint8_t> arena128(l128->bytes_per_block() * 2);
  auto kv128 = PagedKv::create(*l128, 0, {arena128.data(), 2}, {table.data(), 2, lens.data(), 1});
  REQUIRE(kv128.is_ok());
  std::vector<uint16_t> q128(4 * 128), out128(4 * 128);
  DecodeAttentionArgs a128{*kv128, q128.data(), out128.data(), Dtype::kBf16, 4, 0.0f};
  auto p128 = plan_decode_attention(a128, 20);
  REQUIRE(p128.is_ok());
  CHECK(decode_attention_cpu(a128, *p128, {}).code() == StatusCode::kInvalidArgument);  // slot 5
  a128.num_qo_heads = 3;  // not a multiple of 2 kv heads
  CHECK_FALSE(decode_attention_cpu(a128, *p128, {}).is_ok());
  a128.num_qo_heads = 4;
  a128.q_dtype = Dtype::kFp16;  // 16-bit K/V of another type
  CHECK_FALSE(decode_attention_cpu(a128, *p128, {}).is_ok());
  DecodePlanOptions three;
  three.force_splits = 2;
  a128.q_dtype = Dtype::kBf16;
  auto p2 = plan_decode_attention(a128, 20, three);
  REQUIRE(p2.is_ok());
  REQUIRE(p2->num_splits == 2);
  CHECK(decode_attention_cpu(a128, *p2, {}).code() == StatusCode::kInvalidArgument);  // no workspace
  // int8 without scales is refused when building the descriptor.
  auto l8 = KvLayout::standard(1, 2, 128, Dtype::kInt8);
  CHECK_FALSE(PagedKv::create(*l8, 0, {arena128.data(), 2}, {table.data(), 2, lens.data(), 1}).is_ok());
  CHECK_FALSE(PagedKv::create(*l128, 1, {arena128.data(), 2}, {table.data(), 2, lens.data(), 1}).is_ok());
}
