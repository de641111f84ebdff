// The kvtierd wire codec: every message survives a round trip, the byte format is pinned, and
// every malformed payload (truncated, oversized, trailing, unknown enum or op) is kProtocolError.
#include <catch2/catch.hpp>

#include <limits>

#include <set>
#include <string_view>

#include <chrono>
#include <cstring>
#include <thread>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "kvtier/kv_buffer.h"
#include "api/wire/socket_io.h"

using namespace kvtier;
using namespace kvtier::proto;

namespace {

using Bytes = std::vector<std::byte>;

template <typename M>
Bytes encoded(const M& m) {
  Bytes out;
  encode(m, out);
  return out;
}

template <typename M>
Status decode_as(std::span<const std::byte> in) {
  M m;
  return decode(in, m);
}

/// Decodes `in` as an M and encodes what came out again into `out`.
template <typename M>
Status reencode_as(std::span<const std::byte> in, Bytes& out) {
  M m;
  KVTIER_RETURN_IF_ERROR(decode(in, m));
  encode(m, out);
  return Status::ok();
}

Bytes bytes_of(std::initializer_list<uint8_t> v) {
  Bytes out;
  for (uint8_t b : v) out.push_back(std::byte{b});
  return out;
}

void put_u32(Bytes& b, size_t at, uint32_t v) {
  for (size_t i = 0; i < 4; ++i) b.at(at + i) = std::byte(static_cast<uint8_t>(v >> (8 * i)));
}

bool is_protocol_error(const Status& s) { return s.code() == StatusCode::kProtocolError; }
bool mentions(const Status& s, std::string_view what) {
  return s.message().find(what) != std::string_view::npos;
}

// Token ids with every byte distinct, so a byte-order or offset slip changes the value.
std::vector<TokenId> sample_tokens(size_t n) {
  std::vector<TokenId> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = 0x01020304u * static_cast<uint32_t>(i + 1) + 0x80000000u;
  return t;
}

std::vector<BlockExtra> sample_extras() {
  return {BlockExtra{0, BlockKey{0x1122334455667788ull, 0x99AABBCCDDEEFF00ull}},
          BlockExtra{3, BlockKey{0xFEDCBA9876543210ull, 0x0123456789ABCDEFull}}};
}

void check_same_extras(const std::vector<BlockExtra>& a, const std::vector<BlockExtra>& b) {
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    CHECK(a[i].block_index == b[i].block_index);
    CHECK(a[i].item_hash == b[i].item_hash);
  }
}

KvLayout sample_layout() {
  auto l = KvLayout::latent(61, 576, Dtype::kFp8E4M3, 64);  // every field off its default
  REQUIRE(l.is_ok());
  return *l;
}

HelloRequest sample_hello() {
  return {.min_version = 2, .max_version = 3, .window_bytes = 0x0000000123456789ull,
          .client_name = "vllm-worker-7", .mailbox_bytes = 65536};
}
HelloReply sample_hello_reply() {
  return {.version = 2, .layout = sample_layout(), .client_id = 0xA1B2C3D4E5F60718ull,
          .uid = 1000, .gid = 4242, .tenants = {"", "team-a", "team-b"}};
}
OpenNamespaceRequest sample_open() {
  return {.model_id = "meta-llama/Llama-3.1-8B-Instruct@main", .tenant = "team-a",
          .adapter_id = "lora-sql", .layout_fingerprint = 0xDEADBEEFCAFEF00Dull,
          .revision = "0123abcd", .prefill_tokens_per_second = 12345.5};
}
LookupRequest sample_lookup() {
  return {.namespace_id = 0x00C0FFEE, .take_lease = false, .tokens = sample_tokens(37),
          .extras = sample_extras()};
}
LookupReply sample_lookup_reply() {
  return {.lease = 0x1234567890ull, .tokens = 48,
          .tier_masks = {tier_bit(Tier::kHbm), uint8_t(tier_bit(Tier::kHost) | tier_bit(Tier::kNvme)),
                         tier_bit(Tier::kNvme)},
          .held_back_blocks = 9, .saved_ns = 0x0102030405ull};
}
LoadRequest sample_load() {
  return {.lease = 0x1234567890ull, .first_block = 2, .block_count = 5,
          .window_offset = 0x0000000500000000ull, .layer_begin = 3, .layer_count = 7};
}
SaveRequest sample_save() {
  return {.namespace_id = 9, .priority = static_cast<uint8_t>(Priority::kRetained),
          .first_block = 1, .window_offset = 4096, .tokens = sample_tokens(64),
          .extras = sample_extras()};
}
RegisterMemoryRequest sample_register() {
  RegisterMemoryRequest m{.kind = 1, .offset = 1ull << 33, .bytes = 3ull << 30, .address = 0x7f0012345000ull};
  for (size_t i = 0; i < m.ipc_handle.size(); ++i) m.ipc_handle[i] = std::byte(i * 3 + 1);
  return m;
}
RegionBuffer sample_region_buffer(bool paged) {
  if (!paged) return {.places = {{1, 0}, {1, 4096}, {2, 1ull << 40}}};
  return {.layout = 3 /* 1 + FlashInfer HND */, .engine_num_pages = 900, .page_tokens = 64,
          .places = {{3, 0}, {4, 64}}, .pages = {7, 0, 899}};
}
LoadToRequest sample_load_to() {
  return {.lease = 0x1234567890ull, .first_block = 2, .layer_begin = 1, .layer_count = 3,
          .dst = sample_region_buffer(false)};
}
SaveFromRequest sample_save_from() {
  return {.namespace_id = 9, .priority = static_cast<uint8_t>(Priority::kHigh), .first_block = 1,
          .tokens = sample_tokens(64), .extras = sample_extras(), .src = sample_region_buffer(true)};
}
ExportListRequest sample_export_list() {
  return {.restart = true, .max_blocks = 300, .roots = {BlockKey{1, 2}, BlockKey{0xFFFF, 0x8000000000000000ull}}};
}
ExportReadRequest sample_export_read() {
  return {.window_offset = 8192, .keys = {BlockKey{9, 10}, BlockKey{11, 12}, BlockKey{13, 14}}};
}
ExportReadReply sample_export_reply() {
  return {{Status::ok(), Status(StatusCode::kChecksumMismatch, "bad copy"), Status(StatusCode::kNotFound, "gone")}};
}

ObjectPutRequest sample_object_put() {
  return {.namespace_id = 4, .priority = static_cast<uint8_t>(Priority::kHigh), .length = 70000,
          .window_offset = 4096, .key = std::string("page\0hash", 9)};
}
ObjectGetRequest sample_object_get() {
  return {.namespace_id = 4, .window_offset = 0, .window_bytes = 1 << 20, .key = "chunk@model@0"};
}
ObjectKeysRequest sample_object_keys() { return {.namespace_id = 4, .keys = {"a", std::string(kMaxObjectKeyBytes, 'k')}}; }

