// kvtierd and its clients: sharing across processes, byte-identical restores, clients that die,
// restarts, bad protocol input, tenant isolation, the C API. Client processes are the
// service_child program (posix_spawn), so "another process" really is one.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "kvtier/client.h"
#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "api/server/server.h"
#include "api/wire/socket_io.h"
#include "api/store/store.h"
#include "service_fixture.h"
#include "service_support.h"
#include "temp_dir.h"

extern char** environ;

using namespace kvtier;
using namespace kvtier::testing;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kBlock = 4096;  // service_test_layout().bytes_per_block()

ServiceConfig test_config(const std::string& dir) { return test_service_config(dir, "service-test", 512); }

std::unique_ptr<Server> start_server(ServiceConfig c) { return start_test_server(std::move(c)); }

std::unique_ptr<Client> connect(const Server& s, uint64_t window = 64 * kBlock) {
  auto c = Client::connect({.socket_path = s.socket_path(), .window_bytes = window, .name = "test"});
  REQUIRE(c.is_ok());
  return std::move(*c);
}

size_t save_prompt(KvStore& store, NamespaceId ns, const std::vector<TokenId>& prompt) {
  const size_t blocks = prompt.size() / store.layout().block_tokens;
  auto kv = prompt_kv(prompt, store.layout(), 0, blocks);
  auto saved = store.save(ns, prompt, KvBuffer::contiguous(kv.data(), blocks, kBlock));
  REQUIRE(saved.is_ok());
  return *saved;
}

/// Saves `prompt` through a client of a daemon on `dir`, then stops the daemon gracefully (write-back
/// flushed), so that after a restart every block is on NVMe only.
void save_and_stop(const std::string& dir, const std::vector<TokenId>& prompt) {
  auto server = start_server(test_config(dir));
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  REQUIRE(save_prompt(*c, *ns, prompt) == prompt.size() / 16);
  c.reset();
  server->request_stop();
  REQUIRE(server->wait().is_ok());
}


}  // namespace

TEST_CASE("In-process Store: save, lookup, load canonical and paged KV byte-identical", "[service]") {
  TempDir dir("kvtier_store");
  auto opts = to_tier_options([&] {
    auto c = test_config(dir.path());
    REQUIRE(resolve(c).is_ok());
    return c;
  }());
  REQUIRE(opts.is_ok());
  auto store = Store::open({.tiers = std::move(*opts), .secret = "s", .scratch_blocks = 3});
  REQUIRE(store.is_ok());
  Store& s = **store;
  auto ns = s.open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(1, 16 * 10 + 5);  // 10 full blocks and a partial tail
  CHECK(save_prompt(s, *ns, prompt) == 10);
  CHECK(save_prompt(s, *ns, prompt) == 0);  // cached already
  CHECK(restore_and_check(s, *ns, prompt) == 160);

  SECTION("a vLLM paged buffer round-trips through the canonical layout") {
    // In device memory (emulated here) it goes through the page packer: a tier load into device
    // staging 3 blocks at a time (scratch_blocks), then the unpack; a save packs it back out.
    const LocationKind memory = GENERATE(LocationKind::kHost, LocationKind::kDevice);
    CAPTURE(memory == LocationKind::kDevice);
    if (memory == LocationKind::kDevice && !s.tiers().transfer().copy_engine().device_memory_is_host()) {
      // A GPU: these vectors are not GPU memory (registered_memory_test covers real device memory).
      WARN("skipped on a GPU: the device-memory case needs emulated device memory");
      SUCCEED("skipped");  // a deliberate skip, not a run that checked nothing (--warn NoAssertions)
      return;
    }
    const KvLayout L = s.layout();
    const uint32_t pages = 12;
    const uint64_t layer_bytes = 2ull * pages * L.block_tokens * L.num_kv_heads * L.head_dim * 2;
    std::vector<std::vector<std::byte>> layers(L.num_layers, std::vector<std::byte>(layer_bytes, std::byte{0}));
    std::vector<void*> bases;
    for (auto& l : layers) bases.push_back(l.data());
    std::vector<int32_t> page_of = {11, 3, 7, 0, 5, 9, 1, 2, 4, 6};  // out of order
    auto m = s.lookup(*ns, prompt);
    REQUIRE(m.is_ok());
    auto h = s.load(*m, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of, memory));
    REQUIRE(h.is_ok());
    REQUIRE(h->wait().is_ok());
    REQUIRE(s.release(*m).is_ok());
    CHECK(vllm_pages_hold(L, layers, pages, page_of, prompt_kv(prompt, L, 0, 10)));
    // Save the pages under another prompt and read them back canonically: the same bytes.
    const auto other = synthetic_tokens(2, 160);
    auto d2h = [&] { return s.tiers().transfer().stats().bytes_per_route[int(Route::kDeviceToHost)]; };
    const uint64_t d2h_before = d2h();
    auto saved = s.save(*ns, other, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of, memory));
    REQUIRE(saved.is_ok());
    CHECK(*saved == 10);
    // From device memory: packed into the lane's device staging (4 windows of 3), then one DMA
    // per block straight into its host-tier slot: no host scratch in between.
    if (memory == LocationKind::kDevice) CHECK(d2h() - d2h_before == 10 * kBlock);
    auto m2 = s.lookup(*ns, other);
    REQUIRE(m2.is_ok());
    std::vector<std::byte> got(10 * kBlock);
    auto h2 = s.load(*m2, KvBuffer::contiguous(got.data(), 10, kBlock));
    REQUIRE(h2.is_ok());
    REQUIRE(h2->wait().is_ok());
    CHECK(got == prompt_kv(prompt, L, 0, 10));
    REQUIRE(s.release(*m2).is_ok());
  }
  SECTION("bad input: clear errors, nothing stored") {
    const auto fresh = synthetic_tokens(3, 64);
    auto kv = prompt_kv(fresh, s.layout(), 0, 3);
    auto r = s.save(*ns, fresh, KvBuffer::contiguous(kv.data(), 3, kBlock));  // 4 blocks need 4
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK(s.lookup(*ns, fresh)->tokens == 0);
    CHECK(s.lookup(99, fresh).status().code() == StatusCode::kNotFound);
    auto m = s.lookup(*ns, prompt);
    std::vector<std::byte> too_many(11 * kBlock);
    CHECK(s.load(*m, KvBuffer::contiguous(too_many.data(), 11, kBlock)).status().code() == StatusCode::kInvalidArgument);
    REQUIRE(s.release(*m).is_ok());
    std::vector<void*> one_layer = {too_many.data()};
    CHECK(s.save(*ns, fresh, KvBuffer::paged(kernels::EngineLayout::kVllm, one_layer, 4, {0, 1, 2, 3})).status().code() ==
          StatusCode::kInvalidArgument);
  }
  SECTION("pin keeps a prefix through eviction; unpin lets it go") {
    CHECK(*s.pin(*ns, prompt) == 10);
    CHECK(s.tiers().index().evict(Tier::kHost, 1000).size() == 0);
    CHECK(*s.unpin(*ns, prompt) == 10);
  }
  SECTION("unpin gives each block back the priority class it had before the pin") {
    const BlockKey first = s.lookup(*ns, prompt)->blocks[0].key;
    REQUIRE(s.release(*s.lookup(*ns, prompt)).is_ok());
    auto cls = [&] { return s.tiers().index().get(first)->priority; };
    const Priority before = cls();
    CHECK(*s.pin(*ns, prompt, Priority::kRetained) == 10);
    CHECK(cls() == Priority::kRetained);
    CHECK(*s.unpin(*ns, prompt) == 10);
    CHECK(cls() == before);
    CHECK(*s.unpin(*ns, prompt) == 0);  // no pin of this store's left to undo
    CHECK(s.pin(*ns, prompt, static_cast<Priority>(9)).status().code() == StatusCode::kInvalidArgument);
  }
}

