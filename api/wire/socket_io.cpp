#include "api/wire/socket_io.h"

#include <cerrno>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

namespace kvtier::proto {
namespace {

Status gone(const char* what) {
  return Status(StatusCode::kUnavailable, std::string(what) + ": " + std::strerror(errno));
}

void close_fds(msghdr& msg, int& keep) {
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
    const size_t n = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < n; ++i) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
      if (keep < 0) keep = fd;  // the first descriptor is the one the protocol passes
      else ::close(fd);         // anything more is unexpected: never leak it
    }
  }
}

/// One recvmsg into buf[0, n), with room for passed descriptors (kept or closed by close_fds).
ssize_t recv_some(int sock, std::byte* buf, size_t n, int flags, int& received_fd) {
  iovec iov{buf, n};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  const ssize_t r = ::recvmsg(sock, &msg, flags | MSG_CMSG_CLOEXEC);
  if (r >= 0 && msg.msg_controllen > 0) close_fds(msg, received_fd);
  return r;
}

}  // namespace

Status send_frame(int sock, uint16_t op, uint32_t request_id, std::span<const std::byte> payload, int pass_fd) {
  if (payload.size() > kMaxPayload) {
    return invalid_argument("request of " + std::to_string(payload.size()) +
                                                    " bytes exceeds the protocol's " + std::to_string(kMaxPayload));
  }
  std::byte header[kHeaderBytes];
  encode_header({.op = op, .request_id = request_id, .payload_bytes = static_cast<uint32_t>(payload.size())}, header);
  iovec iov[2] = {{header, kHeaderBytes}, {const_cast<std::byte*>(payload.data()), payload.size()}};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = payload.empty() ? 1 : 2;
  if (pass_fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &pass_fd, sizeof(int));
  }
  size_t total = kHeaderBytes + payload.size();
  size_t sent = 0;
  while (sent < total) {
    const ssize_t w = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      return gone("send");
    }
    sent += static_cast<size_t>(w);
    if (sent == total) break;
    // A short send: the descriptor went with the first bytes; advance the iovecs past what went.
    msg.msg_control = nullptr;
    msg.msg_controllen = 0;
    size_t skip = static_cast<size_t>(w);
    while (skip > 0 && msg.msg_iovlen > 0) {
      if (skip >= msg.msg_iov[0].iov_len) {
        skip -= msg.msg_iov[0].iov_len;
        ++msg.msg_iov;
        --msg.msg_iovlen;
      } else {
        msg.msg_iov[0].iov_base = static_cast<char*>(msg.msg_iov[0].iov_base) + skip;
        msg.msg_iov[0].iov_len -= skip;
        skip = 0;
      }
    }
  }
  return Status::ok();
}

bool RequestBudget::grow(uint64_t before, uint64_t after) noexcept {
  const uint64_t more = charge_of(after) - charge_of(before);
  if (more > 0) {
    uint64_t now = charged_.load();
    do {
      if (now + more > limit_) return false;
    } while (!charged_.compare_exchange_weak(now, now + more));
  }
  held_.fetch_add(after - before);
  changed();
  return true;
}

void RequestBudget::give_back(uint64_t bytes) noexcept {
  if (bytes == 0) return;
  charged_.fetch_sub(charge_of(bytes));
  held_.fetch_sub(bytes);
  changed();
}

// A waiter registers, then reads the counts under mu_; a change stores the counts, then reads
// waiters_: one of the two always sees the other (sequentially consistent atomics), so a waiter
// that missed a change is woken by it.
void RequestBudget::changed() noexcept {
  if (waiters_.load() == 0) return;
  std::lock_guard lock(mu_);
  cv_.notify_all();
}

bool RequestBudget::wait_until(const std::function<bool()>& ready, std::chrono::milliseconds timeout) {
  waiters_.fetch_add(1);
  bool ok;
  {
    std::unique_lock lock(mu_);
    ok = cv_.wait_for(lock, timeout, ready);
  }
  waiters_.fetch_sub(1);
  return ok;
}

constexpr size_t kReadBuffer = 64 * 1024;
static_assert(kReadBuffer == RequestBudget::kFreeBytesPerFrame, "the free bytes are a read buffer's worth");

FrameReader::FrameReader(int sock, RequestBudget* budget) : sock_(sock), budget_(budget), buf_(kReadBuffer) {}

FrameReader::~FrameReader() {
  if (pending_fd_ >= 0) ::close(pending_fd_);
  if (budget_) budget_->give_back(frame_bytes_);
}

void FrameReader::release_frame(std::vector<std::byte>& payload) noexcept {
  if (budget_) budget_->give_back(frame_bytes_);
  frame_bytes_ = 0;
  if (payload.capacity() > kKeptPayloadCapacity) std::vector<std::byte>().swap(payload);
}

ssize_t FrameReader::receive(std::byte* buf, size_t n, Deadline deadline) {
  const auto start = std::chrono::steady_clock::now();
  int flags = MSG_DONTWAIT;
  for (;;) {
    const ssize_t r = recv_into(buf, n, flags);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    if (flags != 0 && std::chrono::steady_clock::now() - start <= kPollBeforeBlocking) {
      cpu_relax();
      continue;
    }
    if (deadline == kNoDeadline) {
      flags = 0;  // block in recvmsg
      continue;
    }
    flags = MSG_DONTWAIT;  // block in poll, which knows the deadline
    if (!wait_readable(deadline)) {
      errno = ETIMEDOUT;
      return -1;
    }
  }
}