DoctorRequest sample_doctor() {
  return {.model_id = "org/model", .tenant = "team-a", .adapter_id = "lora-1", .revision = "abc123",
          .engine_block_tokens = 32, .engine_layout_fingerprint = 0x0102030405060708ull,
          .tokens = sample_tokens(40), .extras = sample_extras()};
}
PrefixRequest sample_prefix() {
  return {.namespace_id = 3, .arg = static_cast<uint8_t>(Tier::kHost),
          .tokens = sample_tokens(16), .extras = {}};
}

// One valid payload of every message, with the decoder that must accept it.
struct Sample {
  std::string name;
  Bytes payload;
  Status (*decode)(std::span<const std::byte>);
  Status (*reencode)(std::span<const std::byte>, Bytes&);
};

std::vector<Sample> all_samples() {
  return {
      {"HelloRequest", encoded(sample_hello()), &decode_as<HelloRequest>, &reencode_as<HelloRequest>},
      {"HelloReply", encoded(sample_hello_reply()), &decode_as<HelloReply>, &reencode_as<HelloReply>},
      {"OpenNamespaceRequest", encoded(sample_open()), &decode_as<OpenNamespaceRequest>, &reencode_as<OpenNamespaceRequest>},
      {"OpenNamespaceReply", encoded(OpenNamespaceReply{77}), &decode_as<OpenNamespaceReply>, &reencode_as<OpenNamespaceReply>},
      {"LookupRequest", encoded(sample_lookup()), &decode_as<LookupRequest>, &reencode_as<LookupRequest>},
      {"LookupReply", encoded(sample_lookup_reply()), &decode_as<LookupReply>, &reencode_as<LookupReply>},
      {"LoadRequest", encoded(sample_load()), &decode_as<LoadRequest>, &reencode_as<LoadRequest>},
      {"LoadReply", encoded(LoadReply{5, 2}), &decode_as<LoadReply>, &reencode_as<LoadReply>},
      {"ReleaseRequest", encoded(ReleaseRequest{0x1234567890ull}), &decode_as<ReleaseRequest>, &reencode_as<ReleaseRequest>},
      {"SaveRequest", encoded(sample_save()), &decode_as<SaveRequest>, &reencode_as<SaveRequest>},
      {"SaveReply", encoded(SaveReply{3}), &decode_as<SaveReply>, &reencode_as<SaveReply>},
      {"PrefixRequest", encoded(sample_prefix()), &decode_as<PrefixRequest>, &reencode_as<PrefixRequest>},
      {"CountReply", encoded(CountReply{0x0102030405060708ull}), &decode_as<CountReply>, &reencode_as<CountReply>},
      {"StatsReply", encoded(StatsReply{"kvtier_hits_total 12\n"}), &decode_as<StatsReply>, &reencode_as<StatsReply>},
      {"RegisterMemoryRequest", encoded(sample_register()), &decode_as<RegisterMemoryRequest>, &reencode_as<RegisterMemoryRequest>},
      {"RegisterMemoryReply", encoded(RegisterMemoryReply{5}), &decode_as<RegisterMemoryReply>, &reencode_as<RegisterMemoryReply>},
      {"UnregisterMemoryRequest", encoded(UnregisterMemoryRequest{5}), &decode_as<UnregisterMemoryRequest>, &reencode_as<UnregisterMemoryRequest>},
      {"LoadToRequest", encoded(sample_load_to()), &decode_as<LoadToRequest>, &reencode_as<LoadToRequest>},
      {"SaveFromRequest", encoded(sample_save_from()), &decode_as<SaveFromRequest>, &reencode_as<SaveFromRequest>},
      {"InspectRequest", encoded(InspectRequest{25}), &decode_as<InspectRequest>, &reencode_as<InspectRequest>},
      {"DoctorRequest", encoded(sample_doctor()), &decode_as<DoctorRequest>, &reencode_as<DoctorRequest>},
      {"JsonReply", encoded(JsonReply{"{\"cause\": \"evicted\"}"}), &decode_as<JsonReply>, &reencode_as<JsonReply>},
      {"ExportListRequest", encoded(sample_export_list()), &decode_as<ExportListRequest>, &reencode_as<ExportListRequest>},
      {"ExportReadRequest", encoded(sample_export_read()), &decode_as<ExportReadRequest>, &reencode_as<ExportReadRequest>},
      {"ExportReadReply", encoded(sample_export_reply()), &decode_as<ExportReadReply>, &reencode_as<ExportReadReply>},
      {"ObjectPutRequest", encoded(sample_object_put()), &decode_as<ObjectPutRequest>, &reencode_as<ObjectPutRequest>},
      {"ObjectPutReply", encoded(ObjectPutReply{true}), &decode_as<ObjectPutReply>, &reencode_as<ObjectPutReply>},
      {"ObjectGetRequest", encoded(sample_object_get()), &decode_as<ObjectGetRequest>, &reencode_as<ObjectGetRequest>},
      {"ObjectGetReply", encoded(ObjectGetReply{70000}), &decode_as<ObjectGetReply>, &reencode_as<ObjectGetReply>},
      {"ObjectKeysRequest", encoded(sample_object_keys()), &decode_as<ObjectKeysRequest>, &reencode_as<ObjectKeysRequest>},
  };
}

// One valid payload of every request op (kStats has none).
std::vector<std::pair<Op, Bytes>> all_requests() {
  PrefixRequest pin = sample_prefix();
  pin.arg = static_cast<uint8_t>(Priority::kHigh);
  PrefixRequest unpin = sample_prefix();
  unpin.arg = 0;
  return {{Op::kHello, encoded(sample_hello())},   {Op::kOpenNamespace, encoded(sample_open())},
          {Op::kLookup, encoded(sample_lookup())}, {Op::kLoad, encoded(sample_load())},
          {Op::kRelease, encoded(ReleaseRequest{1})}, {Op::kSave, encoded(sample_save())},
          {Op::kPrefetch, encoded(sample_prefix())}, {Op::kPin, encoded(pin)},
          {Op::kUnpin, encoded(unpin)},
          {Op::kRegisterMemory, encoded(sample_register())},
          {Op::kUnregisterMemory, encoded(UnregisterMemoryRequest{1})},
          {Op::kLoadTo, encoded(sample_load_to())},
          {Op::kSaveFrom, encoded(sample_save_from())},
          {Op::kInspect, encoded(InspectRequest{25})},
          {Op::kDoctor, encoded(sample_doctor())},
          {Op::kExportList, encoded(sample_export_list())},
          {Op::kExportRead, encoded(sample_export_read())},
          {Op::kObjectPut, encoded(sample_object_put())},
          {Op::kObjectGet, encoded(sample_object_get())},
          {Op::kObjectExists, encoded(sample_object_keys())},
          {Op::kObjectRemove, encoded(sample_object_keys())}};
}

}  // namespace

