#include "api/client/socket_client.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "api/kv_copy/kv_copy.h"
#include "api/wire/socket_io.h"
#include "transfer/copy_engine.h"
#include "transfer/shared_device_memory.h"

namespace kvtier {

using proto::Op;

namespace {

std::vector<BlockExtra> to_vector(std::span<const BlockExtra> e) { return {e.begin(), e.end()}; }

}  // namespace

static_assert(ClientOptions::kDefaultMailboxBytes == proto::kDefaultMailboxBytes);

Result<std::unique_ptr<Client>> Client::connect(ClientOptions options) {
  auto c = SocketClient::connect(std::move(options));
  if (!c) return c.status();
  return std::unique_ptr<Client>(std::move(*c));
}

Result<std::unique_ptr<SocketClient>> SocketClient::connect(ClientOptions options) {
  std::unique_ptr<SocketClient> c(new SocketClient());
  auto fd = proto::connect_unix(options.socket_path);
  if (!fd) return fd.status();
  c->fd_ = *fd;
  c->reader_ = std::make_unique<proto::FrameReader>(c->fd_);
  int window_fd = -1;
  if (!proto::valid_mailbox_bytes(options.mailbox_bytes)) {
    return invalid_argument("mailbox_bytes must be 0 or a multiple of 4096 in [" + std::to_string(proto::kMinMailboxBytes) +
                   ", " + std::to_string(proto::kMaxMailboxBytes) + "]");
  }
  const uint64_t mapped = proto::memfd_bytes(options.window_bytes, options.mailbox_bytes);
  if (mapped > 0) {
    // Sealed against shrinking: the daemon refuses a window that could be truncated under it
    // (its copies would fault with SIGBUS).
    window_fd = ::memfd_create("kvtier-client-window", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (window_fd < 0 || ::ftruncate(window_fd, static_cast<off_t>(mapped)) != 0 ||
        ::fcntl(window_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
      Status s(StatusCode::kResourceExhausted, std::string("cannot create the shared window: ") + std::strerror(errno));
      if (window_fd >= 0) ::close(window_fd);
      return s;
    }
    void* p = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_SHARED, window_fd, 0);
    if (p == MAP_FAILED) {
      ::close(window_fd);
      return Status(StatusCode::kResourceExhausted, std::string("cannot map the shared window: ") + std::strerror(errno));
    }
    c->window_ = static_cast<std::byte*>(p);
    c->window_bytes_ = options.window_bytes;
    c->mapped_bytes_ = mapped;
    if (options.mailbox_bytes) {
      c->mailbox_ = proto::Mailbox(c->window_ + proto::mailbox_offset(options.window_bytes), options.mailbox_bytes);
    }
  }
  std::vector<std::byte> req, reply;
  proto::encode(proto::HelloRequest{.window_bytes = options.window_bytes, .client_name = options.name,
                                    .mailbox_bytes = options.mailbox_bytes},
                req);
  Status s = c->call(Op::kHello, req, reply, window_fd);
  if (window_fd >= 0) ::close(window_fd);  // the mapping (ours and the daemon's) keeps the memory
  KVTIER_RETURN_IF_ERROR(s);
  proto::HelloReply hello;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, hello));
  c->layout_ = hello.layout;
  c->client_id_ = hello.client_id;
  c->tenants_ = std::move(hello.tenants);
  c->window_blocks_ = c->window_bytes_ / c->layout_.bytes_per_block();
  return c;
}

SocketClient::~SocketClient() {
  {  // a streaming load still in flight finishes first: it uses the socket and the window
    std::lock_guard lock(worker_mu_);
    worker_stop_ = true;
  }
  worker_cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  if (fd_ >= 0) ::close(fd_);  // the daemon releases this client's leases and pins
  if (engine_) {  // the window was registered with it: forget it before it is unmapped
    copier_.reset();
    engine_->unregister_host_memory(window_);
    engine_.reset();
  }
  if (window_) ::munmap(window_, mapped_bytes_);
}

Result<uint32_t> SocketClient::send_request(Op op, const std::vector<std::byte>& request, int pass_fd) {
  const uint32_t id = next_request_++;
  KVTIER_RETURN_IF_ERROR(proto::send_frame(fd_, static_cast<uint16_t>(op), id, request, pass_fd));
  return id;
}

namespace {
bool is_doorbell(const proto::FrameHeader& h) { return h.op == (static_cast<uint16_t>(Op::kDoorbell) | proto::kReplyBit); }
}  // namespace

