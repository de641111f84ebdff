// Client: a KvStore that talks to kvtierd (api/src/server.h). It creates a shared-memory window
// (a memfd it maps and hands to the daemon at hello); loads and saves move KV through the window
// in chunks that fit it, so bytes never cross the socket. One request is in flight per client at
// a time (calls from several threads queue); use one Client per engine worker for parallelism.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "api/src/protocol.h"
#include "api/src/socket_io.h"
#include "kvtier/store.h"

namespace kvtier {

struct ClientOptions {
  /// The daemon's socket (default /var/lib/kvtier/kvtierd.sock, the daemon's default).
  std::string socket_path = "/var/lib/kvtier/kvtierd.sock";
  /// Shared-memory window in bytes; a load or save moves at most this much per round trip.
  /// Must hold at least one block. Default 256 MiB (memory is touched only as it is used).
  uint64_t window_bytes = 256ull << 20;
  /// Shown in the daemon's logs.
  std::string name = "kvtier-client";
};

class Client final : public KvStore {
 public:
  /// Connects, says hello and maps the window. kUnavailable when no daemon listens,
  /// kPermissionDenied when the daemon refuses this identity.
  static Result<std::unique_ptr<Client>> connect(ClientOptions options);
  ~Client() override;
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  uint64_t client_id() const noexcept { return client_id_; }
  /// Tenants this client's identity may open (from the daemon's config).
  const std::vector<std::string>& tenants() const noexcept { return tenants_; }
  uint64_t window_bytes() const noexcept { return window_bytes_; }

  // KvStore
  const KvLayout& layout() const noexcept override { return layout_; }
  Result<NamespaceId> open_namespace(const NamespaceRequest& request) override;
  Result<Match> lookup(NamespaceId ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras = {}) override;
  /// Runs to completion before it returns (the daemon fills the window a chunk at a time); the
  /// handle is final and every layer has arrived.
  Result<TransferHandle> load(const Match& match, const KvBuffer& dst) override;
  Status release(const Match& match) override;
  Result<size_t> save(NamespaceId ns, std::span<const TokenId> tokens, const KvBuffer& src,
                      Priority priority = Priority::kNormal, std::span<const BlockExtra> extras = {},
                      size_t first_block = 0) override;
  Result<size_t> prefetch(NamespaceId ns, std::span<const TokenId> tokens, Tier to,
                          std::span<const BlockExtra> extras = {}) override;
  Result<size_t> pin(NamespaceId ns, std::span<const TokenId> tokens, Priority priority = Priority::kRetained,
                     std::span<const BlockExtra> extras = {}) override;
  Result<size_t> unpin(NamespaceId ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras = {}) override;
  Result<std::string> metrics_text() override;

 private:
  Client() = default;
  /// One request/reply round trip; `reply` receives the reply body when the status is ok.
  Status call(proto::Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply, int pass_fd = -1);
  Result<uint64_t> prefix_call(proto::Op op, NamespaceId ns, uint8_t arg, std::span<const TokenId> tokens,
                               std::span<const BlockExtra> extras);
  /// The copy engine for device buffers, made on first use.
  Result<TransferEngine*> engine();

  std::mutex mu_;  // one request in flight; guards the window and next_request_
  int fd_ = -1;
  std::unique_ptr<proto::FrameReader> reader_;  // reads fd_'s replies
  std::byte* window_ = nullptr;
  uint64_t window_bytes_ = 0;
  uint64_t window_blocks_ = 0;
  KvLayout layout_;
  uint64_t client_id_ = 0;
  std::vector<std::string> tenants_;
  uint32_t next_request_ = 1;
  std::unique_ptr<TransferEngine> engine_;
};

}  // namespace kvtier
