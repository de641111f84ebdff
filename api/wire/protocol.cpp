// The kvtierd wire codec (protocol.h): a little-endian Writer, a bounds-checked Reader, and one
// encode/decode pair per message.
//
// Decoders fill a temporary and move it out only when the whole payload decoded, so a failed
// decode leaves the caller's message untouched. Every count is checked against its limit and
// against the bytes that remain before anything is reserved, so a frame can never make us
// allocate more than its own size. Encoders do not enforce the limits: a message over a limit
// encodes, and the peer's decode refuses it (encode_status alone truncates, see there).
#include "api/wire/protocol.h"

#include <bit>
#include <cmath>
#include <cstring>
#include <string_view>
#include <utility>

#include "kvtier/kv_buffer.h"

namespace kvtier::proto {
namespace {

inline constexpr uint32_t kMaxTenants = 1024;
inline constexpr size_t kExtraBytes = 4 + 16;  // u32 block_index + BlockKey
inline constexpr uint8_t kKnownTierBits = (1u << kNumTiers) - 1;
// A metrics dump outgrows kMaxString quickly; the frame limit is its only bound.
inline constexpr uint32_t kMaxStatsText = kMaxPayload;

Status protocol_error(std::string message) {
  return {StatusCode::kProtocolError, std::move(message)};
}

class Writer {
 public:
  explicit Writer(std::vector<std::byte>& out) noexcept : out_(out) {}

  void u8(uint8_t v) { out_.push_back(std::byte{v}); }
  void u16(uint16_t v) { put_le(v); }
  void u32(uint32_t v) { put_le(v); }
  void u64(uint64_t v) { put_le(v); }
  void boolean(bool v) { u8(v ? 1 : 0); }

  void string(std::string_view s) {
    u32(static_cast<uint32_t>(s.size()));
    auto raw = std::as_bytes(std::span(s.data(), s.size()));
    out_.insert(out_.end(), raw.begin(), raw.end());
  }

  void key(const BlockKey& k) {
    u64(k.lo);
    u64(k.hi);
  }

  void tokens(std::span<const TokenId> tokens) {
    u32(static_cast<uint32_t>(tokens.size()));
    if constexpr (std::endian::native == std::endian::little) {
      auto raw = std::as_bytes(tokens);  // a prompt can be 2M tokens: one copy, not 2M pushes
      out_.insert(out_.end(), raw.begin(), raw.end());
    } else {
      for (TokenId t : tokens) u32(t);
    }
  }

  void extras(std::span<const BlockExtra> extras) {
    u32(static_cast<uint32_t>(extras.size()));
    for (const BlockExtra& e : extras) {
      u32(e.block_index);
      key(e.item_hash);
    }
  }

  void layout(const KvLayout& l) {
    u8(static_cast<uint8_t>(l.kind));
    u32(l.num_layers);
    u32(l.num_kv_heads);
    u32(l.head_dim);
    u8(static_cast<uint8_t>(l.dtype));
    u32(l.block_tokens);
  }

 private:
  template <typename T>
  void put_le(T v) {
    for (size_t i = 0; i < sizeof(T); ++i) {
      out_.push_back(static_cast<std::byte>(static_cast<uint8_t>(v >> (8 * i))));
    }
  }

  std::vector<std::byte>& out_;
};

/// Reads one payload front to back. Every read checks the bytes that remain; a failure is
/// kProtocolError naming "<message>.<field>".
class Reader {
 public:
  Reader(std::span<const std::byte> in, const char* message) noexcept
      : in_(in), message_(message) {}

  size_t remaining() const noexcept { return in_.size() - pos_; }

  Status error(const char* field, std::string what) const {
    return protocol_error(std::string(message_) + "." + field + ": " + what);
  }

  Status u8(uint8_t& v, const char* field) { return get_le(v, field); }
  Status u16(uint16_t& v, const char* field) { return get_le(v, field); }
  Status u32(uint32_t& v, const char* field) { return get_le(v, field); }
  Status u64(uint64_t& v, const char* field) { return get_le(v, field); }

  Status boolean(bool& v, const char* field) {
    uint8_t b = 0;
    KVTIER_RETURN_IF_ERROR(u8(b, field));
    if (b > 1) return error(field, "is " + std::to_string(b) + ", not a bool (0 or 1)");
    v = b == 1;
    return Status::ok();
  }

