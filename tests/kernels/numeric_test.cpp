// Host conversions: exhaustive round trips for fp16, bf16 and fp8 e4m3; every midpoint rounds to
// even; overflow goes to inf (fp16/bf16) or saturates at 448 (e4m3); int8 rounds half to even.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>

#include "kernels/numeric.h"

using namespace kvtier::kernels;

namespace {
// Checks that the exact midpoint between consecutive positive codes a and a+1 rounds to the
// even one, and that nudges above and below round to the nearer code.
template <typename Encode, typename Decode>
void check_midpoints(uint32_t last_code, uint32_t sign_bit, Encode encode, Decode decode) {
  for (uint32_t a = 0; a < last_code; ++a) {
    const double lo = decode(a), hi = decode(a + 1);
    const float mid = float((lo + hi) / 2);  // exact: one extra bit
    REQUIRE(double(mid) == (lo + hi) / 2);
    const uint32_t even = (a % 2 == 0) ? a : a + 1;
    INFO("codes " << a << " and " << a + 1);
    REQUIRE(encode(mid) == even);
    REQUIRE(encode(std::nextafter(mid, std::numeric_limits<float>::infinity())) == a + 1);
    REQUIRE(encode(std::nextafter(mid, 0.0f)) == a);
    REQUIRE(encode(-mid) == (even | sign_bit));
  }
}
}  // namespace

TEST_CASE("fp16: every code round-trips, midpoints round to even, overflow is inf") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = fp16_to_float(uint16_t(b));
    if (std::isnan(f)) {
      CHECK(std::isnan(fp16_to_float(float_to_fp16(f))));
      continue;
    }
    REQUIRE(float_to_fp16(f) == b);
  }
  check_midpoints(0x7bff, 0x8000, [](float x) { return uint32_t(float_to_fp16(x)); },
                  [](uint32_t c) { return double(fp16_to_float(uint16_t(c))); });
  CHECK(fp16_to_float(0x3c00) == 1.0f);
  CHECK(fp16_to_float(0x0001) == std::ldexp(1.0f, -24));
  CHECK(float_to_fp16(65504.0f) == 0x7bff);
  CHECK(float_to_fp16(65519.99f) == 0x7bff);
  CHECK(float_to_fp16(65520.0f) == 0x7c00);  // the tie above the largest finite goes to inf
  CHECK(float_to_fp16(-1e9f) == 0xfc00);
  CHECK(float_to_fp16(std::ldexp(1.0f, -26)) == 0);  // below half the smallest subnormal
  CHECK(float_to_fp16(-0.0f) == 0x8000);
}

TEST_CASE("bf16: every code round-trips, midpoints round to even, NaN stays NaN") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(uint16_t(b));
    if (std::isnan(f)) {
      CHECK(std::isnan(bf16_to_float(float_to_bf16(f))));
      continue;
    }
    REQUIRE(float_to_bf16(f) == b);
  }
  check_midpoints(0x7f7f, 0x8000, [](float x) { return uint32_t(float_to_bf16(x)); },
                  [](uint32_t c) { return double(bf16_to_float(uint16_t(c))); });
  CHECK(float_to_bf16(std::numeric_limits<float>::max()) == 0x7f80);  // rounds up to inf
  CHECK(float_to_bf16(1.0f) == 0x3f80);
}

TEST_CASE("fp8 e4m3: every code round-trips, midpoints round to even, saturation at 448") {
  for (uint32_t b = 0; b < 256; ++b) {
    const float f = fp8_e4m3_to_float(uint8_t(b));
    if ((b & 0x7f) == 0x7f) {
      CHECK(std::isnan(f));
      continue;
    }
    REQUIRE(float_to_fp8_e4m3(f) == b);
  }
  check_midpoints(0x7d, 0x80, [](float x) { return uint32_t(float_to_fp8_e4m3(x)); },
                  [](uint32_t c) { return double(fp8_e4m3_to_float(uint8_t(c))); });
  CHECK(fp8_e4m3_to_float(0x7e) == 448.0f);
  CHECK(fp8_e4m3_to_float(0x01) == std::ldexp(1.0f, -9));
  CHECK(fp8_e4m3_to_float(0x38) == 1.0f);
  CHECK(float_to_fp8_e4m3(464.0f) == 0x7e);  // would round to 512: saturates
  CHECK(float_to_fp8_e4m3(1e30f) == 0x7e);
  CHECK(float_to_fp8_e4m3(-std::numeric_limits<float>::infinity()) == 0xfe);
  CHECK(float_to_fp8_e4m3(std::ldexp(1.0f, -10)) == 0x00);       // tie to even (0)
  CHECK(float_to_fp8_e4m3(std::ldexp(1.5f, -10)) == 0x01);
  CHECK(float_to_fp8_e4m3(std::ldexp(3.0f, -10)) == 0x02);       // tie 1.5 steps → even 2
  CHECK(float_to_fp8_e4m3(std::ldexp(7.5f, -9)) == 0x08);  // tie past the last subnormal: even 0x08
}

TEST_CASE("int8 symmetric: half to even, clamped, zero scale gives zero") {
  CHECK(float_to_int8_scaled(2.5f, 1.0f) == 2);
  CHECK(float_to_int8_scaled(3.5f, 1.0f) == 4);
  CHECK(float_to_int8_scaled(-2.5f, 1.0f) == -2);
  CHECK(float_to_int8_scaled(1000.0f, 1.0f) == 127);
  CHECK(float_to_int8_scaled(-1000.0f, 1.0f) == -127);
  CHECK(float_to_int8_scaled(0.7f, 0.0f) == 0);
  CHECK(float_to_int8_scaled(1.27f, 0.01f) == 127);
}
