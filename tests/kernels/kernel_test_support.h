// Shared by the kernels tests: a seeded RNG (fresh each run, printed, overridable with
// KVTIER_TEST_SEED), a paged arena builder whose blocks land in shuffled slots among garbage,
// and the naive float64 attention the CPU references are checked against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/numeric.h"
#include "kernels/paged_kv.h"
#include "kvtier/kv_layout.h"

namespace kvtier::kernels::testing {

/// Fresh seed per run unless KVTIER_TEST_SEED is set; tests CAPTURE it so failures replay.
inline uint64_t test_seed() {
  if (const char* s = std::getenv("KVTIER_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return (uint64_t(std::random_device{}()) << 32) ^ std::random_device{}();
}

struct Rng {
  std::mt19937_64 gen;
  explicit Rng(uint64_t seed) : gen(seed) {}
  /// Uniform in [-1, 1] without zero (a zero hides unwritten or unread elements).
  float nonzero() {
    for (;;) {
      const float x = std::uniform_real_distribution<float>(-1.0f, 1.0f)(gen);
      if (std::fabs(x) > 1e-3f) return x;
    }
  }
  float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(gen); }
  uint32_t below(uint32_t n) { return std::uniform_int_distribution<uint32_t>(0, n - 1)(gen); }
  void fill_bytes(std::vector<uint8_t>& v) {
    for (auto& b : v) b = uint8_t(gen());
  }
};

/// Stores x (rounded) into a 16-bit array of `d` and returns the value actually stored.
inline double put16(std::vector<uint16_t>& v, uint64_t i, Dtype d, float x) {
  v[i] = d == Dtype::kFp16 ? float_to_fp16(x) : float_to_bf16(x);
  return d == Dtype::kFp16 ? fp16_to_float(v[i]) : bf16_to_float(v[i]);
}

/// Random q (or any [rows][D] activations) of dtype d; returns the exact stored values.
inline std::vector<double> random_activations(std::vector<uint16_t>& out, uint64_t n, Dtype d, Rng& rng) {
  out.assign(n, 0);
  std::vector<double> exact(n);
  for (uint64_t i = 0; i < n; ++i) exact[i] = put16(out, i, d, rng.nonzero());
  return exact;
}

/// A paged arena holding `lens.size()` sequences of one layout. Slots are shuffled; unused
/// slots, other layers and unused scale entries hold random garbage (NaN bit patterns included)
/// so reading the wrong bytes shows.
struct PagedFixture {
  KvLayout layout;
  uint32_t layer = 0;
  std::vector<uint8_t> arena;
  std::vector<float> scales;
  std::vector<int32_t> table;
  std::vector<int32_t> lens;
  uint32_t max_blocks = 0;
  uint32_t num_slots = 0;
  // Logical (dequantized, exact) values per sequence: [plane][t][kv_head][head_dim].
  std::vector<std::vector<double>> values;
  PagedKv kv;

  double at(uint32_t s, uint32_t plane, uint32_t t, uint32_t h, uint32_t d) const {
    const uint64_t len = uint64_t(lens[s]);
    return values[s][((plane * len + t) * layout.num_kv_heads + h) * layout.head_dim + d];
  }
};

inline PagedFixture make_paged(const KvLayout& layout, uint32_t layer, const std::vector<int32_t>& lens,
                               Rng& rng, uint32_t spare_slots = 3) {
  PagedFixture f;
  f.layout = layout;
  f.layer = layer;
  f.lens = lens;
  const uint32_t T = layout.block_tokens, Hk = layout.num_kv_heads, D = layout.head_dim;
  uint32_t total_blocks = 0;
  for (int32_t len : lens) {
    const uint32_t blocks = (uint32_t(len) + T - 1) / T;
    f.max_blocks = std::max(f.max_blocks, blocks);
    total_blocks += blocks;
  }
  f.max_blocks = std::max<uint32_t>(f.max_blocks, 1) + 1;  // a spare column in each row
  f.num_slots = total_blocks + spare_slots;
  f.arena.resize(f.num_slots * layout.bytes_per_block());
  rng.fill_bytes(f.arena);
  const bool quantized = is_quantized_kv(layout.dtype);
  if (quantized) {
    f.scales.resize(f.num_slots * kv_scales_per_block(layout));
    for (auto& s : f.scales) s = rng.uniform(-1e6f, 1e6f);  // garbage until written
  }
  std::vector<int32_t> order(f.num_slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng.gen);
  f.table.assign(lens.size() * f.max_blocks, -1);
  uint32_t next = 0;
  const uint64_t elem = dtype_bits(layout.dtype) / 8;
  for (size_t s = 0; s < lens.size(); ++s) {
    const uint32_t len = uint32_t(lens[s]);
    const uint32_t blocks = (len + T - 1) / T;
    for (uint32_t b = 0; b < blocks; ++b) f.table[s * f.max_blocks + b] = order[next++];
    f.values.emplace_back(uint64_t(2) * len * Hk * D);
    for (uint32_t plane = 0; plane < 2; ++plane) {
      for (uint32_t t = 0; t < len; ++t) {
        const int32_t slot = f.table[s * f.max_blocks + t / T];
        for (uint32_t h = 0; h < Hk; ++h) {
          const uint64_t row = (uint64_t(plane) * T + t % T) * Hk + h;
          uint8_t* dst = f.arena.data() + slot * layout.bytes_per_block() +
                         layer * layout.bytes_per_block_layer() + row * D * elem;
          double scale = 1.0;
          if (quantized) {
            scale = layout.dtype == Dtype::kInt8 ? rng.uniform(0.004f, 0.02f) : rng.uniform(0.001f, 0.01f);
            f.scales[slot * kv_scales_per_block(layout) + layer * 2 * T * Hk + row] = float(scale);
            scale = double(float(scale));
          }
          for (uint32_t d = 0; d < D; ++d) {
            double value;
            if (layout.dtype == Dtype::kFp16 || layout.dtype == Dtype::kBf16) {
              const float x = rng.nonzero();
              const uint16_t bits = layout.dtype == Dtype::kFp16 ? float_to_fp16(x) : float_to_bf16(x);
              std::memcpy(dst + 2 * d, &bits, 2);
              value = layout.dtype == Dtype::kFp16 ? fp16_to_float(bits) : bf16_to_float(bits);
            } else if (layout.dtype == Dtype::kInt8) {
              int q = int(rng.below(254)) - 127;  // [-127, 126] without 0
              if (q == 0) q = 127;
              dst[d] = uint8_t(int8_t(q));
              value = q * scale;
            } else {  // fp8 e4m3: any finite non-zero pattern
              uint8_t b;
              do b = uint8_t(rng.below(256)); while ((b & 0x7f) == 0x7f || (b & 0x7f) == 0);
              dst[d] = b;
              value = double(fp8_e4m3_to_float(b)) * scale;
            }
            f.values[s][((uint64_t(plane) * len + t) * Hk + h) * D + d] = value;
          }
        }
      }
    }
  }
  KvArena arena{f.arena.data(), f.num_slots, 0, quantized ? f.scales.data() : nullptr, 0};
  BlockTable table{f.table.data(), f.max_blocks, f.lens.data(), uint32_t(lens.size())};
  auto kv = PagedKv::create(layout, layer, arena, table);
  if (!kv.is_ok()) std::abort();  // fixture bug, not a test outcome
  f.kv = *kv;
  return f;
}

/// Naive float64 softmax attention of one query row against `n` keys; key/value fetchers take
/// (t, d). Writes head_dim outputs.
template <typename KeyAt, typename ValueAt>
void naive_attention_row(const double* q, uint32_t D, uint32_t n, double sm_scale, KeyAt key,
                         ValueAt value, double* out) {
  std::vector<double> s(n);
  double m = -INFINITY;
  for (uint32_t t = 0; t < n; ++t) {
    double dot = 0;
    for (uint32_t d = 0; d < D; ++d) dot += q[d] * key(t, d);
    s[t] = dot * sm_scale;
    m = std::max(m, s[t]);
  }
  double l = 0;
  for (uint32_t t = 0; t < n; ++t) l += (s[t] = std::exp(s[t] - m));
  for (uint32_t d = 0; d < D; ++d) {
    double acc = 0;
    for (uint32_t t = 0; t < n; ++t) acc += s[t] * value(t, d);
    out[d] = n ? acc / l : 0.0;
  }
}

/// Stated tolerances: output rounding of the dtype (one ulp relative) plus float32 arithmetic
/// (1e-4 of the largest |V|, which bounds |out|).
inline double attention_tolerance(Dtype out_dtype, double ref, double vmax) {
  const double rel = out_dtype == Dtype::kFp16 ? 0x1p-10 : 0x1p-7;
  return rel * std::fabs(ref) + 1e-4 * vmax;
}

}  // namespace kvtier::kernels::testing