  /// A u32 element count: at most `max`, and `n × min_element_bytes` must still be there.
  Status count(uint32_t& n, const char* field, uint32_t max, size_t min_element_bytes) {
    KVTIER_RETURN_IF_ERROR(u32(n, field));
    if (n > max) {
      return error(field, "count " + std::to_string(n) + " exceeds the limit " +
                              std::to_string(max));
    }
    if (uint64_t(n) * min_element_bytes > remaining()) {
      return error(field, "count " + std::to_string(n) + " needs " +
                              std::to_string(uint64_t(n) * min_element_bytes) + " bytes, " +
                              std::to_string(remaining()) + " remain");
    }
    return Status::ok();
  }

  Status string(std::string& s, const char* field, uint32_t max = kMaxString) {
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(count(n, field, max, 1));
    s.assign(reinterpret_cast<const char*>(in_.data() + pos_), n);
    pos_ += n;
    return Status::ok();
  }

  Status key(BlockKey& k, const char* field) {
    KVTIER_RETURN_IF_ERROR(u64(k.lo, field));
    return u64(k.hi, field);
  }

  Status tokens(std::vector<TokenId>& tokens, const char* field) {
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(count(n, field, kMaxTokens, sizeof(TokenId)));
    tokens.resize(n);
    if constexpr (std::endian::native == std::endian::little) {
      if (n != 0) std::memcpy(tokens.data(), in_.data() + pos_, size_t(n) * sizeof(TokenId));
      pos_ += size_t(n) * sizeof(TokenId);
    } else {
      for (TokenId& t : tokens) KVTIER_RETURN_IF_ERROR(u32(t, field));
    }
    return Status::ok();
  }

  Status extras(std::vector<BlockExtra>& extras, const char* field) {
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(count(n, field, kMaxExtras, kExtraBytes));
    extras.resize(n);
    for (BlockExtra& e : extras) {
      KVTIER_RETURN_IF_ERROR(u32(e.block_index, field));
      KVTIER_RETURN_IF_ERROR(key(e.item_hash, field));
    }
    return Status::ok();
  }

  /// Enum fields go in as read and validate() judges them, so an unknown dtype or attention kind
  /// fails here as any other out-of-range field does.
  Status layout(KvLayout& l) {
    uint8_t kind = 0;
    uint8_t dtype = 0;
    KVTIER_RETURN_IF_ERROR(u8(kind, "layout.kind"));
    KVTIER_RETURN_IF_ERROR(u32(l.num_layers, "layout.num_layers"));
    KVTIER_RETURN_IF_ERROR(u32(l.num_kv_heads, "layout.num_kv_heads"));
    KVTIER_RETURN_IF_ERROR(u32(l.head_dim, "layout.head_dim"));
    KVTIER_RETURN_IF_ERROR(u8(dtype, "layout.dtype"));
    KVTIER_RETURN_IF_ERROR(u32(l.block_tokens, "layout.block_tokens"));
    l.kind = static_cast<AttentionKind>(kind);
    l.dtype = static_cast<Dtype>(dtype);
    if (Status s = l.validate(); !s.is_ok()) return error("layout", std::string(s.message()));
    return Status::ok();
  }

  /// The bytes not read yet; the reader is then at the end.
  std::span<const std::byte> rest() noexcept {
    auto r = in_.subspan(pos_);
    pos_ = in_.size();
    return r;
  }

  /// Ok only when every byte was consumed.
  Status finish() const {
    if (remaining() == 0) return Status::ok();
    return protocol_error(std::string(message_) + ": " + std::to_string(remaining()) +
                          " trailing bytes");
  }

 private:
  template <typename T>
  Status get_le(T& v, const char* field) {
    if (remaining() < sizeof(T)) {
      return error(field, "truncated: needs " + std::to_string(sizeof(T)) + " bytes, " +
                              std::to_string(remaining()) + " remain");
    }
    uint64_t x = 0;
    for (size_t i = 0; i < sizeof(T); ++i) {
      x |= uint64_t(std::to_integer<uint8_t>(in_[pos_ + i])) << (8 * i);
    }
    pos_ += sizeof(T);
    v = static_cast<T>(x);
    return Status::ok();
  }

