/* kvtier C API: a kvtierd client for engines written in other languages (C, Rust, Go, Python
 * through ctypes/cffi). Every call returns a kvtier_status (0 = ok; the codes are
 * kvtier::StatusCode's); after a failure kvtier_last_error() describes it. A client may be used
 * from several threads (calls queue); a match belongs to the client that looked it up. No C++
 * exception leaves a kvtier_* call: one that would is KVTIER_INTERNAL, its text in kvtier_last_error(). */
#ifndef KVTIER_KVTIER_H_
#define KVTIER_KVTIER_H_

#include <stddef.h>
#include <stdint.h>

#include "kvtier/export.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kvtier_status {
  KVTIER_OK = 0,
  KVTIER_INVALID_ARGUMENT = 1,
  KVTIER_NOT_FOUND = 2,
  KVTIER_ALREADY_EXISTS = 3,
  KVTIER_LAYOUT_MISMATCH = 4,
  KVTIER_COLLISION = 5,
  KVTIER_BUSY = 6,
  KVTIER_RESOURCE_EXHAUSTED = 7,
  KVTIER_IO_ERROR = 8,
  KVTIER_CHECKSUM_MISMATCH = 9,
  KVTIER_CANCELLED = 10,
  KVTIER_UNAVAILABLE = 11,
  KVTIER_PERMISSION_DENIED = 12,
  KVTIER_PROTOCOL_ERROR = 13,
  KVTIER_INTERNAL = 14
} kvtier_status;

typedef struct kvtier_client kvtier_client;
typedef struct kvtier_match kvtier_match;

/* Priority classes (lower is evicted first). */
enum { KVTIER_PRIORITY_LOW = 0, KVTIER_PRIORITY_NORMAL = 1, KVTIER_PRIORITY_HIGH = 2, KVTIER_PRIORITY_RETAINED = 3 };

/* The last failure's message on this thread ("" when none). Valid until the next call. */
KVTIER_API const char* kvtier_last_error(void);
/* A stable lower-case name for a status, e.g. "permission_denied". */
KVTIER_API const char* kvtier_status_name(kvtier_status status);

/* Connects to kvtierd at socket_path (NULL: the default path) with a shared-memory window of
 * window_bytes (0: 256 MiB). */
KVTIER_API kvtier_status kvtier_connect(const char* socket_path, uint64_t window_bytes, kvtier_client** out);
/* Disconnects; the daemon releases every lease and pin the client still held. NULL is a no-op. */
KVTIER_API void kvtier_disconnect(kvtier_client* client);

/* The daemon's KV layout: canonical block bytes, tokens per block, layers. */
KVTIER_API uint64_t kvtier_block_bytes(const kvtier_client* client);
KVTIER_API uint32_t kvtier_block_tokens(const kvtier_client* client);
KVTIER_API uint32_t kvtier_num_layers(const kvtier_client* client);

/* Resolves a namespace; tenant must be one the client's identity is bound to ("" = default). */
KVTIER_API kvtier_status kvtier_open_namespace(kvtier_client* client, const char* model_id, const char* tenant,
                                    const char* adapter_id, uint32_t* namespace_out);
/* The same, with the model weights' revision (a commit hash or a digest of the weight files; NULL or
 * "" for none) in the namespace's root key: KV of other weights of the same model never matches. */
KVTIER_API kvtier_status kvtier_open_namespace_revision(kvtier_client* client, const char* model_id,
                                                       const char* revision, const char* tenant,
                                                       const char* adapter_id, uint32_t* namespace_out);

/* The same, declaring the engine's prefill speed (tokens per second, finite and >= 0): a lookup in
 * the namespace then offers only the cached prefix that restores faster than the engine would
 * compute it (kvtier_match_held_back_blocks says what it held back). Opening the namespace again
 * declares a new speed; 0 declares nothing (every cached block is offered), as the calls above. */
KVTIER_API kvtier_status kvtier_open_namespace_prefill(kvtier_client* client, const char* model_id,
                                                      const char* revision, const char* tenant,
                                                      const char* adapter_id, double prefill_tokens_per_second,
                                                      uint32_t* namespace_out);

/* The longest cached prefix of tokens, under a lease; free it with kvtier_match_free. */
KVTIER_API kvtier_status kvtier_lookup(kvtier_client* client, uint32_t ns, const uint32_t* tokens, size_t num_tokens,
                            kvtier_match** out);