TEST_CASE("Daemon: a client saves and restores through a window smaller than the prompt", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  auto c = connect(*server, 3 * kBlock);  // 3 blocks per round trip
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(5, 16 * 11);
  CHECK(save_prompt(*c, *ns, prompt) == 11);
  CHECK(restore_and_check(*c, *ns, prompt) == 176);
  // A longer prompt with the same start: the shared prefix is a hit, only the rest is new.
  auto longer = prompt;
  auto tail = synthetic_tokens(6, 48);
  longer.insert(longer.end(), tail.begin(), tail.end());
  auto m = c->lookup(*ns, longer);
  REQUIRE(m.is_ok());
  CHECK(m->tokens == 176);
  REQUIRE(c->release(*m).is_ok());
  const auto kv_tail = prompt_kv(longer, c->layout(), 11, 3);
  auto saved = c->save(*ns, longer, KvBuffer::contiguous(const_cast<std::byte*>(kv_tail.data()), 3, kBlock),
                       Priority::kNormal, {}, 11);
  REQUIRE(saved.is_ok());
  CHECK(*saved == 3);
  CHECK(restore_and_check(*c, *ns, longer) == 224);

  auto text = c->metrics_text();
  REQUIRE(text.is_ok());
  CHECK(text->find("kvtierd_requests_total{op=\"lookup\"}") != std::string::npos);
  CHECK(text->find("kvtierd_tokens_restored_total 400") != std::string::npos);
  CHECK(text->find("kvtier_tier_used_bytes{tier=\"host\"}") != std::string::npos);
  CHECK(text->find("kvtier_reclaim_rounds_total{by=\"background\"}") != std::string::npos);
  CHECK(text->find("kvtier_io_submit_calls_total") != std::string::npos);

  SECTION("one connection may open at most 1024 namespaces") {
    size_t opened = 1;  // "m" above
    Status last;
    for (int i = 0; i < 1100 && last.is_ok(); ++i) {
      auto id = c->open_namespace({"model-" + std::to_string(i), "", ""});
      if (id) ++opened;
      else last = id.status();
    }
    CHECK(opened == 1024);
    CHECK(last.code() == StatusCode::kResourceExhausted);
    CHECK(restore_and_check(*c, *ns, prompt) == 176);  // the connection keeps serving
  }
  SECTION("requests with bad arguments fail and the connection keeps serving") {
    CHECK(c->lookup(77, prompt).status().code() == StatusCode::kNotFound);  // never opened
    auto other_layout = c->open_namespace({"m", "no-such-tenant", ""});
    CHECK(other_layout.status().code() == StatusCode::kPermissionDenied);
    Match forged;
    forged.lease = 123456;
    forged.blocks.resize(1);
    std::vector<std::byte> buf(kBlock);
    CHECK(c->load(forged, KvBuffer::contiguous(buf.data(), 1, kBlock)).status().code() == StatusCode::kNotFound);
    CHECK(restore_and_check(*c, *ns, prompt) == 176);
  }
}

