#include "api/src/socket_io.h"

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
    return Status(StatusCode::kInvalidArgument, "request of " + std::to_string(payload.size()) +
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

constexpr size_t kReadBuffer = 64 * 1024;

FrameReader::FrameReader(int sock) : sock_(sock), buf_(kReadBuffer) {}

FrameReader::~FrameReader() {
  if (pending_fd_ >= 0) ::close(pending_fd_);
}

ssize_t FrameReader::fill() {
  if (begin_ == end_) begin_ = end_ = 0;
  if (end_ == buf_.size()) {  // the unread tail moves to the front
    std::memmove(buf_.data(), buf_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  const auto start = std::chrono::steady_clock::now();
  int flags = MSG_DONTWAIT;
  for (;;) {
    const ssize_t r = recv_into(buf_.data() + end_, buf_.size() - end_, flags);
    if (r >= 0) {
      end_ += static_cast<size_t>(r);
      return r;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
    if (std::chrono::steady_clock::now() - start > kPollBeforeBlocking) flags &= ~MSG_DONTWAIT;  // block
    cpu_relax();
  }
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

void FrameReader::wait_readable() const {
  pollfd p{sock_, POLLIN, 0};
  while (::poll(&p, 1, -1) < 0 && errno == EINTR) {
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

Status FrameReader::next(FrameHeader& header, std::vector<std::byte>& payload, int& received_fd) {
  received_fd = -1;
  while (end_ - begin_ < kHeaderBytes) {
    const ssize_t r = fill();
    if (r < 0) return gone("recv");
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
  payload.resize(header.payload_bytes);
  const size_t buffered = std::min<size_t>(end_ - begin_, payload.size());
  if (buffered > 0) std::memcpy(payload.data(), buf_.data() + begin_, buffered);
  begin_ += buffered;
  // The rest straight into the payload, past the buffer.
  for (size_t got = buffered; got < payload.size();) {
    const ssize_t n = recv_into(payload.data() + got, payload.size() - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return gone("recv");
    }
    if (n == 0) return Status(StatusCode::kProtocolError, "stream ended inside a frame payload");
    got += static_cast<size_t>(n);
  }
  return Status::ok();
}

Result<int> connect_unix(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) {
    return Status(StatusCode::kInvalidArgument, "socket path longer than " + std::to_string(sizeof(addr.sun_path) - 1) +
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
