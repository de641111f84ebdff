// The kvtierd wire codec (protocol.h): a little-endian Writer, a bounds-checked Reader, and per
// message one list of its fields, in wire order, that both its encode and its decode run (an
// Encoder or a Decoder over it), so the two directions cannot drift apart.
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
#include <array>
#include <concepts>
#include <string_view>
#include <type_traits>
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

/// The writing side of a message's fields() (see "messages" below): appends each field, checks
/// nothing (the peer's decode refuses what is over a limit) and never fails.
class Encoder {
 public:
  explicit Encoder(std::vector<std::byte>& out) noexcept : w_(out) {}

  Status u8(uint8_t v, const char*) {
    w_.u8(v);
    return Status::ok();
  }
  Status u16(uint16_t v, const char*) {
    w_.u16(v);
    return Status::ok();
  }
  Status u32(uint32_t v, const char*) {
    w_.u32(v);
    return Status::ok();
  }
  Status u64(uint64_t v, const char*) {
    w_.u64(v);
    return Status::ok();
  }
  Status i32(int32_t v, const char*) {
    w_.u32(static_cast<uint32_t>(v));
    return Status::ok();
  }
  Status f64(double v, const char*) {
    w_.u64(std::bit_cast<uint64_t>(v));
    return Status::ok();
  }
  Status boolean(bool v, const char*) {
    w_.boolean(v);
    return Status::ok();
  }
  Status string(std::string_view s, const char*, uint32_t = kMaxString) {
    w_.string(s);
    return Status::ok();
  }
  Status key(const BlockKey& k, const char*) {
    w_.key(k);
    return Status::ok();
  }
  Status tokens(std::span<const TokenId> t, const char*) {
    w_.tokens(t);
    return Status::ok();
  }
  Status extras(std::span<const BlockExtra> e, const char*) {
    w_.extras(e);
    return Status::ok();
  }
  Status layout(const KvLayout& l) {
    w_.layout(l);
    return Status::ok();
  }
  template <size_t N>
  Status bytes(const std::array<std::byte, N>& a, const char*) {
    for (std::byte b : a) w_.u8(std::to_integer<uint8_t>(b));
    return Status::ok();
  }
  /// A u32 count, then each element by `each`.
  template <class V, class Each>
  Status list(const V& v, const char*, uint32_t, size_t, Each&& each) {
    w_.u32(static_cast<uint32_t>(v.size()));
    for (const auto& e : v) each(e).ignore();
    return Status::ok();
  }
  /// u8 code, string message. The message is for humans; cutting it keeps a long one from making
  /// the whole reply undecodable at the peer.
  Status status(const Status& s, const char*) {
    w_.u8(static_cast<uint8_t>(s.code()));
    w_.string(s.message().substr(0, kMaxString));
    return Status::ok();
  }
  template <class What>
  Status check(bool, const char*, What&&) {
    return Status::ok();
  }

 private:
  Writer w_;
};

/// The reading side of a message's fields(): reads each field and judges it, failing with
/// kProtocolError "<message>.<field>: ..." at the first that is malformed or out of range.
class Decoder {
 public:
  explicit Decoder(Reader& r) noexcept : r_(r) {}

