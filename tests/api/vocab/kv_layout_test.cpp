// KvLayout: byte sizes follow 2 × layers × kv_heads × head_dim × tokens × dtype bytes; configs
// from Hugging Face parse; absurd layouts are refused with a clear error.
#include <catch2/catch.hpp>

#include "kvtier/kv_layout.h"

using namespace kvtier;

TEST_CASE("Llama-3-70B at 8K tokens in bf16 is about 2.7 GB") {
  auto l = KvLayout::standard(80, 8, 128, Dtype::kBf16);
  REQUIRE(l.is_ok());
  CHECK(l->bytes_for_tokens(8192) == 2ull * 80 * 8 * 128 * 8192 * 2);
  CHECK(l->bytes_for_tokens(8192) == 2684354560ull);
  CHECK(l->bytes_per_block() == 2ull * 80 * 8 * 128 * 16 * 2);
  CHECK(l->bytes_per_block_layer() * 80 == l->bytes_per_block());
}

TEST_CASE("Byte sizes for every dtype, int4 packed") {
  struct Case { Dtype d; uint64_t bytes_per_token; };
  for (auto c : {Case{Dtype::kFp32, 2 * 4 * 2 * 64 * 4}, Case{Dtype::kFp16, 2 * 4 * 2 * 64 * 2},
                 Case{Dtype::kBf16, 2 * 4 * 2 * 64 * 2}, Case{Dtype::kFp8E4M3, 2 * 4 * 2 * 64},
                 Case{Dtype::kFp8E5M2, 2 * 4 * 2 * 64}, Case{Dtype::kInt8, 2 * 4 * 2 * 64},
                 Case{Dtype::kInt4, 2 * 4 * 2 * 64 / 2}}) {
    auto l = KvLayout::standard(4, 2, 64, c.d);
    REQUIRE(l.is_ok());
    CHECK(l->bytes_per_token() == c.bytes_per_token);
  }
  CHECK(KvLayout::standard(4, 1, 63, Dtype::kInt4).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Absurd layouts are refused with a clear error") {
  auto zero = KvLayout::standard(32, 8, 128, Dtype::kBf16, 0);
  REQUIRE_FALSE(zero.is_ok());
  CHECK(zero.status().code() == StatusCode::kInvalidArgument);
  CHECK(std::string(zero.status().message()).find("block_tokens") != std::string::npos);
  CHECK_FALSE(KvLayout::standard(32, 8, 128, Dtype::kBf16, 1u << 20).is_ok());
  CHECK_FALSE(KvLayout::standard(0, 8, 128, Dtype::kBf16).is_ok());
  CHECK_FALSE(KvLayout::standard(32, 0, 128, Dtype::kBf16).is_ok());
  CHECK_FALSE(KvLayout::standard(1024, 1024, 4096, Dtype::kFp32, 4096).is_ok());  // > 2 GiB/block
}

TEST_CASE("Fingerprint is stable and separates every field") {
  auto a = *KvLayout::standard(32, 8, 128, Dtype::kBf16);
  auto b = *KvLayout::standard(32, 8, 128, Dtype::kBf16);
  CHECK(a.fingerprint() == b.fingerprint());
  // Pinned value: a changed encoding must bump kLayoutFingerprintVersion knowingly.
  CHECK(a.fingerprint() == 0xdb254ee5c3c91077ull);
  CHECK(a.fingerprint() != KvLayout::standard(32, 8, 128, Dtype::kFp16)->fingerprint());
  CHECK(a.fingerprint() != KvLayout::standard(32, 8, 128, Dtype::kBf16, 32)->fingerprint());
  CHECK(a.fingerprint() != KvLayout::standard(32, 8, 64, Dtype::kBf16)->fingerprint());
  CHECK(a.fingerprint() != KvLayout::standard(32, 4, 128, Dtype::kBf16)->fingerprint());
  CHECK(a.fingerprint() != KvLayout::standard(31, 8, 128, Dtype::kBf16)->fingerprint());
  CHECK(KvLayout::latent(32, 1024, Dtype::kBf16)->fingerprint() !=
        KvLayout::standard(32, 1, 1024, Dtype::kBf16)->fingerprint());
}

TEST_CASE("Layouts from Hugging Face config.json") {
  SECTION("Llama-3-70B: GQA with num_key_value_heads") {
    auto l = KvLayout::from_hf_config(R"({"num_hidden_layers": 80, "num_attention_heads": 64,
      "num_key_value_heads": 8, "hidden_size": 8192, "torch_dtype": "bfloat16"})");
    REQUIRE(l.is_ok());
    CHECK(l->num_layers == 80);
    CHECK(l->num_kv_heads == 8);
    CHECK(l->head_dim == 128);
    CHECK(l->dtype == Dtype::kBf16);
    CHECK(l->bytes_for_tokens(8192) == 2684354560ull);
  }
  SECTION("explicit head_dim wins over hidden_size / heads (Gemma)") {
    auto l = KvLayout::from_hf_config(R"({"num_hidden_layers": 28, "num_attention_heads": 16,
      "num_key_value_heads": 16, "hidden_size": 3072, "head_dim": 256, "torch_dtype": "float16"})");
    REQUIRE(l.is_ok());
    CHECK(l->head_dim == 256);
    CHECK(l->dtype == Dtype::kFp16);
  }
  SECTION("MHA without num_key_value_heads") {
    auto l = KvLayout::from_hf_config(
        R"({"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768})");
    REQUIRE(l.is_ok());
    CHECK(l->num_kv_heads == 12);
    CHECK(l->head_dim == 64);
  }
  SECTION("DeepSeek-V3 MLA: latent of kv_lora_rank + qk_rope_head_dim") {
    auto l = KvLayout::from_hf_config(R"({"num_hidden_layers": 61, "num_attention_heads": 128,
      "num_key_value_heads": 128, "hidden_size": 7168, "kv_lora_rank": 512,
      "qk_rope_head_dim": 64, "torch_dtype": "bfloat16"})");
    REQUIRE(l.is_ok());
    CHECK(l->kind == AttentionKind::kLatent);
    CHECK(l->head_dim == 576);
    CHECK(l->bytes_per_token() == 61ull * 576 * 2);
  }
  SECTION("multimodal text_config and a dtype override") {
    Dtype fp8 = Dtype::kFp8E4M3;
    auto l = KvLayout::from_hf_config(R"({"model_type": "llava", "text_config":
      {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
       "hidden_size": 4096}, "torch_dtype": "float16"})", 32, &fp8);
    REQUIRE(l.is_ok());
    CHECK(l->num_layers == 32);
    CHECK(l->dtype == Dtype::kFp8E4M3);
    CHECK(l->block_tokens == 32);
  }
  SECTION("bad configs give clear errors") {
    CHECK(KvLayout::from_hf_config("not json").status().code() == StatusCode::kInvalidArgument);
    CHECK(KvLayout::from_hf_config("{}").status().code() == StatusCode::kNotFound);
    CHECK(KvLayout::from_hf_config(R"({"num_hidden_layers": -3})").status().code() ==
          StatusCode::kInvalidArgument);
    CHECK(KvLayout::from_hf_config(R"({"num_hidden_layers": 2, "num_attention_heads": 3,
      "hidden_size": 100})").status().code() == StatusCode::kInvalidArgument);
    CHECK(KvLayout::from_hf_config(R"({"num_hidden_layers": 2, "num_attention_heads": 2,
      "hidden_size": 128, "torch_dtype": "complex64"})").status().code() ==
          StatusCode::kInvalidArgument);
    CHECK(KvLayout::from_hf_config_file("/nonexistent/config.json").status().code() ==
          StatusCode::kNotFound);
  }
}