Status SocketClient::next_frame(proto::FrameHeader& header, std::vector<std::byte>& payload) {
  int received = -1;
  Status got = reader_->next(header, payload, received);
  if (received >= 0) ::close(received);
  if (got.code() == StatusCode::kUnavailable) {
    return Status(StatusCode::kUnavailable, "kvtierd closed the connection: " + std::string(got.message()));
  }
  return got;
}

Status SocketClient::recv_frame(proto::FrameHeader& header, std::vector<std::byte>& payload) {
  do {  // a doorbell that found this client awake after all: nothing to do
    KVTIER_RETURN_IF_ERROR(next_frame(header, payload));
  } while (is_doorbell(header));
  return Status::ok();
}

Status SocketClient::accept_reply(Op op, uint32_t id, const proto::FrameHeader& header, std::span<const std::byte> payload,
                            std::vector<std::byte>& reply) {
  if (header.op != (static_cast<uint16_t>(op) | proto::kReplyBit) ||
      (header.request_id != id && header.request_id != 0)) {
    return Status(StatusCode::kProtocolError, "reply does not match the request");
  }
  Status remote;
  auto body = proto::decode_status(payload, remote);
  if (!body) return body.status();
  if (!remote) return remote;
  reply.assign(body->begin(), body->end());
  return Status::ok();
}

Status SocketClient::recv_reply(Op op, uint32_t id, std::vector<std::byte>& reply) {
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  KVTIER_RETURN_IF_ERROR(recv_frame(header, payload));
  return accept_reply(op, id, header, payload, reply);
}

Status SocketClient::mailbox_call(Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply, bool& used) {
  using proto::Mailbox;
  used = false;
  if (!mailbox_ || op == Op::kHello || proto::kHeaderBytes + request.size() > mailbox_.slot_bytes()) {
    return Status::ok();
  }
  used = true;
  const uint32_t id = next_request_++;
  proto::build_frame(static_cast<uint16_t>(op), id, request, frame_);
  const uint32_t seq = ++mailbox_seq_;
  if (mailbox_.publish(Mailbox::kRequest, frame_, seq)) {  // the daemon's thread sleeps: wake it
    KVTIER_RETURN_IF_ERROR(proto::send_frame(fd_, static_cast<uint16_t>(Op::kDoorbell), 0, {}));
  }
  // Spin for the reply a while (no system call), then park on the socket until the doorbell.
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  bool from_socket = false;  // the reply itself arrived on the socket while parked
  const auto start = std::chrono::steady_clock::now();
  const auto spin = spin_.budget();
  for (uint32_t i = 1; mailbox_.seq(Mailbox::kReply) != seq; ++i) {
    if (spin.count() > 0 && (i % 64 != 0 || std::chrono::steady_clock::now() - start < spin)) {
      proto::cpu_relax();
      continue;
    }
    if (mailbox_.park(Mailbox::kReply) == seq) {
      mailbox_.unpark(Mailbox::kReply);
      break;
    }
    Status got = next_frame(header, payload);  // blocks until the doorbell
    mailbox_.unpark(Mailbox::kReply);
    KVTIER_RETURN_IF_ERROR(got);
    if (is_doorbell(header)) continue;  // look again
    from_socket = true;  // a reply too large for the mailbox (the slot then says "elsewhere")
    break;
  }
  if (!from_socket) {
    spin_.observe(start, mailbox_.published_at(Mailbox::kReply));
    mailbox_.read(Mailbox::kReply, frame_);
    if (frame_.empty()) {  // the reply went over the socket
      KVTIER_RETURN_IF_ERROR(recv_frame(header, payload));
    } else {
      std::span<const std::byte> body;
      KVTIER_RETURN_IF_ERROR(proto::split_frame(frame_, header, body));
      return accept_reply(op, id, header, body, reply);
    }
  }
  return accept_reply(op, id, header, payload, reply);
}

Status SocketClient::call(Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply, int pass_fd) {
  bool used = false;
  if (pass_fd < 0) {  // a descriptor only crosses the socket
    Status via_mailbox = mailbox_call(op, request, reply, used);
    if (used) return via_mailbox;
  }
  auto sent = send_request(op, request, pass_fd);
  if (sent) return recv_reply(op, *sent, reply);
  // The send failed, but the daemon may have said why before it closed (a refused identity, the
  // client limit): that answer is the useful error.
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  if (!recv_frame(header, payload)) return sent.status();
  return accept_reply(op, next_request_ - 1, header, payload, reply);
}

