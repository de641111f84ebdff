// The in-process kvtierd the service tests start: a small config on a temp data dir, and a
// started Server (a failure to start fails the test).
#pragma once

#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>
#include <string>

#include "api/src/server.h"
#include "api/src/service_config.h"
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

}  // namespace kvtier::testing