TEST_CASE("Every request round-trips field by field") {
  {
    HelloRequest in = sample_hello(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.min_version == in.min_version);
    CHECK(out.max_version == in.max_version);
    CHECK(out.window_bytes == in.window_bytes);
    CHECK(out.client_name == in.client_name);
    CHECK(out.mailbox_bytes == in.mailbox_bytes);
  }
  {
    OpenNamespaceRequest in = sample_open(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.model_id == in.model_id);
    CHECK(out.tenant == in.tenant);
    CHECK(out.adapter_id == in.adapter_id);
    CHECK(out.layout_fingerprint == in.layout_fingerprint);
    CHECK(out.revision == in.revision);
    CHECK(out.prefill_tokens_per_second == in.prefill_tokens_per_second);
  }
  {
    LookupRequest in = sample_lookup(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.namespace_id == in.namespace_id);
    CHECK(out.take_lease == false);
    CHECK(out.tokens == in.tokens);
    check_same_extras(out.extras, in.extras);
  }
  {
    LoadRequest in = sample_load(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.lease == in.lease);
    CHECK(out.first_block == in.first_block);
    CHECK(out.block_count == in.block_count);
    CHECK(out.window_offset == in.window_offset);
    CHECK(out.layer_begin == in.layer_begin);
    CHECK(out.layer_count == in.layer_count);
  }
  {
    ReleaseRequest out;
    REQUIRE(decode(encoded(ReleaseRequest{0xFFFFFFFFFFFFFFFEull}), out).is_ok());
    CHECK(out.lease == 0xFFFFFFFFFFFFFFFEull);
  }
  {
    SaveRequest in = sample_save(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.namespace_id == in.namespace_id);
    CHECK(out.priority == in.priority);
    CHECK(out.first_block == in.first_block);
    CHECK(out.window_offset == in.window_offset);
    CHECK(out.tokens == in.tokens);
    check_same_extras(out.extras, in.extras);
  }
  {
    PrefixRequest in = sample_prefix(), out;
    in.extras = sample_extras();
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.namespace_id == in.namespace_id);
    CHECK(out.arg == in.arg);
    CHECK(out.tokens == in.tokens);
    check_same_extras(out.extras, in.extras);
  }
}

namespace {
void check_same_buffer(const RegionBuffer& out, const RegionBuffer& in) {
  CHECK(out.layout == in.layout);
  CHECK(out.engine_num_pages == in.engine_num_pages);
  CHECK(out.page_tokens == in.page_tokens);
  REQUIRE(out.places.size() == in.places.size());
  for (size_t i = 0; i < in.places.size(); ++i) {
    CHECK(out.places[i].region == in.places[i].region);
    CHECK(out.places[i].offset == in.places[i].offset);
  }
  CHECK(out.pages == in.pages);
}
}  // namespace

TEST_CASE("Registered-memory requests round-trip field by field") {
  {
    RegisterMemoryRequest in = sample_register(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.kind == in.kind);
    CHECK(out.ipc_handle == in.ipc_handle);
    CHECK(out.offset == in.offset);
    CHECK(out.bytes == in.bytes);
    CHECK(out.address == in.address);
  }
  {
    LoadToRequest in = sample_load_to(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.lease == in.lease);
    CHECK(out.first_block == in.first_block);
    CHECK(out.layer_begin == in.layer_begin);
    CHECK(out.layer_count == in.layer_count);
    check_same_buffer(out.dst, in.dst);
    CHECK(out.dst.block_count() == 3);
  }
  {
    SaveFromRequest in = sample_save_from(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.namespace_id == in.namespace_id);
    CHECK(out.priority == in.priority);
    CHECK(out.first_block == in.first_block);
    CHECK(out.tokens == in.tokens);
    check_same_extras(out.extras, in.extras);
    check_same_buffer(out.src, in.src);
    CHECK(out.src.block_count() == 3);
  }
  {
    DoctorRequest in = sample_doctor(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.model_id == in.model_id);
    CHECK(out.tenant == in.tenant);
    CHECK(out.adapter_id == in.adapter_id);
    CHECK(out.revision == in.revision);
    CHECK(out.engine_block_tokens == in.engine_block_tokens);
    CHECK(out.engine_layout_fingerprint == in.engine_layout_fingerprint);
    CHECK(out.tokens == in.tokens);
    check_same_extras(out.extras, in.extras);
    InspectRequest i_out;
    REQUIRE(decode(encoded(InspectRequest{25}), i_out).is_ok());
    CHECK(i_out.top_prefixes == 25);
  }
  {
    ExportListRequest in = sample_export_list(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.restart);
    CHECK(out.max_blocks == 300);
    CHECK(out.roots == in.roots);
    ExportReadRequest r_in = sample_export_read(), r_out;
    REQUIRE(decode(encoded(r_in), r_out).is_ok());
    CHECK(r_out.window_offset == 8192);
    CHECK(r_out.keys == r_in.keys);
    ExportReadReply p_out;
    REQUIRE(decode(encoded(sample_export_reply()), p_out).is_ok());
    REQUIRE(p_out.blocks.size() == 3);
    CHECK(p_out.blocks[0].is_ok());
    CHECK(p_out.blocks[1].code() == StatusCode::kChecksumMismatch);
    CHECK(p_out.blocks[1].message() == "bad copy");
    CHECK(p_out.blocks[2].code() == StatusCode::kNotFound);
  }
  {
    ObjectPutRequest put = sample_object_put(), put_out;
    REQUIRE(decode(encoded(put), put_out).is_ok());
    CHECK(put_out.key == put.key);  // any bytes, a NUL included
    CHECK(put_out.length == 70000);
    CHECK(put_out.window_offset == 4096);
    CHECK(put_out.priority == put.priority);
    ObjectGetRequest get = sample_object_get(), get_out;
    REQUIRE(decode(encoded(get), get_out).is_ok());
    CHECK(get_out.key == get.key);
    CHECK(get_out.window_bytes == get.window_bytes);
    ObjectKeysRequest keys = sample_object_keys(), keys_out;
    REQUIRE(decode(encoded(keys), keys_out).is_ok());
    CHECK(keys_out.keys == keys.keys);
  }
  SECTION("shapes the decoder refuses") {
    ObjectPutRequest put = sample_object_put(), put_out;
    put.key.clear();
    CHECK(is_protocol_error(decode(encoded(put), put_out)));
    put.key = std::string(kMaxObjectKeyBytes + 1, 'k');
    CHECK(is_protocol_error(decode(encoded(put), put_out)));
    put = sample_object_put();
    put.priority = kNumPriorities;
    CHECK(is_protocol_error(decode(encoded(put), put_out)));
    ObjectKeysRequest keys = sample_object_keys(), keys_out;
    keys.keys.clear();
    CHECK(is_protocol_error(decode(encoded(keys), keys_out)));
    keys.keys.assign(kMaxObjectKeys + 1, "k");
    CHECK(is_protocol_error(decode(encoded(keys), keys_out)));
    InspectRequest too_many{10001}, i_out;
    CHECK(is_protocol_error(decode(encoded(too_many), i_out)));
    ExportListRequest page = sample_export_list(), page_out;
    page.max_blocks = 0;
    CHECK(is_protocol_error(decode(encoded(page), page_out)));
    page.max_blocks = kMaxExportPage + 1;
    CHECK(is_protocol_error(decode(encoded(page), page_out)));
    page = sample_export_list();
    page.restart = false;  // roots name a new walk only
    CHECK(is_protocol_error(decode(encoded(page), page_out)));
    RegisterMemoryRequest empty = sample_register();
    empty.bytes = 0;
    RegisterMemoryRequest out;
    CHECK(is_protocol_error(decode(encoded(empty), out)));
    RegisterMemoryRequest kind = sample_register();
    kind.kind = 2;
    CHECK(is_protocol_error(decode(encoded(kind), out)));
    LoadToRequest lt = sample_load_to(), lt_out;
    lt.dst.layout = 1 + ::kvtier::kNumEngineLayouts;  // no such engine layout
    CHECK(is_protocol_error(decode(encoded(lt), lt_out)));
    lt = sample_load_to();
    lt.dst.pages = {1};  // a canonical buffer with pages
    CHECK(is_protocol_error(decode(encoded(lt), lt_out)));
    SaveFromRequest sf = sample_save_from(), sf_out;
    sf.src.places.clear();  // a paged buffer without its layer tensors
    CHECK(is_protocol_error(decode(encoded(sf), sf_out)));
    sf = sample_save_from();
    sf.priority = kNumPriorities;
    CHECK(is_protocol_error(decode(encoded(sf), sf_out)));
  }
}

