// The C API (api/include/kvtier/kvtier.h) over kvtier::Client.
#include "kvtier/kvtier.h"

#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/client.h"

struct kvtier_client {
  std::unique_ptr<kvtier::Client> client;
};
struct kvtier_match {
  kvtier::Match match;
};

// kvtier_status is StatusCode, code for code: a C caller's switch sees the same values.
#define KVTIER_SAME_CODE(c, k) static_assert(static_cast<int>(c) == static_cast<int>(kvtier::StatusCode::k), #c)
KVTIER_SAME_CODE(KVTIER_OK, kOk);
KVTIER_SAME_CODE(KVTIER_INVALID_ARGUMENT, kInvalidArgument);
KVTIER_SAME_CODE(KVTIER_NOT_FOUND, kNotFound);
KVTIER_SAME_CODE(KVTIER_ALREADY_EXISTS, kAlreadyExists);
KVTIER_SAME_CODE(KVTIER_LAYOUT_MISMATCH, kLayoutMismatch);
KVTIER_SAME_CODE(KVTIER_COLLISION, kCollision);
KVTIER_SAME_CODE(KVTIER_BUSY, kBusy);
KVTIER_SAME_CODE(KVTIER_RESOURCE_EXHAUSTED, kResourceExhausted);
KVTIER_SAME_CODE(KVTIER_IO_ERROR, kIoError);
KVTIER_SAME_CODE(KVTIER_CHECKSUM_MISMATCH, kChecksumMismatch);
KVTIER_SAME_CODE(KVTIER_CANCELLED, kCancelled);
KVTIER_SAME_CODE(KVTIER_UNAVAILABLE, kUnavailable);
KVTIER_SAME_CODE(KVTIER_PERMISSION_DENIED, kPermissionDenied);
KVTIER_SAME_CODE(KVTIER_PROTOCOL_ERROR, kProtocolError);
KVTIER_SAME_CODE(KVTIER_INTERNAL, kInternal);
#undef KVTIER_SAME_CODE

namespace {

thread_local std::string g_last_error;

kvtier_status fail(const kvtier::Status& s) {
  g_last_error = s.to_string();
  return static_cast<kvtier_status>(s.code());
}
kvtier_status ok() {
  g_last_error.clear();
  return KVTIER_OK;
}
kvtier_status bad(const char* what) {
  return fail(kvtier::invalid_argument(what));
}
/// Runs a call's body with nothing thrown past the C edge: an exception (std::bad_alloc, or a bug)
/// becomes KVTIER_INTERNAL with its text in kvtier_last_error.
template <class Body>
kvtier_status guarded(Body&& body) noexcept {
  try {
    return body();
  } catch (const std::exception& e) {
    return fail(kvtier::internal_error(std::string("exception at the C API: ") + e.what()));
  } catch (...) {
    return fail(kvtier::internal_error("exception at the C API"));
  }
}

std::span<const kvtier::TokenId> token_span(const uint32_t* tokens, size_t n) { return {tokens, tokens ? n : 0}; }

kvtier::KvBuffer buffer(void* const* blocks, size_t n, int device_memory) {
  return kvtier::KvBuffer::canonical(
      std::span<std::byte* const>(reinterpret_cast<std::byte* const*>(blocks), blocks ? n : 0),
      device_memory ? kvtier::LocationKind::kDevice : kvtier::LocationKind::kHost);
}

}  // namespace