  Status u8(uint8_t& v, const char* f) { return r_.u8(v, f); }
  Status u16(uint16_t& v, const char* f) { return r_.u16(v, f); }
  Status u32(uint32_t& v, const char* f) { return r_.u32(v, f); }
  Status u64(uint64_t& v, const char* f) { return r_.u64(v, f); }
  Status i32(int32_t& v, const char* f) {
    uint32_t x = 0;
    KVTIER_RETURN_IF_ERROR(r_.u32(x, f));
    v = static_cast<int32_t>(x);
    return Status::ok();
  }
  Status f64(double& v, const char* f) {
    uint64_t bits = 0;
    KVTIER_RETURN_IF_ERROR(r_.u64(bits, f));
    v = std::bit_cast<double>(bits);
    return Status::ok();
  }
  Status boolean(bool& v, const char* f) { return r_.boolean(v, f); }
  Status string(std::string& s, const char* f, uint32_t max = kMaxString) { return r_.string(s, f, max); }
  Status key(BlockKey& k, const char* f) { return r_.key(k, f); }
  Status tokens(std::vector<TokenId>& t, const char* f) { return r_.tokens(t, f); }
  Status extras(std::vector<BlockExtra>& e, const char* f) { return r_.extras(e, f); }
  Status layout(KvLayout& l) { return r_.layout(l); }
  template <size_t N>
  Status bytes(std::array<std::byte, N>& a, const char* f) {
    for (std::byte& b : a) {
      uint8_t v = 0;
      KVTIER_RETURN_IF_ERROR(r_.u8(v, f));
      b = std::byte{v};
    }
    return Status::ok();
  }
  /// A u32 count (at most `max`, and `min_element_bytes` each must still be there), then each
  /// element by `each`.
  template <class V, class Each>
  Status list(V& v, const char* f, uint32_t max, size_t min_element_bytes, Each&& each) {
    uint32_t n = 0;
    KVTIER_RETURN_IF_ERROR(r_.count(n, f, max, min_element_bytes));
    v.clear();
    v.resize(n);
    for (auto& e : v) KVTIER_RETURN_IF_ERROR(each(e));
    return Status::ok();
  }
  /// A status as Encoder::status writes it; `prefix` names it in errors ("" for a reply's own).
  Status status(Status& s, const char* prefix) {
    const std::string p = *prefix ? std::string(prefix) + "." : std::string();
    uint8_t code = 0;
    std::string message;
    KVTIER_RETURN_IF_ERROR(r_.u8(code, (p + "code").c_str()));
    if (code > static_cast<uint8_t>(StatusCode::kInternal)) {
      return r_.error((p + "code").c_str(), std::to_string(code) + " is not a status code");
    }
    KVTIER_RETURN_IF_ERROR(r_.string(message, (p + "message").c_str()));
    if (code == static_cast<uint8_t>(StatusCode::kOk)) {
      // Status drops an ok's message, so one on the wire could not survive a re-encode.
      if (!message.empty()) return r_.error((p + "message").c_str(), "an ok status carries no message");
      s = Status::ok();
    } else {
      s = Status(static_cast<StatusCode>(code), std::move(message));
    }
    return Status::ok();
  }
  template <class What>
  Status check(bool ok, const char* f, What&& what) {
    return ok ? Status::ok() : r_.error(f, what());
  }

 private:
  Reader& r_;
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
//
// Each message's fields are listed once, in wire order, by a fields(codec, message) function that
// serves both directions: with an Encoder (the message const) it appends each field, with a
// Decoder it reads and checks each one. KVTIER_WIRE_MESSAGE below makes the encode/decode pair.

namespace {

template <class T, class M>
concept Message = std::same_as<std::remove_const_t<T>, M>;

Status fields(auto& c, Message<HelloRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u16(m.min_version, "min_version"));
  KVTIER_RETURN_IF_ERROR(c.u16(m.max_version, "max_version"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_bytes, "window_bytes"));
  KVTIER_RETURN_IF_ERROR(c.string(m.client_name, "client_name"));
  return c.u32(m.mailbox_bytes, "mailbox_bytes");
}

Status fields(auto& c, Message<HelloReply> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u16(m.version, "version"));
  KVTIER_RETURN_IF_ERROR(c.layout(m.layout));
  KVTIER_RETURN_IF_ERROR(c.u64(m.client_id, "client_id"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.uid, "uid"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.gid, "gid"));
  return c.list(m.tenants, "tenants", kMaxTenants, sizeof(uint32_t),
                [&](auto& tenant) { return c.string(tenant, "tenants"); });
}

Status fields(auto& c, Message<OpenNamespaceRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.string(m.model_id, "model_id"));
  KVTIER_RETURN_IF_ERROR(c.string(m.tenant, "tenant"));
  KVTIER_RETURN_IF_ERROR(c.string(m.adapter_id, "adapter_id"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.layout_fingerprint, "layout_fingerprint"));
  KVTIER_RETURN_IF_ERROR(c.string(m.revision, "revision"));
  KVTIER_RETURN_IF_ERROR(c.f64(m.prefill_tokens_per_second, "prefill_tokens_per_second"));
  return c.check(std::isfinite(m.prefill_tokens_per_second) && m.prefill_tokens_per_second >= 0,
                 "prefill_tokens_per_second", [] { return std::string("must be finite and >= 0"); });
}

Status fields(auto& c, Message<OpenNamespaceReply> auto& m) { return c.u32(m.namespace_id, "namespace_id"); }

