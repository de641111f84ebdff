// IoEngine: asynchronous reads and writes of aligned buffers on StorageDevices.
//
// Two implementations behind one interface, chosen by create_io_engine():
//   UringIoEngine       one io_uring with registered files and buffers, batched submission and a
//                       completion thread (transfer/uring_io_engine.h)
//   ThreadPoolIoEngine  a fixed pool of threads calling StorageDevice::read/write (pread/pwrite)
//                       with a bounded queue (transfer/thread_pool_io_engine.h)
// Devices whose native_fd() is -1 (memory and fault-injecting devices) are always driven through
// StorageDevice::read/write on worker threads, by both engines, so a fault wrapper sees every op.
//
// Completion convention (liburing's): the callback gets the number of bytes moved, which is the
// whole length on success (short transfers and -EAGAIN are resubmitted inside the engine), or
// -errno. Turn it into a Status one layer up with errno_status() (tiers/storage_device.h).
// Callbacks run on an engine thread; they must not block on this engine (no submit from a
// completion callback when the engine may be full: hand the work to another thread instead).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>

#include "kvtier/status.h"
#include "tiers/storage_device.h"

namespace kvtier {

enum class IoEngineKind : uint8_t {
  kAuto,        // io_uring when the kernel allows it, else the thread pool (logged)
  kUring,       // io_uring only: create fails with kUnavailable when refused
  kThreadPool,  // pread/pwrite on a thread pool
};
std::string_view io_engine_kind_name(IoEngineKind kind) noexcept;

struct IoEngineOptions {
  /// Which engine (default kAuto).
  IoEngineKind kind = IoEngineKind::kAuto;
  /// Most operations in flight at once; submit() blocks while this many are (default 64).
  uint32_t queue_depth = 64;
  /// Worker threads: the pool's I/O threads, and the uring engine's threads for devices without
  /// a native fd (default 4).
  uint32_t threads = 4;
};

enum class IoOp : uint8_t { kRead, kWrite };

/// One operation. offset, length and buffer follow StorageDevice's alignment rule (kIoAlignment).
struct IoRequest {
  IoOp op = IoOp::kRead;
  StorageDevice* device = nullptr;
  uint64_t offset = 0;
  std::byte* buffer = nullptr;  // read: filled; write: read from (not modified)
  uint64_t length = 0;
};

/// Bytes moved (== length) or -errno.
using IoCallback = std::function<void(int64_t result)>;

/// What an engine has sent to the kernel: operations, and the system calls that carried them.
struct IoEngineStats {
  uint64_t ops = 0;           // operations submitted (resubmitted remainders not counted)
  uint64_t submit_calls = 0;  // io_uring_submit calls (the pool: one pread/pwrite per op)
};

/// A host memory region to register (host arena, staging buffers).
struct IoRegion {
  void* base = nullptr;
  size_t bytes = 0;
};

class IoEngine {
 public:
  virtual ~IoEngine() = default;
  IoEngine(const IoEngine&) = delete;
  IoEngine& operator=(const IoEngine&) = delete;

  /// Queues one operation; `done` runs exactly once, on an engine thread, when it completes.
  /// Blocks while queue_depth operations are in flight. Returns kInvalidArgument (bad alignment,
  /// range, null device) or kUnavailable (engine shut down) without calling `done`.
  [[nodiscard]] virtual Status submit(const IoRequest& request, IoCallback done) = 0;

  [[nodiscard]] Status read_async(StorageDevice* device, uint64_t offset, std::span<std::byte> buffer,
                                  IoCallback done) {
    return submit({IoOp::kRead, device, offset, buffer.data(), buffer.size()}, std::move(done));
  }
  [[nodiscard]] Status write_async(StorageDevice* device, uint64_t offset,
                                   std::span<const std::byte> buffer, IoCallback done) {
    return submit({IoOp::kWrite, device, offset, const_cast<std::byte*>(buffer.data()), buffer.size()},
                  std::move(done));
  }

  /// Registers host regions that later buffers will fall in (io_uring fixed buffers, used with
  /// read_fixed/write_fixed; a no-op for the pool). May be called more than once; regions stay
  /// registered until unregister_buffers(base), so they must outlive that call or the engine. A refusal (memlock limit) is
  /// logged and the engine goes on with plain reads and writes: the Status says what happened.
  [[nodiscard]] virtual Status register_buffers(std::span<const IoRegion> regions) = 0;
  /// Forgets the region registered with this base address (call before freeing it while the
  /// engine lives on). No operation on it may be in flight.
  virtual void unregister_buffers(const void* base) noexcept = 0;

  /// Batched submission. Between begin_batch() and end_batch() the operations this thread
  /// submits may wait in the submission queue and reach the kernel together, in one system call,
  /// at end_batch() — or earlier, when the queue fills. Other threads are not held back. Batches
  /// nest; only the outermost end_batch() sends. A thread must end its batch before it waits for
  /// any of the batch's operations. The pool engine has nothing to batch and ignores both.
  /// Use IoBatch rather than calling these directly.
  virtual void begin_batch() noexcept {}
  virtual void end_batch() {}

  /// Blocks until no operation is in flight.
  virtual void drain() = 0;

  virtual IoEngineStats stats() const noexcept = 0;

  virtual IoEngineKind kind() const noexcept = 0;
  uint32_t queue_depth() const noexcept { return queue_depth_; }
  /// "io_uring (qd 64, 3 fixed buffers)" or "thread pool (4 threads, qd 64)".
  virtual std::string describe() const = 0;

 protected:
  explicit IoEngine(uint32_t queue_depth) : queue_depth_(queue_depth) {}

 private:
  uint32_t queue_depth_;
};

/// One batch of submissions on the calling thread (IoEngine::begin_batch): sent when it ends.
class IoBatch {
 public:
  explicit IoBatch(IoEngine& engine) noexcept : engine_(&engine) { engine_->begin_batch(); }
  ~IoBatch() { end(); }
  IoBatch(const IoBatch&) = delete;
  IoBatch& operator=(const IoBatch&) = delete;
  /// Sends the batch now (idempotent).
  void end() {
    if (engine_ != nullptr) std::exchange(engine_, nullptr)->end_batch();
  }

 private:
  IoEngine* engine_;
};

/// Makes the engine `options.kind` asks for; kAuto logs (spdlog::info) which one runs and why.
Result<std::unique_ptr<IoEngine>> create_io_engine(const IoEngineOptions& options = {});

}  // namespace kvtier