TEST_CASE("Every reply round-trips field by field") {
  {
    HelloReply in = sample_hello_reply(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.version == in.version);
    CHECK(out.layout == in.layout);
    CHECK(out.client_id == in.client_id);
    CHECK(out.uid == in.uid);
    CHECK(out.gid == in.gid);
    CHECK(out.tenants == in.tenants);
  }
  {
    OpenNamespaceReply out;
    REQUIRE(decode(encoded(OpenNamespaceReply{0xABCDEF01u}), out).is_ok());
    CHECK(out.namespace_id == 0xABCDEF01u);
  }
  {
    LookupReply in = sample_lookup_reply(), out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.lease == in.lease);
    CHECK(out.tokens == in.tokens);
    CHECK(out.tier_masks == in.tier_masks);
    CHECK(out.held_back_blocks == in.held_back_blocks);
    CHECK(out.saved_ns == in.saved_ns);
  }
  {
    LoadReply out;
    REQUIRE(decode(encoded(LoadReply{0x01020304u, 0x0A0B0C0Du}), out).is_ok());
    CHECK(out.blocks == 0x01020304u);
    CHECK(out.from_nvme == 0x0A0B0C0Du);
  }
  {
    SaveReply out;
    REQUIRE(decode(encoded(SaveReply{0x7FFFFFFFu}), out).is_ok());
    CHECK(out.saved == 0x7FFFFFFFu);
  }
  {
    CountReply out;
    REQUIRE(decode(encoded(CountReply{0x0102030405060708ull}), out).is_ok());
    CHECK(out.count == 0x0102030405060708ull);
  }
  {
    // Metrics text is the one string allowed past kMaxString.
    StatsReply in{std::string(3 * kMaxString, 'x') + "\nkvtier_hits_total 12\n"}, out;
    REQUIRE(decode(encoded(in), out).is_ok());
    CHECK(out.prometheus_text == in.prometheus_text);
  }
}

TEST_CASE("Empty lists and strings round-trip") {
  LookupRequest in{.namespace_id = 0, .take_lease = true, .tokens = {}, .extras = {}}, out;
  out.tokens = {1, 2, 3};  // decode replaces, never appends
  REQUIRE(decode(encoded(in), out).is_ok());
  CHECK(out.take_lease);
  CHECK(out.tokens.empty());
  CHECK(out.extras.empty());

  HelloReply reply = sample_hello_reply(), reply_out;
  reply.tenants.clear();
  REQUIRE(decode(encoded(reply), reply_out).is_ok());
  CHECK(reply_out.tenants.empty());
}

TEST_CASE("The byte format is little-endian in field order") {
  LookupRequest m{.namespace_id = 7, .take_lease = true, .tokens = {1, 0x01020304u}, .extras = {}};
  CHECK(encoded(m) == bytes_of({7, 0, 0, 0,                   // namespace_id
                                1,                            // take_lease
                                2, 0, 0, 0,                   // token count
                                1, 0, 0, 0, 4, 3, 2, 1,       // tokens
                                0, 0, 0, 0}));                // extras count

  std::byte header[kHeaderBytes];
  encode_header({.op = 3, .request_id = 0x0A0B0C0Du, .payload_bytes = 0x100}, header);
  CHECK(Bytes(header, header + kHeaderBytes) ==
        bytes_of({'K', 'V', 'T', '1', 7, 0, 3, 0, 0x0D, 0x0C, 0x0B, 0x0A, 0, 1, 0, 0}));

  Bytes status;
  encode_status(Status(StatusCode::kBusy, "pinned"), status);
  CHECK(status == bytes_of({static_cast<uint8_t>(StatusCode::kBusy), 6, 0, 0, 0, 'p', 'i', 'n',
                            'n', 'e', 'd'}));
}

TEST_CASE("The frame header round-trips and is checked") {
  FrameHeader in{.version = kVersion, .op = static_cast<uint16_t>(static_cast<uint16_t>(Op::kSave) | kReplyBit),
                 .request_id = 0xFEEDF00Du, .payload_bytes = 12345};
  std::byte raw[kHeaderBytes];
  encode_header(in, raw);
  auto out = decode_header(raw);
  REQUIRE(out.is_ok());
  CHECK(out->magic == kMagic);
  CHECK(out->version == in.version);
  CHECK(out->op == in.op);
  CHECK(out->request_id == in.request_id);
  CHECK(out->payload_bytes == in.payload_bytes);

  SECTION("another version is returned as read, for the server to answer") {
    in.version = kVersion + 1;
    encode_header(in, raw);
    auto h = decode_header(raw);
    REQUIRE(h.is_ok());
    CHECK(h->version == kVersion + 1);
  }
  SECTION("bad magic") {
    in.magic = 0x3254564Bu;  // "KVT2"
    encode_header(in, raw);
    auto h = decode_header(raw);
    CHECK(is_protocol_error(h.status()));
    CHECK(mentions(h.status(), "magic"));
  }
  SECTION("payload_bytes up to kMaxPayload, not beyond") {
    in.payload_bytes = kMaxPayload;
    encode_header(in, raw);
    CHECK(decode_header(raw).is_ok());
    in.payload_bytes = kMaxPayload + 1;
    encode_header(in, raw);
    auto h = decode_header(raw);
    CHECK(is_protocol_error(h.status()));
    CHECK(mentions(h.status(), "payload_bytes"));
  }
  SECTION("every short header and a long one") {
    for (size_t len = 0; len < kHeaderBytes; ++len) {
      CAPTURE(len);
      CHECK(is_protocol_error(decode_header(std::span<const std::byte>(raw, len)).status()));
    }
    Bytes longer(raw, raw + kHeaderBytes);
    longer.push_back(std::byte{0});
    CHECK(is_protocol_error(decode_header(longer).status()));
  }
}

