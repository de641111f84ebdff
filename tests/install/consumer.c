/* An engine written in C, built against an installed kvtier with `pkg-config kvtier`: the C API
 * smoke test the service tests run (tests/api/capi_smoke.c: save a prompt's KV through kvtierd,
 * look it up, load it back, compare the bytes, then bad input refused with a reason), here against
 * the installed library and daemon. Usage: kvtier_c_consumer SOCKET */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

int capi_smoke(const char* socket_path, const unsigned* tokens, size_t num_tokens);

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
    return 2;
  }
  enum { kTokens = 3 * 16 };  /* three blocks of the default 16 tokens */
  unsigned tokens[kTokens];
  for (size_t i = 0; i < kTokens; ++i) tokens[i] = (unsigned)(1000 + i * 7);
  const int rc = capi_smoke(argv[1], tokens, kTokens);
  if (rc == 0) printf("c consumer: saved, matched and loaded 3 blocks, bytes identical\n");
  return rc;
}
