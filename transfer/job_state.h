// JobState: what a TransferHandle and the TransferEngine share about one job — its state, first
// error, per-layer arrival counts and bytes — with the condition variable every wait blocks on.
// Internal to transfer/; callers see it only through TransferHandle.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <vector>

#include "kvtier/status.h"
#include "kvtier/transfer_handle.h"

namespace kvtier::detail {

class JobState {
 public:
  /// segments_per_layer[i]: how many segments layer i has (its size is the job's num_layers).
  JobState(std::vector<uint32_t> segments_per_layer, TransferCallback callback);

  // ---- the handle's side ----
  TransferState state() const noexcept { return state_.load(std::memory_order_acquire); }
  Status status() const;
  Status wait();
  Status wait_layer(uint32_t layer);
  uint32_t layers_done() const noexcept { return layers_done_.load(std::memory_order_acquire); }
  uint32_t num_layers() const noexcept { return static_cast<uint32_t>(remaining_.size()); }
  uint64_t bytes_done() const noexcept { return bytes_done_.load(std::memory_order_relaxed); }
  void cancel() noexcept { cancel_requested_.store(true, std::memory_order_release); }

  // ---- the engine's side ----
  bool cancel_requested() const noexcept { return cancel_requested_.load(std::memory_order_acquire); }
  /// True once the job should issue nothing more: cancelled, or a segment failed.
  bool should_stop() const noexcept {
    return cancel_requested() || failed_.load(std::memory_order_acquire);
  }
  /// pending → running (no-op afterwards).
  void mark_running() noexcept;
  void add_bytes(uint64_t bytes) noexcept { bytes_done_.fetch_add(bytes, std::memory_order_relaxed); }
  /// One segment of `layer` has fully arrived; wakes wait_layer() when it was the last.
  void segment_arrived(uint32_t layer);
  /// Records the job's first error (later ones are dropped); the job will end failed.
  void record_error(Status error);
  /// Called once, when nothing of the job is outstanding any more: decides the final state, calls
  /// `count` with it (the engine's stats, so they are current when a waiter wakes), runs the
  /// callback, then publishes the final state and wakes every waiter.
  void finish(const std::function<void(TransferState)>& count);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<TransferState> state_{TransferState::kPending};
  std::atomic<bool> cancel_requested_{false};
  std::atomic<bool> failed_{false};
  std::atomic<uint32_t> layers_done_{0};
  std::atomic<uint64_t> bytes_done_{0};
  std::vector<uint32_t> remaining_;  // guarded by mu_
  Status error_;                     // guarded by mu_
  Status final_status_;              // guarded by mu_, set by finish()
  TransferCallback callback_;
};

}  // namespace kvtier::detail
