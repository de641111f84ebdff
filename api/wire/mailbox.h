// Mailbox: the fast path for a client's small requests (kvtier/client.h, api/server/server.cpp).
//
// A round trip over the Unix socket costs four or more system calls, and on a virtual machine
// those dominate a lookup (~12 µs of a ~21 µs 4K-token lookup). A client therefore maps, after its
// shared-memory window in the same memfd, a mailbox (516 KiB by default): one slot for a request
// frame, one for the reply frame, each with a sequence number. While the peer is spinning (it polls for ~30 µs
// after each message), a request and its reply cross with no system call at all.
//
// The socket stays the connection: identity, hello, descriptor passing, large frames, the end of
// a session. A reader that stops spinning "parks": it sets its parked flag, fences, checks the
// sequence once more and blocks on the socket. A writer publishes, fences and, when the reader is
// parked, sends a kDoorbell frame over the socket. The two fences make a missed wake-up
// impossible (the Dekker pattern: one side always sees the other's store); a doorbell that
// arrives when the reader was not asleep after all is ignored.
//
// Frames in the mailbox are the same bytes as on the socket (header, payload). The daemon copies
// a request out once, with its length read once and bounded, and decodes that copy with the same
// checks as a socket frame: a client that scribbles on its own mailbox only garbles its own
// request. A reply too large for its slot goes over the socket and the slot says so.
#pragma once

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "api/wire/protocol.h"
#include "api/wire/socket_io.h"
#include "kvtier/status.h"

namespace kvtier::proto {

/// A mailbox is a 4 KiB page of sequence numbers and flags, then two equal slots.
inline constexpr uint32_t kMinMailboxBytes = 12 * 1024;
inline constexpr uint32_t kMaxMailboxBytes = 16u << 20;
/// The client's default: 256 KiB slots, a lookup of up to ~64K tokens.
inline constexpr uint32_t kDefaultMailboxBytes = 4096 + 2 * (256u << 10);
/// Ok sizes: 0 (none), or a multiple of 4096 in [kMinMailboxBytes, kMaxMailboxBytes].
constexpr bool valid_mailbox_bytes(uint64_t bytes) noexcept {
  return bytes == 0 || (bytes % 4096 == 0 && bytes >= kMinMailboxBytes && bytes <= kMaxMailboxBytes);
}

/// Where the mailbox starts in a client's memfd: after the window, page-aligned.
constexpr uint64_t mailbox_offset(uint64_t window_bytes) noexcept { return (window_bytes + 4095) / 4096 * 4096; }
/// The size of a client's memfd: its window, then its mailbox (when it has one).
constexpr uint64_t memfd_bytes(uint64_t window_bytes, uint32_t mailbox_bytes) noexcept {
  return mailbox_bytes ? mailbox_offset(window_bytes) + mailbox_bytes : window_bytes;
}

/// A frame as a mailbox slot holds it: the header, then the payload.
void build_frame(uint16_t op, uint32_t request_id, std::span<const std::byte> payload, std::vector<std::byte>& out);
/// Splits a frame read out of a slot, with the checks a socket frame gets: kProtocolError for a
/// bad header or a length that differs from the header's.
Status split_frame(std::span<const std::byte> frame, FrameHeader& header, std::span<const std::byte>& payload);

/// How long a reader spins for its next message before it parks, adapted to what spinning
/// bought lately. A message the peer published within kPollBeforeBlocking of the wait's start
/// (Mailbox::published_at says when) would have been caught spinning: the budget goes back to
/// the full kPollBeforeBlocking. A later one halves the budget, so a reader whose peer is slow
/// (a loaded machine, a client that thinks between requests) stops spinning after five such
/// waits and leaves the core to the threads doing the work. One per reader; not thread-safe.
class AdaptiveSpin {
 public:
  std::chrono::nanoseconds budget() const noexcept { return budget_; }
  /// The message waited for was published at `published`; the wait began at `start`.
  void observe(std::chrono::steady_clock::time_point start, std::chrono::steady_clock::time_point published) noexcept {
    if (published - start <= kPollBeforeBlocking) {
      budget_ = kPollBeforeBlocking;
    } else {
      budget_ = budget_ / 2 < std::chrono::microseconds(1) ? std::chrono::nanoseconds(0) : budget_ / 2;
    }
  }

