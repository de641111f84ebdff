// Client: a KvStore that talks to kvtierd over its Unix socket. It creates a shared-memory window
// (a memfd it maps and hands to the daemon at hello); loads and saves move KV through the window
// in chunks that fit it, so bytes never cross the socket. One request is in flight per client at
// a time (calls from several threads queue); use one Client per engine worker for parallelism.
//
// A load larger than a few MiB streams layer by layer: it returns at once, and a worker thread
// asks the daemon for one slice of layers at a time into one half of the window while it copies
// the previous slice out of the other half, so wait_layer(0) returns long before the last layer
// has arrived and the engine's first layers overlap the rest of the restore. Until the load is
// final, the client's other calls wait for it.
//
// Link libkvtier_client (CMake: find_package(kvtier) → kvtier::client; pkg-config: kvtier).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kvtier/export.h"
#include "kvtier/kv_store.h"

namespace kvtier {

struct ClientOptions {
  /// The daemon's socket (default /var/lib/kvtier/kvtierd.sock, the daemon's default).
  std::string socket_path = "/var/lib/kvtier/kvtierd.sock";
  /// Shared-memory window in bytes; a load or save moves at most this much per round trip.
  /// Must hold at least one block. Default 256 MiB (memory is touched only as it is used).
  uint64_t window_bytes = 256ull << 20;
  /// Shown in the daemon's logs.
  std::string name = "kvtier-client";
  /// Requests and replies that fit cross a shared-memory mailbox of this size while both sides are
  /// awake, with no system call. 0 or a multiple of 4096 in [12 KiB, 64 MiB]. Default 516 KiB: two
  /// 256 KiB slots, lookups of up to ~64K tokens. 0 sends everything over the socket.
  uint32_t mailbox_bytes = kDefaultMailboxBytes;

  static constexpr uint32_t kDefaultMailboxBytes = 4096 + 2 * (256u << 10);
};

/// Host memory a client shares with kvtierd: a sealed memfd both processes map. A load into it, or a
/// save from it, is one copy between the daemon's tiers and this memory — no window, no second copy
/// in this process — so a CPU engine (or a GPU engine's host staging) allocates its KV buffers here.
/// Unregistered and unmapped on destruction; must not outlive the client that allocated it.
class KVTIER_API SharedHostMemory {
 public:
  virtual ~SharedHostMemory() = default;
  virtual std::byte* data() const noexcept = 0;
  virtual uint64_t size() const noexcept = 0;
};

class KVTIER_API Client : public KvStore {
 public:
  /// Connects, says hello and maps the window. kUnavailable when no daemon listens,
  /// kPermissionDenied when the daemon refuses this identity.
  static Result<std::unique_ptr<Client>> connect(ClientOptions options);
  Client(const Client&) = delete;
  Client& operator=(const Client&) = delete;

  /// The daemon's name for this connection.
  virtual uint64_t client_id() const noexcept = 0;
  /// Tenants this client's identity may open (from the daemon's config).
  virtual const std::vector<std::string>& tenants() const noexcept = 0;
  virtual uint64_t window_bytes() const noexcept = 0;

  /// Hands [base, base + bytes) of this process's GPU memory to kvtierd (CUDA IPC; on a machine
  /// without a GPU, emulated device memory shared as a memfd). A load into, or a save from, a
  /// KvBuffer that lies wholly in registered memory — canonical blocks, or every layer tensor of a
  /// paged buffer — then goes straight between the daemon's tiers and that memory: no window, no
  /// copy in this process. Other buffers still go through the window.
  /// Register an engine's KV cache once at start (a tensor inside a caching allocator's block is
  /// fine) and unregister it before freeing it; the daemon drops the mapping at disconnect too.
  /// kInvalidArgument for memory that cannot be shared, kAlreadyExists when the range overlaps a
  /// registered one, kResourceExhausted past 4096 regions.
  virtual Status register_memory(void* base, uint64_t bytes) = 0;
  /// Ends the registration made at `base` (kNotFound if none was).
  virtual Status unregister_memory(void* base) = 0;
  /// `bytes` (rounded up to whole pages) of zero-filled host memory shared with the daemon and
  /// registered with it (the limits of register_memory). kResourceExhausted when it cannot be had.
  virtual Result<std::unique_ptr<SharedHostMemory>> allocate_shared_host(uint64_t bytes) = 0;

  /// Operator calls, for the daemon's own uid and root only (kPermissionDenied for anyone else):
  /// they see every tenant. Both answer JSON, described in docs/operations.md.
  /// What kvtierd holds (kvtier inspect): each namespace's blocks and bytes per tier, hits,
  /// priorities and ages, each tier's use, and the `top_prefixes` most reused prefixes (≤ 10000).
  virtual Result<std::string> inspect(uint32_t top_prefixes) = 0;
  /// Why a lookup of `tokens` in the namespace `request` names missed (kvtier doctor): its full
  /// blocks, the cached prefix, the block where the chain breaks and why (evicted from which tier,
  /// another tenant, revision, adapter or model, a block size or layout the daemon does not
  /// have, never saved), and the hit another namespace would give. Looks only: no lease, no hit
  /// counted. `engine_block_tokens` and `engine_layout_fingerprint`: what the engine used (0: the
  /// daemon's). kNotFound for a tenant the daemon's config does not name.
  virtual Result<std::string> doctor(const NamespaceRequest& request, std::span<const TokenId> tokens,
                                     std::span<const BlockExtra> extras, uint32_t engine_block_tokens,
                                     uint64_t engine_layout_fingerprint) = 0;
  /// kvtier export through the daemon. export_list pages through the daemon's blocks under
  /// `roots` (every namespace when empty), depth first (a parent right before its subtree), up to
  /// `max_blocks` (1..4096) a page, as JSON (docs/operations.md); `restart` begins a new walk over
  /// a snapshot of what is cached, later calls continue it until a page says "done".
  virtual Result<std::string> export_list(bool restart, std::span<const BlockKey> roots, uint32_t max_blocks) = 0;
  /// Copies the blocks `keys` whole into `dst` (bytes_per_block each, back to back, canonical
  /// layout), each verified against its checksum whichever tier it is read from, through the
  /// window as many at a time as it holds. Per key: ok, or why its bytes are not there
  /// (kNotFound: no longer cached; kChecksumMismatch). kInvalidArgument for a `dst` of another size.
  virtual Result<std::vector<Status>> export_read(std::span<const BlockKey> keys, std::span<std::byte> dst) = 0;

  /// A small load runs to completion before it returns. A larger one returns at once and streams in
  /// layer order (see above): wait_layer(l) returns once layer l of every block is in `dst`.
  /// `dst` must stay valid until the handle is final; cancel() stops after the slice in flight.
  Result<TransferHandle> load(const Match& match, const KvBuffer& dst) override = 0;

 protected:
  Client() = default;
};

}  // namespace kvtier
