/* The C API used from C: compiled as C so the header stays valid C. Saves a prompt, looks it up,
 * loads it and compares the bytes. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvtier/kvtier.h"

#define CHECK(call)                                                                         \
  do {                                                                                      \
    kvtier_status s_ = (call);                                                              \
    if (s_ != KVTIER_OK) {                                                                  \
      fprintf(stderr, "capi_smoke: %s: %s (%s)\n", #call, kvtier_status_name(s_), kvtier_last_error()); \
      return 1;                                                                             \
    }                                                                                       \
  } while (0)

int capi_smoke(const char* socket_path, const unsigned* tokens, size_t num_tokens) {
  kvtier_client* c = NULL;
  CHECK(kvtier_connect(socket_path, 1u << 20, &c));
  const uint64_t bpb = kvtier_block_bytes(c);
  const size_t blocks = num_tokens / kvtier_block_tokens(c);
  uint32_t ns = 0;
  CHECK(kvtier_open_namespace(c, "c-model", "", "", &ns));
  unsigned char* kv = malloc(blocks * bpb);
  unsigned char* back = calloc(blocks, bpb);
  void** ptrs = malloc(blocks * sizeof(void*));
  void** back_ptrs = malloc(blocks * sizeof(void*));
  for (size_t i = 0; i < blocks * bpb; ++i) kv[i] = (unsigned char)(i * 31 + 7);
  for (size_t b = 0; b < blocks; ++b) {
    ptrs[b] = kv + b * bpb;
    back_ptrs[b] = back + b * bpb;
  }
  size_t saved = 0;
  CHECK(kvtier_save(c, ns, tokens, num_tokens, ptrs, blocks, 0, 0, KVTIER_PRIORITY_NORMAL, &saved));
  kvtier_match* m = NULL;
  CHECK(kvtier_lookup(c, ns, tokens, num_tokens, &m));
  if (kvtier_match_blocks(m) != blocks) {
    fprintf(stderr, "capi_smoke: matched %zu blocks, expected %zu\n", kvtier_match_blocks(m), blocks);
    return 1;
  }
  CHECK(kvtier_load(c, m, back_ptrs, blocks, 0));
  kvtier_match_free(c, m);
  /* Restore or recompute: an engine declared faster than any restore is offered nothing, and
   * told what was held back; declaring 0 again offers everything; a negative speed is refused. */
  uint32_t fast = 0;
  CHECK(kvtier_open_namespace_prefill(c, "c-model", "", "", "", 1e15, &fast));
  CHECK(kvtier_lookup(c, fast, tokens, num_tokens, &m));
  if (fast != ns || kvtier_match_blocks(m) != 0 || kvtier_match_held_back_blocks(m) != blocks) {
    fprintf(stderr, "capi_smoke: a 1e15 tokens/s engine was offered %zu blocks, %u held back\n",
            kvtier_match_blocks(m), kvtier_match_held_back_blocks(m));
    return 1;
  }
  kvtier_match_free(c, m);
  CHECK(kvtier_open_namespace_prefill(c, "c-model", "", "", "", 0.0, &fast));
  CHECK(kvtier_lookup(c, fast, tokens, num_tokens, &m));
  if (kvtier_match_blocks(m) != blocks || kvtier_match_held_back_blocks(m) != 0) {
    fprintf(stderr, "capi_smoke: declaring 0 again did not offer every block\n");
    return 1;
  }
  kvtier_match_free(c, m);
  if (kvtier_open_namespace_prefill(c, "c-model", "", "", "", -1.0, &fast) != KVTIER_INVALID_ARGUMENT) {
    fprintf(stderr, "capi_smoke: a negative prefill speed was not refused\n");
    return 1;
  }
  /* Another revision of the same model is another namespace: nothing saved above matches there. */
  uint32_t other_rev = 0;
  CHECK(kvtier_open_namespace_revision(c, "c-model", "rev-2", "", "", &other_rev));
  CHECK(kvtier_lookup(c, other_rev, tokens, num_tokens, &m));
  if (other_rev == ns || kvtier_match_blocks(m) != 0) {
    fprintf(stderr, "capi_smoke: another revision matched %zu blocks\n", kvtier_match_blocks(m));
    return 1;
  }
  kvtier_match_free(c, m);
  if (memcmp(kv, back, blocks * bpb) != 0) {
    fprintf(stderr, "capi_smoke: loaded bytes differ\n");
    return 1;
  }
  /* Bad input is an error with a message, not a crash. */
  if (kvtier_open_namespace(c, NULL, "", "", &ns) != KVTIER_INVALID_ARGUMENT || kvtier_last_error()[0] == 0) {
    fprintf(stderr, "capi_smoke: a NULL model id was not refused\n");
    return 1;
  }
  /* Plain host memory cannot be handed to the daemon: refused with a reason, the client serves on. */
  if (kvtier_register_memory(c, kv, blocks * bpb) != KVTIER_INVALID_ARGUMENT || kvtier_last_error()[0] == 0) {
    fprintf(stderr, "capi_smoke: registering malloc'd memory was not refused\n");
    return 1;
  }
  if (kvtier_unregister_memory(c, kv) != KVTIER_NOT_FOUND) {
    fprintf(stderr, "capi_smoke: unregistering what was never registered was not refused\n");
    return 1;
  }
  char* text = NULL;
  CHECK(kvtier_metrics(c, &text));
  int has = strstr(text, "kvtierd_requests_total") != NULL;
  kvtier_free_string(text);
  kvtier_disconnect(c);
  free(kv);
  free(back);
  free(ptrs);
  free(back_ptrs);
  if (!has) {
    fprintf(stderr, "capi_smoke: metrics lack kvtierd_requests_total\n");
    return 1;
  }
  return saved == blocks ? 0 : 1;
}
