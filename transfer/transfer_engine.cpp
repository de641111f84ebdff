// TransferEngine (see transfer_engine.h for the routes and rules).
//
// Threads: one dispatcher issues every operation, in submission order, and runs every second hop
// ("continuations"). io and copy completion threads only (a) finish single-hop chunks and
// (b) post continuations to the dispatcher; they never submit to an engine, so a full io queue
// and a full copy queue can never wait on each other.
#include "transfer/transfer_engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>

#include "transfer/job_plan.h"
#include "transfer/job_state.h"
#include "transfer/staging_pool.h"

namespace kvtier {

class TransferEngine::Impl {
 public:
  struct SegmentRun {
    SegmentPlan plan;
    std::atomic<uint32_t> chunks_left{0};
    // kStagingInOrder only; touched by the dispatcher thread alone.
    std::unique_ptr<StreamingXxh3> hasher;
    uint32_t next_hash_chunk = 0;
    std::map<uint32_t, std::function<void()>> parked;
  };
  struct Job {
    std::shared_ptr<detail::JobState> state;
    std::vector<std::unique_ptr<SegmentRun>> segments;
    // Guarded by Impl::mu_.
    size_t next_segment = 0;
    uint32_t next_chunk = 0;
    uint32_t outstanding = 0;  // chunks issued and not finished
    bool all_issued = false;   // nothing more will be issued (done, cancelled or failed)
    bool finished = false;
  };
  struct Chunk {
    std::shared_ptr<Job> job;
    SegmentRun* seg = nullptr;
    uint32_t index = 0;
    uint64_t off = 0, n = 0;
    int staging = -1;  // staging buffer index, or -1 for a direct op
  };

  Impl(TransferEngineOptions o, std::shared_ptr<IoEngine> io, std::shared_ptr<CopyEngine> copy)
      : options_(std::move(o)), io_(std::move(io)), copy_(std::move(copy)) {}

  ~Impl() {
    shutdown();
    staging_.reset();  // unregisters from io_ and copy_, which are still alive
  }

  Status start() {
    auto staging = StagingPool::create(options_.staging_buffers, options_.staging_bytes, *io_, *copy_);
    if (!staging) return staging.status();
    staging_ = std::move(*staging);
    chunk_bytes_ = staging_->buffer_bytes();
    dispatcher_ = std::thread([this] { dispatcher_loop(); });
    return Status::ok();
  }

  Result<TransferHandle> submit(JobSpec spec, bool blocking) {
    auto plans = plan_job(spec, chunk_bytes_, copy_->device_memory_is_host());
    if (!plans) return plans.status();
    std::vector<uint32_t> per_layer(spec.num_layers, 0);
    auto job = std::make_shared<Job>();
    for (SegmentPlan& plan : *plans) {
      ++per_layer[plan.segment.layer];
      auto run = std::make_unique<SegmentRun>();
      run->chunks_left.store(plan.chunks, std::memory_order_relaxed);
      if (plan.verify_at == VerifyPoint::kStagingInOrder) run->hasher = std::make_unique<StreamingXxh3>();
      run->plan = plan;
      job->segments.push_back(std::move(run));
    }
    job->state = std::make_shared<detail::JobState>(std::move(per_layer), std::move(spec.callback));
    {
      std::unique_lock lock(mu_);
      if (blocking) {
        ++waiting_submitters_;
        admit_cv_.wait(lock, [&] { return stopping_ || admitted_ < options_.max_inflight_jobs; });
        --waiting_submitters_;
      } else if (!stopping_ && admitted_ >= options_.max_inflight_jobs) {
        return Status(StatusCode::kResourceExhausted,
                      "transfer engine full: " + std::to_string(admitted_) + " jobs in flight");
      }
      if (stopping_) return Status(StatusCode::kUnavailable, "transfer engine is shut down");
      ++admitted_;
      dispatch_.push_back(job);
    }
    jobs_submitted_.fetch_add(1, std::memory_order_relaxed);
    work_cv_.notify_all();
    return TransferHandle(job->state);
  }

  void shutdown() {
    std::call_once(shutdown_once_, [this] {
      std::unique_lock lock(mu_);
      stopping_ = true;
      admit_cv_.notify_all();  // blocked submitters leave with kUnavailable
      admit_cv_.wait(lock, [&] { return admitted_ == 0 && finishing_ == 0; });
      lock.unlock();
      work_cv_.notify_all();
      if (dispatcher_.joinable()) dispatcher_.join();
      io_->drain();
      copy_->drain();
    });
  }

