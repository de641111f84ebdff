// Answers one decoded request of a kvtierd session, per op (request_handler.cpp). Internal to
// kvtier_server: the request loop (session.cpp) makes one Handler per request.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string_view>
#include <vector>

#include "api/server/session.h"
#include "api/store/doctor.h"
#include "api/store/store.h"

namespace kvtier::server_detail {

using proto::Op;

/// Answers one decoded request of a session. Fills `body` with the reply body; a non-ok Status
/// becomes the reply's status. `fatal` is set when the connection must close after replying.
struct Handler {
  Server& server;
  Store& store;
  const ServiceConfig& config;
  Server::Session& s;
  int& passed_fd;
  bool fatal = false;
  std::vector<std::byte> body;
  // Measured by the request loop:
  uint64_t restored_tokens = 0, loaded_bytes = 0, saved_bytes = 0, nvme_blocks = 0;
  double loaded_blocks = 0;  // whole-block equivalents (a request may carry some layers only)
  uint64_t asked_tokens = 0, hit_tokens = 0;
  const TenantRule* tenant = nullptr;  // the tenant of the namespace the request named
  double prefill_tokens_per_second = 0;  // what the client declared for that namespace

  template <class M>
  Status decode(std::span<const std::byte> payload, M& m) {
    Status st = proto::decode(payload, m);
    if (!st) fatal = true;  // malformed input: answer, then close the connection
    return st;
  }

  Result<Namespace> ns(uint32_t id) {
    auto it = s.namespaces.find(id);
    if (it == s.namespaces.end()) {
      return Status(StatusCode::kNotFound, "namespace " + std::to_string(id) + " was not opened on this connection");
    }
    tenant = it->second.tenant;
    prefill_tokens_per_second = it->second.prefill_tokens_per_second;
    return store.namespace_of(id);
  }

  /// kPermissionDenied when namespace `id`'s tenant may not save or pin at `p`.
  Status check_priority(uint32_t id, Priority p) const {
    auto it = s.namespaces.find(id);
    if (it == s.namespaces.end() || p <= it->second.tenant->max_priority) return Status::ok();
    const TenantRule& rule = *it->second.tenant;
    return Status(StatusCode::kPermissionDenied,
                  "tenant '" + rule.name + "' may save and pin at priority up to '" +
                      std::string(priority_name(rule.max_priority)) + "', not '" +
                      std::string(priority_name(p)) + "'");
  }

  Status hello(std::span<const std::byte> payload);
  Status open_namespace(std::span<const std::byte> payload);
  Status lookup(std::span<const std::byte> payload);
  Status load(std::span<const std::byte> payload);
  Status load_to(std::span<const std::byte> payload);
  Status save_from(std::span<const std::byte> payload);
  Status register_memory(std::span<const std::byte> payload);
  Status unregister_memory(std::span<const std::byte> payload);

  /// Blocks [first_block, +block_count) of one of this session's leases.
  Result<Match> leased_blocks(uint64_t lease, uint32_t first_block, uint64_t block_count);
  /// How many layers [begin, +count) names (count 0: to the last); kInvalidArgument for none.
  Result<uint32_t> layer_count(uint32_t begin, uint32_t count) const;
  /// Pins `part` for `copy`, then fills the reply and the load's measurements.
  Status pinned_load(const Match& part, uint32_t layer_begin, uint32_t layers, const std::function<Status()>& copy);
  /// A KV buffer in this session's registered regions, every place checked against its region.
  Result<KvBuffer> region_buffer(const proto::RegionBuffer& rb);
  Status release(std::span<const std::byte> payload);
  Status save(std::span<const std::byte> payload);
  Status prefix_op(Op op, std::span<const std::byte> payload);
  /// kPermissionDenied unless the peer is root or kvtierd's own uid.
  Status check_operator(std::string_view what) const;
  /// The config's tenants with their salts, for inspect and doctor to name a record's tenant.
  std::vector<TenantSalt> config_tenants() const;
  Status inspect(std::span<const std::byte> payload);
  Status doctor(std::span<const std::byte> payload);
  Status export_list(std::span<const std::byte> payload);
  Status export_read(std::span<const std::byte> payload);
  Status object_put(std::span<const std::byte> payload);
  Status object_get(std::span<const std::byte> payload);
  /// kObjectExists (CountReply: how many of the keys, from the first, are stored) and
  /// kObjectRemove (CountReply: how many objects were erased).
  Status object_keys(Op op, std::span<const std::byte> payload);
};

}  // namespace kvtier::server_detail