Result<DeviceMovers> SocketClient::movers() {
  if (!engine_) {
    auto e = create_copy_engine();
    if (!e) return e.status();
    engine_ = std::move(*e);
    // Page-lock the window for DMA where a GPU is present (else a no-op).
    engine_->register_host_memory(window_, window_bytes_).ignore();
    copier_ = copier_over(*engine_);
    // A streamed slice fills half the window: stage that much per launch (a whole block at least).
    packer_ = create_page_packer(engine_->device_memory_is_host(),
                                 std::min<uint64_t>(window_bytes_ / 2, 64ull << 20), layout_.bytes_per_block());
  }
  return DeviceMovers{copier_.get(), packer_.get()};
}

Result<NamespaceId> SocketClient::open_namespace(const NamespaceRequest& r) {
  if (!std::isfinite(r.prefill_tokens_per_second) || r.prefill_tokens_per_second < 0) {
    return invalid_argument("prefill_tokens_per_second must be finite and >= 0, got " +
                            std::to_string(r.prefill_tokens_per_second));
  }
  std::lock_guard lock(gate_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::OpenNamespaceRequest{.model_id = r.model_id, .tenant = r.tenant, .adapter_id = r.adapter_id,
                                            .layout_fingerprint = layout_.fingerprint(),
                                            .revision = r.revision,
                                            .prefill_tokens_per_second = r.prefill_tokens_per_second},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kOpenNamespace, req, reply));
  proto::OpenNamespaceReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return out.namespace_id;
}

Result<Match> SocketClient::lookup(NamespaceId ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  std::lock_guard lock(gate_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::LookupRequest{.namespace_id = ns, .take_lease = true,
                                     .tokens = {tokens.begin(), tokens.end()}, .extras = to_vector(extras)},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kLookup, req, reply));
  proto::LookupReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  Match m;
  m.lease = out.lease;
  m.tokens = out.tokens;
  m.held_back_blocks = out.held_back_blocks;
  m.seconds_saved = double(out.saved_ns) * 1e-9;
  m.blocks.resize(out.tier_masks.size());
  for (size_t i = 0; i < out.tier_masks.size(); ++i) m.blocks[i].tier_mask = out.tier_masks[i];
  return m;
}

namespace {
// A streaming load's slice: about this many bytes, so a slice's copy dwarfs its round trip and
// wait_layer(0) comes early.
constexpr uint64_t kSliceBytes = 4ull << 20;
// Blocks per request of a load or save through registered memory: 12 bytes each on the wire.
constexpr size_t kDirectBlocks = 64 * 1024;
}  // namespace

SocketClient::LoadPlan SocketClient::plan_load(size_t n, LayerRange range) const {
  const uint32_t layers = range.size(layout_.num_layers);
  const uint64_t layer_bytes = layout_.bytes_per_block_layer();
  LoadPlan p;
  p.layer_begin = range.begin;
  p.layer_count = layers;
  // Two buffers (the daemon fills one while the other is copied out) when the window holds two
  // block-layers, else one.
  p.half = window_bytes_ >= 2 * layer_bytes ? window_bytes_ / 2 : 0;
  const uint64_t room = p.half ? p.half : window_bytes_;
  const uint64_t row = n * layer_bytes;  // one layer of every block
  if (row <= room) {
    p.layers = static_cast<uint32_t>(std::min<uint64_t>({layers, room / row, std::max<uint64_t>(1, kSliceBytes / row)}));
    p.blocks = n;
  } else {
    p.layers = 1;
    p.blocks = room / layer_bytes;
  }
  p.slices = ((layers + p.layers - 1) / p.layers) * ((n + p.blocks - 1) / p.blocks);
  return p;
}

SocketClient::LoadPlan SocketClient::plan_direct_load(size_t n, LayerRange range) const {
  const uint32_t layers = range.size(layout_.num_layers);
  const uint64_t layer_bytes = layout_.bytes_per_block_layer();
  LoadPlan p;
  p.layer_begin = range.begin;
  p.layer_count = layers;
  p.blocks = std::min<size_t>(n, kDirectBlocks);
  const uint64_t row = p.blocks * layer_bytes;
  p.layers = static_cast<uint32_t>(std::clamp<uint64_t>(kSliceBytes / row, 1, layers));
  p.slices = ((layers + p.layers - 1) / p.layers) * ((n + p.blocks - 1) / p.blocks);
  return p;
}

Status SocketClient::register_memory(void* base, uint64_t bytes) {
  auto share = export_device_memory(base, bytes);
  if (!share) return share.status();
  return register_share(base, bytes, *share);
}