  std::span<const std::byte> in_;
  size_t pos_ = 0;
  const char* message_;
};

/// Decodes a whole payload with `read_fields` into a fresh M, moved into `m` on success only.
template <typename M, typename ReadFields>
Status decode_whole(std::span<const std::byte> in, const char* name, M& m,
                    ReadFields&& read_fields) {
  Reader r(in, name);
  M tmp;
  KVTIER_RETURN_IF_ERROR(read_fields(r, tmp));
  KVTIER_RETURN_IF_ERROR(r.finish());
  m = std::move(tmp);
  return Status::ok();
}

/// A PrefixRequest's `arg` means a different enum per op (see protocol.h).
Status check_prefix_arg(Op op, uint8_t arg) {
  switch (op) {
    case Op::kPrefetch:
      if (arg < kNumTiers) return Status::ok();
      return protocol_error("PrefixRequest.arg: " + std::to_string(arg) + " is not a tier");
    case Op::kPin:
      if (arg < kNumPriorities) return Status::ok();
      return protocol_error("PrefixRequest.arg: " + std::to_string(arg) + " is not a priority");
    default:
      if (arg == 0) return Status::ok();
      return protocol_error("PrefixRequest.arg: unpin takes 0, got " + std::to_string(arg));
  }
}

}  // namespace

// ---- header ----------------------------------------------------------------------------------

void encode_header(const FrameHeader& h, std::byte out[kHeaderBytes]) noexcept {
  auto put = [&out](size_t at, uint64_t v, size_t bytes) {
    for (size_t i = 0; i < bytes; ++i) {
      out[at + i] = static_cast<std::byte>(static_cast<uint8_t>(v >> (8 * i)));
    }
  };
  put(0, h.magic, 4);
  put(4, h.version, 2);
  put(6, h.op, 2);
  put(8, h.request_id, 4);
  put(12, h.payload_bytes, 4);
}

Result<FrameHeader> decode_header(std::span<const std::byte> bytes) {
  Reader r(bytes, "FrameHeader");
  FrameHeader h;
  KVTIER_RETURN_IF_ERROR(r.u32(h.magic, "magic"));
  KVTIER_RETURN_IF_ERROR(r.u16(h.version, "version"));
  KVTIER_RETURN_IF_ERROR(r.u16(h.op, "op"));
  KVTIER_RETURN_IF_ERROR(r.u32(h.request_id, "request_id"));
  KVTIER_RETURN_IF_ERROR(r.u32(h.payload_bytes, "payload_bytes"));
  KVTIER_RETURN_IF_ERROR(r.finish());
  if (h.magic != kMagic) return r.error("magic", "not a kvtier frame (expected \"KVT1\")");
  if (h.payload_bytes > kMaxPayload) {
    return r.error("payload_bytes", std::to_string(h.payload_bytes) + " exceeds the limit " +
                                        std::to_string(kMaxPayload));
  }
  return h;
}

// ---- messages --------------------------------------------------------------------------------

void encode(const HelloRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u16(m.min_version);
  w.u16(m.max_version);
  w.u64(m.window_bytes);
  w.string(m.client_name);
  w.u32(m.mailbox_bytes);
}

Status decode(std::span<const std::byte> in, HelloRequest& m) {
  return decode_whole(in, "HelloRequest", m, [](Reader& r, HelloRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u16(t.min_version, "min_version"));
    KVTIER_RETURN_IF_ERROR(r.u16(t.max_version, "max_version"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.window_bytes, "window_bytes"));
    KVTIER_RETURN_IF_ERROR(r.string(t.client_name, "client_name"));
    return r.u32(t.mailbox_bytes, "mailbox_bytes");
  });
}

void encode(const HelloReply& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u16(m.version);
  w.layout(m.layout);
  w.u64(m.client_id);
  w.u32(m.uid);
  w.u32(m.gid);
  w.u32(static_cast<uint32_t>(m.tenants.size()));
  for (const std::string& t : m.tenants) w.string(t);
}

Status decode(std::span<const std::byte> in, HelloReply& m) {
  return decode_whole(in, "HelloReply", m, [](Reader& r, HelloReply& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u16(t.version, "version"));
    KVTIER_RETURN_IF_ERROR(r.layout(t.layout));
    KVTIER_RETURN_IF_ERROR(r.u64(t.client_id, "client_id"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.uid, "uid"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.gid, "gid"));
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(r.count(n, "tenants", kMaxTenants, sizeof(uint32_t)));
    t.tenants.resize(n);
    for (std::string& tenant : t.tenants) KVTIER_RETURN_IF_ERROR(r.string(tenant, "tenants"));
    return Status::ok();
  });
}

