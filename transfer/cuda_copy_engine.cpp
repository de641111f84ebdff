// CudaCopyEngine (see cuda_copy_engine.h). Every CUDA runtime call lives in this file, behind
// KVTIER_WITH_CUDA, so the rest of transfer/ builds and runs on machines without CUDA.
#include "transfer/cuda_copy_engine.h"

#include <spdlog/spdlog.h>

#include <string>

#if defined(KVTIER_WITH_CUDA)
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "tiers/device_probe.h"
#endif

namespace kvtier {

#if defined(KVTIER_WITH_CUDA)
namespace {

Status cuda_status(cudaError_t e, const char* what) {
  return Status(StatusCode::kInternal, std::string(what) + ": " + cudaGetErrorString(e));
}

class CudaCopyEngine final : public CopyEngine {
 public:
  static Result<std::unique_ptr<CopyEngine>> create(const CopyEngineOptions& options) {
    std::unique_ptr<CudaCopyEngine> engine(new CudaCopyEngine(options));
    if (cudaError_t e = cudaSetDevice(options.device); e != cudaSuccess) {
      return Status(StatusCode::kUnavailable, std::string("cudaSetDevice: ") + cudaGetErrorString(e));
    }
    // Streams 0 and 1 carry host→device and device→host; further streams share the rest.
    const uint32_t streams = std::max<uint32_t>(2, options.threads * 2);
    for (uint32_t i = 0; i < streams; ++i) {
      auto lane = std::make_unique<Lane>();
      if (cudaError_t e = cudaStreamCreateWithFlags(&lane->stream, cudaStreamNonBlocking); e != cudaSuccess) {
        return cuda_status(e, "cudaStreamCreateWithFlags");
      }
      engine->lanes_.push_back(std::move(lane));
    }
    for (auto& lane : engine->lanes_) {
      lane->thread = std::thread([e = engine.get(), l = lane.get()] { e->lane_loop(*l); });
    }
    return std::unique_ptr<CopyEngine>(std::move(engine));
  }

  ~CudaCopyEngine() override {
    drain();
    for (auto& lane : lanes_) {
      {
        std::lock_guard lock(lane->mu);
        lane->stopping = true;
      }
      lane->cv.notify_all();
      if (lane->thread.joinable()) lane->thread.join();
      if (lane->stream) cudaStreamDestroy(lane->stream);
    }
    for (cudaEvent_t ev : free_events_) cudaEventDestroy(ev);
  }

  Status submit(void* dst, const void* src, uint64_t bytes, CopyDirection direction,
                CopyCallback done) override {
    if ((dst == nullptr || src == nullptr) && bytes > 0) return invalid_argument("copy with a null pointer");
    {
      std::unique_lock lock(mu_);
      room_.wait(lock, [&] { return stopping_ || outstanding_ < queue_depth_; });
      if (stopping_) return Status(StatusCode::kUnavailable, "copy engine is shutting down");
      ++outstanding_;
    }
    warn_if_pageable(direction == CopyDirection::kHostToDevice ? src : dst, direction);
    Lane& lane = pick_lane(direction);
    cudaEvent_t ev = take_event();
    std::lock_guard lock(lane.mu);  // keeps (copy, event) pairs in stream order in lane.pending
    cudaSetDevice(device_);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kinds(direction), lane.stream);
    if (e == cudaSuccess) e = cudaEventRecord(ev, lane.stream);
    if (e != cudaSuccess) {
      give_event(ev);
      release_one();
      return cuda_status(e, "cudaMemcpyAsync");
    }
    lane.pending.push_back(Pending{ev, std::move(done)});
    lane.cv.notify_one();
    return Status::ok();
  }

  void drain() override {
    std::unique_lock lock(mu_);
    room_.wait(lock, [&] { return outstanding_ == 0; });
  }
  bool device_memory_is_host() const noexcept override { return false; }

  Status register_host_memory(void* base, size_t bytes) override {
    cudaError_t e = cudaHostRegister(base, bytes, cudaHostRegisterDefault);
    if (e == cudaErrorHostMemoryAlreadyRegistered) {
      cudaGetLastError();
      return Status::ok();
    }
    if (e != cudaSuccess) {
      cudaGetLastError();
      return cuda_status(e, "cudaHostRegister");
    }
    return Status::ok();
  }
  void unregister_host_memory(void* base) noexcept override {
    if (cudaHostUnregister(base) != cudaSuccess) cudaGetLastError();
  }

  std::string describe() const override {
    return "cuda (device " + std::to_string(device_) + ", " + std::to_string(lanes_.size()) + " streams)";
  }

