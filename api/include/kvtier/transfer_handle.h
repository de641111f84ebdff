// TransferHandle: the caller's end of one asynchronous transfer job (DESIGN.md "Transfer").
//
// States, written down (each job moves only forward along these arrows):
//
//   pending ──► running ──► done        every segment's bytes are at their destination
//      │           ├──────► failed      a segment failed; status() says why (kIoError, ...)
//      └───────────┴──────► cancelled   cancel() was called; segments not yet started were skipped
//
// Lifetime rule: the handle is move-only and there is exactly one per job. Its destructor (and a
// move-assignment over a live handle) WAITS until the job has reached a final state, so memory a
// transfer reads or writes (pinned host slots, staging, HBM) is never freed under it. A job whose
// handle is kept alive needs nothing else; a caller that wants fire-and-forget uses the callback
// and keeps the handle until the callback has fired.
//
// The completion callback given at submit runs exactly once, on an engine thread, before the
// final state is published: when wait() returns, the callback has returned. A callback must not
// wait on or destroy its own job's handle (that would wait for itself).
//
// Waits block on condition variables; nothing here sleeps or spins.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>

#include "kvtier/export.h"
#include "kvtier/status.h"

namespace kvtier {

enum class TransferState : uint8_t { kPending, kRunning, kDone, kFailed, kCancelled };
KVTIER_API std::string_view transfer_state_name(TransferState state) noexcept;
constexpr bool is_final(TransferState s) noexcept {
  return s == TransferState::kDone || s == TransferState::kFailed || s == TransferState::kCancelled;
}

/// Runs once when the job reaches a final state, with its status (ok, the error, or kCancelled).
using TransferCallback = std::function<void(const Status&)>;

namespace detail {
class JobState;  // shared by the handle and whoever runs the job (transfer/job_state.h)
}

class KVTIER_API TransferHandle {
 public:
  /// An empty handle: valid() is false, wait() returns kInvalidArgument.
  TransferHandle() noexcept = default;
  explicit TransferHandle(std::shared_ptr<detail::JobState> job) noexcept;
  TransferHandle(TransferHandle&& other) noexcept = default;
  /// Waits for the job this handle held (the lifetime rule), then takes `other`'s.
  TransferHandle& operator=(TransferHandle&& other) noexcept;
  TransferHandle(const TransferHandle&) = delete;
  TransferHandle& operator=(const TransferHandle&) = delete;
  /// Waits until the job is final (the lifetime rule above).
  ~TransferHandle();

  bool valid() const noexcept { return job_ != nullptr; }

  TransferState state() const noexcept;
  /// Non-blocking: true once the job is done, failed or cancelled.
  bool poll() const noexcept;
  /// Blocks until the job is final; returns its status (ok, the first error, or kCancelled).
  Status wait() const;
  /// Blocks until every segment of `layer` has arrived, or the job is final without it (then the
  /// job's status). kInvalidArgument for a layer >= num_layers().
  Status wait_layer(uint32_t layer) const;
  /// Number of layers whose segments have all arrived (layers with no segments count as arrived).
  uint32_t layers_done() const noexcept;
  uint32_t num_layers() const noexcept;
  /// Ok while pending, running or done; the error once failed; kCancelled once cancelled.
  Status status() const;
  /// Best effort: segments not yet started are skipped, the ones in flight finish; the job ends
  /// kCancelled unless it already finished (or failed) first. Does not wait.
  void cancel() noexcept;
  /// Bytes that have reached their destination so far.
  uint64_t bytes_done() const noexcept;

 private:
  std::shared_ptr<detail::JobState> job_;
};

}  // namespace kvtier