namespace {
// A memfd both processes map; the daemon's mapping ends at unregister (or disconnect).
class SharedHost final : public SharedHostMemory {
 public:
  SharedHost(Client* client, std::byte* data, uint64_t bytes, int fd)
      : client_(client), data_(data), bytes_(bytes), fd_(fd) {}
  ~SharedHost() override {
    client_->unregister_memory(data_).ignore();  // the daemon unmaps it at disconnect otherwise
    ::munmap(data_, bytes_);
    ::close(fd_);
  }
  std::byte* data() const noexcept override { return data_; }
  uint64_t size() const noexcept override { return bytes_; }

 private:
  Client* client_;
  std::byte* data_;
  uint64_t bytes_;
  int fd_;
};
}  // namespace

Result<std::unique_ptr<SharedHostMemory>> SocketClient::allocate_shared_host(uint64_t bytes) {
  if (bytes == 0) return invalid_argument("shared host memory needs at least one byte");
  constexpr uint64_t kPage = 4096;
  if (bytes > (1ull << 47)) return Status(StatusCode::kResourceExhausted, "shared host memory of " + std::to_string(bytes) + " bytes");
  const uint64_t size = (bytes + kPage - 1) / kPage * kPage;
  auto mem = create_shared_memfd("kvtier-shared-host", size);
  if (!mem) return mem.status();
  const int fd = mem->fd;
  void* p = mem->data;
  DeviceShare share{.kind = ShareKind::kMemfd, .offset = 0, .bytes = size, .fd = fd};
  if (Status s = register_share(p, size, share); !s.is_ok()) {
    ::munmap(p, size);
    ::close(fd);
    return s;
  }
  return std::unique_ptr<SharedHostMemory>(std::make_unique<SharedHost>(this, static_cast<std::byte*>(p), size, fd));
}

Status SocketClient::register_share(void* base, uint64_t bytes, const DeviceShare& share) {
  const auto at = reinterpret_cast<uintptr_t>(base);
  std::lock_guard lock(gate_);
  // Regions never overlap, so every address has at most one region.
  auto next = registered_.lower_bound(at);
  if ((next != registered_.end() && next->first < at + bytes) ||
      (next != registered_.begin() && std::prev(next)->first + std::prev(next)->second.bytes > at)) {
    return Status(StatusCode::kAlreadyExists, "the memory overlaps a region this client registered already");
  }
  std::vector<std::byte> req, reply;
  proto::encode(proto::RegisterMemoryRequest{.kind = static_cast<uint8_t>(share.kind), .ipc_handle = share.ipc_handle,
                                             .offset = share.offset, .bytes = share.bytes,
                                             .address = share.address},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kRegisterMemory, req, reply, share.fd));
  proto::RegisterMemoryReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  registered_.emplace(at, Registered{.bytes = bytes, .region = out.region});
  return Status::ok();
}

Status SocketClient::unregister_memory(void* base) {
  std::lock_guard lock(gate_);
  auto it = registered_.find(reinterpret_cast<uintptr_t>(base));
  if (it == registered_.end()) return Status(StatusCode::kNotFound, "no region was registered at this address");
  std::vector<std::byte> req, reply;
  proto::encode(proto::UnregisterMemoryRequest{.region = it->second.region}, req);
  registered_.erase(it);  // forgotten here whatever the daemon says: it unmaps at disconnect anyway
  return call(Op::kUnregisterMemory, req, reply);
}

std::optional<proto::RegionBuffer> SocketClient::in_registered_memory(const KvBuffer& buf) const {
  if (registered_.empty()) return std::nullopt;
  // The region holding [p, p + bytes) whole, if one does.
  auto place = [&](const void* p, uint64_t bytes) -> std::optional<proto::RegionRef> {
    const auto at = reinterpret_cast<uintptr_t>(p);
    auto it = registered_.upper_bound(at);
    if (it == registered_.begin()) return std::nullopt;
    --it;
    const uint64_t off = at - it->first;
    if (off >= it->second.bytes || bytes > it->second.bytes - off) return std::nullopt;
    return proto::RegionRef{.region = it->second.region, .offset = off};
  };
  proto::RegionBuffer rb;
  if (!buf.is_paged()) {
    rb.places.reserve(buf.blocks.size());
    for (const std::byte* b : buf.blocks) {
      auto r = place(b, layout_.bytes_per_block());
      if (!r) return std::nullopt;
      rb.places.push_back(*r);
    }
    return rb;
  }
  rb.layout = static_cast<uint8_t>(1 + static_cast<int>(buf.engine));
  rb.engine_num_pages = buf.engine_num_pages;
  rb.page_tokens = buf.page_tokens;
  const uint64_t pieces = buf.page_tokens > layout_.block_tokens ? buf.page_tokens / layout_.block_tokens : 1;
  for (const void* base : buf.layer_base) {
    auto r = place(base, uint64_t(buf.engine_num_pages) * pieces * layout_.bytes_per_block_layer());
    if (!r) return std::nullopt;
    rb.places.push_back(*r);
  }
  rb.pages = buf.pages;
  return rb;
}