TEST_CASE("Daemon: a load larger than half the window streams layer by layer", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  auto c = connect(*server, /*window=*/6 * kBlock);  // halves of 3 blocks: 7 slices per layer
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  const KvLayout L = c->layout();
  const uint64_t lb = L.bytes_per_block_layer();
  const auto prompt = synthetic_tokens(7, 16 * 20);
  CHECK(save_prompt(*c, *ns, prompt) == 20);
  const auto expect = prompt_kv(prompt, L, 0, 20);
  auto m = c->lookup(*ns, prompt);
  REQUIRE(m.is_ok());
  REQUIRE(m->blocks.size() == 20);
  std::vector<std::byte> got(20 * kBlock, std::byte{0xEE});
  const KvBuffer dst = KvBuffer::contiguous(got.data(), 20, kBlock);

  SECTION("each layer is in place when wait_layer returns, and the restore counts its tokens once") {
    auto h = c->load(*m, dst);
    REQUIRE(h.is_ok());
    CHECK(h->num_layers() == 2);
    REQUIRE(h->wait_layer(0).is_ok());
    for (size_t b = 0; b < 20; ++b) CHECK(std::memcmp(got.data() + b * kBlock, expect.data() + b * kBlock, lb) == 0);
    REQUIRE(h->wait_layer(1).is_ok());
    REQUIRE(h->wait().is_ok());
    CHECK(h->layers_done() == 2);
    CHECK(got == expect);
    REQUIRE(c->release(*m).is_ok());
    auto text = c->metrics_text();
    REQUIRE(text.is_ok());
    CHECK(text->find("kvtierd_tokens_restored_total 320\n") != std::string::npos);
  }
  SECTION("into an engine's paged layout (vLLM), and saved back from it") {
    // Device memory is emulated here: the client's page packer stages each slice and runs the
    // unpack on its lane, as it runs the kernel where there is a GPU.
    const LocationKind memory = GENERATE(LocationKind::kHost, LocationKind::kDevice);
    CAPTURE(memory == LocationKind::kDevice);
    if (memory == LocationKind::kDevice && !server->store().tiers().transfer().copy_engine().device_memory_is_host()) {
      // A GPU: these vectors are not GPU memory (registered_memory_test covers real device memory).
      WARN("skipped on a GPU: the device-memory case needs emulated device memory");
      SUCCEED("skipped");  // a deliberate skip, not a run that checked nothing (--warn NoAssertions)
      return;
    }
    const uint32_t pages = 24;
    const uint64_t row = uint64_t(L.num_kv_heads) * L.head_dim * 2;  // one token of one plane
    std::vector<std::vector<std::byte>> tensors(L.num_layers, std::vector<std::byte>(2 * pages * 16 * row));
    std::vector<void*> bases;
    for (auto& t : tensors) bases.push_back(t.data());
    std::vector<int32_t> page_of(20);
    for (int b = 0; b < 20; ++b) page_of[b] = (b * 7 + 3) % pages;
    auto h = c->load(*m, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of, memory));
    REQUIRE(h.is_ok());
    REQUIRE(h->wait().is_ok());
    CHECK(vllm_pages_hold(L, tensors, pages, page_of, expect));
    REQUIRE(c->release(*m).is_ok());
    // The same pages saved under another prompt come back canonically as the same bytes.
    const auto other = synthetic_tokens(8, 16 * 20);
    auto saved = c->save(*ns, other, KvBuffer::paged(kernels::EngineLayout::kVllm, bases, pages, page_of, memory));
    REQUIRE(saved.is_ok());
    CHECK(*saved == 20);
    auto m2 = c->lookup(*ns, other);
    REQUIRE(m2.is_ok());
    auto h2 = c->load(*m2, dst);
    REQUIRE(h2.is_ok());
    REQUIRE(h2->wait().is_ok());
    CHECK(got == expect);
    REQUIRE(c->release(*m2).is_ok());
  }
  SECTION("a call made while it streams waits for it: release right after load") {
    auto h = c->load(*m, dst);
    REQUIRE(h.is_ok());
    REQUIRE(c->release(*m).is_ok());  // queued behind the load's last slice
    REQUIRE(h->wait().is_ok());
    CHECK(got == expect);
  }
  SECTION("a lease that is gone fails the handle; the connection serves on") {
    REQUIRE(c->release(*m).is_ok());
    auto h = c->load(*m, dst);
    REQUIRE(h.is_ok());  // streaming: the daemon's answer arrives on the handle
    CHECK(h->wait().code() == StatusCode::kNotFound);
    CHECK(restore_and_check(*c, *ns, prompt) == 320);
  }
  SECTION("cancel stops after the slices in flight; the connection serves on") {
    auto h = c->load(*m, dst);
    REQUIRE(h.is_ok());
    h->cancel();
    const Status s = h->wait();
    CHECK((s.is_ok() || s.code() == StatusCode::kCancelled));
    REQUIRE(c->release(*m).is_ok());
    CHECK(restore_and_check(*c, *ns, prompt) == 320);
  }
  SECTION("a client destroyed mid-load finishes the load first") {
    auto h = c->load(*m, dst);
    REQUIRE(h.is_ok());
    c.reset();
    REQUIRE(h->wait().is_ok());
    CHECK(got == expect);
  }
}

TEST_CASE("Daemon: two processes share a prefix, byte-identical", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  const std::string sock = server->socket_path();
  // Another process saves; this one restores.
  REQUIRE(wait_exit(spawn_child({"save", sock, "11", "200"})) == 0);
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  CHECK(restore_and_check(*c, *ns, synthetic_tokens(11, 200)) == 192);
  // This process saves; another restores and checks the bytes.
  REQUIRE(save_prompt(*c, *ns, synthetic_tokens(12, 320)) == 20);
  CHECK(wait_exit(spawn_child({"share", sock, "12", "320", "320"})) == 0);
  // Two children at once on the same prefix.
  pid_t a = spawn_child({"share", sock, "12", "330", "320"});
  pid_t b = spawn_child({"share", sock, "12", "320", "320"});
  CHECK(wait_exit(a) == 0);
  CHECK(wait_exit(b) == 0);
}

TEST_CASE("Daemon: a client killed mid-load leaves no lease, no pin, no session", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", ""});
  const auto prompt = synthetic_tokens(21, 160);
  REQUIRE(save_prompt(*c, *ns, prompt) == 10);
  REQUIRE(*c->pin(*ns, prompt) == 10);  // this client's pin: must survive the other's death
  int fds[2];
  REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
  ::fcntl(fds[1], F_SETFD, 0);  // the child inherits the write end
  const pid_t pid = spawn_child({"hold", server->socket_path(), "21", "160", std::to_string(fds[1])});
  ::close(fds[1]);
  char byte = 0;
  REQUIRE(::read(fds[0], &byte, 1) == 1);  // it holds a lease and is loading in a loop
  ::close(fds[0]);
  CHECK(server->store().tiers().index().stats().leases_active == 1);
  ::kill(pid, SIGKILL);
  CHECK(wait_exit(pid) == 128 + SIGKILL);
  REQUIRE(server->wait_sessions_at_most(1, 30s));
  CHECK(server->store().tiers().index().stats().leases_active == 0);
  CHECK(server->counters().clients_connected == 1);
  // Our pin still holds (nothing evictable); once we unpin, the blocks are evictable again:
  // the dead client's lease pins are gone.
  CHECK(server->store().tiers().index().pick_victims(Tier::kHost, 100, EvictPurpose::kDemote).empty());
  CHECK(*c->unpin(*ns, prompt) == 10);
  // Every block of the chain may be demoted again, leaf first: no pin is left on any of them.
  CHECK(server->store().tiers().index().pick_victims(Tier::kHost, 100, EvictPurpose::kDemote).size() == 10);
  CHECK(restore_and_check(*c, *ns, prompt) == 160);

  SECTION("a disconnect releases the client's own pins too, and their priority") {
    PrefixIndex& index = server->store().tiers().index();
    const BlockKey last = index.pick_victims(Tier::kHost, 1, EvictPurpose::kDemote).at(0);
    const Priority before = index.get(last)->priority;
    REQUIRE(before != Priority::kRetained);
    REQUIRE(*c->pin(*ns, prompt, Priority::kRetained) == 10);
    CHECK(index.get(last)->priority == Priority::kRetained);
    c.reset();
    REQUIRE(server->wait_sessions_at_most(0, 30s));
    CHECK(index.pick_victims(Tier::kHost, 100, EvictPurpose::kDemote).size() == 10);
    CHECK(index.get(last)->priority == before);
  }
}