  TransferStats stats() const {
    TransferStats s;
    s.jobs_submitted = jobs_submitted_.load(std::memory_order_relaxed);
    s.jobs_done = jobs_done_.load(std::memory_order_relaxed);
    s.jobs_failed = jobs_failed_.load(std::memory_order_relaxed);
    s.jobs_cancelled = jobs_cancelled_.load(std::memory_order_relaxed);
    s.checksum_mismatches = checksum_mismatches_.load(std::memory_order_relaxed);
    for (int i = 0; i < kNumRoutes; ++i) s.bytes_per_route[i] = route_bytes_[i].load(std::memory_order_relaxed);
    std::lock_guard lock(mu_);
    s.submitters_waiting = waiting_submitters_;
    s.shutting_down = stopping_;
    return s;
  }

  TransferEngineOptions options_;
  std::shared_ptr<IoEngine> io_;
  std::shared_ptr<CopyEngine> copy_;
  std::unique_ptr<StagingPool> staging_;

 private:
  // ---- dispatcher thread ----
  void dispatcher_loop() {
    t_dispatching = this;
    std::unique_lock lock(mu_);
    for (;;) {
      if (!ready_.empty()) {
        std::function<void()> continuation = std::move(ready_.front());
        ready_.pop_front();
        lock.unlock();
        open_batch();
        continuation();
        lock.lock();
        continue;
      }
      std::shared_ptr<Job> to_finish;
      Chunk to_issue;
      if (step_locked(to_finish, to_issue)) {
        lock.unlock();
        if (to_finish) finish_job(to_finish);
        if (to_issue.job) {
          open_batch();
          issue(std::move(to_issue));
        }
        lock.lock();
        continue;
      }
      if (batch_open_) {  // nothing more to issue now: send the batch, then look again
        lock.unlock();
        close_batch();
        lock.lock();
        continue;
      }
      if (stopping_ && admitted_ == 0) return;
      work_cv_.wait(lock);  // every state change below notifies under or after mu_
    }
  }

  // The dispatcher issues in io batches (IoBatch): the reads and writes it issues in one go reach
  // the kernel in one io_uring_submit. A batch is sent when the dispatcher runs out of work, after
  // kMaxBatchOps issues, and before a job's completion callback runs on the dispatcher (user code
  // may wait on a job whose reads sit in the batch). Dispatcher thread only.
  static constexpr uint32_t kMaxBatchOps = 16;
  void open_batch() {
    if (batch_open_ && ++batch_ops_ < kMaxBatchOps) return;
    close_batch();
    io_->begin_batch();
    batch_open_ = true;
    batch_ops_ = 0;
  }
  void close_batch() {
    if (!batch_open_) return;
    batch_open_ = false;
    io_->end_batch();
  }

  /// Picks the next thing to do for the job at the head of the queue; false when it must wait.
  bool step_locked(std::shared_ptr<Job>& to_finish, Chunk& to_issue) {
    while (!dispatch_.empty()) {
      std::shared_ptr<Job> job = dispatch_.front();
      if (job->state->should_stop() || job->next_segment == job->segments.size()) {
        job->all_issued = true;
        dispatch_.pop_front();
        if (job->outstanding == 0 && !job->finished) {
          job->finished = true;
          to_finish = std::move(job);
          return true;
        }
        continue;
      }
      SegmentRun* seg = job->segments[job->next_segment].get();
      const uint32_t index = job->next_chunk;
      const uint64_t off = uint64_t{index} * chunk_bytes_;
      const uint64_t n = std::min(chunk_bytes_, seg->plan.segment.bytes - off);
      const bool staged = chunk_needs_staging(seg->plan, off, n);
      if (staged ? !staging_->has_free_locked() : direct_inflight_ >= options_.max_direct_ops) return false;
      to_issue = Chunk{job, seg, index, off, n, staged ? static_cast<int>(staging_->take_locked()) : -1};
      if (!staged) ++direct_inflight_;
      ++job->outstanding;
      if (++job->next_chunk == seg->plan.chunks) {
        job->next_chunk = 0;
        ++job->next_segment;
      }
      return true;
    }
    return false;
  }

  std::byte* stage(const Chunk& c) const { return staging_->buffer(static_cast<uint32_t>(c.staging)); }

