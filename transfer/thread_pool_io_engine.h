// ThreadPoolIoEngine: reads and writes through StorageDevice::read/write (pread/pwrite for files)
// on a fixed pool of threads fed by a bounded queue. The fallback when io_uring is refused, the
// engine for devices without a native fd (memory, fault-injecting), and the reference the uring
// engine is tested against.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "transfer/io_engine.h"

namespace kvtier {

class ThreadPoolIoEngine final : public IoEngine {
 public:
  /// `threads` workers (at least 1); at most `queue_depth` operations queued or running.
  ThreadPoolIoEngine(uint32_t threads, uint32_t queue_depth);
  ~ThreadPoolIoEngine() override;

  Status submit(const IoRequest& request, IoCallback done) override;
  Status register_buffers(std::span<const IoRegion>) override { return Status::ok(); }
  void unregister_buffers(const void*) noexcept override {}
  void drain() override;
  IoEngineKind kind() const noexcept override { return IoEngineKind::kThreadPool; }
  std::string describe() const override;
  /// Every op is its own pread/pwrite: submit_calls == ops.
  IoEngineStats stats() const noexcept override {
    const uint64_t n = ops_.load(std::memory_order_relaxed);
    return {n, n};
  }

 private:
  struct Op {
    IoRequest request;
    IoCallback done;
  };
  void worker_loop();

  std::mutex mu_;
  std::condition_variable has_work_;   // workers wait for ops or stop
  std::condition_variable has_room_;   // submitters wait for room; drain waits for idle
  std::deque<Op> queue_;               // bounded: queue_.size() + running_ <= queue_depth
  uint32_t running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> ops_{0};
};

/// -errno for a device Status (kIoError → -EIO, kResourceExhausted → -ENOSPC, ...).
int status_to_errno(const Status& status) noexcept;

}  // namespace kvtier
