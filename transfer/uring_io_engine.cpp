#include "transfer/uring_io_engine.h"

#include <spdlog/spdlog.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string>

namespace kvtier {

namespace {
// One SQE moves at most this much; a longer request completes "short" and the rest is resubmitted.
constexpr uint64_t kMaxOpBytes = 1ull << 30;
// Registered buffers are limited to 1 GiB each by the kernel.
constexpr uint64_t kMaxFixedBufferBytes = 1ull << 30;
constexpr unsigned kReapBatch = 64;

// The batch the calling thread is in: the engine and the nesting depth. One engine per thread at
// a time; a batch begun on a second engine while one is open is not a batch (its submits send).
thread_local const void* t_batch_engine = nullptr;
thread_local int t_batch_depth = 0;
}  // namespace

void UringIoEngine::begin_batch() noexcept {
  if (t_batch_depth == 0) t_batch_engine = this;
  if (t_batch_engine == this) ++t_batch_depth;
}

void UringIoEngine::end_batch() {
  if (t_batch_engine != this || t_batch_depth == 0) return;
  if (--t_batch_depth > 0) return;
  t_batch_engine = nullptr;
  send();
}

bool UringIoEngine::in_batch() const noexcept { return t_batch_engine == this && t_batch_depth > 0; }

IoEngineStats UringIoEngine::stats() const noexcept {
  const IoEngineStats pool = pool_->stats();
  return {ops_.load(std::memory_order_relaxed) + pool.ops,
          submit_calls_.load(std::memory_order_relaxed) + pool.submit_calls};
}

void UringIoEngine::send() {
  std::lock_guard lock(ring_mu_);
  send_locked();
}

void UringIoEngine::send_locked() {
  if (io_uring_sq_ready(&ring_) == 0) return;
  int r;
  while ((r = io_uring_submit(&ring_)) == -EINTR || r == -EAGAIN || r == -EBUSY) {
  }
  submit_calls_.fetch_add(1, std::memory_order_relaxed);
  if (r < 0) spdlog::error("io_uring_submit: {} (the SQEs stay queued)", std::strerror(-r));
}

Result<std::unique_ptr<UringIoEngine>> UringIoEngine::create(const IoEngineOptions& options) {
  uint32_t qd = std::max<uint32_t>(1, options.queue_depth);
  std::unique_ptr<UringIoEngine> engine(new UringIoEngine(qd, options.threads));
  // The CQ gets twice the SQ entries by default; in-flight ops never exceed qd, so it cannot
  // overflow.
  int r = io_uring_queue_init(qd, &engine->ring_, 0);
  if (r < 0) {
    return Status(StatusCode::kUnavailable,
                  std::string("io_uring_queue_init refused: ") + std::strerror(-r));
  }
  engine->ring_ready_ = true;
  r = io_uring_register_files_sparse(&engine->ring_, kFixedFiles);
  if (r == 0) {
    engine->files_registered_ = true;
    engine->file_slots_.assign(kFixedFiles, FileSlot{});
  } else {
    spdlog::warn("io_uring: registered files refused ({}); using plain fds", std::strerror(-r));
  }
  engine->completion_thread_ = std::thread([e = engine.get()] { e->completion_loop(); });
  return engine;
}

UringIoEngine::UringIoEngine(uint32_t queue_depth, uint32_t threads)
    : IoEngine(queue_depth), pool_(std::make_unique<ThreadPoolIoEngine>(threads, queue_depth)) {}

UringIoEngine::~UringIoEngine() {
  if (ring_ready_) {
    drain();
    {
      std::lock_guard lock(inflight_mu_);
      stopping_ = true;
    }
    inflight_cv_.notify_all();
    {
      // A NOP with no op attached tells the completion thread to leave.
      std::lock_guard lock(ring_mu_);
      io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
      while (sqe == nullptr) {
        send_locked();
        sqe = io_uring_get_sqe(&ring_);
      }
      io_uring_prep_nop(sqe);
      io_uring_sqe_set_data(sqe, nullptr);
      send_locked();
    }
    if (completion_thread_.joinable()) completion_thread_.join();
    io_uring_queue_exit(&ring_);
  }
  pool_.reset();
}

std::string UringIoEngine::describe() const {
  return "io_uring (qd " + std::to_string(queue_depth()) + ", " + std::to_string(buffers_.size()) +
         " fixed buffers, fixed files " + (files_registered_ ? "on" : "off") + ")";
}

Status UringIoEngine::submit(const IoRequest& request, IoCallback done) {
  if (request.device == nullptr) return invalid_argument("io submit without a device");
  KVTIER_RETURN_IF_ERROR(request.device->check_range(request.offset, request.length, request.buffer));
  const int fd = request.device->native_fd();
  if (fd < 0) return pool_->submit(request, std::move(done));

  const bool batched = in_batch();
  {
    std::unique_lock lock(inflight_mu_);
    if (!stopping_ && inflight_ >= queue_depth()) {
      // Full, and some of what fills it may be a batch's unsent SQEs (this thread's, or one
      // still being built on another): send them before waiting for a completion, or the wait
      // could last until that batch ends, or forever.
      lock.unlock();
      send();
      lock.lock();
    }
    inflight_cv_.wait(lock, [&] { return stopping_ || inflight_ < queue_depth(); });
    if (stopping_) return Status(StatusCode::kUnavailable, "io engine is shutting down");
    ++inflight_;
  }
  auto* op = new Op{request, std::move(done)};
  std::lock_guard lock(ring_mu_);
  const int slot = file_index_locked(fd);
  op->fd = slot >= 0 ? slot : fd;
  op->fixed_file = slot >= 0;
  op->buffer_index = buffer_index_locked(request.buffer, request.length);
  prep_locked(op);
  op->published.store(true, std::memory_order_release);  // the last touch before the kernel sees it
  ops_.fetch_add(1, std::memory_order_relaxed);
  if (!batched) send_locked();
  return Status::ok();
}

void UringIoEngine::drain() {
  send();  // an open batch's SQEs would otherwise never complete
  {
    std::unique_lock lock(inflight_mu_);
    inflight_cv_.wait(lock, [&] { return inflight_ == 0; });
  }
  pool_->drain();
}

Status UringIoEngine::register_buffers(std::span<const IoRegion> regions) {
  std::lock_guard lock(ring_mu_);
  std::vector<iovec> wanted = buffers_;
  std::vector<const void*> owners = owners_;
  for (const IoRegion& region : regions) {
    auto* p = static_cast<std::byte*>(region.base);
    for (uint64_t done = 0; done < region.bytes; done += kMaxFixedBufferBytes) {
      uint64_t len = std::min<uint64_t>(kMaxFixedBufferBytes, region.bytes - done);
      wanted.push_back(iovec{p + done, len});
      owners.push_back(region.base);
    }
  }
  if (wanted.size() == buffers_.size()) return Status::ok();
  return install_buffers_locked(std::move(wanted), std::move(owners));
}

void UringIoEngine::unregister_buffers(const void* base) noexcept {
  std::lock_guard lock(ring_mu_);
  std::vector<iovec> wanted;
  std::vector<const void*> owners;
  for (size_t i = 0; i < buffers_.size(); ++i) {
    if (owners_[i] == base) continue;
    wanted.push_back(buffers_[i]);
    owners.push_back(owners_[i]);
  }
  if (wanted.size() == buffers_.size()) return;
  install_buffers_locked(std::move(wanted), std::move(owners)).ignore();
}

Status UringIoEngine::install_buffers_locked(std::vector<iovec> wanted, std::vector<const void*> owners) {
  // The table is replaced whole. Ops are prepped under ring_mu_ with indices into the table that
  // is current then, and the kernel keeps the old table alive for ops already in flight.
  // A refused table (the memlock limit, a bad region) leaves the table that was in place: the
  // regions registered before keep their fixed reads and writes, the new ones go plain.
  if (!buffers_.empty()) io_uring_unregister_buffers(&ring_);
  if (wanted.empty()) {
    buffers_.clear();
    owners_.clear();
    return Status::ok();
  }
  int r = io_uring_register_buffers(&ring_, wanted.data(), static_cast<unsigned>(wanted.size()));
  if (r < 0) {
    const size_t kept = buffers_.size();
    if (kept > 0 && io_uring_register_buffers(&ring_, buffers_.data(), static_cast<unsigned>(kept)) < 0) {
      buffers_.clear();
      owners_.clear();
    }
    spdlog::warn("io_uring: registering {} buffers refused ({}); {} stay registered, the rest use "
                 "plain reads and writes", wanted.size(), std::strerror(-r), buffers_.size());
    return Status(StatusCode::kResourceExhausted,
                  std::string("io_uring_register_buffers: ") + std::strerror(-r));
  }
  buffers_ = std::move(wanted);
  owners_ = std::move(owners);
  return Status::ok();
}

int UringIoEngine::file_index_locked(int fd) {
  if (!files_registered_) return -1;
  struct stat st {};
  if (fstat(fd, &st) != 0) return -1;
  auto install = [&](int index) {
    int r = io_uring_register_files_update(&ring_, static_cast<unsigned>(index), &fd, 1);
    if (r < 0) return -1;
    file_slots_[index] = FileSlot{fd, st.st_dev, st.st_ino};
    fd_to_slot_[fd] = index;
    return index;
  };
  if (auto it = fd_to_slot_.find(fd); it != fd_to_slot_.end()) {
    const FileSlot& slot = file_slots_[it->second];
    if (slot.dev == st.st_dev && slot.ino == st.st_ino) return it->second;
    return install(it->second);  // the fd number was closed and reused for another file
  }
  for (size_t i = 0; i < file_slots_.size(); ++i) {
    if (file_slots_[i].fd < 0) return install(static_cast<int>(i));
  }
  return -1;  // table full: plain fd
}

int UringIoEngine::buffer_index_locked(const std::byte* p, uint64_t len) const {
  for (size_t i = 0; i < buffers_.size(); ++i) {
    auto* base = static_cast<const std::byte*>(buffers_[i].iov_base);
    if (p >= base && p + len <= base + buffers_[i].iov_len) return static_cast<int>(i);
  }
  return -1;
}

void UringIoEngine::prep_locked(Op* op) {
  io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
  while (sqe == nullptr) {  // not expected (in flight <= SQ size), but never drop an op
    send_locked();
    sqe = io_uring_get_sqe(&ring_);
  }
  const IoRequest& r = op->request;
  std::byte* buf = r.buffer + op->completed;
  const uint64_t offset = r.offset + op->completed;
  const auto len = static_cast<unsigned>(std::min(r.length - op->completed, kMaxOpBytes));
  if (r.op == IoOp::kRead) {
    if (op->buffer_index >= 0) {
      io_uring_prep_read_fixed(sqe, op->fd, buf, len, offset, op->buffer_index);
    } else {
      io_uring_prep_read(sqe, op->fd, buf, len, offset);
    }
  } else {
    if (op->buffer_index >= 0) {
      io_uring_prep_write_fixed(sqe, op->fd, buf, len, offset, op->buffer_index);
    } else {
      io_uring_prep_write(sqe, op->fd, buf, len, offset);
    }
  }
  if (op->fixed_file) sqe->flags |= IOSQE_FIXED_FILE;
  io_uring_sqe_set_data(sqe, op);
}

void UringIoEngine::finish_op(Op* op, int64_t result) {
  const IoRequest& r = op->request;
  const bool ok = result >= 0;
  if (r.op == IoOp::kRead) {
    r.device->record_read(r.length, ok);
  } else {
    r.device->record_write(r.length, ok);
  }
  op->done(result);
  delete op;
  {
    std::lock_guard lock(inflight_mu_);
    --inflight_;
  }
  inflight_cv_.notify_all();
}

void UringIoEngine::completion_loop() {
  io_uring_cqe* cqes[kReapBatch];
  std::vector<Op*> resubmit;
  std::vector<std::pair<Op*, int64_t>> finished;
  bool stop_seen = false;
  for (;;) {
    io_uring_cqe* first = nullptr;
    int r = io_uring_wait_cqe(&ring_, &first);
    if (r < 0) {
      if (r != -EINTR && r != -EAGAIN) spdlog::error("io_uring_wait_cqe: {}", std::strerror(-r));
      continue;
    }
    const unsigned n = io_uring_peek_batch_cqe(&ring_, cqes, kReapBatch);
    for (unsigned i = 0; i < n; ++i) {
      auto* op = static_cast<Op*>(io_uring_cqe_get_data(cqes[i]));
      const int res = cqes[i]->res;
      if (op == nullptr) {
        stop_seen = true;
        continue;
      }
      (void)op->published.load(std::memory_order_acquire);
      const uint64_t remaining = op->request.length - op->completed;
      if (res == -EAGAIN || res == -EINTR) {
        resubmit.push_back(op);  // try the same remainder again
      } else if (res < 0) {
        finished.emplace_back(op, res);
      } else if (res == 0) {
        finished.emplace_back(op, -EIO);  // end of file inside the device: nothing more will come
      } else if (static_cast<uint64_t>(res) < remaining) {
        op->completed += static_cast<uint64_t>(res);  // short: resubmit the rest
        resubmit.push_back(op);
      } else {
        finished.emplace_back(op, static_cast<int64_t>(op->request.length));
      }
    }
    io_uring_cq_advance(&ring_, n);
    if (!resubmit.empty()) {
      std::lock_guard lock(ring_mu_);
      for (Op* op : resubmit) prep_locked(op);
      send_locked();
      resubmit.clear();
    }
    for (auto& [op, result] : finished) finish_op(op, result);
    finished.clear();
    if (stop_seen) {
      std::lock_guard lock(inflight_mu_);
      if (inflight_ == 0) return;
    }
  }
}

}  // namespace kvtier