TEST_CASE("Every message decodes to what re-encodes to the same bytes") {
  // Encode and decode run one list of fields per message: a field one side lost or reordered
  // would change the bytes here.
  for (const Sample& s : all_samples()) {
    CAPTURE(s.name);
    Bytes again;
    REQUIRE(s.reencode(s.payload, again).is_ok());
    CHECK(again == s.payload);
  }
}

TEST_CASE("Every truncation of every valid payload is a protocol error") {
  for (const Sample& s : all_samples()) {
    CAPTURE(s.name);
    REQUIRE(s.decode(s.payload).is_ok());
    for (size_t len = 0; len < s.payload.size(); ++len) {
      CAPTURE(len);
      CHECK(is_protocol_error(s.decode(std::span<const std::byte>(s.payload).first(len))));
    }
  }
  for (const auto& [op, payload] : all_requests()) {
    CAPTURE(static_cast<int>(op));
    REQUIRE(validate_request(static_cast<uint16_t>(op), payload).is_ok());
    for (size_t len = 0; len < payload.size(); ++len) {
      CAPTURE(len);
      CHECK(is_protocol_error(
          validate_request(static_cast<uint16_t>(op), std::span<const std::byte>(payload).first(len))));
    }
  }
}

TEST_CASE("Trailing bytes after any message are a protocol error") {
  for (Sample& s : all_samples()) {
    CAPTURE(s.name);
    s.payload.push_back(std::byte{0});
    Status st = s.decode(s.payload);
    CHECK(is_protocol_error(st));
    CHECK(mentions(st, "trailing"));
  }
  CHECK(validate_request(static_cast<uint16_t>(Op::kStats), {}).is_ok());
  CHECK(is_protocol_error(validate_request(static_cast<uint16_t>(Op::kStats), bytes_of({0}))));
  CHECK(validate_request(static_cast<uint16_t>(Op::kDoorbell), {}).is_ok());
  CHECK(is_protocol_error(validate_request(static_cast<uint16_t>(Op::kDoorbell), bytes_of({0}))));
}

TEST_CASE("A count claiming more elements than remain is refused before allocating") {
  // LookupRequest: namespace_id u32 @0, take_lease u8 @4, token count u32 @5, tokens, extras.
  LookupRequest m = sample_lookup();
  m.tokens = sample_tokens(3);
  Bytes b = encoded(m);

  SECTION("tokens") {
    put_u32(b, 5, 1000);
    LookupRequest out;
    Status s = decode(b, out);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "LookupRequest.tokens"));
    CHECK(mentions(s, "remain"));
  }
  SECTION("extras") {
    put_u32(b, 5 + 4 + 3 * 4, kMaxExtras);  // within the limit, far past the bytes
    Status s = decode_as<LookupRequest>(b);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "extras"));
    CHECK(mentions(s, "remain"));
  }
  SECTION("tenants") {
    HelloReply reply = sample_hello_reply();
    Bytes r = encoded(reply);
    // version u16, layout 18 bytes, client_id u64, uid u32, gid u32, then the tenant count.
    put_u32(r, 2 + 18 + 8 + 4 + 4, 1000);
    Status s = decode_as<HelloReply>(r);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "tenants"));
  }
  SECTION("tier masks") {
    Bytes r = encoded(sample_lookup_reply());
    put_u32(r, 16, kMaxBlocks);
    Status s = decode_as<LookupReply>(r);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "tier_masks"));
  }
  SECTION("a string length") {
    Bytes h = encoded(sample_hello());
    put_u32(h, 12, 0xFFFF);  // client_name: past kMaxString
    CHECK(mentions(decode_as<HelloRequest>(h), "limit"));
    put_u32(h, 12, 100);  // within the limit, past the bytes
    Status s = decode_as<HelloRequest>(h);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "client_name"));
  }
}

TEST_CASE("Strings and lists at their limits decode and one past them does not") {
  SECTION("strings") {
    HelloRequest m = sample_hello();
    m.client_name.assign(kMaxString, 'a');
    CHECK(decode_as<HelloRequest>(encoded(m)).is_ok());
    m.client_name.push_back('a');
    Status s = decode_as<HelloRequest>(encoded(m));
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "client_name"));
    CHECK(mentions(s, "limit"));
  }
  SECTION("tokens") {
    LookupRequest m{.namespace_id = 1, .take_lease = true, .tokens = {}, .extras = {}};
    m.tokens.assign(kMaxTokens, 5);
    CHECK(decode_as<LookupRequest>(encoded(m)).is_ok());
    m.tokens.push_back(5);
    Status s = decode_as<LookupRequest>(encoded(m));
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "limit"));
  }
  SECTION("extras") {
    SaveRequest m = sample_save();
    m.extras.assign(kMaxExtras + 1, BlockExtra{});
    CHECK(mentions(decode_as<SaveRequest>(encoded(m)), "extras"));
  }
  SECTION("tenants") {
    HelloReply m = sample_hello_reply();
    m.tenants.assign(1024, "t");
    CHECK(decode_as<HelloReply>(encoded(m)).is_ok());
    m.tenants.push_back("t");
    CHECK(mentions(decode_as<HelloReply>(encoded(m)), "tenants"));
  }
  SECTION("tier masks") {
    LookupReply m = sample_lookup_reply();
    m.tier_masks.assign(kMaxBlocks + 1, 1);
    CHECK(mentions(decode_as<LookupReply>(encoded(m)), "limit"));
  }
}

TEST_CASE("Unknown ops are refused") {
  Bytes hello = encoded(sample_hello());
  for (uint16_t op : {uint16_t(0), uint16_t(kLastOp + 1), uint16_t(kReplyBit | 1), uint16_t(0xFFFF)}) {
    CAPTURE(op);
    CHECK_FALSE(is_known_op(op));
    Status s = validate_request(op, hello);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "unknown op"));
  }
  for (uint16_t op = 1; op <= kLastOp; ++op) CHECK(is_known_op(op));
}