TEST_CASE("Daemon restart: the NVMe-resident cache is back, byte-identical", "[service]") {
  TempDir dir("kvtier_svc");
  const auto prompt = synthetic_tokens(31, 16 * 40);
  save_and_stop(dir.path(), prompt);
  auto server = start_server(test_config(dir.path()));
  CHECK(server->store().tiers().stats().recovered_blocks == 40);
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", ""});
  CHECK(restore_and_check(*c, *ns, prompt) == 640);
}

TEST_CASE("Daemon: a block corrupt on NVMe fails one load, then a client's save repairs it", "[service]") {
  TempDir dir("kvtier_svc");
  const auto prompt = synthetic_tokens(33, 16 * 8);
  save_and_stop(dir.path(), prompt);
  auto server = start_server(test_config(dir.path()));
  {
    // Bytes in the middle of block 5's payload on disk; its slot header stays intact.
    Store& store = server->store();
    auto sns = store.open_namespace({"m", "", ""});
    REQUIRE(sns.is_ok());
    auto keys = store.cached_prefix(*sns, prompt);
    REQUIRE(keys.is_ok());
    REQUIRE(keys->size() == 8);
    const SlotId slot = store.tiers().index().get((*keys)[5])->slot(Tier::kNvme);
    const int fd = ::open((dir.path() + "/nvme/slots.0").c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    const char junk[32] = {'x'};
    REQUIRE(::pwrite(fd, junk, sizeof junk, static_cast<off_t>(slot * (kBlock + 4096) + 4096 + 1000)) == sizeof junk);
    ::close(fd);
  }
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  auto m = c->lookup(*ns, prompt);
  REQUIRE(m.is_ok());
  REQUIRE(m->blocks.size() == 8);
  std::vector<std::byte> got(8 * kBlock);
  auto h = c->load(*m, KvBuffer::contiguous(got.data(), 8, kBlock));
  const Status loaded = h ? h->wait() : h.status();
  CHECK(loaded.code() == StatusCode::kChecksumMismatch);
  c->release(*m).ignore();
  // The next lookup is a shorter hit, not the same failure; the engine recomputes from block 5
  // and saves: the daemon writes block 5 anew, and the whole prompt is served again.
  CHECK(restore_and_check(*c, *ns, prompt) == 5 * 16);
  CHECK(save_prompt(*c, *ns, prompt) == 1);
  CHECK(restore_and_check(*c, *ns, prompt) == 8 * 16);
  auto text = c->metrics_text();
  REQUIRE(text.is_ok());
  CHECK(text->find("kvtier_corrupt_blocks_total 1\n") != std::string::npos);
  CHECK(text->find("kvtier_repaired_blocks_total 1\n") != std::string::npos);
  CHECK(text->find("kvtier_damaged_blocks 0\n") != std::string::npos);
}

TEST_CASE("kvtierd process: SIGTERM flushes, a restarted daemon serves the cache", "[service]") {
  TempDir dir("kvtier_svcd");
  const std::string sock = dir.file("kvtierd.sock");
  auto start = [&] {
    int fds[2];
    REQUIRE(::pipe2(fds, O_CLOEXEC) == 0);
    ::fcntl(fds[1], F_SETFD, 0);
    std::vector<std::string> args = {KVTIER_KVTIERD, "--data-dir", dir.path(), "--socket", sock, "--metrics", "off",
                                     "--layers", "2", "--kv-heads", "2", "--head-dim", "16", "--dtype", "fp16",
                                     "--host-bytes", "256KiB", "--nvme-bytes", "2MiB", "--hbm-bytes", "off",
                                     "--ready-fd", std::to_string(fds[1]), "--log-level", "warn"};
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    REQUIRE(::posix_spawn(&pid, KVTIER_KVTIERD, nullptr, nullptr, argv.data(), environ) == 0);
    ::close(fds[1]);
    char buf[8] = {};
    REQUIRE(::read(fds[0], buf, sizeof(buf)) > 0);  // "ready": the socket accepts
    ::close(fds[0]);
    return pid;
  };
  const auto prompt = synthetic_tokens(41, 16 * 12);
  pid_t pid = start();
  {
    auto c = Client::connect({.socket_path = sock, .window_bytes = 1 << 20});
    REQUIRE(c.is_ok());
    auto ns = (*c)->open_namespace({"m", "", ""});
    REQUIRE(save_prompt(**c, *ns, prompt) == 12);
  }
  ::kill(pid, SIGTERM);
  CHECK(wait_exit(pid) == 0);
  pid = start();
  {
    auto c = Client::connect({.socket_path = sock, .window_bytes = 1 << 20});
    REQUIRE(c.is_ok());
    auto ns = (*c)->open_namespace({"m", "", ""});
    CHECK(restore_and_check(**c, *ns, prompt) == 192);
  }
  ::kill(pid, SIGTERM);
  CHECK(wait_exit(pid) == 0);
}

TEST_CASE("Daemon: bad protocol input closes that connection only", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  auto good = connect(*server);
  auto ns = good->open_namespace({"m", "", ""});
  const auto prompt = synthetic_tokens(51, 64);
  REQUIRE(save_prompt(*good, *ns, prompt) == 4);

  auto raw_exchange = [&](const std::vector<std::byte>& bytes, bool shut_write) {
    auto fd = proto::connect_unix(server->socket_path());
    REQUIRE(fd.is_ok());
    REQUIRE(::send(*fd, bytes.data(), bytes.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
    if (shut_write) ::shutdown(*fd, SHUT_WR);
    // The daemon answers with an error (or nothing) and closes: read until end of stream. A daemon
    // that keeps the connection open instead fails the test at the receive timeout, not hangs it.
    const timeval limit{.tv_sec = 60, .tv_usec = 0};
    REQUIRE(::setsockopt(*fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof(limit)) == 0);
    std::vector<std::byte> reply;
    std::byte buf[4096];
    ssize_t n;
    while ((n = ::recv(*fd, buf, sizeof(buf), 0)) > 0) reply.insert(reply.end(), buf, buf + n);
    const int err = errno;
    ::close(*fd);
    INFO("recv: " << (n == 0 ? "end of stream" : std::strerror(err)));
    REQUIRE(n == 0);
    return reply;
  };
  auto reply_status = [](const std::vector<std::byte>& reply) {
    REQUIRE(reply.size() >= proto::kHeaderBytes);
    auto h = proto::decode_header(std::span(reply).first(proto::kHeaderBytes));
    REQUIRE(h.is_ok());
    Status remote;
    REQUIRE(proto::decode_status(std::span(reply).subspan(proto::kHeaderBytes), remote).is_ok());
    return remote.code();
  };
  auto frame = [](uint16_t version, uint16_t op, uint32_t declared, std::vector<std::byte> payload) {
    std::vector<std::byte> out(proto::kHeaderBytes);
    proto::encode_header({.version = version, .op = op, .request_id = 9, .payload_bytes = declared}, out.data());
    out.insert(out.end(), payload.begin(), payload.end());
    return out;
  };

  SECTION("garbage") {
    std::vector<std::byte> junk(64);
    for (size_t i = 0; i < junk.size(); ++i) junk[i] = std::byte(i * 37 + 1);
    CHECK(reply_status(raw_exchange(junk, false)) == StatusCode::kProtocolError);
  }
  SECTION("oversized frame") {
    CHECK(reply_status(raw_exchange(frame(proto::kVersion, 3, proto::kMaxPayload + 1, {}), false)) ==
          StatusCode::kProtocolError);
  }
  SECTION("unknown version") {
    std::vector<std::byte> hello;
    proto::encode(proto::HelloRequest{}, hello);
    CHECK(reply_status(raw_exchange(frame(proto::kVersion + 1, 1, hello.size(), hello), false)) == StatusCode::kProtocolError);
  }
  SECTION("unknown op and requests before hello") {
    CHECK(reply_status(raw_exchange(frame(proto::kVersion, 999, 0, {}), false)) == StatusCode::kProtocolError);
    CHECK(reply_status(raw_exchange(frame(proto::kVersion, 3, 0, {}), false)) == StatusCode::kProtocolError);
  }
  SECTION("truncated frame, then the peer hangs up") {
    auto f = frame(proto::kVersion, 1, 100, std::vector<std::byte>(10));
    CHECK(reply_status(raw_exchange(f, true)) == StatusCode::kProtocolError);
  }
  SECTION("a malformed payload after a good hello") {
    std::vector<std::byte> hello;
    proto::encode(proto::HelloRequest{}, hello);
    auto bytes = frame(proto::kVersion, 1, hello.size(), hello);
    auto bad = frame(proto::kVersion, 3, 5, std::vector<std::byte>(5, std::byte{0xFF}));
    bytes.insert(bytes.end(), bad.begin(), bad.end());
    auto reply = raw_exchange(bytes, false);
    // The hello is answered ok, the lookup with an error, then the connection closes.
    REQUIRE(reply.size() > proto::kHeaderBytes);
    auto h = proto::decode_header(std::span(reply).first(proto::kHeaderBytes));
    REQUIRE(h.is_ok());
    const auto second = std::vector<std::byte>(reply.begin() + proto::kHeaderBytes + h->payload_bytes, reply.end());
    CHECK(reply_status(second) == StatusCode::kProtocolError);
  }
  // A hello with `mem` (closed here) that the daemon refuses: its answer, then the end of stream.
  auto refused_hello = [&](const proto::HelloRequest& req, int mem) {
    auto fd = proto::connect_unix(server->socket_path());
    REQUIRE(fd.is_ok());
    std::vector<std::byte> hello;
    proto::encode(req, hello);
    REQUIRE(proto::send_frame(*fd, 1, 1, hello, mem).is_ok());
    ::close(mem);
    proto::FrameHeader h;
    std::vector<std::byte> payload;
    int got_fd = -1;
    proto::FrameReader reader(*fd);
    REQUIRE(reader.next(h, payload, got_fd).is_ok());
    Status remote;
    REQUIRE(proto::decode_status(payload, remote).is_ok());
    CHECK(reader.next(h, payload, got_fd).code() == StatusCode::kUnavailable);  // closed
    ::close(*fd);
    return remote.code();
  };
  SECTION("a window that could shrink under the daemon is refused") {
    const int mem = ::memfd_create("unsealed", MFD_CLOEXEC);
    REQUIRE(mem >= 0);
    REQUIRE(::ftruncate(mem, 8 * kBlock) == 0);
    CHECK(refused_hello({.window_bytes = 8 * kBlock}, mem) == StatusCode::kInvalidArgument);
  }
  SECTION("a mailbox of a size outside the rule is refused") {
    const int mem = ::memfd_create("mailbox", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    REQUIRE(mem >= 0);
    REQUIRE(::ftruncate(mem, 2 * proto::kMaxMailboxBytes) == 0);
    REQUIRE(::fcntl(mem, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    const uint32_t sizes[] = {4096, proto::kMinMailboxBytes + 1, proto::kMaxMailboxBytes + 4096};
    CHECK(refused_hello({.mailbox_bytes = sizes[GENERATE(0, 1, 2)]}, mem) == StatusCode::kProtocolError);
  }
  SECTION("garbage in the mailbox gets an error there, and the connection closes") {
    // A hand-made client: a mailbox-only memfd, a hello, then a bad frame in the mailbox.
    auto fd = proto::connect_unix(server->socket_path());
    REQUIRE(fd.is_ok());
    const int mem = ::memfd_create("mailbox", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    REQUIRE(mem >= 0);
    constexpr uint32_t kBox = proto::kMinMailboxBytes;
    REQUIRE(::ftruncate(mem, kBox) == 0);
    REQUIRE(::fcntl(mem, F_ADD_SEALS, F_SEAL_SHRINK) == 0);
    void* mapped = ::mmap(nullptr, kBox, PROT_READ | PROT_WRITE, MAP_SHARED, mem, 0);
    REQUIRE(mapped != MAP_FAILED);
    std::vector<std::byte> hello;
    proto::encode(proto::HelloRequest{.mailbox_bytes = kBox}, hello);
    REQUIRE(proto::send_frame(*fd, 1, 1, hello, mem).is_ok());
    ::close(mem);
    proto::FrameReader reader(*fd);
    proto::FrameHeader h;
    std::vector<std::byte> payload;
    int got_fd = -1;
    REQUIRE(reader.next(h, payload, got_fd).is_ok());  // hello answered over the socket
    proto::Mailbox box(static_cast<std::byte*>(mapped), kBox);
    std::vector<std::byte> bad;
    const std::string what = GENERATE(as<std::string>{}, "bad magic", "a length that differs from the header's",
                                      "a doorbell inside the mailbox", "shorter than a header",
                                      "a length word past the slot: read as the slot's size then refused");
    CAPTURE(what);
    if (what == "bad magic") {
      bad = std::vector<std::byte>(40, std::byte{0x5A});
    } else if (what == "a length that differs from the header's") {
      bad = frame(proto::kVersion, static_cast<uint16_t>(proto::Op::kRelease), 100, std::vector<std::byte>(8));
    } else if (what == "a doorbell inside the mailbox") {
      bad = frame(proto::kVersion, static_cast<uint16_t>(proto::Op::kDoorbell), 0, {});
    } else if (what == "shorter than a header") {
      bad = std::vector<std::byte>(3, std::byte{1});
    } else {
      // Written by hand in mailbox.h's layout, the length word before the sequence number: the
      // daemon is spinning on the mailbox and would answer a well-formed request published first.
      bad = frame(proto::kVersion, static_cast<uint16_t>(proto::Op::kStats), 0, {});
      auto* base = static_cast<std::byte*>(mapped);
      std::memcpy(base + 4096, bad.data(), bad.size());  // the request slot's frame
      const uint32_t huge = 0xFFFFFFFFu;
      std::memcpy(base + 256, &huge, 4);  // the request slot's length word
      std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base)).store(1, std::memory_order_release);  // its seq
      bad.clear();
    }
    if (!bad.empty()) box.publish(proto::Mailbox::kRequest, bad, 1);
    REQUIRE(proto::send_frame(*fd, static_cast<uint16_t>(proto::Op::kDoorbell), 0, {}).is_ok());
    // The daemon answers in the mailbox, then closes: read the socket to its end (doorbells only).
    Status end;
    while ((end = reader.next(h, payload, got_fd)).is_ok()) {
      CHECK(h.op == (static_cast<uint16_t>(proto::Op::kDoorbell) | proto::kReplyBit));
    }
    CHECK(end.code() == StatusCode::kUnavailable);
    REQUIRE(box.seq(proto::Mailbox::kReply) == 1);
    std::vector<std::byte> answer;
    box.read(proto::Mailbox::kReply, answer);
    CHECK(reply_status(answer) == StatusCode::kProtocolError);
    ::munmap(mapped, kBox);
    ::close(*fd);
  }
  // The well-behaved client never noticed.
  CHECK(restore_and_check(*good, *ns, prompt) == 64);
  CHECK(server->counters().protocol_errors >= 1);
}

TEST_CASE("Daemon: the mailbox and the socket carry the same requests", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  auto socket_only = Client::connect({.socket_path = server->socket_path(), .window_bytes = 64 * kBlock,
                                      .name = "socket-only", .mailbox_bytes = 0});
  // The smallest mailbox: 4 KiB slots, so a long lookup or the metrics text does not fit.
  auto small_box = Client::connect({.socket_path = server->socket_path(), .window_bytes = 64 * kBlock,
                                    .name = "small-mailbox", .mailbox_bytes = proto::kMinMailboxBytes});
  REQUIRE(small_box.is_ok());
  auto with_mailbox = std::move(*small_box);
  REQUIRE(socket_only.is_ok());
  auto a = with_mailbox->open_namespace({"m", "", ""});
  auto b = (*socket_only)->open_namespace({"m", "", ""});
  auto c = connect(*server);  // the default mailbox
  auto cn = c->open_namespace({"m", "", ""});
  REQUIRE(cn.is_ok());
  REQUIRE(a.is_ok());
  REQUIRE(b.is_ok());
  const auto prompt = synthetic_tokens(61, 16 * 12);
  CHECK(save_prompt(*with_mailbox, *a, prompt) == 12);
  CHECK(restore_and_check(**socket_only, *b, prompt) == 192);
  CHECK(restore_and_check(*with_mailbox, *a, prompt) == 192);
  CHECK(restore_and_check(*c, *cn, prompt) == 192);
  SECTION("a request larger than the mailbox goes over the socket") {
    const auto longer = synthetic_tokens(62, 16 * 100);  // 6.4 KiB of tokens
    CHECK(save_prompt(*with_mailbox, *a, std::vector<TokenId>(longer.begin(), longer.begin() + 16 * 40)) == 40);
    auto m = with_mailbox->lookup(*a, longer);
    REQUIRE(m.is_ok());
    CHECK(m->tokens == 16 * 40);
    REQUIRE(with_mailbox->release(*m).is_ok());
  }
  SECTION("a reply larger than the mailbox comes over the socket") {
    auto text = with_mailbox->metrics_text();
    REQUIRE(text.is_ok());
    CHECK(text->size() > proto::kMinMailboxBytes);
    CHECK(text->find("kvtierd_clients_connected 3") != std::string::npos);
    CHECK(restore_and_check(*with_mailbox, *a, prompt) == 192);  // still in step
  }
}

TEST_CASE("Daemon: tenants are bound to identities", "[service]") {
  TempDir dir("kvtier_svc");
  ::chmod(dir.path().c_str(), 0755);  // another uid must reach the socket
  auto config = test_config(dir.path());
  config.socket_mode = 0666;
  const uint32_t me = ::geteuid();
  const uint32_t other = 65534;  // nobody
  config.tenants = {TenantRule{.name = "alpha", .salt = "salt-a", .uids = {me}},
                    TenantRule{.name = "beta", .salt = "salt-b", .uids = {other}}};
  auto server = start_server(config);
  auto c = connect(*server);
  CHECK(c->tenants() == std::vector<std::string>{"alpha"});
  CHECK(c->open_namespace({"m", "beta", ""}).status().code() == StatusCode::kPermissionDenied);
  CHECK(c->open_namespace({"m", "", ""}).status().code() == StatusCode::kPermissionDenied);  // no default tenant
  auto alpha = c->open_namespace({"m", "alpha", ""});
  REQUIRE(alpha.is_ok());
  const auto prompt = synthetic_tokens(61, 128);
  REQUIRE(save_prompt(*c, *alpha, prompt) == 8);
  if (me != 0) {
    WARN("not root: the cross-identity half of this test needs setuid and is skipped");
    SUCCEED("skipped");
    return;
  }
  // Another identity: may not open alpha, and sees none of alpha's blocks through beta.
  CHECK(wait_exit(spawn_child({"tenant", server->socket_path(), "61", "128", std::to_string(other)})) == 0);
}

TEST_CASE("Daemon: tenant quotas cap the priority class and the pinned blocks", "[service]") {
  TempDir dir("kvtier_svc");
  auto config = test_config(dir.path());
  const uint32_t me = ::geteuid();
  config.tenants = {TenantRule{.name = "capped", .salt = "salt-c", .uids = {me}, .max_priority = Priority::kNormal,
                               .max_pinned_blocks = 12},
                    TenantRule{.name = "free", .salt = "salt-f", .uids = {me}}};
  auto server = start_server(config);
  auto c1 = connect(*server);
  auto capped = c1->open_namespace({"m", "capped", ""});
  auto free = c1->open_namespace({"m", "free", ""});
  REQUIRE(capped.is_ok());
  REQUIRE(free.is_ok());
  const auto a = synthetic_tokens(81, 128), b = synthetic_tokens(82, 128);
  auto kv = prompt_kv(a, c1->layout(), 0, 8);
  const KvBuffer src = KvBuffer::contiguous(kv.data(), 8, kBlock);

  SECTION("saves and pins above the tenant's class are refused, and store nothing") {
    auto r = c1->save(*capped, a, src, Priority::kRetained);
    CHECK(r.status().code() == StatusCode::kPermissionDenied);
    CHECK(r.status().message().find("up to 'normal'") != std::string::npos);
    CHECK(c1->lookup(*capped, a)->tokens == 0);
    REQUIRE(*c1->save(*capped, a, src, Priority::kNormal) == 8);
    CHECK(c1->pin(*capped, a).status().code() == StatusCode::kPermissionDenied);  // pin's default: retained
    CHECK(*c1->pin(*capped, a, Priority::kNormal) == 8);
    // The other tenant has no quota.
    REQUIRE(*c1->save(*free, a, src, Priority::kRetained) == 8);
    CHECK(*c1->pin(*free, a) == 8);
  }
  SECTION("the pinned-block quota is shared by the tenant's clients and freed by unpin and disconnect") {
    REQUIRE(save_prompt(*c1, *capped, a) == 8);
    REQUIRE(save_prompt(*c1, *capped, b) == 8);
    CHECK(*c1->pin(*capped, a, Priority::kNormal) == 8);
    auto c2 = connect(*server);
    auto capped2 = c2->open_namespace({"m", "capped", ""});
    REQUIRE(capped2.is_ok());
    auto over = c2->pin(*capped2, b, Priority::kNormal);  // 8 + 8 > 12
    CHECK(over.status().code() == StatusCode::kResourceExhausted);
    CHECK(over.status().message().find("quota of 12") != std::string::npos);
    CHECK(*c2->pin(*capped2, std::vector<TokenId>(b.begin(), b.begin() + 64), Priority::kNormal) == 4);  // 12: fits
    CHECK(c1->pin(*capped, b, Priority::kNormal).status().code() == StatusCode::kResourceExhausted);
    CHECK(*c1->unpin(*capped, a) == 8);
    CHECK(*c1->pin(*capped, b, Priority::kNormal) == 8);  // 4 + 8
    c2.reset();
    REQUIRE(server->wait_sessions_at_most(1, 10s));
    CHECK(*c1->pin(*capped, std::vector<TokenId>(a.begin(), a.begin() + 64), Priority::kNormal) == 4);  // 8 + 4
    CHECK(c1->pin(*capped, a, Priority::kNormal).status().code() == StatusCode::kResourceExhausted);
    // Another tenant's pins never count against it.
    REQUIRE(save_prompt(*c1, *free, a) == 8);
    CHECK(*c1->pin(*free, a, Priority::kNormal) == 8);
  }
}

TEST_CASE("Daemon: tier shares come from the config and metrics count each tenant's blocks and requests", "[service]") {
  TempDir dir("kvtier_svc");
  auto config = test_config(dir.path());
  const uint32_t me = ::geteuid();
  config.tenants = {TenantRule{.name = "shared \"a\"", .salt = "salt-a", .uids = {me}, .tier_share = 0.25},
                    TenantRule{.name = "b", .salt = "salt-b", .uids = {me}}};
  auto server = start_server(config);
  auto c = connect(*server);
  auto a = c->open_namespace({"m", "shared \"a\"", ""});
  auto b = c->open_namespace({"m", "b", ""});
  REQUIRE((a.is_ok() && b.is_ok()));
  const auto pa = synthetic_tokens(91, 128);
  REQUIRE(save_prompt(*c, *a, pa) == 8);
  REQUIRE(save_prompt(*c, *b, synthetic_tokens(92, 64)) == 4);
  REQUIRE(restore_and_check(*c, *a, pa) == 128);  // 128 tokens asked, all cached, all restored
  CHECK(c->lookup(*b, pa)->tokens == 0);  // b's salt: nothing of a's

  auto text = c->metrics_text();
  REQUIRE(text.is_ok());
  // The label value is escaped as the text format wants it.
  CHECK(text->find("kvtier_tenant_blocks{tenant=\"shared \\\"a\\\"\",tier=\"host\"} 8\n") != std::string::npos);
  CHECK(text->find("kvtier_tenant_blocks{tenant=\"b\",tier=\"host\"} 4\n") != std::string::npos);
  CHECK(text->find("kvtier_tenant_share_blocks{tenant=\"shared \\\"a\\\"\",tier=\"host\"} 16\n") !=
        std::string::npos);  // a quarter of 64 blocks
  CHECK(text->find("kvtier_tenant_share_blocks{tenant=\"b\"") == std::string::npos);  // no share
  CHECK(text->find("kvtier_over_share_evictions_total 0\n") != std::string::npos);
  // Requests per tenant: what each asked for and found, and what it saved.
  CHECK(text->find("kvtierd_tenant_lookup_tokens_total{tenant=\"b\"} 128\n") != std::string::npos);
  CHECK(text->find("kvtierd_tenant_hit_tokens_total{tenant=\"b\"} 0\n") != std::string::npos);
  CHECK(text->find("kvtierd_tenant_hit_tokens_total{tenant=\"shared \\\"a\\\"\"} 128\n") != std::string::npos);
  CHECK(text->find("kvtierd_tenant_save_bytes_total{tenant=\"b\"} " + std::to_string(4 * kBlock) + "\n") !=
        std::string::npos);
  CHECK(text->find("kvtierd_tenant_tokens_restored_total{tenant=\"shared \\\"a\\\"\"} 128\n") !=
        std::string::npos);
  CHECK(text->find("kvtierd_tenant_tokens_restored_total{tenant=\"b\"} 0\n") != std::string::npos);
}

TEST_CASE("Daemon: a peer outside allowed_uids is refused with permission_denied", "[service]") {
  if (::geteuid() != 0) {
    WARN("not root: refusing another identity needs setuid; skipped");
    SUCCEED("skipped");
    return;
  }
  TempDir dir("kvtier_svc");
  ::chmod(dir.path().c_str(), 0755);
  auto config = test_config(dir.path());
  config.socket_mode = 0666;
  config.allowed_uids = {4242};  // neither root (always allowed) nor the child's 65534
  auto server = start_server(config);
  CHECK(wait_exit(spawn_child({"refused", server->socket_path(), "1", "16", "65534"})) == 0);
  CHECK(server->counters().clients_refused == 1);
  auto c = connect(*server);  // root still is
  CHECK(c->open_namespace({"m", "", ""}).is_ok());
}

TEST_CASE("C API: save, lookup, load from a C program", "[service]") {
  TempDir dir("kvtier_svc");
  auto server = start_server(test_config(dir.path()));
  CHECK(wait_exit(spawn_child({"capi", server->socket_path(), "71", "100"})) == 0);
}

TEST_CASE("Daemon: inspect, doctor and export answer operators, and refuse everyone else", "[service]") {
  TempDir dir("kvtier_svc");
  ::chmod(dir.path().c_str(), 0755);  // another uid must reach the socket
  auto config = test_config(dir.path());
  config.socket_mode = 0666;
  auto server = start_server(config);
  auto c = connect(*server);
  auto ns = c->open_namespace({"m", "", "", "r1"});
  REQUIRE(ns.is_ok());
  const auto prompt = synthetic_tokens(62, 128);
  REQUIRE(save_prompt(*c, *ns, prompt) == 8);

  auto inspected = c->inspect(3);
  INFO(inspected.status().to_string());
  REQUIRE(inspected.is_ok());
  CHECK(inspected->find("\"source\":\"kvtierd\"") != std::string::npos);
  CHECK(inspected->find("\"model\":\"m\"") != std::string::npos);
  CHECK(inspected->find("\"revision\":\"r1\"") != std::string::npos);
  auto cached = c->doctor({"m", "", "", "r1"}, prompt, {}, 0, 0);
  REQUIRE(cached.is_ok());
  CHECK(cached->find("\"cause\":\"all_cached\"") != std::string::npos);
  auto other = c->doctor({"m", "", "", "r2"}, prompt, {}, 0, 0);
  REQUIRE(other.is_ok());
  CHECK(other->find("\"cause\":\"other_revision\"") != std::string::npos);
  CHECK(c->doctor({"m", "nobody", "", ""}, prompt, {}, 0, 0).status().code() == StatusCode::kNotFound);
  CHECK(c->inspect(10001).status().code() == StatusCode::kProtocolError);  // refused by the decoder

  // kvtier export's walk and reads: every block, depth first, its bytes as saved (on a connection of
  // its own: the refusal above closed that one).
  c = connect(*server);
  CHECK(c->export_list(false, {}, 4).status().code() == StatusCode::kInvalidArgument);  // no walk under way
  std::vector<BlockKey> keys;
  std::vector<std::string> pages;
  for (bool first = true;; first = false) {
    auto page = c->export_list(first, {}, 3);
    INFO(page.status().to_string());
    REQUIRE(page.is_ok());
    pages.push_back(*page);
    // The page's keys, in order (each block's "key" field).
    for (size_t at = page->find("\"key\":\""); at != std::string::npos; at = page->find("\"key\":\"", at + 1)) {
      keys.push_back(*BlockKey::from_hex(page->substr(at + 7, 32)));
    }
    if (page->find("\"done\":true") != std::string::npos) break;
  }
  CHECK(pages.size() == 3);  // 8 blocks, 3 a page
  REQUIRE(keys.size() == 8);
  const uint64_t bpb = c->layout().bytes_per_block();
  std::vector<std::byte> got(keys.size() * bpb);
  auto read = c->export_read(keys, got);
  REQUIRE(read.is_ok());
  for (const Status& st : *read) CHECK(st.is_ok());
  CHECK(got == prompt_kv(prompt, c->layout(), 0, 8));  // one chain: depth first is prompt order
  BlockKey unknown = keys[0];
  unknown.hi ^= 1;
  std::vector<std::byte> one(bpb);
  auto missing = c->export_read(std::span(&unknown, 1), one);
  REQUIRE(missing.is_ok());
  CHECK(missing->at(0).code() == StatusCode::kNotFound);
  CHECK(c->export_read(keys, one).status().code() == StatusCode::kInvalidArgument);  // dst of another size

  if (::geteuid() != 0) {
    WARN("not root: refusing another identity needs setuid; skipped");
    return;
  }
  CHECK(wait_exit(spawn_child({"operator", server->socket_path(), "62", "128", "65534"})) == 0);
}