ssize_t FrameReader::fill(Deadline deadline) {
  if (begin_ == end_) begin_ = end_ = 0;
  if (end_ == buf_.size()) {  // the unread tail moves to the front
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  const ssize_t r = receive(buf_.data() + end_, buf_.size() - end_, deadline);
  if (r > 0) end_ += static_cast<size_t>(r);
  return r;
}

bool FrameReader::try_fill() {
  if (begin_ == end_) begin_ = end_ = 0;
  if (end_ == buf_.size()) return true;  // full: the caller has a frame to read
  const ssize_t r = recv_into(buf_.data() + end_, buf_.size() - end_, MSG_DONTWAIT);
  if (r > 0) {
    end_ += static_cast<size_t>(r);
    return true;
  }
  if (r == 0) return true;  // end of stream: next() says so
  return errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
}

bool FrameReader::wait_readable(Deadline deadline) {
  deadline_passed_ = false;
  for (;;) {
    int timeout_ms = -1;
    if (deadline != kNoDeadline) {
      const auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::steady_clock::duration::zero()) {
        deadline_passed_ = true;
        return false;
      }
      // Rounded up: poll's milliseconds must not wake before the deadline and spin.
      const auto ms = std::chrono::ceil<std::chrono::milliseconds>(left).count();
      timeout_ms = static_cast<int>(std::min<int64_t>(ms, 24 * 3600 * 1000));
    }
    pollfd p{sock_, POLLIN, 0};
    const int r = ::poll(&p, 1, timeout_ms);
    if (r > 0) return true;
    if (r < 0 && errno != EINTR) return true;  // the read that follows reports the error
  }
}

ssize_t FrameReader::recv_into(std::byte* buf, size_t n, int flags) {
  const bool had_fd = pending_fd_ >= 0;
  const ssize_t r = recv_some(sock_, buf, n, flags, pending_fd_);
  if (r > 0) received_ += static_cast<uint64_t>(r);
  // The kernel ends a read with the message that carried descriptors, so they belong to the frame
  // that holds the read's last byte.
  if (!had_fd && pending_fd_ >= 0) fd_last_byte_ = received_ - 1;
  return r;
}

Status FrameReader::next(FrameHeader& header, std::vector<std::byte>& payload, int& received_fd, Deadline deadline) {
  received_fd = -1;
  release_frame(payload);
  payload.clear();
  deadline_passed_ = false;
  auto failed_read = [&](const char* where) {
    if (deadline_passed_) return Status(StatusCode::kUnavailable, std::string("no whole frame by the deadline (") + where + ")");
    return gone("recv");
  };
  while (end_ - begin_ < kHeaderBytes) {
    const ssize_t r = fill(deadline);
    if (r < 0) return failed_read("header");
    if (r == 0) {
      if (end_ == begin_) return Status(StatusCode::kUnavailable, "peer closed the connection");
      return Status(StatusCode::kProtocolError, "stream ended inside a frame header");
    }
  }
  const uint64_t frame_start = received_ - (end_ - begin_);
  auto h = decode_header(std::span<const std::byte>(buf_.data() + begin_, kHeaderBytes));
  if (!h) return h.status();
  begin_ += kHeaderBytes;
  header = *h;
  // A descriptor that arrived with this frame's bytes goes out with it; one that came with a
  // later frame's (read ahead into the buffer) waits for that frame.
  struct HandOut {
    FrameReader& r;
    uint64_t frame_end;
    int& out;
    ~HandOut() {
      if (r.pending_fd_ >= 0 && r.fd_last_byte_ < frame_end) out = std::exchange(r.pending_fd_, -1);
    }
  } hand_out{*this, frame_start + kHeaderBytes + header.payload_bytes, received_fd};
  // The payload grows only with bytes that came: what the buffer holds is copied in, and room
  // made for it at most doubles the payload, so the capacity stays within twice what arrived.
  // Once the payload has spare room, reads go straight into it, past the buffer.
  const size_t total = header.payload_bytes;
  size_t got = 0;
  auto take = [&](size_t n) {
    if (budget_ && !budget_->grow(got, got + n)) return false;
    got += n;
    frame_bytes_ = got;
    return true;
  };
  auto over_budget = [&] {
    return Status(StatusCode::kResourceExhausted,
                  "kvtierd holds its limit of " + std::to_string(budget_->limit()) +
                      " bytes of requests in flight (max_inflight_request_bytes); a frame of " +
                      std::to_string(total) + " bytes is refused");
  };
  while (got < total) {
    const size_t buffered = std::min<size_t>(end_ - begin_, total - got);
    if (buffered > 0) {
      if (payload.size() < got + buffered) payload.resize(std::min(total, std::max(got + buffered, 2 * got)));
      if (!take(buffered)) return over_budget();
      std::memcpy(payload.data() + got - buffered, buf_.data() + begin_, buffered);
      begin_ += buffered;
      continue;
    }
    const bool direct = payload.size() > got;
    const ssize_t n = direct ? receive(payload.data() + got, payload.size() - got, deadline) : fill(deadline);
    if (n < 0) return failed_read("payload");
    if (n == 0) return Status(StatusCode::kProtocolError, "stream ended inside a frame payload");
    if (direct && !take(static_cast<size_t>(n))) return over_budget();
  }
  payload.resize(total);
  return Status::ok();
}

Result<int> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return invalid_argument("socket path longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
                                                    " bytes: " + path);
  }
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return gone("socket");
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    Status s(StatusCode::kUnavailable, "cannot connect to kvtierd at " + path + ": " + std::strerror(errno) +
                                           " (is the daemon running? start it with `kvtier serve`)");
    ::close(fd);
    return s;
  }
  return fd;
}

}  // namespace kvtier::proto