void encode(const OpenNamespaceRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.string(m.model_id);
  w.string(m.tenant);
  w.string(m.adapter_id);
  w.u64(m.layout_fingerprint);
  w.string(m.revision);
  w.u64(std::bit_cast<uint64_t>(m.prefill_tokens_per_second));
}

Status decode(std::span<const std::byte> in, OpenNamespaceRequest& m) {
  return decode_whole(in, "OpenNamespaceRequest", m,
                      [](Reader& r, OpenNamespaceRequest& t) -> Status {
                        KVTIER_RETURN_IF_ERROR(r.string(t.model_id, "model_id"));
                        KVTIER_RETURN_IF_ERROR(r.string(t.tenant, "tenant"));
                        KVTIER_RETURN_IF_ERROR(r.string(t.adapter_id, "adapter_id"));
                        KVTIER_RETURN_IF_ERROR(r.u64(t.layout_fingerprint, "layout_fingerprint"));
                        KVTIER_RETURN_IF_ERROR(r.string(t.revision, "revision"));
                        uint64_t bits = 0;
                        KVTIER_RETURN_IF_ERROR(r.u64(bits, "prefill_tokens_per_second"));
                        t.prefill_tokens_per_second = std::bit_cast<double>(bits);
                        if (!std::isfinite(t.prefill_tokens_per_second) || t.prefill_tokens_per_second < 0) {
                          return r.error("prefill_tokens_per_second", "must be finite and >= 0");
                        }
                        return Status::ok();
                      });
}

void encode(const OpenNamespaceReply& m, std::vector<std::byte>& out) {
  Writer(out).u32(m.namespace_id);
}

Status decode(std::span<const std::byte> in, OpenNamespaceReply& m) {
  return decode_whole(in, "OpenNamespaceReply", m, [](Reader& r, OpenNamespaceReply& t) {
    return r.u32(t.namespace_id, "namespace_id");
  });
}

void encode(const LookupRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(m.namespace_id);
  w.boolean(m.take_lease);
  w.tokens(m.tokens);
  w.extras(m.extras);
}

Status decode(std::span<const std::byte> in, LookupRequest& m) {
  return decode_whole(in, "LookupRequest", m, [](Reader& r, LookupRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.namespace_id, "namespace_id"));
    KVTIER_RETURN_IF_ERROR(r.boolean(t.take_lease, "take_lease"));
    KVTIER_RETURN_IF_ERROR(r.tokens(t.tokens, "tokens"));
    return r.extras(t.extras, "extras");
  });
}

void encode(const LookupReply& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u64(m.lease);
  w.u64(m.tokens);
  w.u32(static_cast<uint32_t>(m.tier_masks.size()));
  for (uint8_t mask : m.tier_masks) w.u8(mask);
  w.u32(m.held_back_blocks);
  w.u64(m.saved_ns);
}

Status decode(std::span<const std::byte> in, LookupReply& m) {
  return decode_whole(in, "LookupReply", m, [](Reader& r, LookupReply& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u64(t.lease, "lease"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.tokens, "tokens"));
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(r.count(n, "tier_masks", kMaxBlocks, 1));
    t.tier_masks.resize(n);
    for (uint8_t& mask : t.tier_masks) {
      KVTIER_RETURN_IF_ERROR(r.u8(mask, "tier_masks"));
      if ((mask & ~kKnownTierBits) != 0) {
        return r.error("tier_masks", "mask " + std::to_string(mask) + " names an unknown tier");
      }
    }
    KVTIER_RETURN_IF_ERROR(r.u32(t.held_back_blocks, "held_back_blocks"));
    return r.u64(t.saved_ns, "saved_ns");
  });
}

void encode(const LoadRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u64(m.lease);
  w.u32(m.first_block);
  w.u32(m.block_count);
  w.u64(m.window_offset);
  w.u32(m.layer_begin);
  w.u32(m.layer_count);
}

Status decode(std::span<const std::byte> in, LoadRequest& m) {
  return decode_whole(in, "LoadRequest", m, [](Reader& r, LoadRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u64(t.lease, "lease"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.first_block, "first_block"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.block_count, "block_count"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.window_offset, "window_offset"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.layer_begin, "layer_begin"));
    return r.u32(t.layer_count, "layer_count");
  });
}

void encode(const LoadReply& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(m.blocks);
  w.u32(m.from_nvme);
}

