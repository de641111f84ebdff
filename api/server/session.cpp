// The request loop of one kvtierd connection (Server::serve) and its end (Server::end_session).
#include "api/server/session.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <functional>
#include <optional>
#include <unordered_set>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "api/wire/mailbox.h"
#include "api/wire/protocol.h"
#include "api/wire/socket_io.h"
#include "api/kv_copy/kv_copy.h"
#include "transfer/shared_device_memory.h"

#include "api/server/instruments.h"
#include "api/server/request_handler.h"

namespace kvtier {

using proto::Op;
using server_detail::Handler;

namespace {

enum class Arrival { kMailbox, kSocket, kDeadline };

/// Waits for the session's next request: kMailbox when it is in the mailbox, kSocket when the
/// socket has something (a frame, a doorbell, the end of the stream), kDeadline when neither came
/// by `deadline`. Polls both for the session's spin budget (AdaptiveSpin), the socket every 64
/// rounds, then parks (mailbox.h) and blocks on the socket until the deadline. It spins only
/// while it holds one of the `max_spinning` places in `spinning`.
Arrival wait_request(Server::Session& s, proto::FrameReader& reader, std::atomic<int>& spinning,
                     int max_spinning, proto::FrameReader::Deadline deadline) {
  using proto::Mailbox;
  const auto start = std::chrono::steady_clock::now();
  const auto budget = s.spin.budget();
  auto arrived = [&] {
    s.spin.observe(start, s.mailbox.published_at(Mailbox::kRequest));
    return Arrival::kMailbox;
  };
  if (budget.count() > 0 && spinning.fetch_add(1, std::memory_order_relaxed) < max_spinning) {
    struct Leave {
      std::atomic<int>& n;
      ~Leave() { n.fetch_sub(1, std::memory_order_relaxed); }
    } leave{spinning};
    for (uint32_t i = 1;; ++i) {
      if (s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen) return arrived();
      if (i % 64 == 0) {
        if (reader.try_fill()) return Arrival::kSocket;
        if (std::chrono::steady_clock::now() - start > budget) break;
      }
      proto::cpu_relax();
    }
  } else if (budget.count() > 0) {
    spinning.fetch_sub(1, std::memory_order_relaxed);  // every place is taken: park at once
  }
  bool readable = true;
  if (s.mailbox.park(Mailbox::kRequest) == s.mailbox_seen) readable = reader.wait_readable(deadline);
  s.mailbox.unpark(Mailbox::kRequest);
  // A request published as the deadline passed is still served.
  if (s.mailbox.seq(Mailbox::kRequest) != s.mailbox_seen) return arrived();
  return readable ? Arrival::kSocket : Arrival::kDeadline;
}

/// True when the idle deadline may close the session: it holds nothing a client would lose
/// (service_config.h idle_timeout_ms).
bool may_idle_out(const Server::Session& s) {
  return s.leases.empty() && s.pins.size() == 0 && s.regions.empty();
}


}  // namespace

void Server::serve(std::shared_ptr<Session> session) {
  Session& s = *session;
  proto::FrameHeader header;
  std::vector<std::byte> payload;
  std::vector<std::byte> reply;
  std::vector<std::byte> frame;  // a mailbox frame, in or out
  proto::FrameReader reader(s.fd, request_budget_.get());
  proto::RequestBudget& budget = *request_budget_;
  uint64_t mailbox_bytes = 0;  // of the mailbox request being handled, counted in `budget`
  bool from_mailbox = false;
  // A reply goes back the way its request came; one too large for the mailbox goes over the
  // socket and the mailbox says so.
  auto send_reply = [&](uint16_t op, uint32_t id) -> Status {
    if (!from_mailbox) return proto::send_frame(s.fd, op, id, reply);
    using proto::Mailbox;
    bool ring;
    if (proto::kHeaderBytes + reply.size() <= s.mailbox.slot_bytes()) {
      proto::build_frame(op, id, reply, frame);
      ring = s.mailbox.publish(Mailbox::kReply, frame, s.mailbox_seen);
    } else {
      KVTIER_RETURN_IF_ERROR(proto::send_frame(s.fd, op, id, reply));
      ring = s.mailbox.publish_elsewhere(Mailbox::kReply, s.mailbox_seen);
    }
    if (!ring) return Status::ok();
    return proto::send_frame(s.fd, static_cast<uint16_t>(Op::kDoorbell) | proto::kReplyBit, 0, {});
  };
  using Clock = std::chrono::steady_clock;
  // The next request must be whole by this time: the hello deadline counts from the accept, the
  // idle one from the last reply, and only while the session holds nothing (may_idle_out).
  auto request_deadline = [&]() -> proto::FrameReader::Deadline {
    if (!s.hello_done) {
      if (config_.hello_timeout_ms == 0) return proto::FrameReader::kNoDeadline;
      return s.accepted_at + std::chrono::milliseconds(config_.hello_timeout_ms);
    }
    if (config_.idle_timeout_ms == 0 || !may_idle_out(s)) return proto::FrameReader::kNoDeadline;
    return Clock::now() + std::chrono::milliseconds(config_.idle_timeout_ms);
  };
  auto timed_out = [&] {
    if (!s.hello_done) {
      m_->hello_timeouts->add(1);
      spdlog::warn("kvtierd: closing connection {} (pid {} uid {}): no hello within {} ms", s.id, s.pid, s.uid,
                   config_.hello_timeout_ms);
      // Answered like a refused peer (accept_loop), so a client that is merely slow sees why.
      reply.clear();
      proto::encode_status(Status(StatusCode::kUnavailable, "no hello within hello_timeout_ms (" +
                                                                std::to_string(config_.hello_timeout_ms) + " ms)"),
                           reply);
      proto::send_frame(s.fd, static_cast<uint16_t>(Op::kHello) | proto::kReplyBit, 0, reply).ignore();
    } else {
      m_->idle_timeouts->add(1);
      spdlog::warn("kvtierd: closing client {} '{}' (pid {} uid {}): idle for {} ms with no lease, pin or "
                   "registered memory", s.id, s.name, s.pid, s.uid, config_.idle_timeout_ms);
    }
  };
  // Ends the handling of a request: its bytes leave the budget, large buffers are freed.
  auto request_done = [&] {
    reader.release_frame(payload);
    budget.give_back(mailbox_bytes);
    mailbox_bytes = 0;
    if (frame.capacity() > proto::FrameReader::kKeptPayloadCapacity) std::vector<std::byte>().swap(frame);
  };
  for (;;) {
    request_done();
    int passed_fd = -1;
    Status got;
    const proto::FrameReader::Deadline deadline = request_deadline();
    Arrival arrival = Arrival::kSocket;
    if (s.mailbox && !reader.buffered()) arrival = wait_request(s, reader, spinning_, max_spinning_, deadline);
    if (arrival == Arrival::kDeadline) {
      timed_out();
      break;
    }
    from_mailbox = arrival == Arrival::kMailbox;
    if (from_mailbox) {
      s.mailbox_seen = s.mailbox.seq(proto::Mailbox::kRequest);
      s.mailbox.read(proto::Mailbox::kRequest, frame);
      std::span<const std::byte> body;
      got = proto::split_frame(frame, header, body);
      // A mailbox frame (at most a slot, which the client sized at hello) is charged like a
      // socket frame while it is handled; both copies of it are freed after.
      if (got && !budget.grow(0, body.size())) {
        got = Status(StatusCode::kResourceExhausted,
                     "kvtierd holds its limit of " + std::to_string(budget.limit()) +
                         " bytes of requests in flight (max_inflight_request_bytes); a frame of " +
                         std::to_string(body.size()) + " bytes is refused");
      } else if (got) {
        mailbox_bytes = body.size();
        payload.assign(body.begin(), body.end());
      }
    } else {
      got = reader.next(header, payload, passed_fd, deadline);
    }
    if (!got) {
      if (passed_fd >= 0) ::close(passed_fd);
      if (!from_mailbox && reader.deadline_passed()) {
        timed_out();
        break;
      }
      if (got.code() == StatusCode::kProtocolError || got.code() == StatusCode::kResourceExhausted) {
        if (got.code() == StatusCode::kProtocolError) {
          m_->protocol_errors->add(1);
        } else {
          m_->requests_over_budget->add(1);
          spdlog::warn("kvtierd: closing client {} (pid {} uid {}): {}", s.id, s.pid, s.uid, got.to_string());
        }
        reply.clear();
        proto::encode_status(got, reply);
        send_reply(header.op | proto::kReplyBit, header.request_id).ignore();
      }
      break;  // end of stream, a frame we cannot parse or hold: close
    }
    if (header.op == static_cast<uint16_t>(Op::kDoorbell) && header.version == proto::kVersion &&
        payload.empty() && !from_mailbox && passed_fd < 0) {
      continue;  // look at the mailbox again
    }
    const auto t0 = std::chrono::steady_clock::now();
    Handler h{*this, *store_, config_, s, passed_fd};
    Status st;
    if (header.version != proto::kVersion) {
      st = Status(StatusCode::kProtocolError, "unsupported protocol version " + std::to_string(header.version) +
                                                  "; this kvtierd speaks " + std::to_string(proto::kVersion));
      h.fatal = true;
    } else if (!proto::is_known_op(header.op) || header.op == static_cast<uint16_t>(Op::kDoorbell)) {
      st = Status(StatusCode::kProtocolError, "unknown operation " + std::to_string(header.op));
      h.fatal = true;
    } else if (!s.hello_done && header.op != static_cast<uint16_t>(Op::kHello)) {
      st = Status(StatusCode::kProtocolError, "the first request must be hello");
      h.fatal = true;
    } else {
      switch (static_cast<Op>(header.op)) {
        case Op::kHello: st = h.hello(payload); break;
        case Op::kOpenNamespace: st = h.open_namespace(payload); break;
        case Op::kLookup: st = h.lookup(payload); break;
        case Op::kLoad: st = h.load(payload); break;
        case Op::kRelease: st = h.release(payload); break;
        case Op::kSave: st = h.save(payload); break;
        case Op::kLoadTo: st = h.load_to(payload); break;
        case Op::kSaveFrom: st = h.save_from(payload); break;
        case Op::kRegisterMemory: st = h.register_memory(payload); break;
        case Op::kUnregisterMemory: st = h.unregister_memory(payload); break;
        case Op::kPrefetch:
        case Op::kPin:
        case Op::kUnpin: st = h.prefix_op(static_cast<Op>(header.op), payload); break;
        case Op::kInspect: st = h.inspect(payload); break;
        case Op::kDoctor: st = h.doctor(payload); break;
        case Op::kExportList: st = h.export_list(payload); break;
        case Op::kExportRead: st = h.export_read(payload); break;
        case Op::kObjectPut: st = h.object_put(payload); break;
        case Op::kObjectGet: st = h.object_get(payload); break;
        case Op::kObjectExists:
        case Op::kObjectRemove: st = h.object_keys(static_cast<Op>(header.op), payload); break;
        case Op::kDoorbell: break;  // refused above: it never reaches a handler
        case Op::kStats:
          if (!payload.empty()) {
            st = Status(StatusCode::kProtocolError, "stats takes no payload");
            h.fatal = true;
          } else {
            proto::encode(proto::StatsReply{.prometheus_text = metrics_text()}, h.body);
          }
          break;
      }
    }
    if (passed_fd >= 0) ::close(passed_fd);  // mapped (hello) or unexpected: either way not kept
    reply.clear();
    proto::encode_status(st, reply);
    if (st.is_ok()) reply.insert(reply.end(), h.body.begin(), h.body.end());
    // The request's bytes leave the budget before its reply goes: a client that saw the reply
    // must not find them still held (a test counting held bytes raced with this, 8 bytes off).
    request_done();
    const Status sent = send_reply(header.op | proto::kReplyBit, header.request_id);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (proto::is_known_op(header.op) && m_->ops[header.op].requests != nullptr) {  // not doorbells
      Instruments::PerOp& p = m_->ops[header.op];
      p.requests->add(1);
      if (!st) p.errors->add(1);
      p.seconds->observe(secs);
    }
    m_->tokens_restored->add(h.restored_tokens);
    m_->bytes_loaded->add(h.loaded_bytes);
    m_->bytes_saved->add(h.saved_bytes);
    m_->blocks_from_nvme->add(h.nvme_blocks);
    m_->lookup_tokens->add(h.asked_tokens);
    m_->lookup_hit_tokens->add(h.hit_tokens);
    if (Instruments::PerTenant* t = m_->of(h.tenant)) {
      if (h.asked_tokens) t->lookup_tokens->add(h.asked_tokens);
      if (h.hit_tokens) t->hit_tokens->add(h.hit_tokens);
      if (h.saved_bytes) t->save_bytes->add(h.saved_bytes);
      if (h.restored_tokens) t->restored_tokens->add(h.restored_tokens);
    }
    if (h.loaded_blocks > 0) m_->load_seconds_per_block->observe(secs / h.loaded_blocks);
    if (h.fatal) {
      m_->protocol_errors->add(1);
      spdlog::warn("kvtierd: closing client {} (pid {}): {}", s.id, s.pid, st.to_string());
      break;
    }
    if (!sent) break;
  }
  request_done();
  end_session(s);
}

void Server::end_session(Session& s) {
  PrefixIndex& index = store_->tiers().index();
  for (auto& [lease, held] : s.leases) index.release(lease).ignore();  // kNotFound: expired already
  s.leases.clear();
  s.pins.unpin_all(index);
  for (const auto& [tenant, n] : s.tenant_pins) give_tenant_pins(*tenant, n);
  s.tenant_pins.clear();
  s.regions.clear();  // unmapped: the client's memory is its own again
  if (s.window) ::munmap(s.window, s.mapped_bytes);
  s.window = nullptr;
  m_->clients_connected->add(-1);
  std::lock_guard lock(mu_);
  // Closed under mu_, after leaving sessions_: the stop path shuts down every listed session's
  // fd under the same lock, and must never touch a descriptor number already reused.
  sessions_.erase(s.id);
  if (s.uid != 0) {
    auto it = clients_of_uid_.find(s.uid);
    if (it != clients_of_uid_.end() && --it->second == 0) clients_of_uid_.erase(it);
  }
  ::close(s.fd);
  s.fd = -1;
  --active_;
  drained_.notify_all();
}

}  // namespace kvtier