proto::RegionBuffer SocketClient::slice_of(const proto::RegionBuffer& all, size_t first, size_t count) {
  proto::RegionBuffer part;
  part.layout = all.layout;
  part.engine_num_pages = all.engine_num_pages;
  part.page_tokens = all.page_tokens;
  if (all.layout == 0) {
    part.places.assign(all.places.begin() + first, all.places.begin() + first + count);
  } else {
    part.places = all.places;
    part.pages.assign(all.pages.begin() + first, all.pages.begin() + first + count);
  }
  return part;
}

Result<TransferHandle> SocketClient::load(const Match& match, const KvBuffer& dst) {
  return load_layers(match, dst, {});
}

Result<TransferHandle> SocketClient::load_layers(const Match& match, const KvBuffer& dst, LayerRange range) {
  const uint32_t layers = range.size(layout_.num_layers);
  if (layers == 0) return invalid_argument("load: the layer range is outside the layout's layers");
  std::unique_lock lock(gate_);  // stream_load unlocks it: released to it below
  // Registered memory (register_memory) is written by the daemon itself, paged layouts included.
  auto direct = in_registered_memory(dst);
  KVTIER_RETURN_IF_ERROR(check_load(layout_, match, dst));
  const size_t n = dst.block_count();
  if (n == 0) return finished_handle(layers);
  if (match.lease == kNoLease) return invalid_argument("load needs a leased match (from lookup)");
  if (!direct && window_bytes_ < layout_.bytes_per_block_layer()) {
    return invalid_argument("the shared window cannot hold one layer of a block");
  }
  // Into registered memory nothing is copied here: the slices only give wait_layer() its early layers.
  const LoadPlan plan = direct ? plan_direct_load(n, range) : plan_load(n, range);
  auto job = std::make_shared<detail::JobState>(std::vector<uint32_t>(layers, 1), TransferCallback{});
  job->mark_running();
  lock.release();
  if (plan.slices == 1) {  // nothing to overlap: done before returning
    stream_load(match.lease, match.first_block, dst, plan, job, direct ? &*direct : nullptr);
    KVTIER_RETURN_IF_ERROR(job->status());
    return TransferHandle(std::move(job));
  }
  {
    std::lock_guard wl(worker_mu_);
    if (!worker_.joinable()) {
      worker_ = std::thread([this] {
        std::unique_lock lock(worker_mu_);
        for (;;) {
          worker_cv_.wait(lock, [&] { return worker_stop_ || worker_task_; });
          if (worker_task_) {
            auto task = std::move(worker_task_);
            worker_task_ = nullptr;
            lock.unlock();
            task();
            lock.lock();
          } else {
            return;  // stop, with nothing left to run
          }
        }
      });
    }
    // The gate admits one load at a time, so no task is waiting here.
    worker_task_ = [this, lease = match.lease, first = match.first_block, dst, plan, job, direct = std::move(direct)] {
      stream_load(lease, first, dst, plan, job, direct ? &*direct : nullptr);
    };
  }
  worker_cv_.notify_one();
  return TransferHandle(std::move(job));
}