Status decode(std::span<const std::byte> in, LoadReply& m) {
  return decode_whole(in, "LoadReply", m, [](Reader& r, LoadReply& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.blocks, "blocks"));
    return r.u32(t.from_nvme, "from_nvme");
  });
}

void encode(const ReleaseRequest& m, std::vector<std::byte>& out) { Writer(out).u64(m.lease); }

Status decode(std::span<const std::byte> in, ReleaseRequest& m) {
  return decode_whole(in, "ReleaseRequest", m,
                      [](Reader& r, ReleaseRequest& t) { return r.u64(t.lease, "lease"); });
}

void encode(const SaveRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(m.namespace_id);
  w.u8(m.priority);
  w.u32(m.first_block);
  w.u64(m.window_offset);
  w.tokens(m.tokens);
  w.extras(m.extras);
}

Status decode(std::span<const std::byte> in, SaveRequest& m) {
  return decode_whole(in, "SaveRequest", m, [](Reader& r, SaveRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.namespace_id, "namespace_id"));
    KVTIER_RETURN_IF_ERROR(r.u8(t.priority, "priority"));
    if (t.priority >= kNumPriorities) {
      return r.error("priority", std::to_string(t.priority) + " is not a priority");
    }
    KVTIER_RETURN_IF_ERROR(r.u32(t.first_block, "first_block"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.window_offset, "window_offset"));
    KVTIER_RETURN_IF_ERROR(r.tokens(t.tokens, "tokens"));
    return r.extras(t.extras, "extras");
  });
}

void encode(const SaveReply& m, std::vector<std::byte>& out) { Writer(out).u32(m.saved); }

Status decode(std::span<const std::byte> in, SaveReply& m) {
  return decode_whole(in, "SaveReply", m,
                      [](Reader& r, SaveReply& t) { return r.u32(t.saved, "saved"); });
}

void encode(const PrefixRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(m.namespace_id);
  w.u8(m.arg);
  w.tokens(m.tokens);
  w.extras(m.extras);
}

// `arg` is judged by validate_request, which knows the op that gives it a meaning.
Status decode(std::span<const std::byte> in, PrefixRequest& m) {
  return decode_whole(in, "PrefixRequest", m, [](Reader& r, PrefixRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.namespace_id, "namespace_id"));
    KVTIER_RETURN_IF_ERROR(r.u8(t.arg, "arg"));
    KVTIER_RETURN_IF_ERROR(r.tokens(t.tokens, "tokens"));
    return r.extras(t.extras, "extras");
  });
}

void encode(const CountReply& m, std::vector<std::byte>& out) { Writer(out).u64(m.count); }

Status decode(std::span<const std::byte> in, CountReply& m) {
  return decode_whole(in, "CountReply", m,
                      [](Reader& r, CountReply& t) { return r.u64(t.count, "count"); });
}

void encode(const StatsReply& m, std::vector<std::byte>& out) {
  Writer(out).string(m.prometheus_text);
}

Status decode(std::span<const std::byte> in, StatsReply& m) {
  return decode_whole(in, "StatsReply", m, [](Reader& r, StatsReply& t) {
    return r.string(t.prometheus_text, "prometheus_text", kMaxStatsText);
  });
}

void encode(const InspectRequest& m, std::vector<std::byte>& out) { Writer(out).u32(m.top_prefixes); }

Status decode(std::span<const std::byte> in, InspectRequest& m) {
  return decode_whole(in, "InspectRequest", m, [](Reader& r, InspectRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.top_prefixes, "top_prefixes"));
    if (t.top_prefixes > 10000) return r.error("top_prefixes", "at most 10000");
    return Status::ok();
  });
}

void encode(const DoctorRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.string(m.model_id);
  w.string(m.tenant);
  w.string(m.adapter_id);
  w.string(m.revision);
  w.u32(m.engine_block_tokens);
  w.u64(m.engine_layout_fingerprint);
  w.tokens(m.tokens);
  w.extras(m.extras);
}

Status decode(std::span<const std::byte> in, DoctorRequest& m) {
  return decode_whole(in, "DoctorRequest", m, [](Reader& r, DoctorRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.string(t.model_id, "model_id"));
    KVTIER_RETURN_IF_ERROR(r.string(t.tenant, "tenant"));
    KVTIER_RETURN_IF_ERROR(r.string(t.adapter_id, "adapter_id"));
    KVTIER_RETURN_IF_ERROR(r.string(t.revision, "revision"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.engine_block_tokens, "engine_block_tokens"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.engine_layout_fingerprint, "engine_layout_fingerprint"));
    KVTIER_RETURN_IF_ERROR(r.tokens(t.tokens, "tokens"));
    return r.extras(t.extras, "extras");
  });
}