extern "C" {

const char* kvtier_last_error(void) { return g_last_error.c_str(); }

const char* kvtier_status_name(kvtier_status status) {
  if (status < KVTIER_OK || status > KVTIER_INTERNAL) return "unknown";
  // status_code_name returns views of string literals: NUL-terminated.
  return kvtier::status_code_name(static_cast<kvtier::StatusCode>(status)).data();
}

kvtier_status kvtier_connect(const char* socket_path, uint64_t window_bytes, kvtier_client** out) {
  return guarded([&]() -> kvtier_status {
    if (!out) return bad("out is NULL");
    *out = nullptr;
    kvtier::ClientOptions o;
    if (socket_path) o.socket_path = socket_path;
    if (window_bytes) o.window_bytes = window_bytes;
    o.name = "kvtier-c";
    auto c = kvtier::Client::connect(std::move(o));
    if (!c) return fail(c.status());
    *out = new (std::nothrow) kvtier_client{std::move(*c)};
    if (!*out) return fail(kvtier::Status(kvtier::StatusCode::kResourceExhausted, "out of memory"));
    return ok();
  });
}

void kvtier_disconnect(kvtier_client* client) {
  guarded([&] {
    delete client;
    return KVTIER_OK;
  });
}

uint64_t kvtier_block_bytes(const kvtier_client* c) { return c ? c->client->layout().bytes_per_block() : 0; }
uint32_t kvtier_block_tokens(const kvtier_client* c) { return c ? c->client->layout().block_tokens : 0; }
uint32_t kvtier_num_layers(const kvtier_client* c) { return c ? c->client->layout().num_layers : 0; }

kvtier_status kvtier_open_namespace(kvtier_client* c, const char* model_id, const char* tenant, const char* adapter_id,
                                    uint32_t* namespace_out) {
  return kvtier_open_namespace_revision(c, model_id, "", tenant, adapter_id, namespace_out);
}

kvtier_status kvtier_open_namespace_revision(kvtier_client* c, const char* model_id, const char* revision,
                                             const char* tenant, const char* adapter_id, uint32_t* namespace_out) {
  return kvtier_open_namespace_prefill(c, model_id, revision, tenant, adapter_id, 0.0, namespace_out);
}

kvtier_status kvtier_open_namespace_prefill(kvtier_client* c, const char* model_id, const char* revision,
                                            const char* tenant, const char* adapter_id, double prefill_tokens_per_second,
                                            uint32_t* namespace_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || !model_id || !namespace_out) return bad("client, model_id and namespace_out are required");
    auto id = c->client->open_namespace({.model_id = model_id,
                                         .tenant = tenant ? tenant : "",
                                         .adapter_id = adapter_id ? adapter_id : "",
                                         .revision = revision ? revision : "",
                                         .prefill_tokens_per_second = prefill_tokens_per_second});
    if (!id) return fail(id.status());
    *namespace_out = *id;
    return ok();
  });
}

kvtier_status kvtier_lookup(kvtier_client* c, uint32_t ns, const uint32_t* tokens, size_t n, kvtier_match** out) {
  return guarded([&]() -> kvtier_status {
    if (!c || !out || (!tokens && n)) return bad("client, tokens and out are required");
    *out = nullptr;
    auto m = c->client->lookup(ns, token_span(tokens, n));
    if (!m) return fail(m.status());
    *out = new (std::nothrow) kvtier_match{std::move(*m)};
    if (!*out) return fail(kvtier::Status(kvtier::StatusCode::kResourceExhausted, "out of memory"));
    return ok();
  });
}

uint64_t kvtier_match_tokens(const kvtier_match* m) { return m ? m->match.tokens : 0; }
size_t kvtier_match_blocks(const kvtier_match* m) { return m ? m->match.blocks.size() : 0; }
uint32_t kvtier_match_held_back_blocks(const kvtier_match* m) { return m ? m->match.held_back_blocks : 0; }

kvtier_status kvtier_load(kvtier_client* c, const kvtier_match* m, void* const* blocks, size_t n, int device_memory) {
  return guarded([&]() -> kvtier_status {
    if (!c || !m || (!blocks && n)) return bad("client, match and blocks are required");
    auto h = c->client->load(m->match, buffer(blocks, n, device_memory));
    if (!h) return fail(h.status());
    if (kvtier::Status s = h->wait(); !s) return fail(s);
    return ok();
  });
}

void kvtier_match_free(kvtier_client* c, kvtier_match* m) {
  if (!m) return;
  guarded([&] {
    if (c) c->client->release(m->match).ignore();
    return KVTIER_OK;
  });
  delete m;
}

kvtier_status kvtier_save(kvtier_client* c, uint32_t ns, const uint32_t* tokens, size_t n, void* const* blocks,
                          size_t num_blocks, size_t first_block, int device_memory, int priority, size_t* saved_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || (!tokens && n) || (!blocks && num_blocks)) return bad("client, tokens and blocks are required");
    if (priority < 0 || priority >= kvtier::kNumPriorities) return bad("priority must be 0..3");
    auto r = c->client->save(ns, token_span(tokens, n), buffer(blocks, num_blocks, device_memory),
                             static_cast<kvtier::Priority>(priority), {}, first_block);
    if (!r) return fail(r.status());
    if (saved_out) *saved_out = *r;
    return ok();
  });
}

kvtier_status kvtier_register_memory(kvtier_client* c, void* base, uint64_t bytes) {
  return guarded([&]() -> kvtier_status {
    if (!c || !base || bytes == 0) return bad("client, base and bytes are required");
    if (kvtier::Status s = c->client->register_memory(base, bytes); !s) return fail(s);
    return ok();
  });
}