Status fields(auto& c, Message<LookupRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(c.boolean(m.take_lease, "take_lease"));
  KVTIER_RETURN_IF_ERROR(c.tokens(m.tokens, "tokens"));
  return c.extras(m.extras, "extras");
}

Status fields(auto& c, Message<LookupReply> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u64(m.lease, "lease"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.tokens, "tokens"));
  KVTIER_RETURN_IF_ERROR(c.list(m.tier_masks, "tier_masks", kMaxBlocks, 1, [&](auto& mask) -> Status {
    KVTIER_RETURN_IF_ERROR(c.u8(mask, "tier_masks"));
    return c.check((mask & ~kKnownTierBits) == 0, "tier_masks",
                   [&] { return "mask " + std::to_string(mask) + " names an unknown tier"; });
  }));
  KVTIER_RETURN_IF_ERROR(c.u32(m.held_back_blocks, "held_back_blocks"));
  return c.u64(m.saved_ns, "saved_ns");
}

Status fields(auto& c, Message<LoadRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u64(m.lease, "lease"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.first_block, "first_block"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.block_count, "block_count"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_offset, "window_offset"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.layer_begin, "layer_begin"));
  return c.u32(m.layer_count, "layer_count");
}

Status fields(auto& c, Message<LoadReply> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.blocks, "blocks"));
  return c.u32(m.from_nvme, "from_nvme");
}

Status fields(auto& c, Message<ReleaseRequest> auto& m) { return c.u64(m.lease, "lease"); }

Status priority_field(auto& c, auto& priority) {
  KVTIER_RETURN_IF_ERROR(c.u8(priority, "priority"));
  return c.check(priority < kNumPriorities, "priority",
                 [&] { return std::to_string(priority) + " is not a priority"; });
}

Status fields(auto& c, Message<SaveRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(priority_field(c, m.priority));
  KVTIER_RETURN_IF_ERROR(c.u32(m.first_block, "first_block"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_offset, "window_offset"));
  KVTIER_RETURN_IF_ERROR(c.tokens(m.tokens, "tokens"));
  return c.extras(m.extras, "extras");
}

Status fields(auto& c, Message<SaveReply> auto& m) { return c.u32(m.saved, "saved"); }

// `arg` is judged by validate_request, which knows the op that gives it a meaning.
Status fields(auto& c, Message<PrefixRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(c.u8(m.arg, "arg"));
  KVTIER_RETURN_IF_ERROR(c.tokens(m.tokens, "tokens"));
  return c.extras(m.extras, "extras");
}

Status fields(auto& c, Message<CountReply> auto& m) { return c.u64(m.count, "count"); }

Status fields(auto& c, Message<StatsReply> auto& m) {
  return c.string(m.prometheus_text, "prometheus_text", kMaxStatsText);
}

Status fields(auto& c, Message<InspectRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.top_prefixes, "top_prefixes"));
  return c.check(m.top_prefixes <= 10000, "top_prefixes", [] { return std::string("at most 10000"); });
}

Status fields(auto& c, Message<DoctorRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.string(m.model_id, "model_id"));
  KVTIER_RETURN_IF_ERROR(c.string(m.tenant, "tenant"));
  KVTIER_RETURN_IF_ERROR(c.string(m.adapter_id, "adapter_id"));
  KVTIER_RETURN_IF_ERROR(c.string(m.revision, "revision"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.engine_block_tokens, "engine_block_tokens"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.engine_layout_fingerprint, "engine_layout_fingerprint"));
  KVTIER_RETURN_IF_ERROR(c.tokens(m.tokens, "tokens"));
  return c.extras(m.extras, "extras");
}

Status fields(auto& c, Message<ExportListRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.boolean(m.restart, "restart"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.max_blocks, "max_blocks"));
  KVTIER_RETURN_IF_ERROR(c.check(m.max_blocks != 0 && m.max_blocks <= kMaxExportPage, "max_blocks", [&] {
    return std::to_string(m.max_blocks) + " is not in [1, " + std::to_string(kMaxExportPage) + "]";
  }));
  KVTIER_RETURN_IF_ERROR(c.list(m.roots, "roots", kMaxBlocks, 16, [&](auto& k) { return c.key(k, "roots"); }));
  return c.check(m.restart || m.roots.empty(), "roots",
                 [] { return std::string("are named only when a walk restarts"); });
}

Status fields(auto& c, Message<ExportReadRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_offset, "window_offset"));
  return c.list(m.keys, "keys", kMaxBlocks, 16, [&](auto& k) { return c.key(k, "keys"); });
}

