// Registered memory: a client hands kvtierd its (emulated, here) GPU memory and the daemon loads
// into it and saves from it directly, with no window in between (transfer/shared_device_memory.h,
// Client::register_memory). The CUDA IPC calls themselves need a GPU; everything around them —
// the protocol, the daemon's checks, canonical and paged buffers, layered loads, unmapping at
// disconnect, another process — runs here through the memfd path.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "kvtier/client.h"
#include "api/wire/protocol.h"
#include "api/server/server.h"
#include "api/server/service_config.h"
#include "api/store/store.h"
#include "api/wire/socket_io.h"
#include "service_support.h"
#include "temp_dir.h"
#include "transfer/shared_device_memory.h"

extern char** environ;

using namespace kvtier;
using namespace kvtier::testing;
using namespace std::chrono_literals;

namespace {

ServiceConfig config_for(const std::string& dir, const KvLayout& layout, uint64_t host_blocks) {
  ServiceConfig c;
  c.data_dir = dir;
  c.layout = layout;
  c.host_bytes = host_blocks * layout.bytes_per_block();
  c.nvme_bytes = 4 * host_blocks * layout.bytes_per_block();
  c.hbm_enabled = false;
  c.metrics_listen = "";
  c.fdatasync = false;
  c.secret = "registered-memory-test";
  REQUIRE(resolve(c).is_ok());
  return c;
}

std::unique_ptr<Server> start(ServiceConfig c) {
  auto s = Server::start(std::move(c));
  REQUIRE(s.is_ok());
  return std::move(*s);
}

// A window too small for one layer of a block: a load or save that works went around it.
std::unique_ptr<Client> connect_windowless(const Server& s) {
  auto c = Client::connect({.socket_path = s.socket_path(), .window_bytes = 1024, .name = "registered"});
  REQUIRE(c.is_ok());
  return std::move(*c);
}

// Device memory (cudaMalloc with a GPU, else emulated), every byte `fill`. The tests touch it only
// through write() and read(), so the same tests run the CUDA IPC path on a machine with a GPU.
DeviceAllocation allocate(uint64_t bytes, std::byte fill) {
  auto a = DeviceAllocation::create(bytes);
  REQUIRE(a.is_ok());
  const std::vector<std::byte> bytes_of(bytes, fill);
  REQUIRE(a->write(0, bytes_of.data(), bytes).is_ok());
  return std::move(*a);
}

std::vector<std::byte> contents(const DeviceAllocation& a, uint64_t offset = 0, uint64_t bytes = UINT64_MAX) {
  std::vector<std::byte> out(std::min(bytes, a.size() - offset));
  REQUIRE(a.read(offset, out.data(), out.size()).is_ok());
  return out;
}

// A memfd sealed against shrinking and mapped here: memory a client may register whatever the
// machine has, for requests built by hand.
struct SealedMemfd {
  int fd = -1;
  std::byte* data = nullptr;
  uint64_t bytes = 0;
  explicit SealedMemfd(uint64_t n) : bytes(n) {
    fd = ::memfd_create("registered-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, static_cast<off_t>(n)) == 0);
    REQUIRE(::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    void* p = ::mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    REQUIRE(p != MAP_FAILED);
    data = static_cast<std::byte*>(p);
  }
  ~SealedMemfd() {
    ::munmap(data, bytes);
    ::close(fd);
  }
};

}  // namespace

TEST_CASE("Shared device memory: export and map an emulated allocation", "[service][registered]") {
  auto a = allocate(3 * 4096 + 100, std::byte{0});
  if (a.is_cuda()) {
    WARN("a GPU is present: DeviceAllocation is cudaMalloc, and the memfd path is checked by the other tests");
    SUCCEED("skipped");
    return;
  }
  const uint64_t before = mapped_device_regions();
  auto share = export_device_memory(a.data() + 5000, 4000);
  REQUIRE(share.is_ok());
  CHECK(share->kind == ShareKind::kMemfd);
  CHECK(share->offset == 5000);
  CHECK(share->fd >= 0);
  {
    auto m = map_device_memory(*share);
    REQUIRE(m.is_ok());
    CHECK(mapped_device_regions() == before + 1);
    CHECK((*m)->size() == 4000);
    CHECK_FALSE((*m)->is_cuda());
    // The same bytes, both ways (an unaligned offset inside the file).
    a.data()[5000] = std::byte{0x5A};
    CHECK((*m)->data()[0] == std::byte{0x5A});
    (*m)->data()[3999] = std::byte{0xA5};
    CHECK(a.data()[8999] == std::byte{0xA5});
  }
  CHECK(mapped_device_regions() == before);

  SECTION("what cannot be shared is refused with a reason") {
    std::vector<std::byte> pageable(4096);
    auto r = export_device_memory(pageable.data(), pageable.size());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK(r.status().message().find("DeviceAllocation") != std::string::npos);
    CHECK(export_device_memory(a.data() + 100, a.size()).status().code() == StatusCode::kInvalidArgument);
    CHECK(export_device_memory(nullptr, 10).status().code() == StatusCode::kInvalidArgument);
    CHECK(export_device_memory(a.data(), 0).status().code() == StatusCode::kInvalidArgument);
  }
  SECTION("a share is checked against the file before it is mapped") {
    DeviceShare past = *share;
    past.offset = a.size() - 10;
    CHECK(map_device_memory(past).status().code() == StatusCode::kInvalidArgument);
    DeviceShare huge = *share;
    huge.bytes = UINT64_MAX;
    CHECK(map_device_memory(huge).status().code() == StatusCode::kInvalidArgument);
    DeviceShare nofd = *share;
    nofd.fd = -1;
    CHECK(map_device_memory(nofd).status().code() == StatusCode::kInvalidArgument);
    // A memfd its owner could shrink under the mapping is refused.
    const int loose = ::memfd_create("loose", MFD_CLOEXEC);
    REQUIRE(loose >= 0);
    REQUIRE(::ftruncate(loose, 8192) == 0);
    CHECK(map_device_memory({.kind = ShareKind::kMemfd, .offset = 0, .bytes = 4096, .fd = loose}).status().code() ==
          StatusCode::kInvalidArgument);
    ::close(loose);
    DeviceShare ipc = *share;
    ipc.kind = ShareKind::kCudaIpc;
    CHECK(map_device_memory(ipc).status().code() == StatusCode::kUnavailable);  // no GPU here
    CHECK(mapped_device_regions() == before);
  }
}

TEST_CASE("Daemon: registered memory is loaded into and saved from directly", "[service][registered]") {
  TempDir dir("kvtier_reg");
  const KvLayout L = service_test_layout();
  const uint64_t bpb = L.bytes_per_block(), lb = L.bytes_per_block_layer();
  auto server = start(config_for(dir.path(), L, 64));
  auto c = connect_windowless(*server);
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(71, 16 * 20 + 3);
  const auto expect = prompt_kv(prompt, L, 0, 20);
  const uint64_t regions_before = mapped_device_regions();

  // The engine's KV: 20 blocks in registered memory, saved straight from there.
  auto src = allocate(24 * bpb, std::byte{0});
  REQUIRE(src.write(0, expect.data(), expect.size()).is_ok());
  {
    const Status st = c->register_memory(src.data(), src.size());
    INFO(st.to_string());
    REQUIRE(st.is_ok());
  }
  CHECK(mapped_device_regions() == regions_before + 1);
  auto saved = c->save(*ns, prompt, KvBuffer::contiguous(src.data(), 20, bpb, LocationKind::kDevice));
  REQUIRE(saved.is_ok());
  CHECK(*saved == 20);

  SECTION("another client loads canonical blocks, out of order, byte-identical") {
    auto c2 = connect_windowless(*server);
    auto ns2 = c2->open_namespace({"m", "", ""});
    REQUIRE(ns2.is_ok());
    auto dst = allocate(20 * bpb, std::byte{0xEE});
    REQUIRE(c2->register_memory(dst.data(), dst.size()).is_ok());
    auto m = c2->lookup(*ns2, prompt);
    REQUIRE(m.is_ok());
    REQUIRE(m->blocks.size() == 20);
    std::vector<std::byte*> blocks(20);
    for (size_t b = 0; b < 20; ++b) blocks[b] = dst.data() + (19 - b) * bpb;  // reversed
    auto h = c2->load(*m, KvBuffer::canonical(blocks, LocationKind::kDevice));
    REQUIRE(h.is_ok());
    REQUIRE(h->wait().is_ok());
    const auto got = contents(dst);
    for (size_t b = 0; b < 20; ++b) {
      CHECK(std::memcmp(got.data() + (19 - b) * bpb, expect.data() + b * bpb, bpb) == 0);
    }
    REQUIRE(c2->release(*m).is_ok());
    auto text = c2->metrics_text();
    REQUIRE(text.is_ok());
    CHECK(text->find("kvtierd_tokens_restored_total 320\n") != std::string::npos);
    CHECK(text->find("kvtierd_requests_total{op=\"load_to\"} 1\n") != std::string::npos);
    CHECK(text->find("kvtierd_requests_total{op=\"load\"} 0\n") != std::string::npos);
  }
  SECTION("a vLLM paged buffer, one registered tensor per layer, both ways") {
    const uint32_t pages = 24;
    std::vector<DeviceAllocation> tensors;
    std::vector<void*> bases;
    for (uint32_t l = 0; l < L.num_layers; ++l) {
      tensors.push_back(allocate(uint64_t(pages) * lb, std::byte{0}));
      bases.push_back(tensors.back().data());
      REQUIRE(c->register_memory(tensors.back().data(), tensors.back().size()).is_ok());
    }
    std::vector<int32_t> page_of(20);
    for (int b = 0; b < 20; ++b) page_of[b] = (b * 7 + 3) % pages;
    auto m = c->lookup(*ns, prompt);
    REQUIRE(m.is_ok());
    auto h = c->load(*m, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of, LocationKind::kDevice));
    REQUIRE(h.is_ok());
    REQUIRE(h->wait().is_ok());
    REQUIRE(c->release(*m).is_ok());
    std::vector<std::vector<std::byte>> got;
    for (const DeviceAllocation& t : tensors) got.push_back(contents(t));
    CHECK(vllm_pages_hold(L, got, pages, page_of, expect));
    // Saved back from the pages under another prompt, read canonically: the same bytes.
    const auto other = synthetic_tokens(72, 16 * 20);
    auto again = c->save(*ns, other, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of,
                                                     LocationKind::kDevice));
    REQUIRE(again.is_ok());
    CHECK(*again == 20);
    auto m2 = c->lookup(*ns, other);
    REQUIRE(m2.is_ok());
    auto out = allocate(20 * bpb, std::byte{0xEE});
    REQUIRE(c->register_memory(out.data(), out.size()).is_ok());
    auto h2 = c->load(*m2, KvBuffer::contiguous(out.data(), 20, bpb, LocationKind::kDevice));
    REQUIRE(h2.is_ok());
    REQUIRE(h2->wait().is_ok());
    CHECK(contents(out) == expect);
    REQUIRE(c->release(*m2).is_ok());
  }
  SECTION("a buffer outside registered memory still goes through the window") {
    std::vector<std::byte> plain(20 * bpb);
    auto m = c->lookup(*ns, prompt);
    REQUIRE(m.is_ok());
    auto h = c->load(*m, KvBuffer::contiguous(plain.data(), 20, bpb));
    CHECK(h.status().code() == StatusCode::kInvalidArgument);  // this client's window is too small
    CHECK(h.status().message().find("window") != std::string::npos);
    // One block past the registered memory's end: not wholly inside, so not direct either.
    auto h2 = c->load(*m, KvBuffer::contiguous(src.data() + 5 * bpb, 20, bpb, LocationKind::kDevice));
    CHECK(h2.status().code() == StatusCode::kInvalidArgument);
    REQUIRE(c->release(*m).is_ok());
  }
  SECTION("bad registrations: a clear error, the connection serves on") {
    std::vector<std::byte> pageable(4096);
    CHECK(c->register_memory(pageable.data(), pageable.size()).code() == StatusCode::kInvalidArgument);
    CHECK(c->register_memory(src.data() + bpb, bpb).code() == StatusCode::kAlreadyExists);
    CHECK(c->unregister_memory(pageable.data()).code() == StatusCode::kNotFound);
    REQUIRE(c->unregister_memory(src.data()).is_ok());
    CHECK(mapped_device_regions() == regions_before);
    REQUIRE(c->register_memory(src.data(), src.size()).is_ok());  // again, after its end
    auto m = c->lookup(*ns, prompt);
    REQUIRE(m.is_ok());
    CHECK(m->tokens == 320);
    REQUIRE(c->release(*m).is_ok());
  }
  SECTION("a client's disconnect unmaps everything it registered") {
    auto more = allocate(4 * bpb, std::byte{0});
    REQUIRE(c->register_memory(more.data(), more.size()).is_ok());
    CHECK(mapped_device_regions() == regions_before + 2);
    c.reset();
    REQUIRE(server->wait_sessions_at_most(0, 10s));
    CHECK(mapped_device_regions() == regions_before);
  }
}

