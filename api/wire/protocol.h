// The kvtierd wire protocol (DESIGN.md "Sharing across processes"): a small versioned binary
// protocol over a Unix stream socket. Control travels here; KV bytes never do — they move through
// a shared-memory window the client creates and hands over (SCM_RIGHTS) in its hello.
//
// Frame: a 16-byte header, then `payload_bytes` bytes of payload. All integers little-endian.
//
//   u32 magic ("KVT1")  u16 version  u16 op  u32 request_id  u32 payload_bytes
//
// A reply carries the request's id and op | kReplyBit; its payload opens with a status
// (u8 code, string message) and, when the code is kOk, the reply body.
//
// Field encodings: u8/u16/u32/u64 fixed width; string = u32 length + bytes (≤ kMaxString);
// token list = u32 count + count × u32 (≤ kMaxTokens); a BlockKey is 16 bytes (lo, hi as u64).
// Every decode checks every length against the bytes that remain and against its limit, rejects
// trailing bytes, unknown enum values and unknown ops, and returns kProtocolError — it never reads
// out of bounds, never allocates more than the frame's own size allows, and never throws.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kvtier/block_key.h"
#include "kvtier/kv_layout.h"
#include "kvtier/object.h"
#include "kvtier/status.h"
#include "kvtier/tier.h"
#include "kvtier/tokens.h"