Status fields(auto& c, Message<ExportReadReply> auto& m) {
  return c.list(m.blocks, "blocks", kMaxBlocks, 5, [&](auto& s) { return c.status(s, "blocks"); });
}

Status object_key_field(auto& c, auto& key, const char* field) {
  KVTIER_RETURN_IF_ERROR(c.string(key, field, kMaxObjectKeyBytes));
  return c.check(!key.empty(), field, [] { return std::string("an object key must not be empty"); });
}

Status fields(auto& c, Message<ObjectPutRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(priority_field(c, m.priority));
  KVTIER_RETURN_IF_ERROR(c.u64(m.length, "length"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_offset, "window_offset"));
  return object_key_field(c, m.key, "key");
}

Status fields(auto& c, Message<ObjectPutReply> auto& m) { return c.boolean(m.stored, "stored"); }

Status fields(auto& c, Message<ObjectGetRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_offset, "window_offset"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.window_bytes, "window_bytes"));
  return object_key_field(c, m.key, "key");
}

Status fields(auto& c, Message<ObjectGetReply> auto& m) { return c.u64(m.length, "length"); }

Status fields(auto& c, Message<ObjectKeysRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(c.list(m.keys, "keys", kMaxObjectKeys, sizeof(uint32_t) + 1,
                                [&](auto& key) { return object_key_field(c, key, "keys"); }));
  return c.check(!m.keys.empty(), "keys", [] { return std::string("name at least one key"); });
}

Status fields(auto& c, Message<JsonReply> auto& m) { return c.string(m.json, "json", kMaxStatsText); }

Status fields(auto& c, Message<RegisterMemoryRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u8(m.kind, "kind"));
  KVTIER_RETURN_IF_ERROR(c.check(m.kind <= 1, "kind", [&] {
    return std::to_string(m.kind) + " is not a share kind (0 CUDA IPC, 1 memfd)";
  }));
  KVTIER_RETURN_IF_ERROR(c.bytes(m.ipc_handle, "ipc_handle"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.offset, "offset"));
  KVTIER_RETURN_IF_ERROR(c.u64(m.bytes, "bytes"));
  KVTIER_RETURN_IF_ERROR(c.check(m.bytes != 0, "bytes", [] { return std::string("a region must not be empty"); }));
  return c.u64(m.address, "address");
}

Status fields(auto& c, Message<RegisterMemoryReply> auto& m) { return c.u32(m.region, "region"); }

Status fields(auto& c, Message<UnregisterMemoryRequest> auto& m) { return c.u32(m.region, "region"); }

// The shape is checked here (a paged buffer has pages and a canonical one none); offsets, pages
// and the region itself are checked by the daemon against the region and the layout.
Status region_buffer(auto& c, Message<RegionBuffer> auto& b) {
  KVTIER_RETURN_IF_ERROR(c.u8(b.layout, "layout"));
  KVTIER_RETURN_IF_ERROR(c.check(b.layout <= kNumEngineLayouts, "layout", [&] {
    return std::to_string(b.layout) + " is not a KV buffer layout (0 canonical, 1-" +
           std::to_string(kNumEngineLayouts) + " paged)";
  }));
  KVTIER_RETURN_IF_ERROR(c.u32(b.engine_num_pages, "engine_num_pages"));
  KVTIER_RETURN_IF_ERROR(c.u32(b.page_tokens, "page_tokens"));
  KVTIER_RETURN_IF_ERROR(c.list(b.places, "places", kMaxBlocks, 12, [&](auto& p) -> Status {
    KVTIER_RETURN_IF_ERROR(c.u32(p.region, "places.region"));
    return c.u64(p.offset, "places.offset");
  }));
  KVTIER_RETURN_IF_ERROR(
      c.list(b.pages, "pages", kMaxBlocks, sizeof(uint32_t), [&](auto& p) { return c.i32(p, "pages"); }));
  KVTIER_RETURN_IF_ERROR(
      c.check(b.layout != 0 || b.pages.empty(), "pages", [] { return std::string("a canonical buffer has no pages"); }));
  return c.check(b.layout == 0 || !b.places.empty(), "places",
                 [] { return std::string("a paged buffer needs its layer tensors"); });
}

Status fields(auto& c, Message<LoadToRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u64(m.lease, "lease"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.first_block, "first_block"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.layer_begin, "layer_begin"));
  KVTIER_RETURN_IF_ERROR(c.u32(m.layer_count, "layer_count"));
  return region_buffer(c, m.dst);
}