 private:
  std::chrono::nanoseconds budget_ = kPollBeforeBlocking;
};

class Mailbox {
 public:
  enum Slot { kRequest = 0, kReply = 1 };

  Mailbox() = default;
  /// `base`: `bytes` of shared memory (valid_mailbox_bytes), page-aligned, zero when new.
  Mailbox(std::byte* base, uint32_t bytes) noexcept : base_(base), slot_bytes_((bytes - 4096) / 2) {}
  explicit operator bool() const noexcept { return base_ != nullptr; }

  /// The sequence number last published in `slot` (acquire: the frame is visible after it).
  uint32_t seq(Slot slot) const noexcept { return word(seq_at(slot)).load(std::memory_order_acquire); }

  /// When the message last published in `slot` was published, on the peer's steady clock (the
  /// same CLOCK_MONOTONIC in every process). The peer writes it: use it only for heuristics, such
  /// as how long to spin (AdaptiveSpin), never for a decision that matters to anyone else.
  std::chrono::steady_clock::time_point published_at(Slot slot) const noexcept {
    return std::chrono::steady_clock::time_point(std::chrono::nanoseconds(stamp(slot).load(std::memory_order_relaxed)));
  }

  /// The largest frame a slot holds.
  uint32_t slot_bytes() const noexcept { return slot_bytes_; }

  /// Writes `frame` (at most slot_bytes()) into `slot` and publishes it as `seq`. Returns
  /// true when the slot's reader is parked: the caller must ring the doorbell.
  bool publish(Slot slot, std::span<const std::byte> frame, uint32_t seq) noexcept;
  /// Publishes `seq` with no frame: the message went over the socket. Same return.
  bool publish_elsewhere(Slot slot, uint32_t seq) noexcept { return publish(slot, {}, seq); }

  /// Copies the frame published in `slot` into `out` (empty: it went over the socket). The length
  /// is read once and bounded by slot_bytes() whatever the peer wrote.
  void read(Slot slot, std::vector<std::byte>& out) const;

  /// The reader of `slot` parks: sets its flag, fences, and returns seq(slot) read after the
  /// fence. If that is still the old number, the reader may block on the socket: a writer that
  /// publishes from now on will ring. unpark() when awake again.
  uint32_t park(Slot slot) noexcept;
  void unpark(Slot slot) noexcept { word(parked_at(slot)).store(0, std::memory_order_relaxed); }

 private:
  static constexpr size_t seq_at(Slot s) noexcept { return s == kRequest ? 0 : 128; }
  static constexpr size_t parked_at(Slot s) noexcept { return s == kRequest ? 64 : 192; }
  static constexpr size_t len_at(Slot s) noexcept { return s == kRequest ? 256 : 320; }
  static constexpr size_t stamp_at(Slot s) noexcept { return s == kRequest ? 384 : 448; }
  size_t frame_at(Slot s) const noexcept { return s == kRequest ? 4096 : 4096 + size_t(slot_bytes_); }

  std::atomic_ref<uint32_t> word(size_t at) const noexcept {
    return std::atomic_ref<uint32_t>(*reinterpret_cast<uint32_t*>(base_ + at));
  }
  // The publish time of `s`, in steady-clock nanoseconds.
  std::atomic_ref<uint64_t> stamp(Slot s) const noexcept {
    return std::atomic_ref<uint64_t>(*reinterpret_cast<uint64_t*>(base_ + stamp_at(s)));
  }

  std::byte* base_ = nullptr;
  uint32_t slot_bytes_ = 0;
};

}  // namespace kvtier::proto
