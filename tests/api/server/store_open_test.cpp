// Opening a store on a bad data dir is a status that says what is wrong, never a crash (the
// store's destructor ran through a null tier manager): another layout, a second opener, a
// damaged catalog, an NVMe tier larger than its file system; kvtierd prints it and exits 1.
// And a store on a full file system refuses saves with resource_exhausted, keeps serving what is
// committed, resumes when space returns, and serves the committed blocks after a restart there.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <spawn.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "api/server/server.h"
#include "api/server/service_config.h"
#include "api/store/store.h"
#include "service_fixture.h"
#include "service_support.h"
#include "temp_dir.h"
#include "tiers/tmpfs_mount.h"

extern char** environ;

using namespace kvtier;
using namespace kvtier::testing;

namespace {

constexpr uint64_t kBlock = 4096;  // service_test_layout().bytes_per_block()

ServiceConfig config_in(const std::string& dir) { return test_service_config(dir, "store-open-test"); }

Result<std::unique_ptr<Store>> open_store(ServiceConfig c) {
  REQUIRE(resolve(c).is_ok());
  auto opts = to_tier_options(c);
  REQUIRE(opts.is_ok());
  return Store::open({.tiers = std::move(*opts), .secret = c.secret});
}

bool contains(const Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

/// Saves every full block of `prompt`; the store's status when it fails.
Result<size_t> save_prompt(Store& store, NamespaceId ns, const std::vector<TokenId>& prompt) {
  const size_t blocks = prompt.size() / store.layout().block_tokens;
  auto kv = prompt_kv(prompt, store.layout(), 0, blocks);
  return store.save(ns, prompt, KvBuffer::contiguous(kv.data(), blocks, kBlock));
}

/// The blocks a save stored, or 0 (its status in the test's output) when it failed.
size_t blocks_saved(const Result<size_t>& r) {
  UNSCOPED_INFO(r.status().to_string());
  return r.is_ok() ? *r : 0;
}

/// Restores `prompt` (every byte checked); returns the matched blocks.
size_t restored_blocks(Store& store, NamespaceId ns, const std::vector<TokenId>& prompt) {
  return restore_and_check(store, ns, prompt) / store.layout().block_tokens;
}

/// Opens a store on `dir`, saves a prompt and closes it, so that the data dir holds NVMe blocks.
void make_data_dir(const std::string& dir) {
  auto store = open_store(config_in(dir));
  REQUIRE(store.is_ok());
  auto ns = (*store)->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  REQUIRE(blocks_saved(save_prompt(**store, *ns, synthetic_tokens(3, 64))) == 4);
  REQUIRE((*store)->close().is_ok());
}

/// Runs kvtierd with `args` to its exit; returns the exit status and puts its stderr in `err`.
int run_kvtierd(std::vector<std::string> args, const std::string& err_path, std::string& err) {
  args.insert(args.begin(), KVTIER_KVTIERD);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 2, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  pid_t pid = -1;
  const int rc = ::posix_spawn(&pid, KVTIER_KVTIERD, &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  REQUIRE(rc == 0);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  std::stringstream text;
  text << std::ifstream(err_path).rdbuf();
  err = text.str();
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_CASE("A store opened with another layout than its data dir fails with layout mismatch") {
  TempDir dir("kvtier_open");
  make_data_dir(dir.path());
  ServiceConfig c = config_in(dir.path());
  c.layout.num_layers = 4;
  auto store = open_store(c);
  REQUIRE_FALSE(store.is_ok());
  INFO(store.status().to_string());
  CHECK(store.status().code() == StatusCode::kLayoutMismatch);
  CHECK(contains(store.status(), service_test_layout().describe()));
  CHECK(contains(store.status(), c.layout.describe()));
  // The data dir is untouched: the first layout still serves its blocks.
  auto again = open_store(config_in(dir.path()));
  REQUIRE(again.is_ok());
  auto ns = (*again)->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  CHECK(restored_blocks(**again, *ns, synthetic_tokens(3, 64)) == 4);
}

TEST_CASE("A second store on the same data dir is refused naming the lock file") {
  TempDir dir("kvtier_open");
  auto first = open_store(config_in(dir.path()));
  REQUIRE(first.is_ok());
  auto second = open_store(config_in(dir.path()));
  REQUIRE_FALSE(second.is_ok());
  INFO(second.status().to_string());
  CHECK(second.status().code() == StatusCode::kUnavailable);
  CHECK(contains(second.status(), dir.path() + "/nvme/LOCK"));
  CHECK(contains(second.status(), "pid " + std::to_string(::getpid())));
}

TEST_CASE("A store whose catalog CURRENT holds garbage fails with the RocksDB error") {
  TempDir dir("kvtier_open");
  make_data_dir(dir.path());
  std::ofstream(dir.path() + "/nvme/catalog/CURRENT", std::ios::trunc) << "\x01garbage";
  auto store = open_store(config_in(dir.path()));
  REQUIRE_FALSE(store.is_ok());
  INFO(store.status().to_string());
  CHECK(store.status().code() == StatusCode::kIoError);
  CHECK(contains(store.status(), "Corruption"));
  CHECK(contains(store.status(), "aside"));
}

TEST_CASE("A store whose NVMe tier is larger than its file system is refused with the sizes") {
  TempDir dir("kvtier_open");
  struct statvfs vfs{};
  REQUIRE(::statvfs(dir.path().c_str(), &vfs) == 0);
  ServiceConfig c = config_in(dir.path());
  c.nvme_bytes = 2 * static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize + (1ull << 30);
  auto store = open_store(c);
  REQUIRE_FALSE(store.is_ok());
  INFO(store.status().to_string());
  CHECK(store.status().code() == StatusCode::kResourceExhausted);
  CHECK(contains(store.status(), "set nvme_bytes to at most"));
}

TEST_CASE("Server start on a data dir another server holds returns the lock error") {
  TempDir dir("kvtier_open");
  ServiceConfig c = config_in(dir.path());
  REQUIRE(resolve(c).is_ok());
  auto first = Server::start(c);
  REQUIRE(first.is_ok());
  c.socket_path = dir.path() + "/second.sock";
  auto second = Server::start(c);
  REQUIRE_FALSE(second.is_ok());
  INFO(second.status().to_string());
  CHECK(second.status().code() == StatusCode::kUnavailable);
  CHECK(contains(second.status(), "LOCK"));
}

TEST_CASE("kvtierd started with another layout than its data dir prints both layouts and exits 1") {
  TempDir dir("kvtier_open");
  make_data_dir(dir.path());
  std::string err;
  const int rc = run_kvtierd({"--data-dir", dir.path(), "--metrics", "off", "--host-bytes", "256KiB", "--nvme-bytes",
                              "1MiB", "--hbm-bytes", "off", "--layers", "4", "--kv-heads", "2", "--head-dim", "16",
                              "--dtype", "fp16", "--log-level", "warn"},
                             dir.path() + "/stderr", err);
  INFO(err);
  CHECK(rc == 1);
  CHECK(err.find("kvtierd: layout_mismatch") != std::string::npos);
  CHECK(err.find(service_test_layout().describe()) != std::string::npos);
}

TEST_CASE("A store on a full file system refuses saves and keeps serving and resumes") {
  TmpfsMount fs(16 << 20);
  if (!fs.ok()) {
    WARN("skipped: " + fs.why_not());
    SUCCEED("skipped");
    return;
  }
  ServiceConfig c = config_in(fs.path());
  c.write_policy = WritePolicy::kWriteThrough;  // every save reaches the catalog before it returns
  auto opened = open_store(c);
  REQUIRE(opened.is_ok());
  auto store = std::move(*opened);
  auto ns = store->open_namespace({"m", "", ""});
  REQUIRE(ns.is_ok());
  std::vector<std::vector<TokenId>> saved;
  for (uint64_t p = 0; p < 2; ++p) {
    saved.push_back(synthetic_tokens(100 + p, 32));
    REQUIRE(blocks_saved(save_prompt(*store, *ns, saved.back())) == 2);
  }
  REQUIRE(fs.fill() > 0);

  Status failure;
  for (uint64_t p = 2; p < 64 && failure.is_ok(); ++p) {
    auto prompt = synthetic_tokens(100 + p, 32);
    auto r = save_prompt(*store, *ns, prompt);
    if (r.is_ok()) {
      saved.push_back(prompt);
    } else {
      failure = r.status();
    }
  }
  INFO(failure.to_string());
  REQUIRE_FALSE(failure.is_ok());
  CHECK(failure.code() == StatusCode::kResourceExhausted);
  CHECK(contains(failure, fs.path() + "/nvme/catalog"));
  for (const auto& prompt : saved) CHECK(restored_blocks(*store, *ns, prompt) == 2);

  SECTION("saves resume once space is freed") {
    fs.unfill();
    auto prompt = synthetic_tokens(999, 32);
    REQUIRE(blocks_saved(save_prompt(*store, *ns, prompt)) == 2);
    CHECK(restored_blocks(*store, *ns, prompt) == 2);
  }
  SECTION("a restart on the full disk serves every committed block") {
    store.reset();
    fs.fill();
    auto again = open_store(c);
    INFO(again.status().to_string());
    REQUIRE(again.is_ok());
    store = std::move(*again);
    auto ns2 = store->open_namespace({"m", "", ""});
    INFO(ns2.status().to_string());
    REQUIRE(ns2.is_ok());
    for (const auto& prompt : saved) CHECK(restored_blocks(*store, *ns2, prompt) == 2);
  }
}