  void issue(Chunk c) {
    c.job->state->mark_running();
    const SegmentPlan& plan = c.seg->plan;
    const Segment& s = plan.segment;
    if (c.index == 0 && plan.verify_at == VerifyPoint::kSourceAtStart &&
        xxh3_64_of(s.src.ptr, s.bytes) != s.expected_xxh3_64) {
      fail_chunk(c, checksum_error(s));
      return;
    }
    const uint64_t n_io = align_up(c.n, kIoAlignment);
    Status submitted;
    if (c.staging < 0) {
      switch (plan.route) {
        case Route::kStorageToHost:
          submitted = io_->read_async(s.src.device, s.src.offset + c.off, {s.dst.ptr + c.off, c.n},
                                      [this, c](int64_t res) { chunk_done(c, io_status(res, c, "read")); });
          break;
        case Route::kHostToStorage:
          submitted = io_->write_async(s.dst.device, s.dst.offset + c.off, {s.src.ptr + c.off, c.n},
                                       [this, c](int64_t res) { chunk_done(c, io_status(res, c, "write")); });
          break;
        default:
          submitted = copy_->submit(s.dst.ptr + c.off, s.src.ptr + c.off, c.n, direction(plan.route),
                                    [this, c](const Status& st) { chunk_done(c, st); });
          break;
      }
    } else {
      std::byte* buf = stage(c);
      auto to_dispatcher = [this, c](Status st) { post(c, std::move(st)); };
      switch (plan.route) {
        case Route::kStorageToHost:
        case Route::kStorageToDevice:
        case Route::kStorageToStorage:
          submitted = io_->read_async(s.src.device, s.src.offset + c.off, {buf, n_io},
                                      [this, c, to_dispatcher](int64_t res) { to_dispatcher(io_status(res, c, "read")); });
          break;
        case Route::kHostToStorage:
        case Route::kDeviceToStorage:
          std::memset(buf + c.n, 0, n_io - c.n);  // the zero padding up to 4 KiB (transfer_engine.h)
          submitted = copy_->submit(buf, s.src.ptr + c.off, c.n,
                                    plan.route == Route::kHostToStorage ? CopyDirection::kHostToHost
                                                                        : CopyDirection::kDeviceToHost,
                                    to_dispatcher);
          break;
        default:
          submitted = internal_error("staged chunk on a copy route");
      }
    }
    if (!submitted.is_ok()) fail_chunk(c, std::move(submitted));
  }

  /// The first hop of a staged chunk has finished: hand the second hop to the dispatcher.
  void post(const Chunk& c, Status st) {
    {
      std::lock_guard lock(mu_);
      ready_.push_back([this, c, st = std::move(st)] { continue_chunk(c, st); });
    }
    work_cv_.notify_all();
  }

  void continue_chunk(const Chunk& c, const Status& st) {
    SegmentRun& seg = *c.seg;
    if (seg.plan.verify_at != VerifyPoint::kStagingInOrder) {
      second_hop(c, st);
      return;
    }
    if (c.index != seg.next_hash_chunk) {  // an earlier chunk is still on its first hop
      seg.parked.emplace(c.index, [this, c, st] { second_hop(c, st); });
      return;
    }
    second_hop(c, st);
    for (auto it = seg.parked.find(seg.next_hash_chunk); it != seg.parked.end();
         it = seg.parked.find(seg.next_hash_chunk)) {
      std::function<void()> next = std::move(it->second);
      seg.parked.erase(it);
      next();
    }
  }

  void second_hop(const Chunk& c, const Status& st) {
    SegmentRun& seg = *c.seg;
    const Segment& s = seg.plan.segment;
    const bool in_order_hash = seg.plan.verify_at == VerifyPoint::kStagingInOrder;
    if (in_order_hash) ++seg.next_hash_chunk;  // advance even on failure so parked chunks drain
    if (!st.is_ok()) return fail_chunk(c, st);
    if (c.job->state->should_stop()) return finish_chunk(c, false);
    std::byte* buf = stage(c);
    if (in_order_hash) {
      seg.hasher->update(buf, c.n);
      if (c.index + 1 == seg.plan.chunks && seg.hasher->digest() != s.expected_xxh3_64) {
        return fail_chunk(c, checksum_error(s));
      }
    }
    const uint64_t n_io = align_up(c.n, kIoAlignment);
    auto done_io = [this, c](int64_t res) { chunk_done(c, io_status(res, c, "write")); };
    auto done_copy = [this, c](const Status& result) { chunk_done(c, result); };
    Status submitted;
    switch (seg.plan.route) {
      case Route::kStorageToHost:
        submitted = copy_->submit(s.dst.ptr + c.off, buf, c.n, CopyDirection::kHostToHost, done_copy);
        break;
      case Route::kStorageToDevice:
        submitted = copy_->submit(s.dst.ptr + c.off, buf, c.n, CopyDirection::kHostToDevice, done_copy);
        break;
      case Route::kStorageToStorage:
        std::memset(buf + c.n, 0, n_io - c.n);
        [[fallthrough]];
      case Route::kHostToStorage:
      case Route::kDeviceToStorage:
        submitted = io_->write_async(s.dst.device, s.dst.offset + c.off, {buf, n_io}, done_io);
        break;
      default:
        submitted = internal_error("second hop on a single-hop route");
    }
    if (!submitted.is_ok()) fail_chunk(c, std::move(submitted));
  }