 private:
  struct Pending {
    cudaEvent_t event;
    CopyCallback done;
  };
  struct Lane {
    cudaStream_t stream = nullptr;
    std::mutex mu;
    std::condition_variable cv;
    std::deque<Pending> pending;
    bool stopping = false;
    std::thread thread;
  };

  explicit CudaCopyEngine(const CopyEngineOptions& o)
      : queue_depth_(o.queue_depth == 0 ? 1 : o.queue_depth), device_(o.device) {}

  static cudaMemcpyKind kinds(CopyDirection d) {
    switch (d) {
      case CopyDirection::kHostToHost: return cudaMemcpyHostToHost;
      case CopyDirection::kHostToDevice: return cudaMemcpyHostToDevice;
      case CopyDirection::kDeviceToHost: return cudaMemcpyDeviceToHost;
      case CopyDirection::kDeviceToDevice: return cudaMemcpyDeviceToDevice;
    }
    return cudaMemcpyDefault;
  }

  Lane& pick_lane(CopyDirection d) {
    switch (d) {
      case CopyDirection::kHostToDevice: return *lanes_[0];
      case CopyDirection::kDeviceToHost: return *lanes_[1];
      default: {
        if (lanes_.size() <= 2) return *lanes_[next_.fetch_add(1) % 2];
        return *lanes_[2 + next_.fetch_add(1) % (lanes_.size() - 2)];
      }
    }
  }

  void warn_if_pageable(const void* host_ptr, CopyDirection d) {
    if (d != CopyDirection::kHostToDevice && d != CopyDirection::kDeviceToHost) return;
    if (warned_pageable_.load(std::memory_order_relaxed)) return;
    cudaPointerAttributes attr{};
    if (cudaPointerGetAttributes(&attr, host_ptr) != cudaSuccess) {
      cudaGetLastError();
      return;
    }
    if (attr.type == cudaMemoryTypeUnregistered && !warned_pageable_.exchange(true)) {
      spdlog::warn("kvtier transfer: cuda copy from pageable host memory: synchronous and slower");
    }
  }

  cudaEvent_t take_event() {
    {
      std::lock_guard lock(mu_);
      if (!free_events_.empty()) {
        cudaEvent_t ev = free_events_.back();
        free_events_.pop_back();
        return ev;
      }
    }
    cudaEvent_t ev = nullptr;
    cudaEventCreateWithFlags(&ev, cudaEventDisableTiming | cudaEventBlockingSync);
    return ev;
  }
  void give_event(cudaEvent_t ev) {
    std::lock_guard lock(mu_);
    free_events_.push_back(ev);
  }
  void release_one() {
    {
      std::lock_guard lock(mu_);
      --outstanding_;
    }
    room_.notify_all();
  }

  void lane_loop(Lane& lane) {
    cudaSetDevice(device_);
    for (;;) {
      Pending p;
      {
        std::unique_lock lock(lane.mu);
        lane.cv.wait(lock, [&] { return lane.stopping || !lane.pending.empty(); });
        if (lane.pending.empty()) return;
        p = std::move(lane.pending.front());
        lane.pending.pop_front();
      }
      cudaError_t e = cudaEventSynchronize(p.event);  // blocks (BlockingSync), never spins
      give_event(p.event);
      p.done(e == cudaSuccess ? Status::ok() : cuda_status(e, "cuda copy"));
      p.done = nullptr;
      release_one();
    }
  }

  const uint32_t queue_depth_;
  const int device_;
  std::vector<std::unique_ptr<Lane>> lanes_;
  std::atomic<uint32_t> next_{0};
  std::atomic<bool> warned_pageable_{false};
  std::mutex mu_;
  std::condition_variable room_;
  uint32_t outstanding_ = 0;
  bool stopping_ = false;
  std::vector<cudaEvent_t> free_events_;
};

}  // namespace

Result<std::unique_ptr<CopyEngine>> create_cuda_copy_engine(const CopyEngineOptions& options) {
  if (!probe_devices().has_gpu()) {
    return Status(StatusCode::kUnavailable, "cuda copy engine: no GPU (" + probe_devices().reason + ")");
  }
  return CudaCopyEngine::create(options);
}

#else  // !KVTIER_WITH_CUDA

Result<std::unique_ptr<CopyEngine>> create_cuda_copy_engine(const CopyEngineOptions&) {
  return Status(StatusCode::kUnavailable, "cuda copy engine: kvtier was built without CUDA");
}

#endif

}  // namespace kvtier
