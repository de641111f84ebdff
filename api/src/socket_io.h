// Frames over a Unix stream socket, for the daemon and its client: whole-buffer reads and writes
// that survive EINTR and short transfers, and one file descriptor passed with SCM_RIGHTS.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <sys/types.h>
#include <vector>

#include "api/src/protocol.h"
#include "kvtier/status.h"

namespace kvtier::proto {

/// How long a reader polls for the next message before it blocks (the socket reader, the mailbox
/// on both sides): a reply usually arrives within tens of microseconds, and a blocked thread's
/// wake-up costs about as much again on a virtual machine. Bounded, so an idle connection costs
/// nothing after it.
inline constexpr std::chrono::nanoseconds kPollBeforeBlocking{30'000};

/// One round of a polling loop: tells the CPU this thread spins.
inline void cpu_relax() noexcept {
#if defined(__x86_64__)
  __builtin_ia32_pause();
#endif
}

/// Writes a frame (header + payload). `pass_fd` >= 0 rides along with the header (SCM_RIGHTS).
/// kUnavailable when the peer is gone. Never raises SIGPIPE.
Status send_frame(int sock, uint16_t op, uint32_t request_id, std::span<const std::byte> payload,
                  int pass_fd = -1);

/// Reads frames from one socket. Each read takes whatever has arrived, up to a 64 KiB buffer, so a
/// small frame costs one recvmsg and bytes of the next frame wait in the buffer. Before blocking it
/// polls with non-blocking reads for a few tens of microseconds: a reply usually arrives within
/// that, and waking a blocked thread costs as much again on a virtual machine. One reader per
/// socket, used by one thread at a time.
class FrameReader {
 public:
  explicit FrameReader(int sock);
  ~FrameReader();
  FrameReader(const FrameReader&) = delete;
  FrameReader& operator=(const FrameReader&) = delete;

  /// Reads one frame. kUnavailable at a clean end of stream (the peer closed between frames),
  /// kProtocolError for a bad header or a stream cut inside a frame. A descriptor passed with the
  /// frame is returned in `received_fd` (else -1); the caller owns it. The header is returned even
  /// when its version is not ours, so the caller can answer before closing.
  Status next(FrameHeader& header, std::vector<std::byte>& payload, int& received_fd);

  /// True when bytes of a frame wait in the buffer.
  bool buffered() const noexcept { return end_ > begin_; }
  /// One non-blocking read: true when the socket had something — bytes, the end of the stream or
  /// an error (next() then reports it). A descriptor that came along waits for next().
  bool try_fill();
  /// Blocks until the socket is readable (bytes, end of stream or error).
  void wait_readable() const;

 private:
  /// Reads at least one byte into the buffer (after a bounded poll), or returns 0 at end of
  /// stream, -1 on error.
  ssize_t fill();
  /// One recvmsg into buf[0, n); counts the bytes and notes where a passed descriptor came.
  ssize_t recv_into(std::byte* buf, size_t n, int flags);

  int sock_;
  int pending_fd_ = -1;         // a passed descriptor not yet handed out with its frame
  uint64_t received_ = 0;       // bytes read from the socket so far
  uint64_t fd_last_byte_ = 0;   // stream offset of the last byte of the read that brought pending_fd_
  std::vector<std::byte> buf_;
  size_t begin_ = 0, end_ = 0;  // unread bytes are buf_[begin_, end_)
};

/// Connects to a Unix socket path. kUnavailable when nothing listens there.
Result<int> connect_unix(const std::string& path);

}  // namespace kvtier::proto
