/* An engine written in C, built against an installed kvtier with `pkg-config kvtier`: saves a
 * prompt's KV through kvtierd, looks the prompt up, loads it back and compares the bytes.
 * Usage: kvtier_c_consumer SOCKET */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <kvtier/kvtier.h>

#define CHECK(call)                                                                          \
  do {                                                                                       \
    kvtier_status s_ = (call);                                                               \
    if (s_ != KVTIER_OK) {                                                                   \
      fprintf(stderr, "c consumer: %s: %s (%s)\n", #call, kvtier_status_name(s_),            \
              kvtier_last_error());                                                          \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
    return 2;
  }
  kvtier_client* c = NULL;
  CHECK(kvtier_connect(argv[1], 8u << 20, &c));
  const size_t block_tokens = kvtier_block_tokens(c);
  const uint64_t bpb = kvtier_block_bytes(c);
  enum { kBlocks = 3 };
  uint32_t tokens[kBlocks * 64];
  const size_t num_tokens = kBlocks * block_tokens;
  if (num_tokens > sizeof tokens / sizeof tokens[0]) return 1;
  for (size_t i = 0; i < num_tokens; ++i) tokens[i] = (uint32_t)(1000 + i * 7);
  uint32_t ns = 0;
  CHECK(kvtier_open_namespace(c, "install-test-c", "", "", &ns));

  unsigned char* kv = malloc(kBlocks * bpb);
  unsigned char* back = calloc(kBlocks, bpb);
  void* ptrs[kBlocks];
  void* back_ptrs[kBlocks];
  for (size_t i = 0; i < kBlocks * bpb; ++i) kv[i] = (unsigned char)(i * 131 + 17);
  for (size_t b = 0; b < kBlocks; ++b) {
    ptrs[b] = kv + b * bpb;
    back_ptrs[b] = back + b * bpb;
  }
  size_t saved = 0;
  CHECK(kvtier_save(c, ns, tokens, num_tokens, ptrs, kBlocks, 0, 0, KVTIER_PRIORITY_NORMAL, &saved));
  kvtier_match* m = NULL;
  CHECK(kvtier_lookup(c, ns, tokens, num_tokens, &m));
  if (kvtier_match_blocks(m) != kBlocks) {
    fprintf(stderr, "c consumer: matched %zu blocks of %d\n", kvtier_match_blocks(m), kBlocks);
    return 1;
  }
  CHECK(kvtier_load(c, m, back_ptrs, kBlocks, 0));
  kvtier_match_free(c, m);
  const int same = memcmp(kv, back, kBlocks * bpb) == 0;
  kvtier_disconnect(c);
  free(kv);
  free(back);
  if (!same) {
    fprintf(stderr, "c consumer: loaded bytes differ from saved bytes\n");
    return 1;
  }
  printf("c consumer: saved %zu blocks, matched and loaded %d, bytes identical\n", saved, kBlocks);
  return 0;
}
