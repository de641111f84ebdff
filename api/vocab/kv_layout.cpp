#include "kvtier/kv_layout.h"

#include <xxhash.h>

#include <array>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace kvtier {

std::string_view dtype_name(Dtype d) noexcept {
  switch (d) {
    case Dtype::kFp32: return "fp32";
    case Dtype::kFp16: return "fp16";
    case Dtype::kBf16: return "bf16";
    case Dtype::kFp8E4M3: return "fp8_e4m3";
    case Dtype::kFp8E5M2: return "fp8_e5m2";
    case Dtype::kInt8: return "int8";
    case Dtype::kInt4: return "int4";
  }
  return "unknown";
}

Result<Dtype> parse_dtype(std::string_view name) {
  std::string n;
  for (char c : name) n.push_back(static_cast<char>(std::tolower(static_cast<unsigned char>(c))));
  if (n.rfind("torch.", 0) == 0) n.erase(0, 6);
  if (n == "fp32" || n == "float32" || n == "float") return Dtype::kFp32;
  if (n == "fp16" || n == "float16" || n == "half") return Dtype::kFp16;
  if (n == "bf16" || n == "bfloat16") return Dtype::kBf16;
  if (n == "fp8_e4m3" || n == "fp8" || n == "float8_e4m3fn" || n == "e4m3") return Dtype::kFp8E4M3;
  if (n == "fp8_e5m2" || n == "float8_e5m2" || n == "e5m2") return Dtype::kFp8E5M2;
  if (n == "int8") return Dtype::kInt8;
  if (n == "int4") return Dtype::kInt4;
  return invalid_argument("unknown dtype '" + std::string(name) +
                          "' (expected fp32, fp16, bf16, fp8_e4m3, fp8_e5m2, int8 or int4)");
}

Result<KvLayout> KvLayout::standard(uint32_t layers, uint32_t kv_heads, uint32_t head_dim,
                                    Dtype dtype, uint32_t block_tokens) {
  KvLayout l;
  l.kind = AttentionKind::kStandard;
  l.num_layers = layers;
  l.num_kv_heads = kv_heads;
  l.head_dim = head_dim;
  l.dtype = dtype;
  l.block_tokens = block_tokens;
  KVTIER_RETURN_IF_ERROR(l.validate());
  return l;
}

Result<KvLayout> KvLayout::latent(uint32_t layers, uint32_t latent_dim, Dtype dtype,
                                  uint32_t block_tokens) {
  KvLayout l;
  l.kind = AttentionKind::kLatent;
  l.num_layers = layers;
  l.num_kv_heads = 1;
  l.head_dim = latent_dim;
  l.dtype = dtype;
  l.block_tokens = block_tokens;
  KVTIER_RETURN_IF_ERROR(l.validate());
  return l;
}

Status KvLayout::validate() const {
  auto range = [](const char* what, uint64_t v, uint64_t max) -> Status {
    if (v == 0 || v > max) {
      return invalid_argument(std::string(what) + " must be in [1, " + std::to_string(max) +
                              "], got " + std::to_string(v));
    }
    return Status::ok();
  };
  if (kind != AttentionKind::kStandard && kind != AttentionKind::kLatent) {
    return invalid_argument("unknown attention kind");
  }
  if (dtype_bits(dtype) == 0) return invalid_argument("unknown dtype");
  KVTIER_RETURN_IF_ERROR(range("block_tokens", block_tokens, kMaxBlockTokens));
  KVTIER_RETURN_IF_ERROR(range("num_layers", num_layers, kMaxLayers));
  KVTIER_RETURN_IF_ERROR(range("num_kv_heads", num_kv_heads, kMaxKvHeads));
  KVTIER_RETURN_IF_ERROR(range("head_dim", head_dim, kMaxHeadDim));
  if (kind == AttentionKind::kLatent && num_kv_heads != 1) {
    return invalid_argument("latent (MLA) layouts have exactly one kv head");
  }
  if ((elements_per_token_plane() * dtype_bits(dtype)) % 8 != 0) {
    return invalid_argument("int4 layouts need an even number of elements per token");
  }
  uint64_t block_bytes = uint64_t(planes()) * num_layers * block_tokens *
                         elements_per_token_plane() * dtype_bits(dtype) / 8;
  if (block_bytes > kMaxBlockBytes) {
    return invalid_argument("one block would hold " + std::to_string(block_bytes) +
                            " bytes, more than the 2 GiB limit; use fewer block_tokens");
  }
  return Status::ok();
}