TEST_CASE("Every op has one name, and only the doorbell goes unanswered") {
  std::set<std::string_view> names;
  for (const OpInfo& info : kOps) {
    CAPTURE(info.name);
    CHECK(op_name(static_cast<uint16_t>(info.op)) == info.name);
    CHECK(names.insert(info.name).second);  // the metrics label ops by name: no two alike
    CHECK(info.answered == (info.op != Op::kDoorbell));
  }
  CHECK(names.size() == kLastOp);
  CHECK(op_name(0) == "unknown");
  CHECK(op_name(kLastOp + 1) == "unknown");
}

TEST_CASE("Unknown enum values are refused") {
  SECTION("priority 9") {
    SaveRequest m = sample_save();
    m.priority = 9;
    Status s = decode_as<SaveRequest>(encoded(m));
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "priority"));
    CHECK(is_protocol_error(validate_request(static_cast<uint16_t>(Op::kSave), encoded(m))));
  }
  SECTION("bool 2") {
    Bytes b = encoded(sample_lookup());
    b[4] = std::byte{2};  // take_lease
    Status s = decode_as<LookupRequest>(b);
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "take_lease"));
  }
  SECTION("dtype 99 and attention kind 7") {
    HelloReply m = sample_hello_reply();
    m.layout.dtype = static_cast<Dtype>(99);
    Status s = decode_as<HelloReply>(encoded(m));
    CHECK(is_protocol_error(s));
    CHECK(mentions(s, "dtype"));
    m = sample_hello_reply();
    m.layout.kind = static_cast<AttentionKind>(7);
    CHECK(mentions(decode_as<HelloReply>(encoded(m)), "attention kind"));
  }
  SECTION("status code 200") {
    Status remote(StatusCode::kBusy, "untouched");
    auto body = decode_status(bytes_of({200, 0, 0, 0, 0}), remote);
    CHECK(is_protocol_error(body.status()));
    CHECK(mentions(body.status(), "code"));
    CHECK(remote.code() == StatusCode::kBusy);  // left as it was
  }
  SECTION("a tier mask bit past the last tier") {
    LookupReply m = sample_lookup_reply();
    m.tier_masks[1] = 0x08;
    CHECK(mentions(decode_as<LookupReply>(encoded(m)), "tier"));
  }
  SECTION("a prefix request's arg, judged by its op") {
    PrefixRequest m = sample_prefix();
    auto check = [&](Op op, uint8_t arg, bool ok) {
      m.arg = arg;
      INFO("op " << static_cast<int>(op) << " arg " << static_cast<int>(arg));
      Status s = validate_request(static_cast<uint16_t>(op), encoded(m));
      CHECK(s.is_ok() == ok);
      if (!ok) CHECK(is_protocol_error(s));
    };
    check(Op::kPrefetch, static_cast<uint8_t>(Tier::kNvme), true);
    check(Op::kPrefetch, kNumTiers, false);
    check(Op::kPin, static_cast<uint8_t>(Priority::kRetained), true);
    check(Op::kPin, kNumPriorities, false);
    check(Op::kUnpin, 0, true);
    check(Op::kUnpin, 1, false);
  }
}

TEST_CASE("A prefill speed that is negative, infinite or NaN is a protocol error naming the field") {
  for (double bad : {-1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    OpenNamespaceRequest m = sample_open();
    m.prefill_tokens_per_second = bad;
    OpenNamespaceRequest out;
    const Status s = decode(encoded(m), out);
    CHECK(s.code() == StatusCode::kProtocolError);
    CHECK(s.message().find("prefill_tokens_per_second") != std::string::npos);
  }
  OpenNamespaceRequest zero = sample_open(), out;
  zero.prefill_tokens_per_second = 0;
  CHECK(decode(encoded(zero), out).is_ok());
}

TEST_CASE("An invalid layout is a protocol error carrying the reason") {
  HelloReply m = sample_hello_reply();
  m.layout.num_layers = 0;
  Status s = decode_as<HelloReply>(encoded(m));
  CHECK(is_protocol_error(s));
  CHECK(mentions(s, "HelloReply.layout"));
  CHECK(mentions(s, "num_layers"));
}

TEST_CASE("A failed decode leaves the message untouched") {
  SaveRequest out;
  REQUIRE(decode(encoded(sample_save()), out).is_ok());
  Bytes truncated = encoded(SaveRequest{.namespace_id = 1, .priority = 0, .first_block = 0,
                                        .window_offset = 0, .tokens = sample_tokens(8), .extras = {}});
  truncated.pop_back();
  CHECK(is_protocol_error(decode(truncated, out)));
  CHECK(out.namespace_id == sample_save().namespace_id);
  CHECK(out.tokens == sample_save().tokens);
}

TEST_CASE("Reply status prefix") {
  SECTION("ok, followed by the body") {
    Bytes payload;
    encode_status(Status::ok(), payload);
    encode(LoadReply{4, 1}, payload);
    Status remote(StatusCode::kInternal, "stale");
    auto body = decode_status(payload, remote);
    REQUIRE(body.is_ok());
    CHECK(remote.is_ok());
    LoadReply reply;
    REQUIRE(decode(*body, reply).is_ok());
    CHECK(reply.blocks == 4);
    CHECK(reply.from_nvme == 1);
  }
  SECTION("an error with its message, and no body") {
    Bytes payload;
    encode_status(Status(StatusCode::kLayoutMismatch, "fingerprint differs"), payload);
    Status remote;
    auto body = decode_status(payload, remote);
    REQUIRE(body.is_ok());
    CHECK(body->empty());
    CHECK(remote.code() == StatusCode::kLayoutMismatch);
    CHECK(remote.message() == "fingerprint differs");

    for (size_t len = 0; len < payload.size(); ++len) {
      CAPTURE(len);
      CHECK(is_protocol_error(decode_status(std::span<const std::byte>(payload).first(len), remote)
                                  .status()));
    }
    payload.push_back(std::byte{0});  // an error reply carries no body
    CHECK(is_protocol_error(decode_status(payload, remote).status()));
  }
  SECTION("every status code travels; one past the last does not") {
    for (uint8_t c = 1; c <= static_cast<uint8_t>(StatusCode::kInternal); ++c) {
      Bytes payload;
      encode_status(Status(static_cast<StatusCode>(c), "m"), payload);
      Status remote;
      REQUIRE(decode_status(payload, remote).is_ok());
      CHECK(static_cast<uint8_t>(remote.code()) == c);
    }
    Status remote;
    uint8_t past = static_cast<uint8_t>(StatusCode::kInternal) + 1;
    CHECK(is_protocol_error(decode_status(bytes_of({past, 0, 0, 0, 0}), remote).status()));
  }
  SECTION("an ok status with a message is not canonical") {
    Status remote;
    CHECK(is_protocol_error(decode_status(bytes_of({0, 1, 0, 0, 0, 'x'}), remote).status()));
  }
  SECTION("a long message is cut to kMaxString so the reply still decodes") {
    Bytes payload;
    encode_status(Status(StatusCode::kIoError, std::string(kMaxString + 100, 'e')), payload);
    Status remote;
    REQUIRE(decode_status(payload, remote).is_ok());
    CHECK(remote.message().size() == kMaxString);
  }
}

// ---- FrameReader over a real socket --------------------------------------------------------------

namespace {

struct SocketPair {
  int a = -1, b = -1;
  SocketPair() {
    int fds[2];
    REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
    a = fds[0];
    b = fds[1];
  }
  ~SocketPair() {
    if (a >= 0) ::close(a);
    if (b >= 0) ::close(b);
  }
  void close_b() {
    ::close(b);
    b = -1;
  }
};

Bytes frame_bytes(uint16_t op, uint32_t id, const Bytes& payload) {
  Bytes out(kHeaderBytes);
  encode_header({.op = op, .request_id = id, .payload_bytes = static_cast<uint32_t>(payload.size())},
                out.data());
  out.insert(out.end(), payload.begin(), payload.end());
  return out;
}

Bytes pattern(size_t n, uint8_t seed) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = std::byte(uint8_t(i * 131 + seed));
  return b;
}

/// Sends every byte; false on an error. No assertion inside: writer threads use it too, and
/// Catch2's assertions belong to the test's own thread.
bool send_all(int fd, const Bytes& bytes) {
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t w = ::send(fd, bytes.data() + done, bytes.size() - done, MSG_NOSIGNAL);
    if (w <= 0) return false;
    done += static_cast<size_t>(w);
  }
  return true;
}