Status fields(auto& c, Message<SaveFromRequest> auto& m) {
  KVTIER_RETURN_IF_ERROR(c.u32(m.namespace_id, "namespace_id"));
  KVTIER_RETURN_IF_ERROR(priority_field(c, m.priority));
  KVTIER_RETURN_IF_ERROR(c.u32(m.first_block, "first_block"));
  KVTIER_RETURN_IF_ERROR(c.tokens(m.tokens, "tokens"));
  KVTIER_RETURN_IF_ERROR(c.extras(m.extras, "extras"));
  return region_buffer(c, m.src);
}

}  // namespace

#define KVTIER_WIRE_MESSAGE(M)                                                                    \
  void encode(const M& m, std::vector<std::byte>& out) {                                          \
    Encoder e(out);                                                                               \
    fields(e, m).ignore(); /* an encoder checks nothing and cannot fail */                        \
  }                                                                                               \
  Status decode(std::span<const std::byte> in, M& m) {                                            \
    return decode_whole(in, #M, m, [](Reader& r, M& t) {                                          \
      Decoder d(r);                                                                               \
      return fields(d, t);                                                                        \
    });                                                                                           \
  }

KVTIER_WIRE_MESSAGE(HelloRequest)
KVTIER_WIRE_MESSAGE(HelloReply)
KVTIER_WIRE_MESSAGE(OpenNamespaceRequest)
KVTIER_WIRE_MESSAGE(OpenNamespaceReply)
KVTIER_WIRE_MESSAGE(LookupRequest)
KVTIER_WIRE_MESSAGE(LookupReply)
KVTIER_WIRE_MESSAGE(LoadRequest)
KVTIER_WIRE_MESSAGE(LoadReply)
KVTIER_WIRE_MESSAGE(ReleaseRequest)
KVTIER_WIRE_MESSAGE(SaveRequest)
KVTIER_WIRE_MESSAGE(SaveReply)
KVTIER_WIRE_MESSAGE(PrefixRequest)
KVTIER_WIRE_MESSAGE(CountReply)
KVTIER_WIRE_MESSAGE(StatsReply)
KVTIER_WIRE_MESSAGE(InspectRequest)
KVTIER_WIRE_MESSAGE(DoctorRequest)
KVTIER_WIRE_MESSAGE(ExportListRequest)
KVTIER_WIRE_MESSAGE(ExportReadRequest)
KVTIER_WIRE_MESSAGE(ExportReadReply)
KVTIER_WIRE_MESSAGE(ObjectPutRequest)
KVTIER_WIRE_MESSAGE(ObjectPutReply)
KVTIER_WIRE_MESSAGE(ObjectGetRequest)
KVTIER_WIRE_MESSAGE(ObjectGetReply)
KVTIER_WIRE_MESSAGE(ObjectKeysRequest)
KVTIER_WIRE_MESSAGE(JsonReply)
KVTIER_WIRE_MESSAGE(RegisterMemoryRequest)
KVTIER_WIRE_MESSAGE(RegisterMemoryReply)
KVTIER_WIRE_MESSAGE(UnregisterMemoryRequest)
KVTIER_WIRE_MESSAGE(LoadToRequest)
KVTIER_WIRE_MESSAGE(SaveFromRequest)

#undef KVTIER_WIRE_MESSAGE

// ---- status ----------------------------------------------------------------------------------

void encode_status(const Status& s, std::vector<std::byte>& out) {
  Encoder e(out);
  e.status(s, "status").ignore();
}

Result<std::span<const std::byte>> decode_status(std::span<const std::byte> in, Status& remote) {
  Reader r(in, "status");
  Decoder d(r);
  Status s;
  KVTIER_RETURN_IF_ERROR(d.status(s, ""));
  if (s.is_ok()) {
    remote = Status::ok();
    return r.rest();
  }
  KVTIER_RETURN_IF_ERROR(r.finish());  // an error reply has no body
  remote = std::move(s);
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
    case Op::kObjectPut: {
      ObjectPutRequest m;
      return decode(payload, m);
    }
    case Op::kObjectGet: {
      ObjectGetRequest m;
      return decode(payload, m);
    }
    case Op::kObjectExists:
    case Op::kObjectRemove: {
      ObjectKeysRequest m;
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
