// KvLayout: the shape and element type of a model's KV cache, and the byte sizes that follow.
//
// Canonical in-tier block layout (DESIGN.md "Blocks"):
//   standard attention: [layer][K|V][token][kv_head][head_dim]
//   MLA (latent) attention: [layer][token][latent_dim]   (one latent vector, no separate V)
// so one layer of one block is contiguous and can be restored on its own.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/export.h"
#include "kvtier/status.h"

namespace kvtier {

enum class Dtype : uint8_t {
  kFp32 = 0,
  kFp16 = 1,
  kBf16 = 2,
  kFp8E4M3 = 3,
  kFp8E5M2 = 4,
  kInt8 = 5,
  kInt4 = 6,  // packed, two elements per byte, low nibble first
};

/// Bits one element occupies (int4: 4).
constexpr uint32_t dtype_bits(Dtype d) noexcept {
  switch (d) {
    case Dtype::kFp32: return 32;
    case Dtype::kFp16:
    case Dtype::kBf16: return 16;
    case Dtype::kFp8E4M3:
    case Dtype::kFp8E5M2:
    case Dtype::kInt8: return 8;
    case Dtype::kInt4: return 4;
  }
  return 0;
}

/// "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4".
KVTIER_API std::string_view dtype_name(Dtype d) noexcept;
/// Accepts the names above and torch spellings ("float16", "bfloat16", "float32",
/// "torch.float16", "float8_e4m3fn", "half", ...).
KVTIER_API Result<Dtype> parse_dtype(std::string_view name);

enum class AttentionKind : uint8_t {
  kStandard = 0,  // separate K and V per kv head (MHA, GQA, MQA)
  kLatent = 1,    // MLA: one compressed latent per token per layer (DeepSeek V2/V3)
};

/// Limits that make a layout "absurd" rather than merely large.
inline constexpr uint32_t kMaxBlockTokens = 4096;
inline constexpr uint32_t kMaxLayers = 1024;
inline constexpr uint32_t kMaxKvHeads = 1024;
inline constexpr uint32_t kMaxHeadDim = 65536;
inline constexpr uint64_t kMaxBlockBytes = 1ull << 31;  // 2 GiB per block

struct KVTIER_API KvLayout {
  AttentionKind kind = AttentionKind::kStandard;
  uint32_t num_layers = 0;      // transformer layers holding KV
  uint32_t num_kv_heads = 0;    // KV heads (GQA/MQA count); 1 for kLatent
  uint32_t head_dim = 0;        // per-head width; for kLatent, the latent width
                                // (kv_lora_rank + qk_rope_head_dim, e.g. 512 + 64 = 576)
  Dtype dtype = Dtype::kBf16;   // element type stored in the tiers
  uint32_t block_tokens = 16;   // tokens per block; 16 matches vLLM and SGLang pages

  /// Standard-attention layout.
  static Result<KvLayout> standard(uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                                   Dtype dtype, uint32_t block_tokens = 16);
  /// MLA layout: one latent vector of `latent_dim` elements per token per layer.
  static Result<KvLayout> latent(uint32_t layers, uint32_t latent_dim, Dtype dtype,
                                 uint32_t block_tokens = 16);

  /// Reads a Hugging Face config.json (text). Uses num_hidden_layers, num_key_value_heads
  /// (default: num_attention_heads), head_dim (default: hidden_size / num_attention_heads),
  /// kv_lora_rank + qk_rope_head_dim for MLA, and torch_dtype (or dtype). A nested
  /// "text_config" (multimodal models) is used when the top level has no layer count.
  /// `dtype_override` replaces the config's dtype (e.g. fp8 KV on a bf16 model).
  static Result<KvLayout> from_hf_config(std::string_view json_text, uint32_t block_tokens = 16,
                                         const Dtype* dtype_override = nullptr);
  static Result<KvLayout> from_hf_config_file(const std::string& path, uint32_t block_tokens = 16,
                                              const Dtype* dtype_override = nullptr);

  /// Ok when every field is in range and the block byte size is whole and bounded.
  Status validate() const;

  /// K and V planes per layer: 2 for standard attention, 1 for latent.
  uint32_t planes() const noexcept { return kind == AttentionKind::kLatent ? 1 : 2; }
  /// Elements of one token in one plane of one layer (kv_heads × head_dim, or latent width).
  uint64_t elements_per_token_plane() const noexcept {
    return uint64_t(kind == AttentionKind::kLatent ? 1 : num_kv_heads) * head_dim;
  }
  /// Bytes of one token across all layers: 2 × layers × kv_heads × head_dim × dtype bytes.
  uint64_t bytes_per_token() const noexcept {
    return uint64_t(planes()) * num_layers * elements_per_token_plane() * dtype_bits(dtype) / 8;
  }
  /// Bytes of one layer of one block (contiguous in the canonical layout).
  uint64_t bytes_per_block_layer() const noexcept {
    return uint64_t(planes()) * block_tokens * elements_per_token_plane() * dtype_bits(dtype) / 8;
  }
  uint64_t bytes_per_block() const noexcept { return bytes_per_block_layer() * num_layers; }
  /// Bytes of a sequence of `tokens` tokens (whole and partial blocks alike).
  uint64_t bytes_for_tokens(uint64_t tokens) const noexcept {
    return bytes_per_token() * tokens;
  }

  /// Stable 64-bit fingerprint of every field; equal layouts, equal fingerprints, across
  /// processes, machines and versions. Bump kLayoutFingerprintVersion if the encoding changes.
  uint64_t fingerprint() const noexcept;
  static constexpr uint32_t kLayoutFingerprintVersion = 1;

  /// "standard L=80 kv_heads=8 head_dim=128 bf16 block_tokens=16 (5.00 MiB/block)".
  std::string describe() const;

  friend bool operator==(const KvLayout&, const KvLayout&) = default;
};

/// Layers [begin, begin + count) of a block; count 0 means every layer from begin on. In a buffer
/// that holds some layers only, each block's layers lie back to back in layer order.
struct LayerRange {
  uint32_t begin = 0;
  uint32_t count = 0;

  /// The number of layers this range covers in a model of `num_layers` (0 when it is outside).
  constexpr uint32_t size(uint32_t num_layers) const noexcept {
    if (begin >= num_layers || count > num_layers - begin) return 0;
    return count == 0 ? num_layers - begin : count;
  }
};

}  // namespace kvtier