KVTIER_API uint64_t kvtier_match_tokens(const kvtier_match* match);
KVTIER_API size_t kvtier_match_blocks(const kvtier_match* match);
/* Cached blocks after the match not offered: slower to restore than to recompute at the
 * namespace's declared prefill speed (0 when it declares none). */
KVTIER_API uint32_t kvtier_match_held_back_blocks(const kvtier_match* match);
/* Copies the first num_blocks matched blocks into blocks[i] (canonical layout, block_bytes each;
 * device_memory != 0 for GPU pointers). Returns when every byte is in place. */
KVTIER_API kvtier_status kvtier_load(kvtier_client* client, const kvtier_match* match, void* const* blocks,
                          size_t num_blocks, int device_memory);
/* Releases the match's lease and frees it. NULL is a no-op. */
KVTIER_API void kvtier_match_free(kvtier_client* client, kvtier_match* match);

/* Saves the full blocks of tokens from blocks[0..num_blocks) (block first_block onward; earlier
 * blocks must be cached). *saved_out (may be NULL) receives the blocks newly saved. */
KVTIER_API kvtier_status kvtier_save(kvtier_client* client, uint32_t ns, const uint32_t* tokens, size_t num_tokens,
                          void* const* blocks, size_t num_blocks, size_t first_block, int device_memory,
                          int priority, size_t* saved_out);

/* Hands [base, base + bytes) of this process's GPU memory (cudaMalloc'd, or a tensor inside such
 * an allocation) to kvtierd over CUDA IPC. Loads into and saves from blocks that lie wholly in
 * registered memory then go straight between the daemon's tiers and that memory, with no copy in
 * this process. Register the engine's KV cache once; unregister it before freeing it (the daemon
 * also drops it at disconnect). KVTIER_INVALID_ARGUMENT for memory that cannot be shared (plain
 * host memory), KVTIER_ALREADY_EXISTS for a range overlapping a registered one. */
KVTIER_API kvtier_status kvtier_register_memory(kvtier_client* client, void* base, uint64_t bytes);
KVTIER_API kvtier_status kvtier_unregister_memory(kvtier_client* client, void* base);

/* Pins (with a priority) or unpins the cached prefix of tokens; *count_out receives the blocks. */
KVTIER_API kvtier_status kvtier_pin(kvtier_client* client, uint32_t ns, const uint32_t* tokens, size_t num_tokens,
                         int priority, size_t* count_out);
KVTIER_API kvtier_status kvtier_unpin(kvtier_client* client, uint32_t ns, const uint32_t* tokens, size_t num_tokens,
                           size_t* count_out);

/* Key-addressed objects: bytes named by the engine's own key (key_len 1..1024 bytes, any), kept in
 * namespace ns's tiers like its blocks. A put keeps what is stored already under the key (*stored_out,
 * may be NULL: 1 stored, 0 kept); the object must fit the window laid out (its bytes and an 8-byte
 * length, in whole blocks). A get copies the object into dst and sets *length_out:
 * KVTIER_NOT_FOUND when it is not stored, KVTIER_INVALID_ARGUMENT when dst_bytes is too short. */
KVTIER_API kvtier_status kvtier_object_put(kvtier_client* client, uint32_t ns, const void* key, size_t key_len,
                                           const void* bytes, size_t num_bytes, int priority, int* stored_out);
KVTIER_API kvtier_status kvtier_object_get(kvtier_client* client, uint32_t ns, const void* key, size_t key_len,
                                           void* dst, size_t dst_bytes, size_t* length_out);
/* How many of keys[0..num_keys) (key_lens[i] bytes each), from the first, are stored; the first
 * missing one ends the count. */
KVTIER_API kvtier_status kvtier_object_exists(kvtier_client* client, uint32_t ns, const void* const* keys,
                                              const size_t* key_lens, size_t num_keys, size_t* present_out);
/* Erases the objects named by keys; *removed_out (may be NULL) receives how many were stored. */
KVTIER_API kvtier_status kvtier_object_remove(kvtier_client* client, uint32_t ns, const void* const* keys,
                                              const size_t* key_lens, size_t num_keys, size_t* removed_out);

/* The daemon's metrics in Prometheus text; free the string with kvtier_free_string. */
KVTIER_API kvtier_status kvtier_metrics(kvtier_client* client, char** text_out);
KVTIER_API void kvtier_free_string(char* text);

#ifdef __cplusplus
}
#endif

#endif /* KVTIER_KVTIER_H_ */
