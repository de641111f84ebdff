// Host-side conversions between float and the narrow KV element types: fp16 (IEEE binary16),
// bf16, fp8 e4m3 ("fn": no infinities, max 448) and int8 symmetric quantization.
//
// Why our own: the CPU references must build without CUDA headers, and they must round exactly
// as the device does (round-to-nearest-even, as __float2half_rn, __float2bfloat16_rn and
// __nv_cvt_float_to_fp8(.., __NV_SATFINITE, __NV_E4M3)) so that the GPU check can demand
// bit-equal results from the quantize kernels. Every function here is exhaustively tested.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kvtier/kv_layout.h"

namespace kvtier::kernels {

// ---- bf16: the top 16 bits of a float ------------------------------------------------------------
inline float bf16_to_float(uint16_t bits) noexcept {
  return std::bit_cast<float>(uint32_t(bits) << 16);
}
inline uint16_t float_to_bf16(float f) noexcept {
  const uint32_t u = std::bit_cast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  // Adding 0x7fff plus the lowest kept bit rounds to nearest, ties to even; overflow lands on inf.
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// ---- fp16: 1 sign, 5 exponent (bias 15), 10 mantissa bits ----------------------------------------
inline float fp16_to_float(uint16_t bits) noexcept {
  const uint32_t exponent = (bits >> 10) & 0x1fu;
  const uint32_t mantissa = bits & 0x3ffu;
  float v;
  if (exponent == 0) {
    v = std::ldexp(float(mantissa), -24);  // subnormal: mantissa × 2^-24
  } else if (exponent == 31) {
    v = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(float(mantissa | 0x400u), int(exponent) - 25);
  }
  return (bits & 0x8000u) ? -v : v;
}
inline uint16_t float_to_fp16(float f) noexcept {
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  if (std::isnan(f)) return sign | 0x7e00;
  const float a = std::fabs(f);
  if (std::isinf(a)) return sign | 0x7c00;
  if (a < 0x1p-14f) {
    // Subnormal range: steps of 2^-24. A result of 1024 is the smallest normal, whose
    // encoding 0x0400 is the same integer, so no special case is needed.
    return sign | uint16_t(std::nearbyint(a * 0x1p24f));
  }
  int e = 0;
  std::frexp(a, &e);
  int exponent = e - 1;                                  // a in [2^exponent, 2^(exponent+1))
  float r = std::nearbyint(std::ldexp(a, 10 - exponent));  // 11 significant bits: [1024, 2048]
  if (r == 2048.0f) {
    r = 1024.0f;
    ++exponent;
  }
  if (exponent > 15) return sign | 0x7c00;  // rounds past 65504: infinity, as IEEE says
  return sign | uint16_t(((exponent + 15) << 10) | (uint32_t(r) - 1024u));
}

// ---- fp8 e4m3 (OCP "fn"): 1 sign, 4 exponent (bias 7), 3 mantissa; 0x7f/0xff are NaN -----------
inline constexpr float kFp8E4M3Max = 448.0f;

inline float fp8_e4m3_to_float(uint8_t bits) noexcept {
  const uint32_t exponent = (bits >> 3) & 0xfu;
  const uint32_t mantissa = bits & 0x7u;
  float v;
  if (exponent == 15 && mantissa == 7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exponent == 0) {
    v = std::ldexp(float(mantissa), -9);
  } else {
    v = std::ldexp(float(mantissa | 0x8u), int(exponent) - 10);
  }
  return (bits & 0x80u) ? -v : v;
}
/// Round to nearest even, saturating to ±448 (inf too), as the device's __NV_SATFINITE mode.
inline uint8_t float_to_fp8_e4m3(float f) noexcept {
  const uint8_t sign = std::signbit(f) ? 0x80 : 0;
  if (std::isnan(f)) return 0x7f;
  const float a = std::fabs(f);
  if (a >= kFp8E4M3Max) return sign | 0x7e;
  if (a < 0x1p-6f) return sign | uint8_t(std::nearbyint(a * 512.0f));  // subnormal, 2^-9 steps
  int e = 0;
  std::frexp(a, &e);
  int exponent = e - 1;
  float r = std::nearbyint(std::ldexp(a, 3 - exponent));  // 4 significant bits: [8, 16]
  if (r == 16.0f) {
    r = 8.0f;
    ++exponent;
  }
  const uint32_t bits = (uint32_t(exponent + 7) << 3) | (uint32_t(r) - 8u);
  return sign | uint8_t(std::min<uint32_t>(bits, 0x7eu));  // 0x7f would be NaN: saturate
}

// ---- int8 symmetric ------------------------------------------------------------------------------
inline constexpr float kInt8Max = 127.0f;

/// q = clamp(round_half_even(x / scale), -127, 127); scale 0 (an all-zero row) gives 0.
inline int8_t float_to_int8_scaled(float x, float scale) noexcept {
  if (!(scale > 0.0f)) return 0;
  const float q = std::nearbyint(x / scale);
  return int8_t(std::clamp(q, -kInt8Max, kInt8Max));
}

// ---- typed element access for the CPU references -------------------------------------------------
/// Element `i` of an array of `d` (fp32, fp16, bf16, fp8 e4m3 or int8; int8 unscaled), as float.
inline float load_as_float(const void* base, Dtype d, uint64_t i) noexcept {
  switch (d) {
    case Dtype::kFp32: return static_cast<const float*>(base)[i];
    case Dtype::kFp16: return fp16_to_float(static_cast<const uint16_t*>(base)[i]);
    case Dtype::kBf16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    case Dtype::kFp8E4M3: return fp8_e4m3_to_float(static_cast<const uint8_t*>(base)[i]);
    case Dtype::kInt8: return float(static_cast<const int8_t*>(base)[i]);
    default: return std::numeric_limits<float>::quiet_NaN();
  }
}
/// Stores `v` rounded to nearest even into element `i` of an fp32, fp16 or bf16 array.
inline void store_from_float(void* base, Dtype d, uint64_t i, float v) noexcept {
  switch (d) {
    case Dtype::kFp32: static_cast<float*>(base)[i] = v; break;
    case Dtype::kFp16: static_cast<uint16_t*>(base)[i] = float_to_fp16(v); break;
    case Dtype::kBf16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: break;
  }
}

}  // namespace kvtier::kernels