  // ---- completion side (any thread) ----
  void chunk_done(const Chunk& c, const Status& st) {
    if (!st.is_ok()) return fail_chunk(c, st);
    finish_chunk(c, true);
  }

  void fail_chunk(const Chunk& c, Status st) {
    if (st.code() == StatusCode::kChecksumMismatch) checksum_mismatches_.fetch_add(1, std::memory_order_relaxed);
    c.job->state->record_error(std::move(st));
    finish_chunk(c, false);
  }

  void finish_chunk(const Chunk& c, bool arrived) {
    const SegmentPlan& plan = c.seg->plan;
    if (arrived) {
      c.job->state->add_bytes(c.n);
      route_bytes_[static_cast<int>(plan.route)].fetch_add(c.n, std::memory_order_relaxed);
      if (c.seg->chunks_left.fetch_sub(1, std::memory_order_acq_rel) == 1) {  // the segment is complete
        const Segment& s = plan.segment;
        if (plan.verify_at == VerifyPoint::kDestinationAtEnd &&
            xxh3_64_of(s.dst.ptr, s.bytes) != s.expected_xxh3_64) {
          checksum_mismatches_.fetch_add(1, std::memory_order_relaxed);
          c.job->state->record_error(checksum_error(s));
        } else {
          c.job->state->segment_arrived(s.layer);
        }
      }
    }
    std::shared_ptr<Job> to_finish;
    bool wake = true;
    {
      std::lock_guard lock(mu_);
      if (c.staging >= 0) {
        staging_->give_back_locked(static_cast<uint32_t>(c.staging));
      } else {
        // A dispatcher that waits for direct slots is woken once half of them are free, not at
        // every completion: on a virtual machine each wake-up costs about as much as a 64 KiB copy.
        // No deadlock: every slot in flight frees itself, so the count does reach the half.
        wake = --direct_inflight_ <= options_.max_direct_ops / 2;
      }
      Job& job = *c.job;
      if (--job.outstanding == 0 && job.all_issued && !job.finished) {
        job.finished = true;
        to_finish = c.job;
      }
    }
    if (wake) work_cv_.notify_all();
    if (to_finish) finish_job(to_finish);
  }

  void finish_job(const std::shared_ptr<Job>& job) {
    if (t_dispatching == this) close_batch();
    // The admission slot goes back before the handle turns final: a caller whose wait() has
    // returned must find it free (try_submit right after wait() saw "engine full" otherwise).
    // `finishing_` keeps shutdown waiting until finish() below has returned.
    {
      std::lock_guard lock(mu_);
      --admitted_;
      ++finishing_;
    }
    admit_cv_.notify_all();
    job->state->finish([this](TransferState final_state) {
      switch (final_state) {
        case TransferState::kDone: jobs_done_.fetch_add(1, std::memory_order_relaxed); break;
        case TransferState::kFailed: jobs_failed_.fetch_add(1, std::memory_order_relaxed); break;
        default: jobs_cancelled_.fetch_add(1, std::memory_order_relaxed); break;
      }
    });
    {
      std::lock_guard lock(mu_);
      --finishing_;
    }
    admit_cv_.notify_all();
    work_cv_.notify_all();
  }

  // ---- helpers ----
  static Status io_status(int64_t res, const Chunk& c, const char* what) {
    if (res >= 0) return Status::ok();
    const Segment& s = c.seg->plan.segment;
    const Location& dev = std::string_view(what) == "read" ? s.src : s.dst;
    return errno_status(static_cast<int>(res), std::string(what) + " of " + std::to_string(c.n) +
                                                   " bytes at offset " + std::to_string(dev.offset + c.off) +
                                                   " of " + (dev.device ? dev.device->describe() : "?"));
  }
  static Status checksum_error(const Segment& s) {
    return Status(StatusCode::kChecksumMismatch,
                  "segment of layer " + std::to_string(s.layer) + " (" + std::to_string(s.bytes) +
                      " bytes): xxh3-64 differs from the expected value");
  }
  static CopyDirection direction(Route r) {
    switch (r) {
      case Route::kHostToDevice: return CopyDirection::kHostToDevice;
      case Route::kDeviceToHost: return CopyDirection::kDeviceToHost;
      case Route::kDeviceToDevice: return CopyDirection::kDeviceToDevice;
      default: return CopyDirection::kHostToHost;
    }
  }

