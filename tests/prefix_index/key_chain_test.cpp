// Keys: chained, keyed, stable across processes; salts, models, adapters and layouts separate them.
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "index_fixture.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
std::string run_keys_command(const std::string& args) {
  std::string cmd = std::string(KVTIER_CLI_PATH) + " keys " + args + " 2>&1";
  FILE* pipe = popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof buf, pipe)) out += buf;
  REQUIRE(pclose(pipe) == 0);
  return out;
}
}  // namespace

TEST_CASE("Keys are equal across two processes with the same config") {
  const std::string args = "--secret s3cret --model llama --salt team-a --tokens 1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33";
  std::string first = run_keys_command(args);
  std::string second = run_keys_command(args);
  CHECK(first == second);
  CHECK(first.find("block 1 ") != std::string::npos);   // two full blocks of 16
  CHECK(first.find("block 2 ") == std::string::npos);   // the 1-token tail is never keyed
  // ...and equal to this process's own computation.
  KeyChain chain("s3cret");
  auto ns = chain.make_namespace({"llama", *KvLayout::standard(32, 8, 128, Dtype::kBf16), "team-a", ""});
  REQUIRE(ns.is_ok());
  CHECK(first.find("root " + ns->root.to_hex()) != std::string::npos);
  // Another salt, model or secret gives other keys.
  CHECK(run_keys_command("--secret s3cret --model llama --salt team-b --tokens 1").substr(0, 37) !=
        first.substr(0, 37));
  CHECK(run_keys_command("--secret s3cret --model llama --salt team-a --tokens 1").substr(0, 37) ==
        first.substr(0, 37));  // the same root: the comparisons above see the root line only
  CHECK(run_keys_command("--secret s3cret --model mistral --salt team-a --tokens 1").substr(0, 37) !=
        first.substr(0, 37));
  CHECK(run_keys_command("--secret other --model llama --salt team-a --tokens 1").substr(0, 37) !=
        first.substr(0, 37));
}

TEST_CASE("Root keys separate every namespace field") {
  KeyChain chain("secret");
  auto layout = small_layout();
  auto root = [&](NamespaceSpec spec) { return chain.make_namespace(spec)->root; };
  const BlockKey base = root({"m", layout, "salt", "lora"});
  CHECK(base == root({"m", layout, "salt", "lora"}));
  CHECK(base != root({"m2", layout, "salt", "lora"}));
  CHECK(base != root({"m", layout, "salt2", "lora"}));
  CHECK(base != root({"m", layout, "salt", "lora2"}));
  CHECK(base != root({"m", small_layout(8), "salt", "lora"}));
  CHECK(root({"ab", layout, "c", ""}) != root({"a", layout, "bc", ""}));  // length-prefixed fields
  CHECK(KeyChain("other").make_namespace({"m", layout, "salt", "lora"})->root != base);
  // The weights' revision: another revision never shares a root, and no revision keeps the root
  // it had before revisions existed (a field is added only when given).
  const BlockKey rev_a = root({"m", layout, "salt", "lora", "abc123"});
  CHECK(rev_a != base);
  CHECK(rev_a != root({"m", layout, "salt", "lora", "abc124"}));
  CHECK(rev_a == root({"m", layout, "salt", "lora", "abc123"}));
  CHECK(root({"m", layout, "salt", "", "lora"}) != root({"m", layout, "salt", "lora", ""}));
  CHECK(chain.make_namespace({"", layout, "", ""}).status().code() == StatusCode::kInvalidArgument);
  KvLayout bad = layout;
  bad.block_tokens = 0;
  CHECK(chain.make_namespace({"m", bad, "", ""}).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Chained keys: a block's key depends on its whole prefix, tokens and extras") {
  KeyChain chain("secret");
  auto ns = *chain.make_namespace({"m", small_layout(4), "", ""});
  std::vector<TokenId> a = {1, 2, 3, 4, 5, 6, 7, 8, 9};
  std::vector<TokenId> b = {1, 2, 3, 5, 5, 6, 7, 8};
  std::vector<BlockKey> ka, kb;
  REQUIRE(chain.chain(ns, a, {}, ka).is_ok());
  REQUIRE(chain.chain(ns, b, {}, kb).is_ok());
  REQUIRE(ka.size() == 2);  // 9 tokens: 2 full blocks, the tail is not keyed
  REQUIRE(kb.size() == 2);
  CHECK(ka[0] != kb[0]);
  CHECK(ka[1] != kb[1]);  // same tokens in block 1, different parent
  CHECK(ka[0] == chain.block_key(ns.root, std::span(a).first(4)));

  std::vector<BlockExtra> image = {{1, BlockKey{42, 43}}};
  std::vector<BlockKey> kx;
  REQUIRE(chain.chain(ns, a, image, kx).is_ok());
  CHECK(kx[0] == ka[0]);
  CHECK(kx[1] != ka[1]);
  std::vector<BlockExtra> beyond = {{2, BlockKey{1, 1}}};
  CHECK(chain.chain(ns, a, beyond, kx).code() == StatusCode::kInvalidArgument);
  std::vector<BlockExtra> unsorted = {{1, BlockKey{1, 1}}, {0, BlockKey{1, 1}}};
  CHECK(chain.chain(ns, a, unsorted, kx).code() == StatusCode::kInvalidArgument);

  std::vector<BlockKey> empty;
  REQUIRE(chain.chain(ns, std::vector<TokenId>{}, {}, empty).is_ok());
  CHECK(empty.empty());
}

TEST_CASE("Long blocks hash through the heap path identically") {
  KeyChain chain("secret");
  auto ns = *chain.make_namespace({"m", small_layout(1024), "", ""});
  std::mt19937_64 rng(1);
  auto tokens = random_tokens(rng, 2048);
  std::vector<BlockKey> keys;
  REQUIRE(chain.chain(ns, tokens, {}, keys).is_ok());
  REQUIRE(keys.size() == 2);
  CHECK(keys[1] == chain.block_key(keys[0], std::span(tokens).subspan(1024, 1024)));
}

TEST_CASE("The fast chain equals block-by-block keying for every block size") {
  // chain() keys plain prompts on an unrolled register path (with a fixed-length digest for
  // 16-token blocks); block_key() is the reference definition. They must agree at every block.
  KeyChain chain("secret");
  std::mt19937_64 rng(7);
  for (uint32_t bt : {1u, 15u, 16u, 17u, 64u, 256u}) {
    auto ns = *chain.make_namespace({"m", small_layout(bt), "", ""});
    auto tokens = random_tokens(rng, size_t(bt) * 37 + bt / 2);  // 37 blocks and a partial tail
    std::vector<BlockKey> keys;
    REQUIRE(chain.chain(ns, tokens, {}, keys).is_ok());
    REQUIRE(keys.size() == 37);
    BlockKey parent = ns.root;
    for (size_t b = 0; b < keys.size(); ++b) {
      INFO("block_tokens " << bt << ", block " << b);
      REQUIRE(keys[b] == chain.block_key(parent, std::span(tokens).subspan(b * bt, bt)));
      parent = keys[b];
    }
  }
}