void SocketClient::stream_load(LeaseId lease, uint32_t lease_first, const KvBuffer& dst, LoadPlan plan, const std::shared_ptr<detail::JobState>& job,
                         const proto::RegionBuffer* direct) {
  const uint32_t layer_end = plan.layer_begin + plan.layer_count;
  const size_t n = dst.block_count();
  const size_t chunks = (n + plan.blocks - 1) / plan.blocks;
  struct Slice {
    uint32_t l0 = 0, nl = 0;
    size_t b0 = 0, nb = 0;
    uint64_t offset = 0;  // in the window
    bool ends_layers = false;  // the last chunk of its layers: they are complete once it lands
    uint32_t id = 0;
  };
  // Slices in layer order: every block of layers [l0, l0 + nl), then the next layers.
  auto slice_at = [&](size_t k) {
    Slice s;
    s.l0 = plan.layer_begin + static_cast<uint32_t>(k / chunks) * plan.layers;
    s.nl = std::min(plan.layers, layer_end - s.l0);
    s.b0 = (k % chunks) * plan.blocks;
    s.nb = std::min(plan.blocks, n - s.b0);
    s.offset = plan.half ? (k % 2) * plan.half : 0;
    s.ends_layers = k % chunks == chunks - 1;
    return s;
  };
  Status st;
  DeviceMovers movers;
  if (!direct && dst.memory != LocationKind::kHost) {
    auto m = this->movers();
    if (m) movers = *m;
    else st = m.status();
  }
  std::vector<Slice> in_flight;  // at most two, oldest first
  size_t next = 0;
  const size_t depth = plan.half || direct ? 2 : 1;
  auto send_next = [&]() -> Status {
    Slice s = slice_at(next++);
    std::vector<std::byte> req;
    if (direct) {
      proto::encode(proto::LoadToRequest{.lease = lease, .first_block = lease_first + static_cast<uint32_t>(s.b0),
                                         .layer_begin = s.l0, .layer_count = s.nl,
                                         .dst = slice_of(*direct, s.b0, s.nb)},
                    req);
    } else {
      proto::encode(proto::LoadRequest{.lease = lease, .first_block = lease_first + static_cast<uint32_t>(s.b0),
                                       .block_count = static_cast<uint32_t>(s.nb), .window_offset = s.offset,
                                       .layer_begin = s.l0, .layer_count = s.nl},
                    req);
    }
    auto id = send_request(direct ? Op::kLoadTo : Op::kLoad, req);
    if (!id) return id.status();
    s.id = *id;
    in_flight.push_back(s);
    return Status::ok();
  };
  while (st.is_ok() && next < plan.slices && in_flight.size() < depth) st = send_next();
  while (!in_flight.empty()) {
    const Slice s = in_flight.front();
    in_flight.erase(in_flight.begin());
    std::vector<std::byte> reply;
    const Status got = recv_reply(direct ? Op::kLoadTo : Op::kLoad, s.id, reply);
    const bool transport = got.code() == StatusCode::kUnavailable || got.code() == StatusCode::kProtocolError;
    if (st.is_ok()) st = got;
    if (transport) {  // the connection is gone or out of step: later calls fail cleanly too
      ::shutdown(fd_, SHUT_RDWR);
      break;
    }
    if (!st) continue;     // after an error, only read the replies still owed
    if (!direct) {
      // The other buffer is being filled meanwhile; this one is reused once its copy is done.
      auto h = scatter_blocks(layout_, window_ + s.offset, dst, s.b0, s.nb, movers, {s.l0, s.nl});
      st = h ? h->wait() : h.status();
      if (!st) continue;
    }
    if (s.ends_layers) {
      for (uint32_t l = s.l0; l < s.l0 + s.nl; ++l) job->segment_arrived(l - plan.layer_begin);
    }
    if (next < plan.slices && !job->cancel_requested()) st = send_next();
  }
  if (!st) job->record_error(st);
  gate_.unlock();  // before the job is final: a waiter's next call must not find the gate held
  job->finish({});
}

Status SocketClient::release(const Match& match) {
  if (match.lease == kNoLease) return Status::ok();
  std::lock_guard lock(gate_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::ReleaseRequest{.lease = match.lease}, req);
  return call(Op::kRelease, req, reply);
}

Result<size_t> SocketClient::save(NamespaceId ns, std::span<const TokenId> tokens, const KvBuffer& src, Priority priority,
                            std::span<const BlockExtra> extras, size_t first_block) {
  std::lock_guard lock(gate_);
  auto direct = in_registered_memory(src);
  auto checked = check_save(layout_, tokens.size(), src, extras, first_block);
  if (!checked) return checked.status();
  const size_t full = *checked;
  const uint32_t bt = layout_.block_tokens;
  if (full == first_block) return size_t{0};
  // One request per chunk: registered memory the daemon reads itself, or what fits the window.
  const size_t chunk = direct ? kDirectBlocks : window_blocks_;
  if (chunk == 0) return invalid_argument("the shared window cannot hold one block");
  DeviceMovers movers;
  if (!direct && src.memory != LocationKind::kHost) {
    auto m = this->movers();
    if (!m) return m.status();
    movers = *m;
  }
  size_t saved = 0;
  for (size_t b0 = first_block; b0 < full; b0 += chunk) {
    const size_t count = std::min<size_t>(chunk, full - b0);
    const size_t end = b0 + count;
    std::vector<TokenId> prefix(tokens.begin(), tokens.begin() + end * bt);
    auto ex = to_vector(extras_below(extras, end));
    std::vector<std::byte> req, reply;
    if (direct) {
      proto::encode(proto::SaveFromRequest{.namespace_id = ns, .priority = static_cast<uint8_t>(priority),
                                           .first_block = static_cast<uint32_t>(b0), .tokens = std::move(prefix),
                                           .extras = std::move(ex), .src = slice_of(*direct, b0 - first_block, count)},
                    req);
    } else {
      KVTIER_RETURN_IF_ERROR(gather_blocks(layout_, src, b0 - first_block, count, window_, movers));
      proto::encode(proto::SaveRequest{.namespace_id = ns, .priority = static_cast<uint8_t>(priority),
                                       .first_block = static_cast<uint32_t>(b0), .window_offset = 0,
                                       .tokens = std::move(prefix), .extras = std::move(ex)},
                    req);
    }
    KVTIER_RETURN_IF_ERROR(call(direct ? Op::kSaveFrom : Op::kSave, req, reply));
    proto::SaveReply out;
    KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
    saved += out.saved;
  }
  return saved;
}