void write_all(int fd, const Bytes& bytes) { REQUIRE(send_all(fd, bytes)); }

}  // namespace

TEST_CASE("FrameReader splits a stream into its frames however the bytes arrive") {
  SocketPair sp;
  FrameReader reader(sp.a);
  FrameHeader h;
  Bytes payload;
  int fd = -1;

  SECTION("frames sent back to back in one write come out one by one, in order") {
    Bytes stream;
    for (uint32_t i = 0; i < 5; ++i) {
      const Bytes f = frame_bytes(static_cast<uint16_t>(Op::kLookup), 100 + i, pattern(i * 7, uint8_t(i)));
      stream.insert(stream.end(), f.begin(), f.end());
    }
    write_all(sp.b, stream);
    for (uint32_t i = 0; i < 5; ++i) {
      REQUIRE(reader.next(h, payload, fd).is_ok());
      CHECK(h.request_id == 100 + i);
      CHECK(payload == pattern(i * 7, uint8_t(i)));
      CHECK(fd == -1);
    }
  }
  SECTION("a frame written a byte at a time is assembled") {
    const Bytes f = frame_bytes(static_cast<uint16_t>(Op::kSave), 9, pattern(50, 3));
    bool sent = true;
    std::thread writer([&] {
      for (std::byte b : f) sent = sent && send_all(sp.b, Bytes{b});
    });
    REQUIRE(reader.next(h, payload, fd).is_ok());
    writer.join();
    CHECK(sent);
    CHECK(h.request_id == 9);
    CHECK(payload == pattern(50, 3));
  }
  SECTION("a payload larger than the read buffer, then a small frame behind it") {
    const Bytes big = pattern(300 * 1024 + 17, 5), small = pattern(3, 6);
    Bytes stream = frame_bytes(static_cast<uint16_t>(Op::kSave), 1, big);
    const Bytes second = frame_bytes(static_cast<uint16_t>(Op::kRelease), 2, small);
    stream.insert(stream.end(), second.begin(), second.end());
    bool sent = false;
    std::thread writer([&] { sent = send_all(sp.b, stream); });  // more than the socket buffer holds
    REQUIRE(reader.next(h, payload, fd).is_ok());
    CHECK(h.request_id == 1);
    CHECK(payload == big);
    REQUIRE(reader.next(h, payload, fd).is_ok());
    CHECK(h.request_id == 2);
    CHECK(payload == small);
    writer.join();
    CHECK(sent);
  }
  SECTION("a descriptor passed with a frame is handed to the caller") {
    const int mem = ::memfd_create("frame-reader-test", MFD_CLOEXEC);
    REQUIRE(mem >= 0);
    REQUIRE(send_frame(sp.b, static_cast<uint16_t>(Op::kHello), 1, pattern(10, 1), mem).is_ok());
    ::close(mem);
    REQUIRE(reader.next(h, payload, fd).is_ok());
    CHECK(fd >= 0);
    struct stat st{};
    CHECK(::fstat(fd, &st) == 0);
    ::close(fd);
  }
  SECTION("a descriptor read ahead with a later frame waits for that frame") {
    // A doorbell, then a frame with a descriptor: one read may bring both, and the kernel hands
    // the descriptor to that read. It belongs to the second frame, not the doorbell.
    write_all(sp.b, frame_bytes(static_cast<uint16_t>(Op::kDoorbell), 0, {}));
    const int mem = ::memfd_create("frame-reader-test", MFD_CLOEXEC);
    REQUIRE(mem >= 0);
    REQUIRE(send_frame(sp.b, static_cast<uint16_t>(Op::kRegisterMemory), 2, pattern(10, 1), mem).is_ok());
    ::close(mem);
    REQUIRE(reader.try_fill());  // both frames, and the descriptor, in the buffer now
    REQUIRE(reader.next(h, payload, fd).is_ok());
    CHECK(h.op == static_cast<uint16_t>(Op::kDoorbell));
    CHECK(fd == -1);
    REQUIRE(reader.next(h, payload, fd).is_ok());
    CHECK(h.request_id == 2);
    CHECK(fd >= 0);
    if (fd >= 0) ::close(fd);
  }
  SECTION("the end of the stream between frames, inside a header, inside a payload") {
    Bytes f = frame_bytes(static_cast<uint16_t>(Op::kLookup), 1, pattern(40, 2));
    write_all(sp.b, f);
    REQUIRE(reader.next(h, payload, fd).is_ok());
    SECTION("between") {
      sp.close_b();
      CHECK(reader.next(h, payload, fd).code() == StatusCode::kUnavailable);
    }
    SECTION("inside the header") {
      write_all(sp.b, Bytes(f.begin(), f.begin() + 5));
      sp.close_b();
      const Status s = reader.next(h, payload, fd);
      CHECK(is_protocol_error(s));
      CHECK(mentions(s, "header"));
    }
    SECTION("inside the payload") {
      write_all(sp.b, Bytes(f.begin(), f.end() - 1));
      sp.close_b();
      const Status s = reader.next(h, payload, fd);
      CHECK(is_protocol_error(s));
      CHECK(mentions(s, "payload"));
    }
  }
  SECTION("a bad header is refused, not skipped") {
    Bytes f = frame_bytes(static_cast<uint16_t>(Op::kLookup), 1, {});
    f[0] = std::byte{0};  // magic
    write_all(sp.b, f);
    CHECK(is_protocol_error(reader.next(h, payload, fd)));
  }
}