TEST_CASE("Daemon: a load into registered memory streams layer by layer", "[service][registered]") {
  TempDir dir("kvtier_reg");
  // 512 KiB blocks (64 KiB per layer): one layer of 80 blocks is more than a 4 MiB slice.
  auto L = KvLayout::standard(8, 8, 128, Dtype::kFp16, 16);
  REQUIRE(L.is_ok());
  const uint64_t bpb = L->bytes_per_block(), lb = L->bytes_per_block_layer();
  auto server = start(config_for(dir.path(), *L, 96));
  auto c = connect_windowless(*server);
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(73, 16 * 80);
  const auto expect = prompt_kv(prompt, *L, 0, 80);
  auto mem = allocate(80 * bpb, std::byte{0});
  REQUIRE(mem.write(0, expect.data(), expect.size()).is_ok());
  REQUIRE(c->register_memory(mem.data(), mem.size()).is_ok());
  const KvBuffer buf = KvBuffer::contiguous(mem.data(), 80, bpb, LocationKind::kDevice);
  REQUIRE(*c->save(*ns, prompt, buf) == 80);
  const std::vector<std::byte> poison(mem.size(), std::byte{0xEE});
  REQUIRE(mem.write(0, poison.data(), poison.size()).is_ok());

  auto m = c->lookup(*ns, prompt);
  REQUIRE(m.is_ok());
  auto h = c->load(*m, buf);
  REQUIRE(h.is_ok());
  REQUIRE(h->wait_layer(0).is_ok());
  for (size_t b = 0; b < 80; ++b) REQUIRE(std::memcmp(contents(mem, b * bpb, lb).data(), expect.data() + b * bpb, lb) == 0);
  REQUIRE(h->wait().is_ok());
  CHECK(h->layers_done() == 8);
  CHECK(contents(mem) == expect);
  REQUIRE(c->release(*m).is_ok());
  auto text = c->metrics_text();
  REQUIRE(text.is_ok());
  CHECK(text->find("kvtierd_requests_total{op=\"load_to\"} 8\n") != std::string::npos);  // one slice per layer
  CHECK(text->find("kvtierd_tokens_restored_total 1280\n") != std::string::npos);       // counted once
}

