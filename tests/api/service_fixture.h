// The in-process kvtierd the service tests start: a small config on a temp data dir, a started
// Server (a failure to start fails the test), a byte-checked restore, and child processes.
#pragma once

#include <catch2/catch.hpp>

#include <spawn.h>
#include <sys/wait.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

extern char** environ;

#include "api/server/server.h"
#include "api/server/service_config.h"
#include "service_support.h"

namespace kvtier::testing {

/// service_test_layout() (4 KiB blocks), a 64-block host tier, an NVMe tier of `nvme_blocks`,
/// no HBM, no metrics endpoint, no fdatasync, and the given secret.
inline ServiceConfig test_service_config(const std::string& dir, const std::string& secret,
                                         uint64_t nvme_blocks = 256) {
  const uint64_t block = service_test_layout().bytes_per_block();
  ServiceConfig c;
  c.data_dir = dir;
  c.layout = service_test_layout();
  c.host_bytes = 64 * block;
  c.nvme_bytes = nvme_blocks * block;
  c.hbm_enabled = false;
  c.metrics_listen = "";
  c.fdatasync = false;
  c.secret = secret;
  return c;
}

/// resolve() and Server::start, both required to succeed.
inline std::unique_ptr<Server> start_test_server(ServiceConfig c) {
  REQUIRE(resolve(c).is_ok());
  auto s = Server::start(std::move(c));
  REQUIRE(s.is_ok());
  return std::move(*s);
}

/// Looks up, loads and compares every restored byte with the prompt's KV; returns the matched tokens.
inline uint64_t restore_and_check(KvStore& store, NamespaceId ns, const std::vector<TokenId>& prompt) {
  const uint64_t block = store.layout().bytes_per_block();
  auto m = store.lookup(ns, prompt);
  REQUIRE(m.is_ok());
  std::vector<std::byte> got(m->blocks.size() * block, std::byte{0xEE});
  auto h = store.load(*m, KvBuffer::contiguous(got.data(), m->blocks.size(), block));
  REQUIRE(h.is_ok());
  REQUIRE(h->wait().is_ok());
  CHECK(got == prompt_kv(prompt, store.layout(), 0, m->blocks.size()));
  REQUIRE(store.release(*m).is_ok());
  return m->tokens;
}

/// Waits for a child; its exit status, or 128 + the signal that ended it.
inline int wait_exit(pid_t pid) {
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

#ifdef KVTIER_SERVICE_CHILD
/// Starts service_child with `args`; returns its pid.
inline pid_t spawn_child(std::vector<std::string> args) {
  args.insert(args.begin(), KVTIER_SERVICE_CHILD);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = -1;
  REQUIRE(::posix_spawn(&pid, KVTIER_SERVICE_CHILD, nullptr, nullptr, argv.data(), environ) == 0);
  return pid;
}
#endif

}  // namespace kvtier::testing
