// Writes the seed corpus of protocol_fuzz.cpp: one valid example of every request and reply,
// each file the op (u16 little-endian) followed by the payload, plus one whole frame (header and
// payload) for decode_header. Run by the build, so the seeds always follow the current encoders.
//
// Usage: protocol_fuzz_make_seeds <directory>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "api/wire/protocol.h"

namespace {

using namespace kvtier;
using namespace kvtier::proto;

std::vector<std::byte> with_op(uint16_t op) {
  return {static_cast<std::byte>(op & 0xFF), static_cast<std::byte>(op >> 8)};
}

template <typename M>
std::vector<std::byte> request(Op op, const M& m) {
  auto out = with_op(static_cast<uint16_t>(op));
  encode(m, out);
  return out;
}

template <typename M>
std::vector<std::byte> reply(Op op, const M& m) {
  auto out = with_op(static_cast<uint16_t>(static_cast<uint16_t>(op) | kReplyBit));
  encode_status(Status::ok(), out);
  encode(m, out);
  return out;
}

std::vector<TokenId> tokens(size_t n) {
  std::vector<TokenId> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<TokenId>(128000 + 7 * i);
  return t;
}

bool write(const std::filesystem::path& dir, const std::string& name,
           const std::vector<std::byte>& bytes) {
  std::ofstream f(dir / name, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <directory>\n", argv[0]);
    return 2;
  }
  std::filesystem::path dir(argv[1]);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "protocol_fuzz_make_seeds: %s: %s\n", argv[1], ec.message().c_str());
    return 1;
  }

  auto layout = KvLayout::standard(32, 8, 128, Dtype::kBf16);
  if (!layout.is_ok()) return 1;
  const std::vector<BlockExtra> extras = {{1, BlockKey{0x0123456789ABCDEFull, 0x0FEDCBA987654321ull}}};

  std::vector<std::pair<std::string, std::vector<std::byte>>> seeds = {
      {"hello", request(Op::kHello, HelloRequest{1, 1, 64ull << 20, "seed-client"})},
      {"open_namespace", request(Op::kOpenNamespace,
                                 OpenNamespaceRequest{"meta-llama/Llama-3.1-8B", "team-a", "",
                                                      layout->fingerprint()})},
      {"lookup", request(Op::kLookup, LookupRequest{5, true, tokens(40), extras})},
      {"load", request(Op::kLoad, LoadRequest{42, 0, 2, 4096})},
      {"load_layers", request(Op::kLoad, LoadRequest{42, 0, 2, 4096, 1, 2})},
      {"release", request(Op::kRelease, ReleaseRequest{42})},
      {"save", request(Op::kSave, SaveRequest{5, 2, 1, 8192, tokens(48), extras})},
      {"prefetch", request(Op::kPrefetch, PrefixRequest{5, 1, tokens(32), {}})},
      {"pin", request(Op::kPin, PrefixRequest{5, 3, tokens(16), extras})},
      {"unpin", request(Op::kUnpin, PrefixRequest{5, 0, tokens(16), {}})},
      {"stats", with_op(static_cast<uint16_t>(Op::kStats))},
      {"doorbell", with_op(static_cast<uint16_t>(Op::kDoorbell))},
      {"register_memory", request(Op::kRegisterMemory, RegisterMemoryRequest{.kind = 1, .offset = 4096, .bytes = 1 << 20})},
      {"unregister_memory", request(Op::kUnregisterMemory, UnregisterMemoryRequest{2})},
      {"load_to", request(Op::kLoadTo, LoadToRequest{.lease = 42, .first_block = 1, .layer_begin = 0, .layer_count = 2,
                                                     .dst = {.places = {{1, 0}, {1, 8192}}}})},
      {"load_to_paged", request(Op::kLoadTo, LoadToRequest{.lease = 42, .dst = {.layout = 1, .engine_num_pages = 64,
                                                                                .places = {{1, 0}, {2, 0}},
                                                                                .pages = {5, 9}}})},
      {"save_from", request(Op::kSaveFrom, SaveFromRequest{.namespace_id = 5, .priority = 1, .first_block = 1,
                                                           .tokens = tokens(48), .extras = extras,
                                                           .src = {.places = {{1, 0}, {1, 4096}}}})},
      {"inspect", request(Op::kInspect, InspectRequest{20})},
      {"doctor", request(Op::kDoctor, DoctorRequest{.model_id = "m", .tenant = "team-a", .adapter_id = "",
                                                    .revision = "abc", .engine_block_tokens = 32,
                                                    .engine_layout_fingerprint = 7, .tokens = tokens(40),
                                                    .extras = extras})},
      {"export_list", request(Op::kExportList, ExportListRequest{.restart = true, .max_blocks = 64,
                                                                 .roots = {BlockKey{1, 2}, BlockKey{3, 4}}})},
      {"export_read", request(Op::kExportRead, ExportReadRequest{.window_offset = 4096,
                                                                 .keys = {BlockKey{5, 6}, BlockKey{7, 8}}})},
      {"reply_export_read", reply(Op::kExportRead, ExportReadReply{{Status::ok(), Status(StatusCode::kNotFound, "gone")}})},
      {"object_put", request(Op::kObjectPut, ObjectPutRequest{.namespace_id = 2, .priority = 1, .length = 5000,
                                                             .window_offset = 0, .key = "page-1"})},
      {"object_get", request(Op::kObjectGet, ObjectGetRequest{.namespace_id = 2, .window_offset = 0,
                                                             .window_bytes = 65536, .key = "page-1"})},
      {"object_exists", request(Op::kObjectExists, ObjectKeysRequest{.namespace_id = 2, .keys = {"page-1", "page-2"}})},
      {"object_remove", request(Op::kObjectRemove, ObjectKeysRequest{.namespace_id = 2, .keys = {"page-1"}})},
      {"reply_object_put", reply(Op::kObjectPut, ObjectPutReply{true})},
      {"reply_object_get", reply(Op::kObjectGet, ObjectGetReply{5000})},
      {"reply_json", reply(Op::kInspect, JsonReply{"{\"source\": \"kvtierd\"}"})},
      {"reply_hello", reply(Op::kHello, HelloReply{1, *layout, 7, 1000, 1000, {"", "team-a"}})},
      {"reply_open_namespace", reply(Op::kOpenNamespace, OpenNamespaceReply{3})},
      {"reply_lookup", reply(Op::kLookup, LookupReply{42, 32, {1, 3, 6}})},
      {"reply_load", reply(Op::kLoad, LoadReply{2, 1})},
      {"reply_save", reply(Op::kSave, SaveReply{1})},
      {"reply_count", reply(Op::kPin, CountReply{3})},
      {"reply_register_memory", reply(Op::kRegisterMemory, RegisterMemoryReply{1})},
      {"reply_stats", reply(Op::kStats, StatsReply{"# TYPE kvtier_hits_total counter\n"
                                                   "kvtier_hits_total 12\n"})},
  };

  auto error_reply = with_op(static_cast<uint16_t>(Op::kOpenNamespace) | kReplyBit);
  encode_status(Status(StatusCode::kLayoutMismatch, "layout fingerprint differs"), error_reply);
  seeds.emplace_back("reply_error", error_reply);

  std::vector<std::byte> payload;
  encode(LookupRequest{5, false, tokens(16), {}}, payload);
  std::vector<std::byte> frame(kHeaderBytes);
  encode_header({.op = static_cast<uint16_t>(Op::kLookup), .request_id = 9,
                 .payload_bytes = static_cast<uint32_t>(payload.size())},
                frame.data());
  frame.insert(frame.end(), payload.begin(), payload.end());
  seeds.emplace_back("frame_lookup", frame);

  for (const auto& [name, bytes] : seeds) {
    if (!write(dir, name, bytes)) {
      std::fprintf(stderr, "protocol_fuzz_make_seeds: cannot write %s\n", name.c_str());
      return 1;
    }
  }
  return 0;
}