TEST_CASE("Daemon: registered-memory requests are checked against the session's regions", "[service][registered]") {
  TempDir dir("kvtier_reg");
  const KvLayout L = service_test_layout();
  const uint64_t bpb = L.bytes_per_block();
  auto server = start(config_for(dir.path(), L, 64));
  {  // something to lease
    auto c = connect_windowless(*server);
    auto ns = c->open_namespace({"m", "", ""});
    auto mem = allocate(4 * bpb, std::byte{1});
    REQUIRE(c->register_memory(mem.data(), mem.size()).is_ok());
    REQUIRE(*c->save(*ns, synthetic_tokens(74, 64), KvBuffer::contiguous(mem.data(), 4, bpb, LocationKind::kDevice)) == 4);
  }
  // A raw session, so requests the Client would never send reach the daemon.
  auto fd = proto::connect_unix(server->socket_path());
  REQUIRE(fd.is_ok());
  proto::FrameReader reader(*fd);
  uint32_t id = 0;
  auto call = [&](proto::Op op, const std::vector<std::byte>& payload, int pass_fd = -1) {
    REQUIRE(proto::send_frame(*fd, static_cast<uint16_t>(op), ++id, payload, pass_fd).is_ok());
    proto::FrameHeader h;
    std::vector<std::byte> reply;
    int got = -1;
    REQUIRE(reader.next(h, reply, got).is_ok());
    Status remote;
    auto body = proto::decode_status(reply, remote);
    REQUIRE(body.is_ok());
    return std::pair{remote, std::vector<std::byte>(body->begin(), body->end())};
  };
  std::vector<std::byte> p;
  proto::encode(proto::HelloRequest{}, p);
  REQUIRE(call(proto::Op::kHello, p).first.is_ok());
  p.clear();
  proto::encode(proto::OpenNamespaceRequest{"m", "", "", L.fingerprint()}, p);
  auto opened = call(proto::Op::kOpenNamespace, p);
  REQUIRE(opened.first.is_ok());
  proto::OpenNamespaceReply nsr;
  REQUIRE(proto::decode(opened.second, nsr).is_ok());
  p.clear();
  proto::encode(proto::LookupRequest{.namespace_id = nsr.namespace_id, .tokens = synthetic_tokens(74, 64)}, p);
  auto looked = call(proto::Op::kLookup, p);
  REQUIRE(looked.first.is_ok());
  proto::LookupReply lr;
  REQUIRE(proto::decode(looked.second, lr).is_ok());
  REQUIRE(lr.tier_masks.size() == 4);

  SealedMemfd mem(2 * bpb);
  auto reg = [&](const proto::RegisterMemoryRequest& r, int pass) {
    p.clear();
    proto::encode(r, p);
    return call(proto::Op::kRegisterMemory, p, pass);
  };
  SECTION("registrations the daemon refuses") {
    // A memfd registration without its descriptor, an IPC one with a stray descriptor, a range
    // past the file, and a CUDA IPC handle on a daemon without a GPU.
    CHECK(reg({.kind = 1, .bytes = mem.bytes}, -1).first.code() == StatusCode::kInvalidArgument);
    CHECK(reg({.kind = 0, .bytes = mem.bytes}, mem.fd).first.code() == StatusCode::kInvalidArgument);
    CHECK(reg({.kind = 1, .offset = 1, .bytes = mem.bytes}, mem.fd).first.code() == StatusCode::kInvalidArgument);
    // A CUDA IPC handle of zeros: no GPU here, or no such allocation where there is one.
    const StatusCode bogus = reg({.kind = 0, .bytes = mem.bytes}, -1).first.code();
    CHECK((bogus == StatusCode::kUnavailable || bogus == StatusCode::kInvalidArgument));
    p.clear();
    proto::encode(proto::UnregisterMemoryRequest{.region = 77}, p);
    CHECK(call(proto::Op::kUnregisterMemory, p).first.code() == StatusCode::kNotFound);
  }
  SECTION("loads and saves that name places outside the regions") {
    auto ok = reg({.kind = 1, .bytes = mem.bytes}, mem.fd);
    REQUIRE(ok.first.is_ok());
    proto::RegisterMemoryReply rr;
    REQUIRE(proto::decode(ok.second, rr).is_ok());
    auto load_to = [&](proto::RegionBuffer dst) {
      p.clear();
      proto::encode(proto::LoadToRequest{.lease = lr.lease, .dst = std::move(dst)}, p);
      return call(proto::Op::kLoadTo, p).first.code();
    };
    CHECK(load_to({.places = {{rr.region, 0}, {rr.region + 1, 0}}}) == StatusCode::kNotFound);
    CHECK(load_to({.places = {{rr.region, 0}, {rr.region, bpb + 1}}}) == StatusCode::kInvalidArgument);
    CHECK(load_to({.places = {{rr.region, UINT64_MAX}}}) == StatusCode::kInvalidArgument);
    CHECK(load_to({.places = std::vector<proto::RegionRef>(5, {rr.region, 0})}) == StatusCode::kInvalidArgument);
    // Paged: one tensor for a two-layer model; a page past the tensor; a tensor past the region.
    CHECK(load_to({.layout = 1, .engine_num_pages = 1, .places = {{rr.region, 0}}, .pages = {0}}) ==
          StatusCode::kInvalidArgument);
    CHECK(load_to({.layout = 1, .engine_num_pages = 1, .places = {{rr.region, 0}, {rr.region, 0}}, .pages = {1}}) ==
          StatusCode::kInvalidArgument);
    CHECK(load_to({.layout = 1, .engine_num_pages = 5, .places = {{rr.region, 0}, {rr.region, 0}}, .pages = {0}}) ==
          StatusCode::kInvalidArgument);
    // A good one still works on this connection, and the bytes are the saved block's.
    REQUIRE(load_to({.places = {{rr.region, 0}, {rr.region, bpb}}}) == StatusCode::kOk);
    CHECK(std::all_of(mem.data, mem.data + mem.bytes, [](std::byte b) { return b == std::byte{1}; }));
    p.clear();
    proto::encode(proto::SaveFromRequest{.namespace_id = nsr.namespace_id, .tokens = synthetic_tokens(75, 32),
                                         .src = {.places = {{rr.region, 0}, {rr.region, bpb + 4096}}}},
                  p);
    CHECK(call(proto::Op::kSaveFrom, p).first.code() == StatusCode::kInvalidArgument);
  }
  ::close(*fd);
}

