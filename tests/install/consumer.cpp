// An engine written in C++, built against an installed kvtier with find_package(kvtier): saves a
// prompt's KV through kvtierd, looks the prompt up, loads it back and compares the bytes.
// Usage: kvtier_cxx_consumer SOCKET
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <vector>

#include <kvtier/client.h>

namespace {

int fail(const char* what, const kvtier::Status& s) {
  std::fprintf(stderr, "c++ consumer: %s: %s\n", what, s.to_string().c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
    return 2;
  }
  kvtier::ClientOptions options;
  options.socket_path = argv[1];
  options.window_bytes = 8u << 20;
  options.name = "install-test-c++";
  auto client = kvtier::Client::connect(options);
  if (!client) return fail("connect", client.status());
  kvtier::Client& c = **client;

  const kvtier::KvLayout& layout = c.layout();
  const size_t blocks = 4;
  const uint64_t bpb = layout.bytes_per_block();
  std::vector<kvtier::TokenId> tokens(blocks * layout.block_tokens);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = kvtier::TokenId(5000 + i * 3);
  auto ns = c.open_namespace({.model_id = "install-test-c++"});
  if (!ns) return fail("open_namespace", ns.status());

  std::vector<std::byte> kv(blocks * bpb), back(blocks * bpb);
  for (size_t i = 0; i < kv.size(); ++i) kv[i] = std::byte((i * 29 + 3) & 0xff);
  auto saved = c.save(*ns, tokens, kvtier::KvBuffer::contiguous(kv.data(), blocks, bpb));
  if (!saved) return fail("save", saved.status());

  auto match = c.lookup(*ns, tokens);
  if (!match) return fail("lookup", match.status());
  if (match->blocks.size() != blocks) {
    std::fprintf(stderr, "c++ consumer: matched %zu blocks of %zu\n", match->blocks.size(), blocks);
    return 1;
  }
  auto handle = c.load(*match, kvtier::KvBuffer::contiguous(back.data(), blocks, bpb));
  if (!handle) return fail("load", handle.status());
  if (auto s = handle->wait(); !s) return fail("load wait", s);
  if (auto s = c.release(*match); !s) return fail("release", s);
  if (std::memcmp(kv.data(), back.data(), kv.size()) != 0) {
    std::fprintf(stderr, "c++ consumer: loaded bytes differ from saved bytes\n");
    return 1;
  }
  std::printf("c++ consumer: saved %zu blocks, matched and loaded %zu, bytes identical\n", *saved, blocks);
  return 0;
}
