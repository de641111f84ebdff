#include "transfer/host_copy_engine.h"

#include <cstring>
#include <string>

namespace kvtier {

HostCopyEngine::HostCopyEngine(uint32_t threads, uint32_t queue_depth)
    : queue_depth_(queue_depth == 0 ? 1 : queue_depth) {
  if (threads == 0) threads = 1;
  for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

HostCopyEngine::~HostCopyEngine() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;  // workers finish the queue first
  }
  has_work_.notify_all();
  has_room_.notify_all();
  for (auto& t : workers_) t.join();
}

Status HostCopyEngine::submit(void* dst, const void* src, uint64_t bytes, CopyDirection,
                              CopyCallback done) {
  if ((dst == nullptr || src == nullptr) && bytes > 0) return invalid_argument("copy with a null pointer");
  std::unique_lock lock(mu_);
  has_room_.wait(lock, [&] { return stopping_ || queue_.size() + running_ < queue_depth_; });
  if (stopping_) return Status(StatusCode::kUnavailable, "copy engine is shutting down");
  queue_.push_back(Copy{dst, src, bytes, std::move(done)});
  lock.unlock();
  has_work_.notify_one();
  return Status::ok();
}

void HostCopyEngine::drain() {
  std::unique_lock lock(mu_);
  has_room_.wait(lock, [&] { return queue_.empty() && running_ == 0; });
}

std::string HostCopyEngine::describe() const {
  return "host memcpy (" + std::to_string(workers_.size()) + " thread" +
         (workers_.size() == 1 ? "" : "s") + ")";
}

void HostCopyEngine::worker_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    has_work_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;
    Copy copy = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    lock.unlock();
    if (copy.bytes > 0) std::memcpy(copy.dst, copy.src, copy.bytes);
    copy.done(Status::ok());
    copy.done = nullptr;
    lock.lock();
    --running_;
    has_room_.notify_all();
  }
}

}  // namespace kvtier
