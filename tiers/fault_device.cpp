#include "tiers/fault_device.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace kvtier {

namespace {
int status_to_errno(const Status& s) {
  if (s.is_ok()) return 0;
  return s.code() == StatusCode::kResourceExhausted ? -ENOSPC : -EIO;
}
}  // namespace

FaultInjectingDevice::FaultInjectingDevice(std::unique_ptr<StorageDevice> inner, FaultPlan plan)
    : StorageDevice(inner->size()), inner_(std::move(inner)) {
  set_plan(plan);
}

void FaultInjectingDevice::set_plan(const FaultPlan& plan) {
  std::lock_guard lock(mu_);
  plan_ = plan;
  rng_.seed(plan.seed);
  writes_seen_ = 0;
  bytes_written_ = 0;
}

FaultPlan FaultInjectingDevice::plan() const {
  std::lock_guard lock(mu_);
  return plan_;
}

bool FaultInjectingDevice::draw_one_in_locked(uint32_t n) {
  if (n == 0) return false;
  return rng_() % n == 0;
}

FaultInjectingDevice::WriteDecision FaultInjectingDevice::decide_write_locked(uint64_t offset,
                                                                              uint64_t length) {
  const uint64_t nth = ++writes_seen_;
  WriteDecision d;
  if (plan_.enospc_after_bytes && bytes_written_ + length > *plan_.enospc_after_bytes) {
    d.fault = WriteFault::kEnospc;
    d.err = -ENOSPC;
  } else if (plan_.fail_nth_write != 0 && nth == plan_.fail_nth_write) {
    d.fault = plan_.fail_nth_write_errno == ENOSPC ? WriteFault::kEnospc : WriteFault::kFail;
    d.err = -plan_.fail_nth_write_errno;
  } else if (plan_.fail_writes_at_offset && *plan_.fail_writes_at_offset >= offset &&
             *plan_.fail_writes_at_offset - offset < length) {
    d.fault = WriteFault::kFail;
    d.err = -EIO;
  } else if (plan_.torn_write_nth != 0 && nth == plan_.torn_write_nth) {
    d.fault = WriteFault::kPartial;
    d.err = -EIO;
    d.keep_bytes = std::min(length, plan_.torn_write_bytes / kIoAlignment * kIoAlignment);
    faults_.torn_writes.fetch_add(1, std::memory_order_relaxed);
  } else if (plan_.short_write_once) {
    plan_.short_write_once = false;
    d.fault = WriteFault::kPartial;
    d.err = -EIO;
    d.keep_bytes = length / 2 / kIoAlignment * kIoAlignment;
    faults_.short_writes.fetch_add(1, std::memory_order_relaxed);
  } else if (draw_one_in_locked(plan_.write_error_one_in)) {
    d.fault = WriteFault::kFail;
    d.err = -EIO;
  }
  if (d.fault == WriteFault::kFail) faults_.write_errors.fetch_add(1, std::memory_order_relaxed);
  if (d.fault == WriteFault::kEnospc) faults_.enospc.fetch_add(1, std::memory_order_relaxed);
  if (d.fault == WriteFault::kNone) bytes_written_ += length;
  if (d.fault == WriteFault::kPartial) bytes_written_ += d.keep_bytes;
  return d;
}

int FaultInjectingDevice::read_impl(uint64_t offset, std::span<std::byte> out) {
  uint32_t delay_us = 0;
  {
    std::lock_guard lock(mu_);
    if (draw_one_in_locked(plan_.read_error_one_in)) {
      faults_.read_errors.fetch_add(1, std::memory_order_relaxed);
      return -EIO;
    }
    delay_us = plan_.read_delay_us;
  }
  if (delay_us > 0) {
    // The device is slow, not the test waiting: the read returns its bytes after the delay.
    faults_.delayed_reads.fetch_add(1, std::memory_order_relaxed);
    std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
  }
  return status_to_errno(inner_->read(offset, out));
}

int FaultInjectingDevice::write_impl(uint64_t offset, std::span<const std::byte> in) {
  WriteDecision d;
  {
    std::lock_guard lock(mu_);
    d = decide_write_locked(offset, in.size());
  }
  switch (d.fault) {
    case WriteFault::kNone:
      return status_to_errno(inner_->write(offset, in));
    case WriteFault::kPartial:
      if (d.keep_bytes > 0) {
        const int rc = status_to_errno(inner_->write(offset, in.first(d.keep_bytes)));
        if (rc != 0) return rc;
      }
      return d.err;
    case WriteFault::kFail:
    case WriteFault::kEnospc:
      return d.err;
  }
  return -EIO;
}

int FaultInjectingDevice::flush_impl() {
  {
    std::lock_guard lock(mu_);
    if (plan_.fail_flush) {
      faults_.flush_errors.fetch_add(1, std::memory_order_relaxed);
      return -EIO;
    }
  }
  return status_to_errno(inner_->flush());
}

}  // namespace kvtier