uint64_t KvLayout::fingerprint() const noexcept {
  // Fixed-width little-endian encoding so the value is identical on every build.
  std::array<uint8_t, 4 * 7> buf{};
  const uint32_t fields[7] = {kLayoutFingerprintVersion, static_cast<uint32_t>(kind), num_layers,
                              num_kv_heads, head_dim, static_cast<uint32_t>(dtype), block_tokens};
  for (int f = 0; f < 7; ++f) {
    for (int b = 0; b < 4; ++b) buf[f * 4 + b] = static_cast<uint8_t>(fields[f] >> (8 * b));
  }
  return XXH3_64bits(buf.data(), buf.size());
}

std::string KvLayout::describe() const {
  char out[256];
  if (kind == AttentionKind::kLatent) {
    std::snprintf(out, sizeof out, "latent layers=%u latent_dim=%u %s block_tokens=%u (%.2f MiB/block)",
                  num_layers, head_dim, std::string(dtype_name(dtype)).c_str(), block_tokens,
                  bytes_per_block() / 1048576.0);
  } else {
    std::snprintf(out, sizeof out,
                  "standard layers=%u kv_heads=%u head_dim=%u %s block_tokens=%u (%.2f MiB/block)",
                  num_layers, num_kv_heads, head_dim, std::string(dtype_name(dtype)).c_str(),
                  block_tokens, bytes_per_block() / 1048576.0);
  }
  return out;
}

namespace {

using nlohmann::json;

Result<uint32_t> positive_field(const json& cfg, const char* name) {
  auto it = cfg.find(name);
  if (it == cfg.end() || it->is_null()) return not_found(std::string("config has no ") + name);
  if (!it->is_number_integer() || it->get<int64_t>() <= 0 || it->get<int64_t>() > UINT32_MAX) {
    return invalid_argument(std::string("config field ") + name + " must be a positive integer");
  }
  return static_cast<uint32_t>(it->get<int64_t>());
}

}  // namespace

Result<KvLayout> KvLayout::from_hf_config(std::string_view json_text, uint32_t block_tokens,
                                          const Dtype* dtype_override) {
  json root = json::parse(json_text.begin(), json_text.end(), nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded() || !root.is_object()) {
    return invalid_argument("config.json is not a JSON object");
  }
  const json* cfg = &root;
  if (!root.contains("num_hidden_layers") && root.contains("text_config") &&
      root["text_config"].is_object()) {
    cfg = &root["text_config"];
  }

  auto layers = positive_field(*cfg, "num_hidden_layers");
  if (!layers) return layers.status();

  Dtype dtype = Dtype::kBf16;
  if (dtype_override) {
    dtype = *dtype_override;
  } else {
    const json* d = nullptr;
    for (const json* c : {cfg, static_cast<const json*>(&root)}) {
      for (const char* k : {"torch_dtype", "dtype"}) {
        if (!d && c->contains(k) && (*c)[k].is_string()) d = &(*c)[k];
      }
    }
    if (d) {
      auto parsed = parse_dtype(d->get<std::string>());
      if (!parsed) return parsed.status();
      dtype = *parsed;
    }
  }

  if (cfg->contains("kv_lora_rank") && !(*cfg)["kv_lora_rank"].is_null()) {
    auto rank = positive_field(*cfg, "kv_lora_rank");
    if (!rank) return rank.status();
    auto rope = positive_field(*cfg, "qk_rope_head_dim");
    if (!rope) return rope.status();
    return latent(*layers, *rank + *rope, dtype, block_tokens);
  }

  auto attn_heads = positive_field(*cfg, "num_attention_heads");
  if (!attn_heads) return attn_heads.status();
  auto kv_heads = positive_field(*cfg, "num_key_value_heads");
  uint32_t kv = kv_heads ? *kv_heads : *attn_heads;
  if (!kv_heads && kv_heads.status().code() != StatusCode::kNotFound) return kv_heads.status();

  auto head_dim = positive_field(*cfg, "head_dim");
  uint32_t hd = 0;
  if (head_dim) {
    hd = *head_dim;
  } else {
    if (head_dim.status().code() != StatusCode::kNotFound) return head_dim.status();
    auto hidden = positive_field(*cfg, "hidden_size");
    if (!hidden) return hidden.status();
    if (*hidden % *attn_heads != 0) {
      return invalid_argument("hidden_size is not a multiple of num_attention_heads");
    }
    hd = *hidden / *attn_heads;
  }
  return standard(*layers, kv, hd, dtype, block_tokens);
}

Result<KvLayout> KvLayout::from_hf_config_file(const std::string& path, uint32_t block_tokens,
                                               const Dtype* dtype_override) {
  std::ifstream in(path);
  if (!in) return not_found("cannot open config file " + path);
  std::stringstream text;
  text << in.rdbuf();
  return from_hf_config(text.str(), block_tokens, dtype_override);
}

}  // namespace kvtier