namespace {
void write_keys(Writer& w, std::span<const BlockKey> keys) {
  w.u32(static_cast<uint32_t>(keys.size()));
  for (const BlockKey& k : keys) w.key(k);
}
Status read_keys(Reader& r, std::vector<BlockKey>& keys, const char* field, uint32_t max) {
  uint32_t n = 0;
  KVTIER_RETURN_IF_ERROR(r.count(n, field, max, 16));
  keys.resize(n);
  for (BlockKey& k : keys) KVTIER_RETURN_IF_ERROR(r.key(k, field));
  return Status::ok();
}
}  // namespace

void encode(const ExportListRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u8(m.restart ? 1 : 0);
  w.u32(m.max_blocks);
  write_keys(w, m.roots);
}

Status decode(std::span<const std::byte> in, ExportListRequest& m) {
  return decode_whole(in, "ExportListRequest", m, [](Reader& r, ExportListRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.boolean(t.restart, "restart"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.max_blocks, "max_blocks"));
    if (t.max_blocks == 0 || t.max_blocks > kMaxExportPage) {
      return r.error("max_blocks", std::to_string(t.max_blocks) + " is not in [1, " + std::to_string(kMaxExportPage) + "]");
    }
    KVTIER_RETURN_IF_ERROR(read_keys(r, t.roots, "roots", kMaxBlocks));
    if (!t.restart && !t.roots.empty()) return r.error("roots", "are named only when a walk restarts");
    return Status::ok();
  });
}

void encode(const ExportReadRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u64(m.window_offset);
  write_keys(w, m.keys);
}

Status decode(std::span<const std::byte> in, ExportReadRequest& m) {
  return decode_whole(in, "ExportReadRequest", m, [](Reader& r, ExportReadRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u64(t.window_offset, "window_offset"));
    return read_keys(r, t.keys, "keys", kMaxBlocks);
  });
}

void encode(const ExportReadReply& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(static_cast<uint32_t>(m.blocks.size()));
  for (const Status& s : m.blocks) {
    w.u8(static_cast<uint8_t>(s.code()));
    w.string(std::string(s.message().substr(0, kMaxString)));
  }
}

Status decode(std::span<const std::byte> in, ExportReadReply& m) {
  return decode_whole(in, "ExportReadReply", m, [](Reader& r, ExportReadReply& t) -> Status {
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(r.count(n, "blocks", kMaxBlocks, 5));
    t.blocks.clear();
    t.blocks.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
      uint8_t code = 0;
      std::string message;
      KVTIER_RETURN_IF_ERROR(r.u8(code, "blocks.code"));
      if (code > static_cast<uint8_t>(StatusCode::kInternal)) return r.error("blocks.code", std::to_string(code) + " is not a status code");
      KVTIER_RETURN_IF_ERROR(r.string(message, "blocks.message"));
      if (code == 0 && !message.empty()) return r.error("blocks.message", "an ok status carries no message");
      t.blocks.push_back(code == 0 ? Status::ok() : Status(static_cast<StatusCode>(code), std::move(message)));
    }
    return Status::ok();
  });
}

void encode(const JsonReply& m, std::vector<std::byte>& out) { Writer(out).string(m.json); }

Status decode(std::span<const std::byte> in, JsonReply& m) {
  return decode_whole(in, "JsonReply", m,
                      [](Reader& r, JsonReply& t) { return r.string(t.json, "json", kMaxStatsText); });
}

void encode(const RegisterMemoryRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u8(m.kind);
  out.insert(out.end(), m.ipc_handle.begin(), m.ipc_handle.end());
  w.u64(m.offset);
  w.u64(m.bytes);
  w.u64(m.address);
}

Status decode(std::span<const std::byte> in, RegisterMemoryRequest& m) {
  return decode_whole(in, "RegisterMemoryRequest", m, [](Reader& r, RegisterMemoryRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u8(t.kind, "kind"));
    if (t.kind > 1) return r.error("kind", std::to_string(t.kind) + " is not a share kind (0 CUDA IPC, 1 memfd)");
    for (std::byte& b : t.ipc_handle) {
      uint8_t v = 0;
      KVTIER_RETURN_IF_ERROR(r.u8(v, "ipc_handle"));
      b = std::byte{v};
    }
    KVTIER_RETURN_IF_ERROR(r.u64(t.offset, "offset"));
    KVTIER_RETURN_IF_ERROR(r.u64(t.bytes, "bytes"));
    if (t.bytes == 0) return r.error("bytes", "a region must not be empty");
    return r.u64(t.address, "address");
  });
}