Result<uint64_t> SocketClient::prefix_call(Op op, NamespaceId ns, uint8_t arg, std::span<const TokenId> tokens,
                                     std::span<const BlockExtra> extras) {
  std::lock_guard lock(gate_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::PrefixRequest{.namespace_id = ns, .arg = arg, .tokens = {tokens.begin(), tokens.end()},
                                     .extras = to_vector(extras)},
                req);
  KVTIER_RETURN_IF_ERROR(call(op, req, reply));
  proto::CountReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return out.count;
}

Result<size_t> SocketClient::prefetch(NamespaceId ns, std::span<const TokenId> tokens, Tier to, std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kPrefetch, ns, static_cast<uint8_t>(to), tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<size_t> SocketClient::pin(NamespaceId ns, std::span<const TokenId> tokens, Priority priority,
                           std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kPin, ns, static_cast<uint8_t>(priority), tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<size_t> SocketClient::unpin(NamespaceId ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kUnpin, ns, 0, tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<std::string> SocketClient::metrics_text() {
  std::lock_guard lock(gate_);
  std::vector<std::byte> reply;
  KVTIER_RETURN_IF_ERROR(call(Op::kStats, {}, reply));
  proto::StatsReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return std::move(out.prometheus_text);
}

Result<bool> SocketClient::object_put(NamespaceId ns, std::string_view key, std::span<const std::byte> bytes,
                                      Priority priority) {
  KVTIER_RETURN_IF_ERROR(check_object_key(key));
  const uint64_t bpb = layout_.bytes_per_block();
  const uint64_t laid = object_blocks(bytes.size(), bpb) * bpb;
  std::lock_guard lock(gate_);
  if (laid > window_bytes_) {
    return invalid_argument("an object of " + std::to_string(bytes.size()) + " bytes takes " + std::to_string(laid) +
                            " bytes of window; this client's window has " + std::to_string(window_bytes_));
  }
  lay_out_object(bytes, {window_, laid});
  std::vector<std::byte> req, reply;
  proto::encode(proto::ObjectPutRequest{.namespace_id = ns, .priority = static_cast<uint8_t>(priority),
                                        .length = bytes.size(), .window_offset = 0, .key = std::string(key)},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kObjectPut, req, reply));
  proto::ObjectPutReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return out.stored;
}

Result<uint64_t> SocketClient::object_get(NamespaceId ns, std::string_view key, std::span<std::byte> dst) {
  KVTIER_RETURN_IF_ERROR(check_object_key(key));
  std::lock_guard lock(gate_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::ObjectGetRequest{.namespace_id = ns, .window_offset = 0, .window_bytes = window_bytes_,
                                        .key = std::string(key)},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kObjectGet, req, reply));
  proto::ObjectGetReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  if (out.length > window_bytes_) {
    return Status(StatusCode::kProtocolError, "object_get: a length of " + std::to_string(out.length) +
                                                  " bytes past the window");
  }
  if (out.length > dst.size()) {
    return invalid_argument("the object is " + std::to_string(out.length) + " bytes; the buffer has " +
                            std::to_string(dst.size()));
  }
  if (out.length != 0) std::memcpy(dst.data(), window_, out.length);
  return out.length;
}

Result<size_t> SocketClient::object_keys(Op op, NamespaceId ns, std::span<const std::string> keys) {
  size_t count = 0;
  std::lock_guard lock(gate_);
  // In requests of up to kMaxObjectKeys keys; exists stops at the first request short of all.
  for (size_t at = 0; at < keys.size(); at += kMaxObjectKeys) {
    const size_t n = std::min<size_t>(kMaxObjectKeys, keys.size() - at);
    std::vector<std::byte> req, reply;
    proto::encode(proto::ObjectKeysRequest{.namespace_id = ns, .keys = {keys.begin() + at, keys.begin() + at + n}},
                  req);
    KVTIER_RETURN_IF_ERROR(call(op, req, reply));
    proto::CountReply out;
    KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
    count += out.count;
    if (op == Op::kObjectExists && out.count < n) break;
  }
  return count;
}

Result<size_t> SocketClient::object_exists(NamespaceId ns, std::span<const std::string> keys) {
  return object_keys(Op::kObjectExists, ns, keys);
}

Result<size_t> SocketClient::object_remove(NamespaceId ns, std::span<const std::string> keys) {
  return object_keys(Op::kObjectRemove, ns, keys);
}

Result<std::string> SocketClient::inspect(uint32_t top_prefixes) {
  std::vector<std::byte> payload, reply;
  proto::encode(proto::InspectRequest{top_prefixes}, payload);
  std::lock_guard lock(gate_);
  KVTIER_RETURN_IF_ERROR(call(Op::kInspect, payload, reply));
  proto::JsonReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return std::move(out.json);
}

Result<std::string> SocketClient::doctor(const NamespaceRequest& request, std::span<const TokenId> tokens,
                                         std::span<const BlockExtra> extras, uint32_t engine_block_tokens,
                                         uint64_t engine_layout_fingerprint) {
  std::vector<std::byte> payload, reply;
  proto::encode(proto::DoctorRequest{.model_id = request.model_id, .tenant = request.tenant,
                                     .adapter_id = request.adapter_id, .revision = request.revision,
                                     .engine_block_tokens = engine_block_tokens,
                                     .engine_layout_fingerprint = engine_layout_fingerprint,
                                     .tokens = {tokens.begin(), tokens.end()},
                                     .extras = {extras.begin(), extras.end()}},
                payload);
  std::lock_guard lock(gate_);
  KVTIER_RETURN_IF_ERROR(call(Op::kDoctor, payload, reply));
  proto::JsonReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return std::move(out.json);
}

Result<std::string> SocketClient::export_list(bool restart, std::span<const BlockKey> roots, uint32_t max_blocks) {
  std::vector<std::byte> payload, reply;
  proto::encode(proto::ExportListRequest{.restart = restart, .max_blocks = max_blocks,
                                         .roots = {roots.begin(), roots.end()}},
                payload);
  std::lock_guard lock(gate_);
  KVTIER_RETURN_IF_ERROR(call(Op::kExportList, payload, reply));
  proto::JsonReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return std::move(out.json);
}

Result<std::vector<Status>> SocketClient::export_read(std::span<const BlockKey> keys, std::span<std::byte> dst) {
  const uint64_t bpb = layout_.bytes_per_block();
  if (dst.size() != keys.size() * bpb) {
    return invalid_argument("export_read: " + std::to_string(dst.size()) + " bytes for " + std::to_string(keys.size()) +
                            " blocks of " + std::to_string(bpb));
  }
  const size_t per_call = window_bytes_ / bpb;
  if (per_call == 0 && !keys.empty()) {
    return invalid_argument("a " + std::to_string(bpb) + "-byte block does not fit the " +
                            std::to_string(window_bytes_) + "-byte window");
  }
  std::vector<Status> out;
  out.reserve(keys.size());
  std::lock_guard lock(gate_);
  for (size_t at = 0; at < keys.size(); at += per_call) {
    const size_t n = std::min(per_call, keys.size() - at);
    std::vector<std::byte> payload, reply;
    proto::encode(proto::ExportReadRequest{.window_offset = 0, .keys = {keys.begin() + at, keys.begin() + at + n}},
                  payload);
    KVTIER_RETURN_IF_ERROR(call(Op::kExportRead, payload, reply));
    proto::ExportReadReply r;
    KVTIER_RETURN_IF_ERROR(proto::decode(reply, r));
    if (r.blocks.size() != n) {
      return Status(StatusCode::kProtocolError, "export_read: " + std::to_string(r.blocks.size()) + " answers for " + std::to_string(n) +
                            " blocks");
    }
    for (size_t i = 0; i < n; ++i) {
      if (r.blocks[i].is_ok()) std::memcpy(dst.data() + (at + i) * bpb, window_ + i * bpb, bpb);
      out.push_back(std::move(r.blocks[i]));
    }
  }
  return out;
}

}  // namespace kvtier
