// Fuzz target for the wire codec (api/wire/protocol.h). Input: a u16 op (little-endian), then a
// payload. Besides "never crashes, never reads out of bounds", it checks two properties a server
// relies on: every failure is kProtocolError, and decoding is canonical — whatever decodes
// re-encodes to exactly the bytes it came from, so no field is dropped or silently normalised.
// Built with libFuzzer (KVTIER_FUZZ) or with replay_main.cpp under the gcc presets.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>
#include <vector>

#include "api/wire/protocol.h"

namespace {

using namespace kvtier;
using namespace kvtier::proto;

[[noreturn]] void fail(const char* what, const Status& s = Status::ok()) {
  std::fprintf(stderr, "protocol_fuzz: %s (%s)\n", what, s.to_string().c_str());
  std::abort();
}

void check_failure(const Status& s, const char* what) {
  if (!s.is_ok() && s.code() != StatusCode::kProtocolError) fail(what, s);
}

template <typename M>
void check_decode(std::span<const std::byte> payload, const char* name) {
  M m;
  Status s = decode(payload, m);
  check_failure(s, name);
  if (!s.is_ok()) return;
  std::vector<std::byte> again;
  encode(m, again);
  if (!std::ranges::equal(again, payload)) fail(name, internal_error("re-encode differs"));
}

void check_replies(std::span<const std::byte> body) {
  check_decode<HelloReply>(body, "HelloReply");
  check_decode<OpenNamespaceReply>(body, "OpenNamespaceReply");
  check_decode<LookupReply>(body, "LookupReply");
  check_decode<LoadReply>(body, "LoadReply");
  check_decode<SaveReply>(body, "SaveReply");
  check_decode<CountReply>(body, "CountReply");
  check_decode<StatsReply>(body, "StatsReply");
  check_decode<RegisterMemoryReply>(body, "RegisterMemoryReply");
  check_decode<JsonReply>(body, "JsonReply");
  check_decode<ExportReadReply>(body, "ExportReadReply");
  check_decode<ObjectPutReply>(body, "ObjectPutReply");
  check_decode<ObjectGetReply>(body, "ObjectGetReply");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::span<const std::byte> input(reinterpret_cast<const std::byte*>(data), size);

  if (size >= kHeaderBytes) {
    auto header = decode_header(input.first(kHeaderBytes));
    check_failure(header.status(), "decode_header");
    if (header.is_ok()) {
      std::byte again[kHeaderBytes];
      encode_header(*header, again);
      if (!std::ranges::equal(std::span<const std::byte>(again), input.first(kHeaderBytes))) {
        fail("header re-encode differs");
      }
    }
  }
  if (size < 2) return 0;

  const uint16_t op = static_cast<uint16_t>(data[0] | (data[1] << 8));
  auto payload = input.subspan(2);

  Status valid = validate_request(op, payload);
  check_failure(valid, "validate_request");
  if (valid.is_ok() && !is_known_op(op)) fail("validate_request accepted an unknown op");

  check_decode<HelloRequest>(payload, "HelloRequest");
  check_decode<OpenNamespaceRequest>(payload, "OpenNamespaceRequest");
  check_decode<LookupRequest>(payload, "LookupRequest");
  check_decode<LoadRequest>(payload, "LoadRequest");
  check_decode<ReleaseRequest>(payload, "ReleaseRequest");
  check_decode<SaveRequest>(payload, "SaveRequest");
  check_decode<PrefixRequest>(payload, "PrefixRequest");
  check_decode<RegisterMemoryRequest>(payload, "RegisterMemoryRequest");
  check_decode<UnregisterMemoryRequest>(payload, "UnregisterMemoryRequest");
  check_decode<LoadToRequest>(payload, "LoadToRequest");
  check_decode<SaveFromRequest>(payload, "SaveFromRequest");
  check_decode<InspectRequest>(payload, "InspectRequest");
  check_decode<DoctorRequest>(payload, "DoctorRequest");
  check_decode<ExportListRequest>(payload, "ExportListRequest");
  check_decode<ExportReadRequest>(payload, "ExportReadRequest");
  check_decode<ObjectPutRequest>(payload, "ObjectPutRequest");
  check_decode<ObjectGetRequest>(payload, "ObjectGetRequest");
  check_decode<ObjectKeysRequest>(payload, "ObjectKeysRequest");
  check_replies(payload);

  Status remote;
  auto body = decode_status(payload, remote);
  check_failure(body.status(), "decode_status");
  if (body.is_ok()) {
    std::vector<std::byte> again;
    encode_status(remote, again);
    again.insert(again.end(), body->begin(), body->end());
    if (!std::ranges::equal(again, payload)) fail("status re-encode differs");
    if (remote.is_ok()) check_replies(*body);
  }
  return 0;
}