TEST_CASE("Daemon: another process loads into its own registered memory", "[service][registered]") {
  TempDir dir("kvtier_reg");
  const KvLayout L = service_test_layout();
  const uint64_t bpb = L.bytes_per_block();
  auto server = start(config_for(dir.path(), L, 64));
  auto c = connect_windowless(*server);
  auto ns = c->open_namespace({"m", "", ""});
  const auto prompt = synthetic_tokens(76, 16 * 12);
  auto mem = allocate(12 * bpb, std::byte{0});
  const auto kv = prompt_kv(prompt, L, 0, 12);
  REQUIRE(mem.write(0, kv.data(), kv.size()).is_ok());
  REQUIRE(c->register_memory(mem.data(), mem.size()).is_ok());
  REQUIRE(*c->save(*ns, prompt, KvBuffer::contiguous(mem.data(), 12, bpb, LocationKind::kDevice)) == 12);

  std::vector<std::string> args = {KVTIER_SERVICE_CHILD, "device-share", server->socket_path(), "76", "192", "192"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(::posix_spawn(&pid, KVTIER_SERVICE_CHILD, nullptr, nullptr, argv.data(), environ) == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

TEST_CASE("Daemon: shared host memory is loaded into and saved from with no window", "[service][registered]") {
  TempDir dir("kvtier_shared_host");
  const KvLayout L = service_test_layout();
  const uint64_t bpb = L.bytes_per_block();
  auto server = start(config_for(dir.path(), L, 64));
  auto c = connect_windowless(*server);  // a window too small for one layer: only the direct path works
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(72, 16 * 12);
  const auto expect = prompt_kv(prompt, L, 0, 12);
  const uint64_t regions_before = mapped_device_regions();

  auto src = c->allocate_shared_host(12 * bpb - 100);  // rounded up to whole pages
  REQUIRE(src.is_ok());
  REQUIRE((*src)->size() >= 12 * bpb);
  CHECK((*src)->size() % 4096 == 0);
  CHECK(mapped_device_regions() == regions_before + 1);
  CHECK(std::all_of((*src)->data(), (*src)->data() + (*src)->size(), [](std::byte b) { return b == std::byte{0}; }));
  std::memcpy((*src)->data(), expect.data(), expect.size());
  auto saved = c->save(*ns, prompt, KvBuffer::contiguous((*src)->data(), 12, bpb));  // plain host KvBuffer
  REQUIRE(saved.is_ok());
  CHECK(*saved == 12);

  auto dst = c->allocate_shared_host(12 * bpb);
  REQUIRE(dst.is_ok());
  auto m = c->lookup(*ns, prompt);
  REQUIRE(m.is_ok());
  REQUIRE(m->blocks.size() == 12);
  auto h = c->load(*m, KvBuffer::contiguous((*dst)->data(), 12, bpb));
  REQUIRE(h.is_ok());
  REQUIRE(h->wait().is_ok());
  CHECK(std::memcmp((*dst)->data(), expect.data(), expect.size()) == 0);
  REQUIRE(c->release(*m).is_ok());

  // Freeing it ends the registration: the daemon unmaps it, and its range is free to register again.
  src->reset();
  dst->reset();
  CHECK(mapped_device_regions() == regions_before);
  CHECK(c->allocate_shared_host(0).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Daemon and Store: load_layers writes only the layers asked for", "[service][registered]") {
  TempDir dir("kvtier_load_layers");
  const KvLayout L = *KvLayout::standard(4, 2, 16, Dtype::kBf16, 16);  // layers 1 and 2 are inner
  const uint64_t bpb = L.bytes_per_block(), lb = L.bytes_per_block_layer();
  auto server = start(config_for(dir.path(), L, 64));
  auto window = Client::connect({.socket_path = server->socket_path(), .name = "layers"});
  REQUIRE(window.is_ok());
  auto direct = connect_windowless(*server);
  const auto prompt = synthetic_tokens(73, 16 * 10);
  const auto expect = prompt_kv(prompt, L, 0, 10);
  {
    auto ns = (*window)->open_namespace({"m", "", ""});
    REQUIRE(ns.is_ok());
    std::vector<std::byte> src(expect.begin(), expect.end());
    REQUIRE((*window)->save(*ns, prompt, KvBuffer::contiguous(src.data(), 10, bpb)).is_ok());
  }
  const LayerRange range{1, 2};
  // Layers 1 and 2 of every block are the saved ones; every other byte is still the fill.
  auto check_only_range = [&](const std::byte* got) {
    for (size_t b = 0; b < 10; ++b) {
      for (uint32_t l = 0; l < L.num_layers; ++l) {
        const std::byte* at = got + b * bpb + l * lb;
        if (l >= range.begin && l < range.begin + range.count) {
          REQUIRE(std::memcmp(at, expect.data() + b * bpb + l * lb, lb) == 0);
        } else {
          REQUIRE(std::all_of(at, at + lb, [](std::byte x) { return x == std::byte{0xEE}; }));
        }
      }
    }
  };
  auto run = [&](KvStore& kv, std::byte* dst) {
    auto ns = kv.open_namespace({"m", "", ""});
    REQUIRE(ns.is_ok());
    auto m = kv.lookup(*ns, prompt);
    REQUIRE(m.is_ok());
    REQUIRE(m->blocks.size() == 10);
    std::fill(dst, dst + 10 * bpb, std::byte{0xEE});
    auto h = kv.load_layers(*m, KvBuffer::contiguous(dst, 10, bpb), range);
    REQUIRE(h.is_ok());
    CHECK(h->num_layers() == 2);
    CHECK(h->wait_layer(1).is_ok());  // the range's second layer, layer 2
    CHECK(h->wait_layer(2).code() == StatusCode::kInvalidArgument);
    REQUIRE(h->wait().is_ok());
    check_only_range(dst);
    CHECK(kv.load_layers(*m, KvBuffer::contiguous(dst, 10, bpb), {L.num_layers, 1}).status().code() ==
          StatusCode::kInvalidArgument);
    CHECK(kv.load_layers(*m, KvBuffer::contiguous(dst, 10, bpb), {L.num_layers - 1, 2}).status().code() ==
          StatusCode::kInvalidArgument);
    REQUIRE(kv.release(*m).is_ok());
  };
  SECTION("through the window") {
    std::vector<std::byte> dst(10 * bpb);
    run(**window, dst.data());
  }
  SECTION("into shared host memory (no window)") {
    auto dst = direct->allocate_shared_host(10 * bpb);
    REQUIRE(dst.is_ok());
    run(*direct, (*dst)->data());
  }
  SECTION("in-process") {
    window->reset();
    direct.reset();
    server.reset();  // the data dir is free: the Store opens it
    ServiceConfig c = config_for(dir.path(), L, 64);
    auto opts = to_tier_options(c);
    REQUIRE(opts.is_ok());
    auto store = Store::open({.tiers = std::move(*opts), .secret = c.secret});
    REQUIRE(store.is_ok());
    std::vector<std::byte> dst(10 * bpb);
    run(**store, dst.data());
  }
}
