// prefill_attention_cpu against naive float64 causal attention over [cached prefix ‖ new tokens]:
// uneven prefixes (empty, exact blocks, partial), one new token, shuffled blocks, every dtype.
#include <catch2/catch.hpp>

#include "kernel_test_support.h"
#include "kernels/prefill_attention.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

namespace {

double run_prefill(Dtype q_dtype, Dtype kv_dtype, uint32_t D, uint32_t KH, uint32_t H,
                   const std::vector<int32_t>& prefix, const std::vector<int32_t>& n_new, Rng& rng) {
  auto layout = KvLayout::standard(3, KH, D, kv_dtype);
  REQUIRE(layout.is_ok());
  PagedFixture f = make_paged(*layout, 1, prefix, rng);
  const uint32_t S = uint32_t(prefix.size());
  std::vector<int32_t> indptr(S + 1, 0);
  for (uint32_t s = 0; s < S; ++s) indptr[s + 1] = indptr[s] + n_new[s];
  const uint32_t N = uint32_t(indptr[S]);
  std::vector<uint16_t> q, k, v, out(uint64_t(N) * H * D, 0x7e00);
  const auto qx = random_activations(q, uint64_t(N) * H * D, q_dtype, rng);
  const auto kx = random_activations(k, uint64_t(N) * KH * D, q_dtype, rng);
  const auto vx = random_activations(v, uint64_t(N) * KH * D, q_dtype, rng);
  PrefillAttentionArgs args{f.kv, q.data(), k.data(), v.data(), out.data(), indptr.data(), N,
                            q_dtype, H, 0.0f};
  const Status st = prefill_attention_cpu(args);
  INFO(st.to_string());
  REQUIRE(st.is_ok());

  double worst = 0;
  std::vector<double> ref(D);
  const uint32_t group = H / KH;
  for (uint32_t s = 0; s < S; ++s) {
    const uint32_t P = uint32_t(prefix[s]);
    for (int32_t i = 0; i < n_new[s]; ++i) {
      const uint64_t row = uint64_t(indptr[s]) + i;
      for (uint32_t h = 0; h < H; ++h) {
        const uint32_t kh = h / group;
        auto fetch = [&](const std::vector<double>& fresh, uint32_t plane) {
          return [&, plane](uint32_t t, uint32_t d) {
            return t < P ? f.at(s, plane, t, kh, d)
                         : fresh[((uint64_t(indptr[s]) + t - P) * KH + kh) * D + d];
          };
        };
        naive_attention_row(&qx[(row * H + h) * D], D, P + i + 1, 1.0 / std::sqrt(double(D)),
                            fetch(kx, 0), fetch(vx, 1), ref.data());
        double vmax = 1e-30;
        for (uint32_t t = 0; t < P + i + 1; ++t)
          for (uint32_t d = 0; d < D; ++d) vmax = std::max(vmax, std::fabs(fetch(vx, 1)(t, d)));
        for (uint32_t d = 0; d < D; ++d) {
          const uint16_t bits = out[(row * H + h) * D + d];
          const double got = q_dtype == Dtype::kFp16 ? fp16_to_float(bits) : bf16_to_float(bits);
          const double tol = attention_tolerance(q_dtype, ref[d], vmax);
          const double err = std::fabs(got - ref[d]);
          if (!(err <= tol)) {
            INFO("seq " << s << " new token " << i << " head " << h << " dim " << d);
            CHECK(err <= tol);
            return 1e9;
          }
          worst = std::max(worst, err / tol);
        }
      }
    }
  }
  return worst;
}

}  // namespace

TEST_CASE("Prefill over a cached prefix matches float64 causal attention") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  struct Kv { Dtype q, kv; };
  for (Kv dt : {Kv{Dtype::kFp16, Dtype::kFp16}, Kv{Dtype::kBf16, Dtype::kBf16},
                Kv{Dtype::kBf16, Dtype::kInt8}, Kv{Dtype::kFp16, Dtype::kFp8E4M3}}) {
    for (uint32_t D : {64u, 128u, 256u}) {
      CAPTURE(dtype_name(dt.q), dtype_name(dt.kv), D);
      // Prefixes: none, one partial block, two exact blocks, 3 blocks + 5; new: 6, 1, 9, 17.
      CHECK(run_prefill(dt.q, dt.kv, D, 2, 6, {0, 7, 32, 53}, {6, 1, 9, 17}, rng) <= 1.0);
      CHECK(run_prefill(dt.q, dt.kv, D, 1, 10, {21}, {4}, rng) <= 1.0);  // MQA
    }
  }
}

TEST_CASE("Prefill with a long cached prefix") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  CHECK(run_prefill(Dtype::kBf16, Dtype::kBf16, 128, 1, 4, {8000, 300}, {5, 12}, rng) <= 1.0);
}

TEST_CASE("Prefill refuses a broken indptr") {
  Rng rng(1);
  auto layout = KvLayout::standard(1, 1, 64, Dtype::kFp16);
  PagedFixture f = make_paged(*layout, 0, {16}, rng);
  std::vector<uint16_t> buf(64 * 8);
  std::vector<int32_t> indptr{0, 3};
  PrefillAttentionArgs args{f.kv, buf.data(), buf.data(), buf.data(), buf.data(), indptr.data(),
                            4, Dtype::kFp16, 1, 0.0f};
  CHECK(prefill_attention_cpu(args).code() == StatusCode::kInvalidArgument);
  args.total_new_tokens = 3;
  CHECK(prefill_attention_cpu(args).is_ok());
  args.q_dtype = Dtype::kBf16;
  CHECK_FALSE(prefill_attention_cpu(args).is_ok());
}
