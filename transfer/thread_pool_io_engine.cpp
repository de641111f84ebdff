#include "transfer/thread_pool_io_engine.h"

#include <cerrno>
#include <string>

namespace kvtier {

int status_to_errno(const Status& status) noexcept {
  switch (status.code()) {
    case StatusCode::kOk: return 0;
    case StatusCode::kInvalidArgument: return -EINVAL;
    case StatusCode::kResourceExhausted: return -ENOSPC;
    case StatusCode::kUnavailable: return -ENODEV;
    case StatusCode::kCancelled: return -ECANCELED;
    default: return -EIO;
  }
}

ThreadPoolIoEngine::ThreadPoolIoEngine(uint32_t threads, uint32_t queue_depth)
    : IoEngine(queue_depth == 0 ? 1 : queue_depth) {
  if (threads == 0) threads = 1;
  workers_.reserve(threads);
  for (uint32_t i = 0; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPoolIoEngine::~ThreadPoolIoEngine() {
  {
    std::lock_guard lock(mu_);
    stopping_ = true;  // workers finish the queue before they leave
  }
  has_work_.notify_all();
  has_room_.notify_all();
  for (auto& t : workers_) t.join();
}

Status ThreadPoolIoEngine::submit(const IoRequest& request, IoCallback done) {
  if (request.device == nullptr) return invalid_argument("io submit without a device");
  KVTIER_RETURN_IF_ERROR(request.device->check_range(request.offset, request.length, request.buffer));
  std::unique_lock lock(mu_);
  has_room_.wait(lock, [&] { return stopping_ || queue_.size() + running_ < queue_depth(); });
  if (stopping_) return Status(StatusCode::kUnavailable, "io engine is shutting down");
  queue_.push_back(Op{request, std::move(done)});
  lock.unlock();
  ops_.fetch_add(1, std::memory_order_relaxed);
  has_work_.notify_one();
  return Status::ok();
}

void ThreadPoolIoEngine::drain() {
  std::unique_lock lock(mu_);
  has_room_.wait(lock, [&] { return queue_.empty() && running_ == 0; });
}

std::string ThreadPoolIoEngine::describe() const {
  return "thread pool (" + std::to_string(workers_.size()) + " threads, qd " +
         std::to_string(queue_depth()) + ")";
}

void ThreadPoolIoEngine::worker_loop() {
  std::unique_lock lock(mu_);
  for (;;) {
    has_work_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping and nothing left
    Op op = std::move(queue_.front());
    queue_.pop_front();
    ++running_;
    lock.unlock();

    const IoRequest& r = op.request;
    Status s = r.op == IoOp::kRead
                   ? r.device->read(r.offset, {r.buffer, r.length})
                   : r.device->write(r.offset, {static_cast<const std::byte*>(r.buffer), r.length});
    int64_t result = s.is_ok() ? static_cast<int64_t>(r.length) : status_to_errno(s);
    op.done(result);
    op.done = nullptr;  // release captures before the slot is given back

    lock.lock();
    --running_;
    has_room_.notify_all();
  }
}

}  // namespace kvtier