void encode(const RegisterMemoryReply& m, std::vector<std::byte>& out) { Writer(out).u32(m.region); }

Status decode(std::span<const std::byte> in, RegisterMemoryReply& m) {
  return decode_whole(in, "RegisterMemoryReply", m,
                      [](Reader& r, RegisterMemoryReply& t) { return r.u32(t.region, "region"); });
}

void encode(const UnregisterMemoryRequest& m, std::vector<std::byte>& out) { Writer(out).u32(m.region); }

Status decode(std::span<const std::byte> in, UnregisterMemoryRequest& m) {
  return decode_whole(in, "UnregisterMemoryRequest", m,
                      [](Reader& r, UnregisterMemoryRequest& t) { return r.u32(t.region, "region"); });
}

namespace {

void write_region_buffer(Writer& w, const RegionBuffer& b) {
  w.u8(b.layout);
  w.u32(b.engine_num_pages);
  w.u32(b.page_tokens);
  w.u32(static_cast<uint32_t>(b.places.size()));
  for (const RegionRef& p : b.places) {
    w.u32(p.region);
    w.u64(p.offset);
  }
  w.u32(static_cast<uint32_t>(b.pages.size()));
  for (int32_t p : b.pages) w.u32(static_cast<uint32_t>(p));
}

// The shape is checked here (a paged buffer has pages and a canonical one none); offsets, pages
// and the region itself are checked by the daemon against the region and the layout.
Status read_region_buffer(Reader& r, RegionBuffer& b) {
  KVTIER_RETURN_IF_ERROR(r.u8(b.layout, "layout"));
  if (b.layout > kNumEngineLayouts) {
    return r.error("layout", std::to_string(b.layout) + " is not a KV buffer layout (0 canonical, 1-" +
                                 std::to_string(kNumEngineLayouts) + " paged)");
  }
  KVTIER_RETURN_IF_ERROR(r.u32(b.engine_num_pages, "engine_num_pages"));
  KVTIER_RETURN_IF_ERROR(r.u32(b.page_tokens, "page_tokens"));
  uint32_t n = 0;
  KVTIER_RETURN_IF_ERROR(r.count(n, "places", kMaxBlocks, 12));
  b.places.resize(n);
  for (RegionRef& p : b.places) {
    KVTIER_RETURN_IF_ERROR(r.u32(p.region, "places.region"));
    KVTIER_RETURN_IF_ERROR(r.u64(p.offset, "places.offset"));
  }
  KVTIER_RETURN_IF_ERROR(r.count(n, "pages", kMaxBlocks, sizeof(uint32_t)));
  b.pages.resize(n);
  for (int32_t& p : b.pages) {
    uint32_t v = 0;
    KVTIER_RETURN_IF_ERROR(r.u32(v, "pages"));
    p = static_cast<int32_t>(v);
  }
  if (b.layout == 0 && !b.pages.empty()) return r.error("pages", "a canonical buffer has no pages");
  if (b.layout != 0 && b.places.empty()) return r.error("places", "a paged buffer needs its layer tensors");
  return Status::ok();
}

}  // namespace

void encode(const LoadToRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u64(m.lease);
  w.u32(m.first_block);
  w.u32(m.layer_begin);
  w.u32(m.layer_count);
  write_region_buffer(w, m.dst);
}

Status decode(std::span<const std::byte> in, LoadToRequest& m) {
  return decode_whole(in, "LoadToRequest", m, [](Reader& r, LoadToRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u64(t.lease, "lease"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.first_block, "first_block"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.layer_begin, "layer_begin"));
    KVTIER_RETURN_IF_ERROR(r.u32(t.layer_count, "layer_count"));
    return read_region_buffer(r, t.dst);
  });
}

void encode(const SaveFromRequest& m, std::vector<std::byte>& out) {
  Writer w(out);
  w.u32(m.namespace_id);
  w.u8(m.priority);
  w.u32(m.first_block);
  w.tokens(m.tokens);
  w.extras(m.extras);
  write_region_buffer(w, m.src);
}

