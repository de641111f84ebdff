#include "kvtier/transfer_handle.h"

#include "transfer/job_state.h"

namespace kvtier {

std::string_view transfer_state_name(TransferState state) noexcept {
  switch (state) {
    case TransferState::kPending: return "pending";
    case TransferState::kRunning: return "running";
    case TransferState::kDone: return "done";
    case TransferState::kFailed: return "failed";
    case TransferState::kCancelled: return "cancelled";
  }
  return "unknown";
}

TransferHandle::TransferHandle(std::shared_ptr<detail::JobState> job) noexcept : job_(std::move(job)) {}

TransferHandle& TransferHandle::operator=(TransferHandle&& other) noexcept {
  if (this != &other) {
    if (job_) job_->wait().ignore();  // the lifetime rule: never drop a job still in flight
    job_ = std::move(other.job_);
  }
  return *this;
}

TransferHandle::~TransferHandle() {
  if (job_) job_->wait().ignore();  // the lifetime rule: memory is never freed under a transfer
}

TransferState TransferHandle::state() const noexcept {
  return job_ ? job_->state() : TransferState::kFailed;
}

bool TransferHandle::poll() const noexcept { return !job_ || is_final(job_->state()); }

Status TransferHandle::wait() const {
  if (!job_) return invalid_argument("wait() on an empty TransferHandle");
  return job_->wait();
}

Status TransferHandle::wait_layer(uint32_t layer) const {
  if (!job_) return invalid_argument("wait_layer() on an empty TransferHandle");
  return job_->wait_layer(layer);
}

uint32_t TransferHandle::layers_done() const noexcept { return job_ ? job_->layers_done() : 0; }
uint32_t TransferHandle::num_layers() const noexcept { return job_ ? job_->num_layers() : 0; }

Status TransferHandle::status() const {
  if (!job_) return invalid_argument("status() of an empty TransferHandle");
  return job_->status();
}

void TransferHandle::cancel() noexcept {
  if (job_) job_->cancel();
}

uint64_t TransferHandle::bytes_done() const noexcept { return job_ ? job_->bytes_done() : 0; }

}  // namespace kvtier
