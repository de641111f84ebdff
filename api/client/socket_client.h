// SocketClient: the kvtier::Client (kvtier/client.h) that talks to kvtierd (api/server/server.h)
// through a Unix socket, a shared-memory window and a mailbox. How loads stream is written down in
// kvtier/client.h.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <vector>

#include "api/kv_copy/kv_copy.h"
#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "api/wire/socket_io.h"
#include "kvtier/client.h"
#include "kvtier/kv_store.h"
#include "transfer/job_state.h"

namespace kvtier {

struct DeviceShare;  // transfer/shared_device_memory.h

class SocketClient final : public Client {
 public:
  /// Connects, says hello and maps the window (Client::connect).
  static Result<std::unique_ptr<SocketClient>> connect(ClientOptions options);
  ~SocketClient() override;

  uint64_t client_id() const noexcept override { return client_id_; }
  const std::vector<std::string>& tenants() const noexcept override { return tenants_; }
  uint64_t window_bytes() const noexcept override { return window_bytes_; }
  Status register_memory(void* base, uint64_t bytes) override;
  Status unregister_memory(void* base) override;
  Result<std::unique_ptr<SharedHostMemory>> allocate_shared_host(uint64_t bytes) override;

  // KvStore
  const KvLayout& layout() const noexcept override { return layout_; }
  Result<NamespaceId> open_namespace(const NamespaceRequest& request) override;
  Result<Match> lookup(NamespaceId ns, std::span<const TokenId> tokens,
                       std::span<const BlockExtra> extras = {}) override;
  Result<TransferHandle> load(const Match& match, const KvBuffer& dst) override;
  Result<TransferHandle> load_layers(const Match& match, const KvBuffer& dst, LayerRange layers) override;
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
  Result<bool> object_put(NamespaceId ns, std::string_view key, std::span<const std::byte> bytes,
                          Priority priority = Priority::kNormal) override;
  Result<uint64_t> object_get(NamespaceId ns, std::string_view key, std::span<std::byte> dst) override;
  Result<size_t> object_exists(NamespaceId ns, std::span<const std::string> keys) override;
  Result<size_t> object_remove(NamespaceId ns, std::span<const std::string> keys) override;
  Result<std::string> inspect(uint32_t top_prefixes) override;
  Result<std::string> doctor(const NamespaceRequest& request, std::span<const TokenId> tokens,
                             std::span<const BlockExtra> extras, uint32_t engine_block_tokens,
                             uint64_t engine_layout_fingerprint) override;
  Result<std::string> export_list(bool restart, std::span<const BlockKey> roots, uint32_t max_blocks) override;
  Result<std::vector<Status>> export_read(std::span<const BlockKey> keys, std::span<std::byte> dst) override;

 private:
  SocketClient() = default;
  /// One request/reply round trip; `reply` receives the reply body when the status is ok.
  Status call(proto::Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply, int pass_fd = -1);
  /// The halves of call(), for requests in flight back to back; returns the request id.
  Result<uint32_t> send_request(proto::Op op, const std::vector<std::byte>& request, int pass_fd = -1);
  Status recv_reply(proto::Op op, uint32_t id, std::vector<std::byte>& reply);
  /// The next frame from the socket (a passed descriptor is closed; "closed" says kvtierd did it).
  Status next_frame(proto::FrameHeader& header, std::vector<std::byte>& payload);
  /// The next frame from the socket that is not a doorbell.
  Status recv_frame(proto::FrameHeader& header, std::vector<std::byte>& payload);
  /// Checks a reply frame against its request and unwraps its status into `reply`.
  Status accept_reply(proto::Op op, uint32_t id, const proto::FrameHeader& header,
                      std::span<const std::byte> payload, std::vector<std::byte>& reply);
  /// call() through the mailbox; false in `used` when the request does not fit it.
  Status mailbox_call(proto::Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply,
                      bool& used);

