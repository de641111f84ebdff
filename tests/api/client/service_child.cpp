// A client process for the service tests: started by the test (posix_spawn) so that two
// processes, or a process that dies, really share the daemon. Exit 0 when every check passed;
// otherwise a message on stderr and exit 1.
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kvtier/client.h"
#include "transfer/shared_device_memory.h"
#include "service_support.h"

extern "C" int capi_smoke(const char* socket_path, const unsigned* tokens, size_t num_tokens);

using namespace kvtier;
using namespace kvtier::testing;

namespace {

int fail(const std::string& what, const Status& s = Status::ok()) {
  std::fprintf(stderr, "service_child: %s %s\n", what.c_str(), s.is_ok() ? "" : s.to_string().c_str());
  return 1;
}

std::unique_ptr<Client> connect_or_die(const std::string& socket) {
  auto c = Client::connect({.socket_path = socket, .window_bytes = 64 << 10, .name = "service_child"});
  if (!c) {
    fail("connect", c.status());
    std::exit(1);
  }
  return std::move(*c);
}

/// Looks the prompt up, expects `expect_tokens` cached, loads them and checks every byte.
int check_shared(Client& c, NamespaceId ns, const std::vector<TokenId>& prompt, uint64_t expect_tokens) {
  auto m = c.lookup(ns, prompt);
  if (!m) return fail("lookup", m.status());
  if (m->tokens != expect_tokens) {
    return fail("matched " + std::to_string(m->tokens) + " tokens, expected " + std::to_string(expect_tokens));
  }
  const KvLayout& layout = c.layout();
  const uint64_t bpb = layout.bytes_per_block();
  std::vector<std::byte> got(m->blocks.size() * bpb);
  auto h = c.load(*m, KvBuffer::contiguous(got.data(), m->blocks.size(), bpb));
  if (!h) return fail("load", h.status());
  if (Status s = h->wait(); !s) return fail("load wait", s);
  if (got != prompt_kv(prompt, layout, 0, m->blocks.size())) return fail("restored KV differs from the saved KV");
  if (Status s = c.release(*m); !s) return fail("release", s);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return fail("usage: service_child share|save|hold|tenant|refused|operator|uid-limit|capi SOCKET SEED TOKENS [ARG]");
  const std::string cmd = argv[1], socket = argv[2];
  const uint64_t seed = std::strtoull(argv[3], nullptr, 10);
  const auto prompt = synthetic_tokens(seed, std::strtoull(argv[4], nullptr, 10));
  const uint64_t arg = argc > 5 ? std::strtoull(argv[5], nullptr, 10) : 0;

  if (cmd == "tenant") {  // drop to another identity first: the daemon sees it in SO_PEERCRED
    if (::setgid(static_cast<gid_t>(arg)) != 0 || ::setuid(static_cast<uid_t>(arg)) != 0) return fail("setuid");
    auto c = connect_or_die(socket);
    auto alpha = c->open_namespace({"m", "alpha", ""});
    if (alpha || alpha.status().code() != StatusCode::kPermissionDenied) {
      return fail("opening another identity's tenant was not refused", alpha.status());
    }
    auto beta = c->open_namespace({"m", "beta", ""});
    if (!beta) return fail("open own tenant", beta.status());
    return check_shared(*c, *beta, prompt, 0);  // the other tenant's blocks are invisible
  }
  if (cmd == "refused") {  // as another identity, which the daemon's allow-list leaves out
    if (::setgid(static_cast<gid_t>(arg)) != 0 || ::setuid(static_cast<uid_t>(arg)) != 0) return fail("setuid");
    auto c = Client::connect({.socket_path = socket, .window_bytes = 64 << 10, .name = "service_child"});
    if (c || c.status().code() != StatusCode::kPermissionDenied) {
      return fail("connect was not refused with permission_denied", c ? Status::ok() : c.status());
    }
    return 0;
  }
  if (cmd == "operator") {  // as another identity: inspect, doctor and export are refused, the rest served
    if (::setgid(static_cast<gid_t>(arg)) != 0 || ::setuid(static_cast<uid_t>(arg)) != 0) return fail("setuid");
    auto c = connect_or_die(socket);
    auto inspected = c->inspect(5);
    if (inspected || inspected.status().code() != StatusCode::kPermissionDenied ||
        inspected.status().message().find("operators") == std::string_view::npos) {
      return fail("inspect by a non-operator was not refused", inspected ? Status::ok() : inspected.status());
    }
    auto doctored = c->doctor({"m", "", ""}, prompt, {}, 0, 0);
    if (doctored || doctored.status().code() != StatusCode::kPermissionDenied) {
      return fail("doctor by a non-operator was not refused", doctored ? Status::ok() : doctored.status());
    }
    auto listed = c->export_list(true, {}, 16);
    if (listed || listed.status().code() != StatusCode::kPermissionDenied) {
      return fail("export_list by a non-operator was not refused", listed ? Status::ok() : listed.status());
    }
    std::vector<std::byte> one(c->layout().bytes_per_block());
    const BlockKey key{1, 2};
    auto read = c->export_read(std::span(&key, 1), one);
    if (read || read.status().code() != StatusCode::kPermissionDenied) {
      return fail("export_read by a non-operator was not refused", read ? Status::ok() : read.status());
    }
    auto ns = c->open_namespace({"m", "", ""});
    if (!ns) return fail("open_namespace after the refusals", ns.status());
    return 0;
  }
  if (cmd == "uid-limit") {  // as another identity: SEED clients connect, the next is refused
    if (::setgid(static_cast<gid_t>(arg)) != 0 || ::setuid(static_cast<uid_t>(arg)) != 0) return fail("setuid");
    std::vector<std::unique_ptr<Client>> held;
    for (uint64_t i = 0; i < seed; ++i) held.push_back(connect_or_die(socket));
    auto over = Client::connect({.socket_path = socket, .window_bytes = 64 << 10, .name = "service_child"});
    if (over || over.status().code() != StatusCode::kResourceExhausted ||
        over.status().message().find("max_clients_per_uid") == std::string_view::npos) {
      return fail("the connection past the per-uid limit was not refused with resource_exhausted",
                  over ? Status::ok() : over.status());
    }
    for (auto& c : held) {  // the refusal left the others alone
      if (!c->open_namespace({"m", "", ""})) return fail("a client within the limit is not served");
    }
    return 0;
  }
  if (cmd == "capi") return capi_smoke(socket.c_str(), prompt.data(), prompt.size());
  if (cmd == "device-share") {  // like share, into registered memory, through no window at all
    auto c = Client::connect({.socket_path = socket, .window_bytes = 1024, .name = "service_child"});
    if (!c) return fail("connect", c.status());
    auto ns = (*c)->open_namespace({"m", "", ""});
    if (!ns) return fail("open_namespace", ns.status());
    const KvLayout& layout = (*c)->layout();
    const uint64_t bpb = layout.bytes_per_block();
    auto m = (*c)->lookup(*ns, prompt);
    if (!m || m->tokens != arg) return fail("lookup did not match " + std::to_string(arg) + " tokens");
    auto mem = DeviceAllocation::create(m->blocks.size() * bpb);
    if (!mem) return fail("allocate", mem.status());
    if (Status s = (*c)->register_memory(mem->data(), mem->size()); !s) return fail("register_memory", s);
    auto h = (*c)->load(*m, KvBuffer::contiguous(mem->data(), m->blocks.size(), bpb, LocationKind::kDevice));
    if (!h) return fail("load", h.status());
    if (Status s = h->wait(); !s) return fail("load wait", s);
    const auto expect = prompt_kv(prompt, layout, 0, m->blocks.size());
    std::vector<std::byte> got(expect.size());
    if (Status s = mem->read(0, got.data(), got.size()); !s) return fail("read back", s);
    if (got != expect) return fail("restored KV differs from the saved KV");
    return (*c)->release(*m).is_ok() ? 0 : fail("release");
  }

  auto c = connect_or_die(socket);
  auto ns = c->open_namespace({"m", "", ""});
  if (!ns) return fail("open_namespace", ns.status());
  if (cmd == "share") return check_shared(*c, *ns, prompt, arg);
  if (cmd == "save") {
    const size_t blocks = prompt.size() / c->layout().block_tokens;
    auto kv = prompt_kv(prompt, c->layout(), 0, blocks);
    auto saved = c->save(*ns, prompt, KvBuffer::contiguous(kv.data(), blocks, c->layout().bytes_per_block()));
    if (!saved) return fail("save", saved.status());
    return *saved == blocks ? 0 : fail("saved " + std::to_string(*saved) + " of " + std::to_string(blocks));
  }
  if (cmd == "hold") {  // lease the prompt, report, then load it over and over until killed
    auto m = c->lookup(*ns, prompt);
    if (!m || m->blocks.empty()) return fail("hold: nothing cached");
    const uint64_t bpb = c->layout().bytes_per_block();
    std::vector<std::byte> got(m->blocks.size() * bpb);
    for (bool reported = false;;) {
      auto h = c->load(*m, KvBuffer::contiguous(got.data(), m->blocks.size(), bpb));
      if (!h || !h->wait().is_ok()) return fail("hold: load failed");
      if (!reported) {
        reported = true;
        const char byte = 'L';
        if (::write(static_cast<int>(arg), &byte, 1) != 1) return fail("hold: report");
      }
    }
  }
  return fail("unknown command " + cmd);
}