kvtier_status kvtier_unregister_memory(kvtier_client* c, void* base) {
  return guarded([&]() -> kvtier_status {
    if (!c || !base) return bad("client and base are required");
    if (kvtier::Status s = c->client->unregister_memory(base); !s) return fail(s);
    return ok();
  });
}

kvtier_status kvtier_pin(kvtier_client* c, uint32_t ns, const uint32_t* tokens, size_t n, int priority, size_t* count_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || (!tokens && n)) return bad("client and tokens are required");
    if (priority < 0 || priority >= kvtier::kNumPriorities) return bad("priority must be 0..3");
    auto r = c->client->pin(ns, token_span(tokens, n), static_cast<kvtier::Priority>(priority));
    if (!r) return fail(r.status());
    if (count_out) *count_out = *r;
    return ok();
  });
}

namespace {
std::string_view bytes_view(const void* p, size_t n) { return {static_cast<const char*>(p), n}; }

kvtier::Result<std::vector<std::string>> object_keys(const void* const* keys, const size_t* lens, size_t n) {
  if (n && (!keys || !lens)) return kvtier::invalid_argument("keys and their lengths are required");
  std::vector<std::string> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (!keys[i] && lens[i]) return kvtier::invalid_argument("key " + std::to_string(i) + " is NULL");
    out.emplace_back(bytes_view(keys[i], lens[i]));
  }
  return out;
}
}  // namespace

kvtier_status kvtier_object_put(kvtier_client* c, uint32_t ns, const void* key, size_t key_len, const void* bytes,
                                size_t num_bytes, int priority, int* stored_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || (!key && key_len) || (!bytes && num_bytes)) return bad("client, key and bytes are required");
    if (priority < 0 || priority >= kvtier::kNumPriorities) return bad("priority must be 0..3");
    auto r = c->client->object_put(ns, bytes_view(key, key_len),
                                   {static_cast<const std::byte*>(bytes), num_bytes},
                                   static_cast<kvtier::Priority>(priority));
    if (!r) return fail(r.status());
    if (stored_out) *stored_out = *r ? 1 : 0;
    return ok();
  });
}

kvtier_status kvtier_object_get(kvtier_client* c, uint32_t ns, const void* key, size_t key_len, void* dst,
                                size_t dst_bytes, size_t* length_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || (!key && key_len) || (!dst && dst_bytes) || !length_out) {
      return bad("client, key, dst and length_out are required");
    }
    auto r = c->client->object_get(ns, bytes_view(key, key_len), {static_cast<std::byte*>(dst), dst_bytes});
    if (!r) return fail(r.status());
    *length_out = *r;
    return ok();
  });
}

kvtier_status kvtier_object_exists(kvtier_client* c, uint32_t ns, const void* const* keys, const size_t* key_lens,
                                   size_t num_keys, size_t* present_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || !present_out) return bad("client and present_out are required");
    auto k = object_keys(keys, key_lens, num_keys);
    if (!k) return fail(k.status());
    auto r = c->client->object_exists(ns, *k);
    if (!r) return fail(r.status());
    *present_out = *r;
    return ok();
  });
}

kvtier_status kvtier_object_remove(kvtier_client* c, uint32_t ns, const void* const* keys, const size_t* key_lens,
                                   size_t num_keys, size_t* removed_out) {
  return guarded([&]() -> kvtier_status {
    if (!c) return bad("a client is required");
    auto k = object_keys(keys, key_lens, num_keys);
    if (!k) return fail(k.status());
    auto r = c->client->object_remove(ns, *k);
    if (!r) return fail(r.status());
    if (removed_out) *removed_out = *r;
    return ok();
  });
}

kvtier_status kvtier_unpin(kvtier_client* c, uint32_t ns, const uint32_t* tokens, size_t n, size_t* count_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || (!tokens && n)) return bad("client and tokens are required");
    auto r = c->client->unpin(ns, token_span(tokens, n));
    if (!r) return fail(r.status());
    if (count_out) *count_out = *r;
    return ok();
  });
}

kvtier_status kvtier_metrics(kvtier_client* c, char** text_out) {
  return guarded([&]() -> kvtier_status {
    if (!c || !text_out) return bad("client and text_out are required");
    auto t = c->client->metrics_text();
    if (!t) return fail(t.status());
    char* s = static_cast<char*>(std::malloc(t->size() + 1));
    if (!s) return fail(kvtier::Status(kvtier::StatusCode::kResourceExhausted, "out of memory"));
    std::memcpy(s, t->c_str(), t->size() + 1);
    *text_out = s;
    return ok();
  });
}

void kvtier_free_string(char* text) { std::free(text); }

}  // extern "C"
