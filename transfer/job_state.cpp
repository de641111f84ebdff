#include "transfer/job_state.h"

#include <utility>

namespace kvtier::detail {

JobState::JobState(std::vector<uint32_t> segments_per_layer, TransferCallback callback)
    : remaining_(std::move(segments_per_layer)), callback_(std::move(callback)) {
  uint32_t empty = 0;
  for (uint32_t n : remaining_) empty += n == 0 ? 1 : 0;
  layers_done_.store(empty, std::memory_order_relaxed);
}

Status JobState::status() const {
  std::lock_guard lock(mu_);
  switch (state_.load(std::memory_order_acquire)) {
    case TransferState::kFailed:
    case TransferState::kCancelled:
      return final_status_;
    default:
      return Status::ok();
  }
}

Status JobState::wait() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return is_final(state_.load(std::memory_order_acquire)); });
  return final_status_;
}

Status JobState::wait_layer(uint32_t layer) {
  if (layer >= remaining_.size()) {
    return invalid_argument("wait_layer(" + std::to_string(layer) + ") of a job with " +
                            std::to_string(remaining_.size()) + " layers");
  }
  std::unique_lock lock(mu_);
  cv_.wait(lock, [&] { return remaining_[layer] == 0 || is_final(state_.load(std::memory_order_acquire)); });
  if (remaining_[layer] == 0) return Status::ok();
  return final_status_;
}

void JobState::mark_running() noexcept {
  TransferState expected = TransferState::kPending;
  state_.compare_exchange_strong(expected, TransferState::kRunning, std::memory_order_acq_rel);
}

void JobState::segment_arrived(uint32_t layer) {
  bool layer_complete = false;
  {
    std::lock_guard lock(mu_);
    if (layer < remaining_.size() && remaining_[layer] > 0 && --remaining_[layer] == 0) {
      layer_complete = true;
      layers_done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
  if (layer_complete) cv_.notify_all();
}

void JobState::record_error(Status error) {
  std::lock_guard lock(mu_);
  if (error_.is_ok()) error_ = std::move(error);
  failed_.store(true, std::memory_order_release);
}

void JobState::finish(const std::function<void(TransferState)>& count) {
  Status final_status;
  TransferState final_state;
  {
    std::lock_guard lock(mu_);
    if (!error_.is_ok()) {
      final_state = TransferState::kFailed;
      final_status = error_;
    } else if (cancel_requested()) {
      // Cancelled only matters when something was skipped; a job whose every layer arrived is done.
      bool all_arrived = true;
      for (uint32_t n : remaining_) all_arrived = all_arrived && n == 0;
      final_state = all_arrived ? TransferState::kDone : TransferState::kCancelled;
      if (!all_arrived) final_status = Status(StatusCode::kCancelled, "transfer cancelled");
    } else {
      final_state = TransferState::kDone;
    }
  }
  if (count) count(final_state);
  // The callback runs before the final state is published so that wait() returning implies the
  // callback has returned (written down in transfer_handle.h).
  if (callback_) {
    callback_(final_status);
    callback_ = nullptr;
  }
  {
    std::lock_guard lock(mu_);
    final_status_ = final_status;
    state_.store(final_state, std::memory_order_release);
  }
  cv_.notify_all();
}

}  // namespace kvtier::detail
