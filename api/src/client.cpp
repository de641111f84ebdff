#include "api/src/client.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "api/src/kv_copy.h"
#include "api/src/socket_io.h"

namespace kvtier {

using proto::Op;

namespace {

Status invalid(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }

std::vector<BlockExtra> to_vector(std::span<const BlockExtra> e) { return {e.begin(), e.end()}; }

}  // namespace

Result<std::unique_ptr<Client>> Client::connect(ClientOptions options) {
  std::unique_ptr<Client> c(new Client());
  auto fd = proto::connect_unix(options.socket_path);
  if (!fd) return fd.status();
  c->fd_ = *fd;
  c->reader_ = std::make_unique<proto::FrameReader>(c->fd_);
  int window_fd = -1;
  if (options.window_bytes > 0) {
    // Sealed against shrinking: the daemon refuses a window that could be truncated under it
    // (its copies would fault with SIGBUS).
    window_fd = ::memfd_create("kvtier-client-window", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (window_fd < 0 || ::ftruncate(window_fd, static_cast<off_t>(options.window_bytes)) != 0 ||
        ::fcntl(window_fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
      Status s(StatusCode::kResourceExhausted, std::string("cannot create the shared window: ") + std::strerror(errno));
      if (window_fd >= 0) ::close(window_fd);
      return s;
    }
    void* p = ::mmap(nullptr, options.window_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, window_fd, 0);
    if (p == MAP_FAILED) {
      ::close(window_fd);
      return Status(StatusCode::kResourceExhausted, std::string("cannot map the shared window: ") + std::strerror(errno));
    }
    c->window_ = static_cast<std::byte*>(p);
    c->window_bytes_ = options.window_bytes;
  }
  std::vector<std::byte> req, reply;
  proto::encode(proto::HelloRequest{.window_bytes = options.window_bytes, .client_name = options.name}, req);
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

Client::~Client() {
  if (fd_ >= 0) ::close(fd_);  // the daemon releases this client's leases and pins
  if (engine_) {  // the window was registered with it: forget it before it is unmapped
    engine_->unregister_host_memory(window_);
    engine_.reset();
  }
  if (window_) ::munmap(window_, window_bytes_);
}

Status Client::call(Op op, const std::vector<std::byte>& request, std::vector<std::byte>& reply, int pass_fd) {
  const uint32_t id = next_request_++;
  const Status sent = proto::send_frame(fd_, static_cast<uint16_t>(op), id, request, pass_fd);
  // Even when the send failed, the daemon may have said why before it closed (a refused
  // identity, the client limit): that answer is the useful error.
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  int received = -1;
  Status got = reader_->next(header, payload, received);
  if (!sent && !got) return sent;
  if (received >= 0) ::close(received);
  if (!got) {
    return got.code() == StatusCode::kUnavailable
               ? Status(StatusCode::kUnavailable, "kvtierd closed the connection: " + std::string(got.message()))
               : got;
  }
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

Result<TransferEngine*> Client::engine() {
  if (!engine_) {
    TransferEngineOptions o;
    o.staging_buffers = 2;
    auto e = TransferEngine::create(std::move(o));
    if (!e) return e.status();
    engine_ = std::move(*e);
    // Page-lock the window for DMA where a GPU is present (else a no-op or mlock).
    engine_->register_host_memory(window_, window_bytes_).ignore();
  }
  return engine_.get();
}

Result<NamespaceId> Client::open_namespace(const NamespaceRequest& r) {
  std::lock_guard lock(mu_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::OpenNamespaceRequest{.model_id = r.model_id, .tenant = r.tenant, .adapter_id = r.adapter_id,
                                            .layout_fingerprint = layout_.fingerprint()},
                req);
  KVTIER_RETURN_IF_ERROR(call(Op::kOpenNamespace, req, reply));
  proto::OpenNamespaceReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return out.namespace_id;
}

Result<Match> Client::lookup(NamespaceId ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  std::lock_guard lock(mu_);
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
  m.blocks.resize(out.tier_masks.size());
  for (size_t i = 0; i < out.tier_masks.size(); ++i) m.blocks[i].tier_mask = out.tier_masks[i];
  return m;
}

Result<TransferHandle> Client::load(const Match& match, const KvBuffer& dst) {
  KVTIER_RETURN_IF_ERROR(check_load(layout_, match, dst, /*paged_device_ok=*/false));
  const size_t n = dst.block_count();
  if (n == 0) return finished_handle(layout_.num_layers);
  if (match.lease == kNoLease) return invalid("load needs a leased match (from lookup)");
  if (window_blocks_ == 0) return invalid("the shared window cannot hold one block");
  std::lock_guard lock(mu_);
  TransferEngine* eng = nullptr;
  if (dst.memory != LocationKind::kHost) {
    auto e = engine();
    if (!e) return e.status();
    eng = *e;
  }
  for (size_t b0 = 0; b0 < n; b0 += window_blocks_) {
    const auto count = static_cast<uint32_t>(std::min<size_t>(window_blocks_, n - b0));
    std::vector<std::byte> req, reply;
    proto::encode(proto::LoadRequest{.lease = match.lease, .first_block = static_cast<uint32_t>(b0),
                                     .block_count = count, .window_offset = 0},
                  req);
    KVTIER_RETURN_IF_ERROR(call(Op::kLoad, req, reply));
    // The window is reused by the next chunk: this chunk's copy must be complete first.
    auto h = scatter_blocks(layout_, window_, dst, b0, count, eng);
    if (!h) return h.status();
    KVTIER_RETURN_IF_ERROR(h->wait());
  }
  return finished_handle(layout_.num_layers);
}

Status Client::release(const Match& match) {
  if (match.lease == kNoLease) return Status::ok();
  std::lock_guard lock(mu_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::ReleaseRequest{.lease = match.lease}, req);
  return call(Op::kRelease, req, reply);
}

Result<size_t> Client::save(NamespaceId ns, std::span<const TokenId> tokens, const KvBuffer& src, Priority priority,
                            std::span<const BlockExtra> extras, size_t first_block) {
  auto checked = check_save(layout_, tokens.size(), src, extras, first_block, /*paged_device_ok=*/false);
  if (!checked) return checked.status();
  const size_t full = *checked;
  const uint32_t bt = layout_.block_tokens;
  if (full == first_block) return size_t{0};
  if (window_blocks_ == 0) return invalid("the shared window cannot hold one block");
  std::lock_guard lock(mu_);
  TransferEngine* eng = nullptr;
  if (src.memory != LocationKind::kHost) {
    auto e = engine();
    if (!e) return e.status();
    eng = *e;
  }
  size_t saved = 0;
  for (size_t b0 = first_block; b0 < full; b0 += window_blocks_) {
    const size_t count = std::min<size_t>(window_blocks_, full - b0);
    KVTIER_RETURN_IF_ERROR(gather_blocks(layout_, src, b0 - first_block, count, window_, eng));
    const size_t end = b0 + count;
    std::vector<std::byte> req, reply;
    auto ex = extras_below(extras, end);
    proto::encode(proto::SaveRequest{.namespace_id = ns, .priority = static_cast<uint8_t>(priority),
                                     .first_block = static_cast<uint32_t>(b0), .window_offset = 0,
                                     .tokens = {tokens.begin(), tokens.begin() + end * bt},
                                     .extras = to_vector(ex)},
                  req);
    KVTIER_RETURN_IF_ERROR(call(Op::kSave, req, reply));
    proto::SaveReply out;
    KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
    saved += out.saved;
  }
  return saved;
}

Result<uint64_t> Client::prefix_call(Op op, NamespaceId ns, uint8_t arg, std::span<const TokenId> tokens,
                                     std::span<const BlockExtra> extras) {
  std::lock_guard lock(mu_);
  std::vector<std::byte> req, reply;
  proto::encode(proto::PrefixRequest{.namespace_id = ns, .arg = arg, .tokens = {tokens.begin(), tokens.end()},
                                     .extras = to_vector(extras)},
                req);
  KVTIER_RETURN_IF_ERROR(call(op, req, reply));
  proto::CountReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return out.count;
}

Result<size_t> Client::prefetch(NamespaceId ns, std::span<const TokenId> tokens, Tier to, std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kPrefetch, ns, static_cast<uint8_t>(to), tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<size_t> Client::pin(NamespaceId ns, std::span<const TokenId> tokens, Priority priority,
                           std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kPin, ns, static_cast<uint8_t>(priority), tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<size_t> Client::unpin(NamespaceId ns, std::span<const TokenId> tokens, std::span<const BlockExtra> extras) {
  auto r = prefix_call(Op::kUnpin, ns, 0, tokens, extras);
  if (!r) return r.status();
  return static_cast<size_t>(*r);
}

Result<std::string> Client::metrics_text() {
  std::lock_guard lock(mu_);
  std::vector<std::byte> reply;
  KVTIER_RETURN_IF_ERROR(call(Op::kStats, {}, reply));
  proto::StatsReply out;
  KVTIER_RETURN_IF_ERROR(proto::decode(reply, out));
  return std::move(out.prometheus_text);
}

}  // namespace kvtier
