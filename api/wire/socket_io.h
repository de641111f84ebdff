// Frames over a Unix stream socket, for the daemon and its client: whole-buffer reads and writes
// that survive EINTR and short transfers, and one file descriptor passed with SCM_RIGHTS.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <string>
#include <sys/types.h>
#include <vector>

#include "api/wire/protocol.h"
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

/// The daemon-wide budget for request payloads held in memory: frames partly received, and
/// frames being handled. Each frame's first kFreeBytesPerFrame bytes are free: every connection
/// already owns a read buffer that large, so they are bounded by the client limit, and ordinary
/// requests (hello, lookups of up to 16K tokens) never wait on the budget or fail for it while a
/// flood of large frames holds it. Only bytes past that are charged, and only bytes that
/// arrived: a header announcing 8 MiB costs nothing until the bytes come. Thread-safe; the counts
/// are atomics, and a waiter (tests, wait_until) is woken on every change.
class RequestBudget {
 public:
  static constexpr uint64_t kFreeBytesPerFrame = 64 * 1024;
  /// `limit`: the most charged bytes at once (0: nothing past the free bytes).
  explicit RequestBudget(uint64_t limit) noexcept : limit_(limit) {}
  RequestBudget(const RequestBudget&) = delete;
  RequestBudget& operator=(const RequestBudget&) = delete;

  /// A frame that held `before` payload bytes now holds `after` (>= before). False, and nothing
  /// counted, when the charged part would pass the limit.
  [[nodiscard]] bool grow(uint64_t before, uint64_t after) noexcept;
  /// A frame holding `bytes` is done: its bytes are given back.
  void give_back(uint64_t bytes) noexcept;

  uint64_t limit() const noexcept { return limit_; }
  /// Payload bytes held by every frame now, free and charged.
  uint64_t held() const noexcept { return held_.load(); }
  /// The charged part of held(): at most limit().
  uint64_t charged() const noexcept { return charged_.load(); }
  /// Blocks until `ready()` (which reads held() and charged()) is true, or `timeout` passes.
  bool wait_until(const std::function<bool()>& ready, std::chrono::milliseconds timeout);

 private:
  static uint64_t charge_of(uint64_t bytes) noexcept {
    return bytes > kFreeBytesPerFrame ? bytes - kFreeBytesPerFrame : 0;
  }
  void changed() noexcept;

  const uint64_t limit_;
  std::atomic<uint64_t> held_{0}, charged_{0};
  std::atomic<int> waiters_{0};  // wait_until callers: only then does a change take the lock
  std::mutex mu_;
  std::condition_variable cv_;
};

/// Reads frames from one socket. Each read takes whatever has arrived, up to a 64 KiB buffer, so a
/// small frame costs one recvmsg and bytes of the next frame wait in the buffer. Before blocking it
/// polls with non-blocking reads for a few tens of microseconds: a reply usually arrives within
/// that, and waking a blocked thread costs as much again on a virtual machine. One reader per
/// socket, used by one thread at a time.
///
/// A payload grows with the bytes that arrive (its capacity at most twice what came, never the
/// size the header announces), and with a RequestBudget each frame's bytes are charged to it
/// until release_frame() or the next next(). A deadline bounds the wait for a whole frame.
class FrameReader {
 public:
  using Deadline = std::chrono::steady_clock::time_point;
  static constexpr Deadline kNoDeadline = Deadline::max();
  /// Capacity a payload keeps between frames; a larger one is freed by release_frame().
  static constexpr size_t kKeptPayloadCapacity = 64 * 1024;

  /// `budget` (may be null: no accounting) must outlive the reader.
  explicit FrameReader(int sock, RequestBudget* budget = nullptr);
  ~FrameReader();
  FrameReader(const FrameReader&) = delete;
  FrameReader& operator=(const FrameReader&) = delete;

  /// Reads one frame. kUnavailable at a clean end of stream (the peer closed between frames),
  /// kProtocolError for a bad header or a stream cut inside a frame. A descriptor passed with the
  /// frame is returned in `received_fd` (else -1); the caller owns it. The header is returned even
  /// when its version is not ours, so the caller can answer before closing.
  /// kResourceExhausted when the budget cannot take the payload's bytes (the header is returned,
  /// the rest of the frame is not read: close the connection). When the frame is not whole by
  /// `deadline`: kUnavailable, and deadline_passed() is true.
  Status next(FrameHeader& header, std::vector<std::byte>& payload, int& received_fd,
              Deadline deadline = kNoDeadline);
  /// The frame last returned is handled: its bytes go back to the budget, and a payload larger
  /// than kKeptPayloadCapacity is freed. next() does it too.
  void release_frame(std::vector<std::byte>& payload) noexcept;
  /// True when the last next() or wait_readable() ended at its deadline.
  bool deadline_passed() const noexcept { return deadline_passed_; }

  /// True when bytes of a frame wait in the buffer.
  bool buffered() const noexcept { return end_ > begin_; }
  /// One non-blocking read: true when the socket had something — bytes, the end of the stream or
  /// an error (next() then reports it). A descriptor that came along waits for next().
  bool try_fill();
  /// Blocks until the socket is readable (bytes, end of stream or error): true, or false when
  /// `deadline` came first (deadline_passed() then says so too).
  bool wait_readable(Deadline deadline = kNoDeadline);

 private:
  /// Reads at least one byte into the buffer (after a bounded poll), or returns 0 at end of
  /// stream, -1 on error or at the deadline (deadline_passed_).
  ssize_t fill(Deadline deadline);
  /// One read of at most `n` bytes into `buf`: polls for kPollBeforeBlocking, then blocks until
  /// bytes come or `deadline`. Same returns as fill().
  ssize_t receive(std::byte* buf, size_t n, Deadline deadline);
  /// One recvmsg into buf[0, n); counts the bytes and notes where a passed descriptor came.
  ssize_t recv_into(std::byte* buf, size_t n, int flags);

  int sock_;
  RequestBudget* budget_;
  uint64_t frame_bytes_ = 0;    // payload bytes of the current frame, counted in budget_
  bool deadline_passed_ = false;
  int pending_fd_ = -1;         // a passed descriptor not yet handed out with its frame
  uint64_t received_ = 0;       // bytes read from the socket so far
  uint64_t fd_last_byte_ = 0;   // stream offset of the last byte of the read that brought pending_fd_
  std::vector<std::byte> buf_;
  size_t begin_ = 0, end_ = 0;  // unread bytes are buf_[begin_, end_)
};

/// Connects to a Unix socket path. kUnavailable when nothing listens there.
Result<int> connect_unix(const std::string& path);

}  // namespace kvtier::proto