namespace kvtier::proto {

inline constexpr uint32_t kMagic = 0x3154564Bu;  // "KVT1" little-endian
// 2: OpenNamespaceRequest carries the revision; 3: RegionBuffer::page_tokens; 4: the prefill
// speed in OpenNamespaceRequest, what a lookup held back in LookupReply; 5: kInspect, kDoctor;
// 6: kExportList, kExportRead; 7: kObjectPut, kObjectGet, kObjectExists, kObjectRemove.
inline constexpr uint16_t kVersion = 7;
inline constexpr size_t kHeaderBytes = 16;
inline constexpr uint32_t kMaxPayload = 8u << 20;  // 8 MiB: ~2M tokens
inline constexpr uint32_t kMaxString = 4096;
inline constexpr uint32_t kMaxTokens = 1u << 21;   // 2M tokens per request
inline constexpr uint32_t kMaxExtras = 1u << 16;
inline constexpr uint32_t kMaxBlocks = 1u << 20;
inline constexpr uint16_t kReplyBit = 0x8000;

enum class Op : uint16_t {
  kHello = 1,          // first request of every connection; the window memfd rides along
  kOpenNamespace = 2,  // model/tenant/adapter → namespace id (tenant checked against peer creds)
  kLookup = 3,         // longest cached prefix, optionally under a lease
  kLoad = 4,           // copy leased blocks [first, first+count) into the window
  kRelease = 5,        // release a lease
  kSave = 6,           // save blocks from the window
  kPrefetch = 7,       // promote a prefix's blocks to a tier
  kPin = 8,            // pin a prefix (released on unpin or disconnect) and set its priority
  kUnpin = 9,
  kStats = 10,         // Prometheus text of the daemon's metrics
  kDoorbell = 11,      // no payload, no reply: "look at the mailbox" (api/wire/mailbox.h); the
                       // daemon sends it back with kReplyBit set to wake a parked client
  kRegisterMemory = 12,    // share a region of the client's GPU memory (transfer/shared_device_memory.h)
  kUnregisterMemory = 13,  // end a registration
  kLoadTo = 14,        // copy leased blocks straight into a registered region
  kSaveFrom = 15,      // save blocks straight from a registered region
  kInspect = 16,       // what the daemon holds, as JSON (operators only: kvtier inspect)
  kDoctor = 17,        // why a prompt's lookup missed, as JSON (operators only: kvtier doctor)
  kExportList = 18,    // the daemon's blocks depth first, a page at a time, as JSON (operators only)
  kExportRead = 19,    // blocks by key into the window, each verified (operators only: kvtier export)
  kObjectPut = 20,     // a key-addressed object from the window (api/store/object_store.h)
  kObjectGet = 21,     // a key-addressed object into the window
  kObjectExists = 22,  // how many of some keys, from the first, are stored
  kObjectRemove = 23,  // erase objects by key
};
inline constexpr uint16_t kLastOp = static_cast<uint16_t>(Op::kObjectRemove);

/// The ops once, in wire order: each one's name (logs, the daemon's per-op metrics) and whether a
/// request of it is answered (a doorbell is not: no payload, no reply). op_name, is_known_op and
/// kvtierd's instruments read this table; the static_assert below ties it to the enum.
struct OpInfo {
  Op op;
  std::string_view name;
  bool answered;
};
inline constexpr OpInfo kOps[] = {
    {Op::kHello, "hello", true},
    {Op::kOpenNamespace, "open_namespace", true},
    {Op::kLookup, "lookup", true},
    {Op::kLoad, "load", true},
    {Op::kRelease, "release", true},
    {Op::kSave, "save", true},
    {Op::kPrefetch, "prefetch", true},
    {Op::kPin, "pin", true},
    {Op::kUnpin, "unpin", true},
    {Op::kStats, "stats", true},
    {Op::kDoorbell, "doorbell", false},
    {Op::kRegisterMemory, "register_memory", true},
    {Op::kUnregisterMemory, "unregister_memory", true},
    {Op::kLoadTo, "load_to", true},
    {Op::kSaveFrom, "save_from", true},
    {Op::kInspect, "inspect", true},
    {Op::kDoctor, "doctor", true},
    {Op::kExportList, "export_list", true},
    {Op::kExportRead, "export_read", true},
    {Op::kObjectPut, "object_put", true},
    {Op::kObjectGet, "object_get", true},
    {Op::kObjectExists, "object_exists", true},
    {Op::kObjectRemove, "object_remove", true},
};
consteval bool ops_table_matches_enum() {
  if (std::size(kOps) != kLastOp) return false;
  for (size_t i = 0; i < std::size(kOps); ++i) {
    if (static_cast<uint16_t>(kOps[i].op) != i + 1 || kOps[i].name.empty()) return false;
  }
  return true;
}
static_assert(ops_table_matches_enum(), "kOps lists every Op once, in wire order from 1");

/// True for the ops above (requests only).
constexpr bool is_known_op(uint16_t op) noexcept { return op >= 1 && op <= kLastOp; }
/// The op's name from kOps; "unknown" for any other value.
constexpr std::string_view op_name(uint16_t op) noexcept {
  return is_known_op(op) ? kOps[op - 1].name : std::string_view("unknown");
}

struct FrameHeader {
  uint32_t magic = kMagic;
  uint16_t version = kVersion;
  uint16_t op = 0;
  uint32_t request_id = 0;
  uint32_t payload_bytes = 0;
};
void encode_header(const FrameHeader& h, std::byte out[kHeaderBytes]) noexcept;
/// kProtocolError for a bad magic, payload_bytes > kMaxPayload; kUnavailable-free: the version is
/// returned as read so the server can answer "unsupported version" before closing.
Result<FrameHeader> decode_header(std::span<const std::byte> bytes);

// ---- messages -------------------------------------------------------------------------------

struct HelloRequest {
  uint16_t min_version = kVersion;
  uint16_t max_version = kVersion;
  uint64_t window_bytes = 0;  // size of the memfd window passed with the frame
  std::string client_name;    // for logs and metrics only
  uint32_t mailbox_bytes = 0; // 0, or a mailbox of this size follows the window in the same
                              // memfd, at mailbox_offset(window_bytes) (api/wire/mailbox.h)
};
struct HelloReply {
  uint16_t version = kVersion;
  KvLayout layout;            // the daemon's KV layout (one per daemon)
  uint64_t client_id = 0;
  uint32_t uid = 0;           // the identity the daemon saw (peer credentials)
  uint32_t gid = 0;
  std::vector<std::string> tenants;  // tenants this identity may open
};

struct OpenNamespaceRequest {
  std::string model_id;
  std::string tenant;      // a tenant name from the daemon's config ("" = the default tenant)
  std::string adapter_id;
  uint64_t layout_fingerprint = 0;  // must equal the daemon layout's, else kLayoutMismatch
  std::string revision;    // the weights' revision, part of the root key ("" = none); version 2
  /// The engine's prefill speed, tokens per second, finite and >= 0 (0: declares nothing; every
  /// cached block is offered). Version 4. Sent as the double's bits.
  double prefill_tokens_per_second = 0;
};
struct OpenNamespaceReply {
  uint32_t namespace_id = 0;
};

struct LookupRequest {
  uint32_t namespace_id = 0;
  bool take_lease = true;
  std::vector<TokenId> tokens;
  std::vector<BlockExtra> extras;
};
struct LookupReply {
  uint64_t lease = 0;              // 0 when no lease was taken or nothing matched
  uint64_t tokens = 0;             // matched tokens
  std::vector<uint8_t> tier_masks; // per matched block: tier_bit(t) set when resident in t
  uint32_t held_back_blocks = 0;   // cached blocks after the match, slower to restore than recompute (v4)
  uint64_t saved_ns = 0;           // estimated recompute minus restore time of the match (v4)
};

struct LoadRequest {
  uint64_t lease = 0;
  uint32_t first_block = 0;   // blocks [first_block, first_block + block_count) of the match
  uint32_t block_count = 0;
  uint64_t window_offset = 0; // where block first_block goes; the rest follow back to back
  uint32_t layer_begin = 0;   // layers [layer_begin, layer_begin + layer_count) of each block;
  uint32_t layer_count = 0;   // 0: every layer from layer_begin on. Each block's layers lie back
                              // to back, so a block takes layer_count × bytes_per_block_layer
};
struct LoadReply {
  uint32_t blocks = 0;          // blocks written into the window
  uint32_t from_nvme = 0;       // of which restored from NVMe
};

struct ReleaseRequest {
  uint64_t lease = 0;
};

struct SaveRequest {
  uint32_t namespace_id = 0;
  uint8_t priority = 1;       // Priority
  uint32_t first_block = 0;   // the window holds blocks [first_block, tokens/block_tokens)
  uint64_t window_offset = 0;
  std::vector<TokenId> tokens;  // the prompt from its start (earlier blocks must be cached)
  std::vector<BlockExtra> extras;
};
struct SaveReply {
  uint32_t saved = 0;  // blocks newly saved (the rest were cached already)
};

struct PrefixRequest {  // kPrefetch, kPin, kUnpin
  uint32_t namespace_id = 0;
  uint8_t arg = 0;      // kPrefetch: Tier; kPin: Priority; kUnpin: unused (0)
  std::vector<TokenId> tokens;
  std::vector<BlockExtra> extras;
};
struct CountReply {     // kPrefetch, kPin, kUnpin, kRelease: blocks touched; kObjectExists, kObjectRemove: objects
  uint64_t count = 0;
};

struct RegisterMemoryRequest {
  uint8_t kind = 0;                        // ShareKind: 0 CUDA IPC, 1 memfd (passed with the frame)
  std::array<std::byte, 64> ipc_handle{};  // CUDA IPC: the allocation's cudaIpcMemHandle_t
  uint64_t offset = 0;                     // of the region in the allocation or the memfd
  uint64_t bytes = 0;                      // > 0
  uint64_t address = 0;                    // CUDA IPC: the region's address in the client, used only
                                           // by a daemon in the client's own process (peer pid)
};
struct RegisterMemoryReply {
  uint32_t region = 0;  // names the region in kLoadTo/kSaveFrom/kUnregisterMemory; never 0
};
struct UnregisterMemoryRequest {
  uint32_t region = 0;
};

/// A place in a registered region.
struct RegionRef {
  uint32_t region = 0;
  uint64_t offset = 0;
};
/// KV in registered regions: canonical blocks (one place per block, each block's layers back to
/// back as in the tiers), or an engine's paged layout (one place per layer tensor — an engine
/// often allocates each layer on its own — and a page per block, kernels/page_pack.h).
struct RegionBuffer {
  uint8_t layout = 0;              // 0 canonical; 1 + kernels::EngineLayout for paged
  uint32_t engine_num_pages = 0;   // paged: pages in each layer tensor
  uint32_t page_tokens = 0;        // paged: tokens per page, a multiple of block_tokens (0: equal)
  std::vector<RegionRef> places;   // canonical: [blocks]; paged: [layers]
  std::vector<int32_t> pages;      // paged: [blocks]; canonical: empty
  size_t block_count() const noexcept { return layout == 0 ? places.size() : pages.size(); }
};
struct LoadToRequest {
  uint64_t lease = 0;
  uint32_t first_block = 0;   // blocks [first_block, first_block + dst.block_count()) of the match
  uint32_t layer_begin = 0;   // layers [layer_begin, layer_begin + layer_count), 0: to the last
  uint32_t layer_count = 0;   // (each lands where it belongs in the destination block)
  RegionBuffer dst;
};  // reply: LoadReply
struct SaveFromRequest {
  uint32_t namespace_id = 0;
  uint8_t priority = 1;
  uint32_t first_block = 0;   // src holds blocks [first_block, tokens/block_tokens)
  std::vector<TokenId> tokens;
  std::vector<BlockExtra> extras;
  RegionBuffer src;
};  // reply: SaveReply

struct StatsReply {
  std::string prometheus_text;  // the one string not bound by kMaxString: only by kMaxPayload
};

struct InspectRequest {
  uint32_t top_prefixes = 10;  // the most reused prefixes listed (at most 10000)
};
struct DoctorRequest {
  std::string model_id;
  std::string tenant;              // a tenant name from the daemon's config
  std::string adapter_id;
  std::string revision;
  uint32_t engine_block_tokens = 0;       // the engine's page size (0: the daemon's)
  uint64_t engine_layout_fingerprint = 0; // the engine's KV layout (0: the daemon's)
  std::vector<TokenId> tokens;
  std::vector<BlockExtra> extras;
};
inline constexpr uint32_t kMaxExportPage = 4096;  // blocks per kExportList reply
struct ExportListRequest {
  bool restart = false;          // a new walk over a snapshot of the index; false: its next page
  uint32_t max_blocks = 256;     // 1..kMaxExportPage
  std::vector<BlockKey> roots;   // restart: the namespaces walked, in this order (empty: all)
};  // reply: JsonReply
struct ExportReadRequest {
  uint64_t window_offset = 0;    // block i lands at window_offset + i × bytes_per_block
  std::vector<BlockKey> keys;    // at most kMaxBlocks
};
struct ExportReadReply {
  std::vector<Status> blocks;    // per key: ok (its bytes are in the window) or why not
};
struct ObjectPutRequest {
  uint32_t namespace_id = 0;
  uint8_t priority = 1;          // Priority
  uint64_t length = 0;           // the object's bytes, laid out in the window as object_store.h says
  uint64_t window_offset = 0;
  std::string key;               // 1..kMaxObjectKeyBytes bytes, any
};
struct ObjectPutReply {
  bool stored = false;           // false: the key was stored whole already and is kept
};
struct ObjectGetRequest {
  uint32_t namespace_id = 0;
  uint64_t window_offset = 0;    // the object's blocks land here, laid out
  uint64_t window_bytes = 0;     // the room there
  std::string key;
};
struct ObjectGetReply {
  uint64_t length = 0;           // its bytes: window_offset + [0, length)
};
struct ObjectKeysRequest {       // kObjectExists, kObjectRemove; reply: CountReply
  uint32_t namespace_id = 0;
  std::vector<std::string> keys; // 1..kMaxObjectKeys, each 1..kMaxObjectKeyBytes bytes
};
struct JsonReply {  // kInspect, kDoctor, kExportList
  std::string json;  // bound by kMaxPayload only, as StatsReply's text
};

// Each encode appends the payload (not the header) to `out`. Each decode reads one whole
// payload: kProtocolError on any malformed, truncated, oversized or trailing input.
void encode(const HelloRequest& m, std::vector<std::byte>& out);
void encode(const HelloReply& m, std::vector<std::byte>& out);
void encode(const OpenNamespaceRequest& m, std::vector<std::byte>& out);
void encode(const OpenNamespaceReply& m, std::vector<std::byte>& out);
void encode(const LookupRequest& m, std::vector<std::byte>& out);
void encode(const LookupReply& m, std::vector<std::byte>& out);
void encode(const LoadRequest& m, std::vector<std::byte>& out);
void encode(const LoadReply& m, std::vector<std::byte>& out);
void encode(const ReleaseRequest& m, std::vector<std::byte>& out);
void encode(const SaveRequest& m, std::vector<std::byte>& out);
void encode(const SaveReply& m, std::vector<std::byte>& out);
void encode(const PrefixRequest& m, std::vector<std::byte>& out);
void encode(const CountReply& m, std::vector<std::byte>& out);
void encode(const StatsReply& m, std::vector<std::byte>& out);
void encode(const RegisterMemoryRequest& m, std::vector<std::byte>& out);
void encode(const RegisterMemoryReply& m, std::vector<std::byte>& out);
void encode(const UnregisterMemoryRequest& m, std::vector<std::byte>& out);
void encode(const LoadToRequest& m, std::vector<std::byte>& out);
void encode(const SaveFromRequest& m, std::vector<std::byte>& out);
void encode(const InspectRequest& m, std::vector<std::byte>& out);
void encode(const DoctorRequest& m, std::vector<std::byte>& out);
void encode(const ExportListRequest& m, std::vector<std::byte>& out);
void encode(const ExportReadRequest& m, std::vector<std::byte>& out);
void encode(const ExportReadReply& m, std::vector<std::byte>& out);
void encode(const ObjectPutRequest& m, std::vector<std::byte>& out);
void encode(const ObjectPutReply& m, std::vector<std::byte>& out);
void encode(const ObjectGetRequest& m, std::vector<std::byte>& out);
void encode(const ObjectGetReply& m, std::vector<std::byte>& out);
void encode(const ObjectKeysRequest& m, std::vector<std::byte>& out);
void encode(const JsonReply& m, std::vector<std::byte>& out);

Status decode(std::span<const std::byte> in, HelloRequest& m);
Status decode(std::span<const std::byte> in, HelloReply& m);
Status decode(std::span<const std::byte> in, OpenNamespaceRequest& m);
Status decode(std::span<const std::byte> in, OpenNamespaceReply& m);
Status decode(std::span<const std::byte> in, LookupRequest& m);
Status decode(std::span<const std::byte> in, LookupReply& m);
Status decode(std::span<const std::byte> in, LoadRequest& m);
Status decode(std::span<const std::byte> in, LoadReply& m);
Status decode(std::span<const std::byte> in, ReleaseRequest& m);
Status decode(std::span<const std::byte> in, SaveRequest& m);
Status decode(std::span<const std::byte> in, SaveReply& m);
Status decode(std::span<const std::byte> in, PrefixRequest& m);
Status decode(std::span<const std::byte> in, CountReply& m);
Status decode(std::span<const std::byte> in, StatsReply& m);
Status decode(std::span<const std::byte> in, RegisterMemoryRequest& m);
Status decode(std::span<const std::byte> in, RegisterMemoryReply& m);
Status decode(std::span<const std::byte> in, UnregisterMemoryRequest& m);
Status decode(std::span<const std::byte> in, LoadToRequest& m);
Status decode(std::span<const std::byte> in, SaveFromRequest& m);
Status decode(std::span<const std::byte> in, InspectRequest& m);
Status decode(std::span<const std::byte> in, DoctorRequest& m);
Status decode(std::span<const std::byte> in, ExportListRequest& m);
Status decode(std::span<const std::byte> in, ExportReadRequest& m);
Status decode(std::span<const std::byte> in, ExportReadReply& m);
Status decode(std::span<const std::byte> in, ObjectPutRequest& m);
Status decode(std::span<const std::byte> in, ObjectPutReply& m);
Status decode(std::span<const std::byte> in, ObjectGetRequest& m);
Status decode(std::span<const std::byte> in, ObjectGetReply& m);
Status decode(std::span<const std::byte> in, ObjectKeysRequest& m);
Status decode(std::span<const std::byte> in, JsonReply& m);

/// A reply payload's status prefix: u8 code, string message. encode_status appends it;
/// decode_status reads it and returns the body that follows (empty unless the code is kOk).
void encode_status(const Status& s, std::vector<std::byte>& out);
Result<std::span<const std::byte>> decode_status(std::span<const std::byte> in, Status& remote);

/// Decodes one request payload of op `op` into the matching message and discards it: what the
/// fuzz target and the server's first validation step call. kProtocolError for an unknown op.
Status validate_request(uint16_t op, std::span<const std::byte> payload);

}  // namespace kvtier::proto
