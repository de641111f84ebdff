// KV quantization: the documented error bound holds for every element (int8 and fp8, from fp16
// and bf16), scales are amax / qmax, the largest element hits the top code, a zero row stays
// zero, dequantize rounds q·scale exactly once, and untouched slots stay untouched.
#include <catch2/catch.hpp>

#include <cstring>
#include <numeric>

#include "kernel_test_support.h"
#include "kernels/kv_quant.h"

using namespace kvtier;
using namespace kvtier::kernels;
using namespace kvtier::kernels::testing;

TEST_CASE("Quantize meets the error bound and dequantize rounds q times scale once") {
  const uint64_t seed = test_seed();
  CAPTURE(seed);
  Rng rng(seed);
  for (Dtype wide : {Dtype::kFp16, Dtype::kBf16}) {
    for (Dtype narrow : {Dtype::kInt8, Dtype::kFp8E4M3}) {
      for (uint32_t D : {64u, 128u, 256u}) {
        CAPTURE(dtype_name(wide), dtype_name(narrow), D);
        const uint32_t L = 2, Hk = 2, T = 16, slots = 5, nblocks = 3;
        auto layout = KvLayout::standard(L, Hk, D, wide, T);
        REQUIRE(layout.is_ok());
        const uint64_t rows = kv_scales_per_block(*layout);
        std::vector<uint16_t> wide_arena(slots * layout->bytes_per_block() / 2);
        // Each row gets its own magnitude (1e-3 .. 1e2) so scales vary; row 5 of the first
        // block is all zeros.
        for (uint64_t r = 0; r < wide_arena.size() / D; ++r) {
          const float mag = std::pow(10.0f, rng.uniform(-3.0f, 2.0f));
          for (uint32_t d = 0; d < D; ++d) put16(wide_arena, r * D + d, wide, rng.nonzero() * mag);
        }
        std::vector<int32_t> wide_slots{3, 0, 4}, narrow_slots{1, 4, 2};
        const uint64_t zero_row = uint64_t(wide_slots[0]) * rows + 5;
        std::fill_n(&wide_arena[zero_row * D], D, uint16_t(0));
        std::vector<uint8_t> narrow_arena(slots * layout->bytes_per_block() / 2);
        rng.fill_bytes(narrow_arena);
        const auto narrow_before = narrow_arena;
        std::vector<float> scales(slots * rows, -7.0f);

        KvQuantArgs args;
        args.layout = *layout;
        args.narrow_dtype = narrow;
        args.wide_arena = wide_arena.data();
        args.narrow_arena = narrow_arena.data();
        args.scales = scales.data();
        args.wide_slots = wide_slots.data();
        args.narrow_slots = narrow_slots.data();
        args.num_blocks = nblocks;
        args.num_wide_slots = slots;
        args.num_narrow_slots = slots;
        REQUIRE(quantize_kv_cpu(args).is_ok());

        const bool int8 = narrow == Dtype::kInt8;
        const float qmax = int8 ? 127.0f : 448.0f;
        auto wide_at = [&](uint64_t i) {
          return double(wide == Dtype::kFp16 ? fp16_to_float(wide_arena[i]) : bf16_to_float(wide_arena[i]));
        };
        for (uint32_t b = 0; b < nblocks; ++b) {
          for (uint64_t r = 0; r < rows; ++r) {
            const uint64_t wrow = uint64_t(wide_slots[b]) * rows + r;
            const uint64_t nrow = uint64_t(narrow_slots[b]) * rows + r;
            double amax = 0;
            for (uint32_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(wide_at(wrow * D + d)));
            const float scale = scales[nrow];
            REQUIRE(scale == float(amax) / qmax);
            bool hit_top = amax == 0;
            for (uint32_t d = 0; d < D; ++d) {
              const double x = wide_at(wrow * D + d);
              const uint8_t code = narrow_arena[nrow * D + d];
              const double q = int8 ? double(int8_t(code)) : double(fp8_e4m3_to_float(code));
              REQUIRE(std::isfinite(q));
              REQUIRE(std::fabs(q) <= qmax);
              const double back = double(float(q) * scale);
              // The documented bound (kv_quant.h), plus float rounding slack.
              const double bound = int8 ? 0.5 * double(scale)
                                        : std::max(0x1p-4 * std::fabs(x), 0x1p-10 * double(scale));
              const double slack = 0x1p-20 * std::fabs(x) + 1e-30;
              if (!(std::fabs(back - x) <= bound + slack)) {
                INFO("block " << b << " row " << r << " d " << d << " x " << x << " back " << back);
                REQUIRE(std::fabs(back - x) <= bound + slack);
              }
              if (std::fabs(q) == qmax) hit_top = true;
            }
            CHECK(hit_top);
            if (wrow == zero_row) {
              CHECK(scale == 0.0f);
              for (uint32_t d = 0; d < D; ++d) CHECK((narrow_arena[nrow * D + d] & 0x7f) == 0);
            }
          }
        }
        // Narrow slots outside the batch (0 and 3) are untouched.
        for (uint32_t s : {0u, 3u}) {
          const uint64_t off = uint64_t(s) * rows * D;
          CHECK(std::memcmp(&narrow_arena[off], &narrow_before[off], rows * D) == 0);
        }

        // Dequantize into a fresh wide arena: exactly round(q * scale) into the wide type.
        std::vector<uint16_t> back(wide_arena.size(), 0x7e00);
        args.wide_arena = back.data();
        REQUIRE(dequantize_kv_cpu(args).is_ok());
        for (uint32_t b = 0; b < nblocks; ++b) {
          for (uint64_t r = 0; r < rows; ++r) {
            const uint64_t nrow = uint64_t(narrow_slots[b]) * rows + r;
            for (uint32_t d = 0; d < D; ++d) {
              const uint8_t code = narrow_arena[nrow * D + d];
              const double q = int8 ? double(int8_t(code)) : double(fp8_e4m3_to_float(code));
              const float product = float(q * double(scales[nrow]));  // exact in double
              const uint16_t want = wide == Dtype::kFp16 ? float_to_fp16(product) : float_to_bf16(product);
              REQUIRE(back[(uint64_t(wide_slots[b]) * rows + r) * D + d] == want);
            }
          }
        }
      }
    }
  }
}

TEST_CASE("Quantize refuses wrong dtypes and out-of-range slots") {
  auto layout = KvLayout::standard(1, 1, 64, Dtype::kBf16);
  std::vector<uint8_t> wide(layout->bytes_per_block()), narrow(layout->bytes_per_block() / 2);
  std::vector<float> scales(kv_scales_per_block(*layout));
  int32_t ws = 0, ns = 1;
  KvQuantArgs args;
  args.layout = *layout;
  args.wide_arena = wide.data();
  args.narrow_arena = narrow.data();
  args.scales = scales.data();
  args.wide_slots = &ws;
  args.narrow_slots = &ns;
  args.num_blocks = 1;
  args.num_wide_slots = 1;
  args.num_narrow_slots = 1;
  CHECK(quantize_kv_cpu(args).code() == StatusCode::kInvalidArgument);  // narrow slot 1
  ns = 0;
  CHECK(quantize_kv_cpu(args).is_ok());
  args.narrow_dtype = Dtype::kFp8E5M2;
  CHECK_FALSE(quantize_kv_cpu(args).is_ok());
  args.narrow_dtype = Dtype::kInt8;
  args.layout.dtype = Dtype::kFp32;
  CHECK_FALSE(dequantize_kv_cpu(args).is_ok());
}
