// StagingPool: the fixed set of staging buffers that two-hop transfers (NVMe ↔ HBM, unaligned
// host I/O) pass through. Allocated once as one 4 KiB-aligned region, page-locked where possible
// (mlock; cudaHostRegister through the copy engine with a GPU) and registered with the io engine
// as fixed buffers. Never grows: running out is back-pressure, not an allocation.
//
// Not thread-safe by itself: the TransferEngine takes and returns buffers under its own lock
// (the *_locked names), where it also decides who waits for one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kvtier/status.h"
#include "tiers/storage_device.h"
#include "transfer/copy_engine.h"
#include "transfer/io_engine.h"

namespace kvtier {

class StagingPool {
 public:
  /// `count` buffers of `bytes` (rounded up to kIoAlignment) each.
  static Result<std::unique_ptr<StagingPool>> create(uint32_t count, uint64_t bytes, IoEngine& io,
                                                     CopyEngine& copy);
  /// Unregisters from both engines (which must still live) and frees the region.
  ~StagingPool();
  StagingPool(const StagingPool&) = delete;
  StagingPool& operator=(const StagingPool&) = delete;

  uint32_t count() const noexcept { return count_; }
  uint64_t buffer_bytes() const noexcept { return bytes_; }
  std::byte* buffer(uint32_t index) const noexcept { return region_.get() + index * bytes_; }

  bool has_free_locked() const noexcept { return !free_.empty(); }
  /// The caller checked has_free_locked().
  uint32_t take_locked() noexcept {
    uint32_t i = free_.back();
    free_.pop_back();
    return i;
  }
  void give_back_locked(uint32_t index) { free_.push_back(index); }

  bool locked_in_memory() const noexcept { return mlocked_; }

 private:
  StagingPool(uint32_t count, uint64_t bytes, AlignedBuffer region, IoEngine& io, CopyEngine& copy)
      : count_(count), bytes_(bytes), region_(std::move(region)), io_(io), copy_(copy) {}

  uint32_t count_;
  uint64_t bytes_;
  AlignedBuffer region_;
  IoEngine& io_;
  CopyEngine& copy_;
  bool mlocked_ = false;
  bool copy_registered_ = false;
  std::vector<uint32_t> free_;
};

}  // namespace kvtier