  uint64_t chunk_bytes_ = 0;
  static thread_local const Impl* t_dispatching;  // the engine whose dispatcher this thread is
  bool batch_open_ = false;                       // dispatcher thread only
  uint32_t batch_ops_ = 0;
  mutable std::mutex mu_;
  std::condition_variable work_cv_;   // the dispatcher waits here
  std::condition_variable admit_cv_;  // submit() and shutdown() wait here
  std::deque<std::shared_ptr<Job>> dispatch_;     // admitted jobs with chunks left to issue
  std::deque<std::function<void()>> ready_;       // continuations; at most one per staging buffer
  uint32_t admitted_ = 0;
  uint32_t finishing_ = 0;  // jobs whose slot is back but whose handle is not final yet
  uint32_t direct_inflight_ = 0;
  uint32_t waiting_submitters_ = 0;  // submit() calls waiting for an admission slot
  bool stopping_ = false;
  std::once_flag shutdown_once_;
  std::thread dispatcher_;

  std::atomic<uint64_t> jobs_submitted_{0}, jobs_done_{0}, jobs_failed_{0}, jobs_cancelled_{0};
  std::atomic<uint64_t> checksum_mismatches_{0};
  std::array<std::atomic<uint64_t>, kNumRoutes> route_bytes_{};
};

// ---- public face ----

Result<std::unique_ptr<TransferEngine>> TransferEngine::create(TransferEngineOptions options) {
  if (options.staging_buffers == 0) return invalid_argument("staging_buffers must be > 0");
  if (options.staging_bytes == 0) return invalid_argument("staging_bytes must be > 0");
  if (options.max_inflight_jobs == 0) return invalid_argument("max_inflight_jobs must be > 0");
  if (options.max_direct_ops == 0) return invalid_argument("max_direct_ops must be > 0");
  std::shared_ptr<IoEngine> io = options.io_engine;
  if (!io) {
    auto made = create_io_engine(options.io);
    if (!made) return made.status();
    io = std::move(*made);
  }
  std::shared_ptr<CopyEngine> copy = options.copy_engine;
  if (!copy) {
    auto made = create_copy_engine();
    if (!made) return made.status();
    copy = std::move(*made);
  }
  auto impl = std::make_unique<Impl>(std::move(options), std::move(io), std::move(copy));
  KVTIER_RETURN_IF_ERROR(impl->start());
  return std::unique_ptr<TransferEngine>(new TransferEngine(std::move(impl)));
}

TransferEngine::TransferEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TransferEngine::~TransferEngine() = default;

thread_local const TransferEngine::Impl* TransferEngine::Impl::t_dispatching = nullptr;

Result<TransferHandle> TransferEngine::submit(JobSpec spec) { return impl_->submit(std::move(spec), true); }
Result<TransferHandle> TransferEngine::try_submit(JobSpec spec) {
  return impl_->submit(std::move(spec), false);
}
void TransferEngine::shutdown() { impl_->shutdown(); }

Status TransferEngine::register_host_memory(void* base, size_t bytes) {
  KVTIER_RETURN_IF_ERROR(impl_->copy_->register_host_memory(base, bytes));
  // Fixed buffers are only an optimisation: a refusal (the memlock limit of a daemon running as
  // its own user) was logged by the io engine, which goes on with plain reads and writes.
  IoRegion region{base, bytes};
  impl_->io_->register_buffers({&region, 1}).ignore();
  return Status::ok();
}

void TransferEngine::unregister_host_memory(void* base) noexcept {
  impl_->io_->unregister_buffers(base);
  impl_->copy_->unregister_host_memory(base);
}

TransferStats TransferEngine::stats() const { return impl_->stats(); }
IoEngine& TransferEngine::io_engine() noexcept { return *impl_->io_; }
CopyEngine& TransferEngine::copy_engine() noexcept { return *impl_->copy_; }
uint64_t TransferEngine::staging_bytes() const noexcept { return impl_->staging_->buffer_bytes(); }
uint32_t TransferEngine::staging_buffers() const noexcept { return impl_->staging_->count(); }

}  // namespace kvtier