Status decode(std::span<const std::byte> in, SaveFromRequest& m) {
  return decode_whole(in, "SaveFromRequest", m, [](Reader& r, SaveFromRequest& t) -> Status {
    KVTIER_RETURN_IF_ERROR(r.u32(t.namespace_id, "namespace_id"));
    KVTIER_RETURN_IF_ERROR(r.u8(t.priority, "priority"));
    if (t.priority >= kNumPriorities) {
      return r.error("priority", std::to_string(t.priority) + " is not a priority");
    }
    KVTIER_RETURN_IF_ERROR(r.u32(t.first_block, "first_block"));
    KVTIER_RETURN_IF_ERROR(r.tokens(t.tokens, "tokens"));
    KVTIER_RETURN_IF_ERROR(r.extras(t.extras, "extras"));
    return read_region_buffer(r, t.src);
  });
}

// ---- status ----------------------------------------------------------------------------------

void encode_status(const Status& s, std::vector<std::byte>& out) {
  Writer w(out);
  w.u8(static_cast<uint8_t>(s.code()));
  // The message is for humans; cutting it keeps a long one from making the whole reply
  // undecodable at the peer.
  w.string(s.message().substr(0, kMaxString));
}

Result<std::span<const std::byte>> decode_status(std::span<const std::byte> in, Status& remote) {
  Reader r(in, "status");
  uint8_t code = 0;
  std::string message;
  KVTIER_RETURN_IF_ERROR(r.u8(code, "code"));
  if (code > static_cast<uint8_t>(StatusCode::kInternal)) {
    return r.error("code", std::to_string(code) + " is not a status code");
  }
  KVTIER_RETURN_IF_ERROR(r.string(message, "message"));
  if (code == static_cast<uint8_t>(StatusCode::kOk)) {
    // Status drops an ok's message, so one on the wire could not survive a re-encode.
    if (!message.empty()) return r.error("message", "an ok status carries no message");
    remote = Status::ok();
    return r.rest();
  }
  KVTIER_RETURN_IF_ERROR(r.finish());  // an error reply has no body
  remote = Status(static_cast<StatusCode>(code), std::move(message));
  return std::span<const std::byte>();
}

// ---- requests --------------------------------------------------------------------------------

Status validate_request(uint16_t op, std::span<const std::byte> payload) {
  switch (static_cast<Op>(op)) {
    case Op::kHello: {
      HelloRequest m;
      return decode(payload, m);
    }
    case Op::kOpenNamespace: {
      OpenNamespaceRequest m;
      return decode(payload, m);
    }
    case Op::kLookup: {
      LookupRequest m;
      return decode(payload, m);
    }
    case Op::kLoad: {
      LoadRequest m;
      return decode(payload, m);
    }
    case Op::kRelease: {
      ReleaseRequest m;
      return decode(payload, m);
    }
    case Op::kSave: {
      SaveRequest m;
      return decode(payload, m);
    }
    case Op::kPrefetch:
    case Op::kPin:
    case Op::kUnpin: {
      PrefixRequest m;
      KVTIER_RETURN_IF_ERROR(decode(payload, m));
      return check_prefix_arg(static_cast<Op>(op), m.arg);
    }
    case Op::kRegisterMemory: {
      RegisterMemoryRequest m;
      return decode(payload, m);
    }
    case Op::kUnregisterMemory: {
      UnregisterMemoryRequest m;
      return decode(payload, m);
    }
    case Op::kLoadTo: {
      LoadToRequest m;
      return decode(payload, m);
    }
    case Op::kSaveFrom: {
      SaveFromRequest m;
      return decode(payload, m);
    }
    case Op::kInspect: {
      InspectRequest m;
      return decode(payload, m);
    }
    case Op::kDoctor: {
      DoctorRequest m;
      return decode(payload, m);
    }
    case Op::kExportList: {
      ExportListRequest m;
      return decode(payload, m);
    }
    case Op::kExportRead: {
      ExportReadRequest m;
      return decode(payload, m);
    }
    case Op::kStats:
    case Op::kDoorbell:
      if (payload.empty()) return Status::ok();
      return protocol_error(std::string(op == uint16_t(Op::kStats) ? "stats" : "doorbell") + " request: " +
                            std::to_string(payload.size()) + " trailing bytes (its payload is empty)");
  }
  return protocol_error("unknown op " + std::to_string(op));
}

}  // namespace kvtier::proto
