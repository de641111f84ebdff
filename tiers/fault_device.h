// FaultInjectingDevice: wraps any StorageDevice and fails on purpose, as RocksDB's
// FaultInjectionTestFS and Navy's MockDevice do, so tests prove that every error reaches the
// caller and that the tier keeps serving afterwards. The plan can change while I/O runs.
#pragma once

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>

#include "tiers/storage_device.h"

namespace kvtier {

/// What to break. Every field is off by default; counts restart at each set_plan().
struct FaultPlan {
  /// Seed of the one-in-N draws (default 0), so a failing run can be replayed.
  uint64_t seed = 0;
  /// Fail about one read in N with EIO (default 0: never).
  uint32_t read_error_one_in = 0;
  /// Fail about one write in N with EIO, nothing written (default 0: never).
  uint32_t write_error_one_in = 0;
  /// Fail the Nth write from now (1-based) with `fail_nth_write_errno`, nothing written
  /// (default 0: never).
  uint64_t fail_nth_write = 0;
  /// The errno of `fail_nth_write` (default EIO; ENOSPC becomes kResourceExhausted).
  int fail_nth_write_errno = EIO;
  /// Fail every write whose range covers this byte offset with EIO (default: none).
  std::optional<uint64_t> fail_writes_at_offset;
  /// Once this many bytes have been written since set_plan(), fail every further write with
  /// ENOSPC (default: none).
  std::optional<uint64_t> enospc_after_bytes;
  /// The next write stores only its first half (rounded down to kIoAlignment) and returns EIO
  /// (default false). Fires once.
  bool short_write_once = false;
  /// The Nth write from now (1-based) stores only its first `torn_write_bytes` bytes and returns
  /// EIO: power lost mid-write (default 0: never).
  uint64_t torn_write_nth = 0;
  /// Bytes a torn write keeps, rounded down to kIoAlignment (default 4096: one page).
  uint64_t torn_write_bytes = 4096;
  /// Every flush fails with EIO (default false).
  bool fail_flush = false;
  /// Every read takes at least this long, its bytes right: a slow or throttled device
  /// (default 0: no delay).
  uint32_t read_delay_us = 0;
};

/// How many faults were injected, by kind. Monotonic across plans.
struct FaultCounters {
  std::atomic<uint64_t> read_errors{0};
  std::atomic<uint64_t> write_errors{0};  // one-in-N, Nth and at-offset write failures
  std::atomic<uint64_t> enospc{0};
  std::atomic<uint64_t> short_writes{0};
  std::atomic<uint64_t> torn_writes{0};
  std::atomic<uint64_t> flush_errors{0};
  std::atomic<uint64_t> delayed_reads{0};
};

class FaultInjectingDevice final : public StorageDevice {
 public:
  explicit FaultInjectingDevice(std::unique_ptr<StorageDevice> inner, FaultPlan plan = {});

  /// Replaces the plan and restarts its counts (writes seen, bytes written, the random stream).
  void set_plan(const FaultPlan& plan);
  /// set_plan(FaultPlan{}): the device works again.
  void clear_faults() { set_plan(FaultPlan{}); }
  FaultPlan plan() const;

  const FaultCounters& faults() const noexcept { return faults_; }
  StorageDevice& inner() noexcept { return *inner_; }
  const StorageDevice& inner() const noexcept { return *inner_; }

  /// -1: an I/O engine must go through read()/write() so the faults apply.
  int native_fd() const noexcept override { return -1; }
  bool direct_io() const noexcept override { return inner_->direct_io(); }
  std::string describe() const override { return "fault-injecting " + inner_->describe(); }

 private:
  enum class WriteFault { kNone, kFail, kEnospc, kPartial };
  struct WriteDecision {
    WriteFault fault = WriteFault::kNone;
    int err = 0;
    uint64_t keep_bytes = 0;  // for kPartial
  };

  int read_impl(uint64_t offset, std::span<std::byte> out) override;
  int write_impl(uint64_t offset, std::span<const std::byte> in) override;
  int flush_impl() override;

  WriteDecision decide_write_locked(uint64_t offset, uint64_t length);
  bool draw_one_in_locked(uint32_t n);

  std::unique_ptr<StorageDevice> inner_;
  mutable std::mutex mu_;
  FaultPlan plan_;
  std::mt19937_64 rng_;
  uint64_t writes_seen_ = 0;
  uint64_t bytes_written_ = 0;
  FaultCounters faults_;
};

}  // namespace kvtier