TEST_CASE("A payload grows with the bytes that arrive and its bytes are charged to the request budget") {
  SocketPair sp;
  const int big_buffer = 1 << 20;  // every write below fits: nothing waits for the reader
  ::setsockopt(sp.b, SOL_SOCKET, SO_SNDBUF, &big_buffer, sizeof(big_buffer));
  constexpr uint64_t kFree = RequestBudget::kFreeBytesPerFrame;
  RequestBudget budget(16 * 1024);
  FrameHeader h;
  Bytes payload;
  int fd = -1;
  // A header announcing the largest payload, then the first `sent` bytes of it.
  auto announce = [&](uint32_t id, size_t sent) {
    Bytes f(kHeaderBytes);
    encode_header({.op = static_cast<uint16_t>(Op::kSave), .request_id = id, .payload_bytes = kMaxPayload}, f.data());
    const Bytes part = pattern(sent, uint8_t(id));
    f.insert(f.end(), part.begin(), part.end());
    write_all(sp.b, f);
  };
  auto soon = [] { return std::chrono::steady_clock::now() + std::chrono::milliseconds(20); };
  {
    FrameReader reader(sp.a, &budget);
    SECTION("a few bytes of an 8 MiB frame hold a few bytes") {
      announce(1, 100);
      // The rest never comes: the deadline ends the wait, with what arrived held.
      const Status s = reader.next(h, payload, fd, soon());
      CHECK(s.code() == StatusCode::kUnavailable);
      CHECK(reader.deadline_passed());
      CHECK(h.request_id == 1);
      CHECK(payload.capacity() <= 200);  // was kMaxPayload, announced, before any byte came
      CHECK(budget.held() == 100);
      CHECK(budget.charged() == 0);
      reader.release_frame(payload);
      CHECK(budget.held() == 0);
    }
    SECTION("bytes past the free ones are charged and the capacity stays within twice what came") {
      announce(2, kFree + 10'000);
      CHECK(reader.next(h, payload, fd, soon()).code() == StatusCode::kUnavailable);
      CHECK(payload.capacity() <= 2 * (kFree + 10'000));
      CHECK(budget.held() == kFree + 10'000);
      CHECK(budget.charged() == 10'000);
    }
    SECTION("a frame the budget cannot hold is refused with its header") {
      announce(3, kFree + 16 * 1024 + 1);
      const Status s = reader.next(h, payload, fd, soon());
      CHECK(s.code() == StatusCode::kResourceExhausted);
      CHECK_FALSE(reader.deadline_passed());
      CHECK(h.request_id == 3);
      CHECK(budget.charged() <= 16 * 1024);
    }
    SECTION("a whole frame is held until it is released and a large payload is freed then") {
      const Bytes big = pattern(kFree + 5'000, 4);
      write_all(sp.b, frame_bytes(static_cast<uint16_t>(Op::kSave), 4, big));
      REQUIRE(reader.next(h, payload, fd).is_ok());
      CHECK(payload == big);
      CHECK(budget.held() == big.size());
      CHECK(budget.charged() == 5'000);
      reader.release_frame(payload);
      CHECK(budget.held() == 0);
      CHECK(budget.charged() == 0);
      CHECK(payload.capacity() <= FrameReader::kKeptPayloadCapacity);
      // The next frame releases the one before by itself.
      write_all(sp.b, frame_bytes(static_cast<uint16_t>(Op::kSave), 5, big));
      write_all(sp.b, frame_bytes(static_cast<uint16_t>(Op::kRelease), 6, pattern(10, 6)));
      REQUIRE(reader.next(h, payload, fd).is_ok());
      CHECK(budget.held() == big.size());
      REQUIRE(reader.next(h, payload, fd).is_ok());
      CHECK(h.request_id == 6);
      CHECK(budget.held() == 10);
    }
  }
  // A reader that goes gives back what its frame held.
  CHECK(budget.held() == 0);
  CHECK(budget.charged() == 0);
}

TEST_CASE("A reader waits for the socket no longer than its deadline") {
  SocketPair sp;
  FrameReader reader(sp.a);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(30);
  CHECK_FALSE(reader.wait_readable(deadline));
  CHECK(reader.deadline_passed());
  CHECK(std::chrono::steady_clock::now() >= deadline);
  write_all(sp.b, frame_bytes(static_cast<uint16_t>(Op::kLookup), 1, pattern(3, 1)));
  CHECK(reader.wait_readable(std::chrono::steady_clock::now() + std::chrono::seconds(20)));
  CHECK_FALSE(reader.deadline_passed());
  FrameHeader h;
  Bytes payload;
  int fd = -1;
  REQUIRE(reader.next(h, payload, fd, std::chrono::steady_clock::now() + std::chrono::seconds(20)).is_ok());
  CHECK(payload == pattern(3, 1));
}

TEST_CASE("A mailbox reader spins only as long as spinning has lately paid off") {
  using namespace std::chrono_literals;
  proto::AdaptiveSpin spin;
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(spin.budget() == proto::kPollBeforeBlocking);  // a new reader spins the full time
  // Messages that came later than a spin could wait halve the budget, to nothing after five.
  std::vector<std::chrono::nanoseconds> seen;
  for (int i = 0; i < 5; ++i) {
    spin.observe(t0, t0 + 200us);
    seen.push_back(spin.budget());
  }
  CHECK(seen == std::vector<std::chrono::nanoseconds>{15us, 7500ns, 3750ns, 1875ns, 0ns});
  spin.observe(t0, t0 + 200us);
  CHECK(spin.budget() == 0ns);
  // One message that a spin would have caught restores the full budget, including one that was
  // published before the wait began.
  spin.observe(t0, t0 + 10us);
  CHECK(spin.budget() == proto::kPollBeforeBlocking);
  spin.observe(t0, t0 + 1ms);
  spin.observe(t0, t0 - 5us);
  CHECK(spin.budget() == proto::kPollBeforeBlocking);
}

TEST_CASE("A mailbox slot says when its message was published") {
  std::vector<std::byte> memory(proto::kMinMailboxBytes + 4096);
  auto* base = reinterpret_cast<std::byte*>((reinterpret_cast<uintptr_t>(memory.data()) + 4095) / 4096 * 4096);
  proto::Mailbox box(base, proto::kMinMailboxBytes);
  const std::vector<std::byte> frame(40, std::byte{7});
  const auto before = std::chrono::steady_clock::now();
  CHECK_FALSE(box.publish(proto::Mailbox::kReply, frame, 1));  // no reader parked: no doorbell
  const auto after = std::chrono::steady_clock::now();
  CHECK(box.seq(proto::Mailbox::kReply) == 1);
  CHECK(box.published_at(proto::Mailbox::kReply) >= before);
  CHECK(box.published_at(proto::Mailbox::kReply) <= after);
  // The other slot keeps its own time: nothing was published there.
  CHECK(box.published_at(proto::Mailbox::kRequest).time_since_epoch().count() == 0);
}
