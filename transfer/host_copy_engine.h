// HostCopyEngine: memcpy on worker threads behind the CopyEngine interface. Used when there is no
// GPU: the emulated HBM arena is host memory, so every direction is a plain memcpy, and the
// transfer engine may checksum "device" bytes (device_memory_is_host() is true).
#pragma once

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "transfer/copy_engine.h"

namespace kvtier {

class HostCopyEngine final : public CopyEngine {
 public:
  HostCopyEngine(uint32_t threads, uint32_t queue_depth);
  ~HostCopyEngine() override;

  Status submit(void* dst, const void* src, uint64_t bytes, CopyDirection direction,
                CopyCallback done) override;
  void drain() override;
  bool device_memory_is_host() const noexcept override { return true; }
  Status register_host_memory(void*, size_t) override { return Status::ok(); }
  void unregister_host_memory(void*) noexcept override {}
  std::string describe() const override;

 private:
  struct Copy {
    void* dst;
    const void* src;
    uint64_t bytes;
    CopyCallback done;
  };
  void worker_loop();

  const uint32_t queue_depth_;
  std::mutex mu_;
  std::condition_variable has_work_;
  std::condition_variable has_room_;
  std::deque<Copy> queue_;  // bounded: queue_.size() + running_ <= queue_depth_
  uint32_t running_ = 0;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace kvtier