  /// How a load is cut into slices: layers [l0, l0 + layers) of blocks [b0, b0 + blocks).
  struct LoadPlan {
    uint32_t layer_begin = 0;  // the load's layers: [layer_begin, layer_begin + layer_count)
    uint32_t layer_count = 0;
    uint32_t layers = 0;     // per slice (the last group may have fewer)
    size_t blocks = 0;       // per slice (the last chunk may have fewer)
    uint64_t half = 0;       // bytes of each of the two window buffers (0: one buffer only)
    size_t slices = 0;
  };
  LoadPlan plan_load(size_t n, LayerRange range) const;
  /// Slices of a load into registered memory: layer groups of about 4 MiB, no window halves.
  LoadPlan plan_direct_load(size_t n, LayerRange range) const;
  /// Runs a sliced load, through the window, or into registered memory when `direct` says where
  /// `dst` lies; marks each layer on `job` as it lands, finishes `job`. Holds the gate.
  void stream_load(LeaseId lease, uint32_t lease_first, const KvBuffer& dst, LoadPlan plan,
                   const std::shared_ptr<detail::JobState>& job, const proto::RegionBuffer* direct);
  /// `buf` as places in registered regions, or nullopt when any of it lies outside them. Under the gate.
  std::optional<proto::RegionBuffer> in_registered_memory(const KvBuffer& buf) const;
  /// Blocks [first, first + count) of `all`.
  static proto::RegionBuffer slice_of(const proto::RegionBuffer& all, size_t first, size_t count);

  /// The per-client lock, as a semaphore so the load worker may release what load() acquired.
  class Gate {
   public:
    void lock() { sem_.acquire(); }
    void unlock() { sem_.release(); }

   private:
    std::binary_semaphore sem_{1};
  };
  /// Registers [base, base + bytes) with the daemon as `share` describes it.
  Status register_share(void* base, uint64_t bytes, const DeviceShare& share);
  /// kObjectExists or kObjectRemove over `keys`, in requests of up to kMaxObjectKeys.
  Result<size_t> object_keys(proto::Op op, NamespaceId ns, std::span<const std::string> keys);
  Result<uint64_t> prefix_call(proto::Op op, NamespaceId ns, uint8_t arg, std::span<const TokenId> tokens,
                               std::span<const BlockExtra> extras);
  /// The copy engine and page packer for device buffers, made on first use.
  Result<DeviceMovers> movers();

  Gate gate_;  // one request (or streaming load) in flight; guards the socket, window, next_request_
  // The load worker: runs at most one streaming load (the gate admits one), started on first use.
  std::mutex worker_mu_;
  std::condition_variable worker_cv_;
  std::function<void()> worker_task_;
  bool worker_stop_ = false;
  std::thread worker_;
  int fd_ = -1;
  std::unique_ptr<proto::FrameReader> reader_;  // reads fd_'s replies
  std::byte* window_ = nullptr;
  uint64_t window_bytes_ = 0;
  uint64_t mapped_bytes_ = 0;  // the window and the mailbox after it
  proto::Mailbox mailbox_;
  uint32_t mailbox_seq_ = 0;   // the last request published in the mailbox
  proto::AdaptiveSpin spin_;   // how long to spin for a reply before parking
  std::vector<std::byte> frame_;  // a mailbox frame being built or read
  uint64_t window_blocks_ = 0;
  KvLayout layout_;
  uint64_t client_id_ = 0;
  std::vector<std::string> tenants_;
  uint32_t next_request_ = 1;
  std::unique_ptr<CopyEngine> engine_;      // device copies, made on first use
  std::unique_ptr<DeviceCopier> copier_;    // over engine_
  std::unique_ptr<kernels::DevicePagePacker> packer_;  // paged KV in device memory, via the window
  struct Registered {
    uint64_t bytes = 0;
    uint32_t region = 0;  // the daemon's name for it
  };
  std::map<uintptr_t, Registered> registered_;  // by base address; guarded by gate_
};

}  // namespace kvtier
