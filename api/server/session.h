// A kvtierd connection's state (Server::Session): its peer, window and mailbox, and what it holds
// — namespaces, leases, pins, registered memory — all released when it ends. Internal to
// kvtier_server: the accept loop makes sessions (server.cpp), the request loop serves them
// (session.cpp), the request handler answers their requests (request_handler.cpp).
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>

#include "api/server/server.h"
#include "api/store/index_export.h"
#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "transfer/shared_device_memory.h"

namespace kvtier {

struct Server::Session {
  uint64_t id = 0;
  int fd = -1;
  uint32_t uid = 0, gid = 0;
  pid_t pid = 0;
  std::chrono::steady_clock::time_point accepted_at;  // the hello deadline counts from here
  std::string name;
  bool hello_done = false;
  std::byte* window = nullptr;
  uint64_t window_bytes = 0;
  uint64_t mapped_bytes = 0;      // the window and the mailbox after it
  proto::Mailbox mailbox;         // the client's fast path for small requests (mailbox.h)
  uint32_t mailbox_seen = 0;      // the last request sequence number taken from it
  proto::AdaptiveSpin spin;       // how long to spin for the next request before parking
  struct OpenedNamespace {
    const TenantRule* tenant;
    double prefill_tokens_per_second = 0;  // as the client declared it last (restore or recompute)
  };
  std::unordered_map<NamespaceId, OpenedNamespace> namespaces;  // opened by this session

  std::unordered_map<const TenantRule*, uint64_t> tenant_pins;    // pins held here, per tenant (quotas)
  struct HeldLease {
    Match match;
    const TenantRule* tenant;  // of the namespace it was matched in (per-tenant metrics)
  };
  std::unordered_map<LeaseId, HeldLease> leases;
  size_t leased_blocks = 0;  // blocks over all entries of `leases`
  PinLedger pins;  // the priority pins this session holds
  // Memory the client registered (kRegisterMemory): the daemon loads into and saves from it.
  std::unordered_map<uint32_t, std::unique_ptr<MappedDeviceMemory>> regions;
  uint32_t next_region = 1;
  std::optional<IndexExport> export_walk;  // kvtier export's walk (kExportList), an operator's

  /// The window bytes [offset, offset + bytes), or kInvalidArgument when outside the window.
  Result<std::byte*> window_span(uint64_t offset, uint64_t bytes) const {
    if (!window || window_bytes == 0) return invalid_argument("this client handed over no shared-memory window");
    if (offset > window_bytes || bytes > window_bytes - offset) {
      return invalid_argument("window range [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                     ") is outside the " + std::to_string(window_bytes) + "-byte window");
    }
    return window + offset;
  }
};

}  // namespace kvtier
