// kvtier's error vocabulary: a small status code with a message, and Result<T> for values.
//
// Exceptions policy (written down once, here): kvtier does not throw for expected failures.
// Every operation that can fail returns Status or Result<T>, both [[nodiscard]]; ignoring one
// is an explicit, greppable call to `.ignore()`. Objects whose construction can fail are made by
// `create()`/`open()` factories that return Result. The only exception that may escape the C++
// API is std::bad_alloc; none crosses the C API, the service loop or a CUDA launch.
#pragma once

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "kvtier/export.h"

namespace kvtier {

enum class StatusCode : uint8_t {
  kOk = 0,
  kInvalidArgument,    // the caller's input is malformed (bad size, partial block, garbage)
  kNotFound,           // no such key, file or entry
  kAlreadyExists,      // the thing is already there (not always an error for the caller)
  kLayoutMismatch,     // the KV layout does not match what the namespace or block expects
  kCollision,          // a key exists with different parent/tokens: a hash collision, refused
  kBusy,               // pinned, has children, or in use: try later or release first
  kResourceExhausted,  // tier full, queue full, no free slot: back-pressure
  kIoError,            // the storage device failed
  kChecksumMismatch,   // stored bytes do not match their checksum: treated as a miss
  kCancelled,          // the caller cancelled the job
  kUnavailable,        // a device or service is not there (no GPU, daemon down)
  kPermissionDenied,   // the caller's identity may not do this
  kProtocolError,      // a peer sent bytes that do not decode
  kInternal,           // a broken invariant inside kvtier: a bug
};

/// Stable lower-case name of a code, e.g. "invalid_argument".
KVTIER_API std::string_view status_code_name(StatusCode code) noexcept;

class [[nodiscard, gnu::visibility("default")]] Status {  // exported, as KVTIER_API
 public:
  Status() noexcept = default;  // ok
  Status(StatusCode code, std::string message)
      : code_(code),
        message_(code == StatusCode::kOk ? nullptr
                                         : std::make_shared<const std::string>(std::move(message))) {}

  static Status ok() noexcept { return Status(); }

  bool is_ok() const noexcept { return code_ == StatusCode::kOk; }
  explicit operator bool() const noexcept { return is_ok(); }
  StatusCode code() const noexcept { return code_; }
  std::string_view message() const noexcept {
    return message_ ? std::string_view(*message_) : std::string_view();
  }
  /// "code_name: message", or "ok".
  std::string to_string() const;

  /// Drop this status on purpose. Grep for `.ignore()` to find every such place.
  void ignore() const noexcept {}

  friend bool operator==(const Status& a, const Status& b) noexcept { return a.code_ == b.code_; }

 private:
  StatusCode code_ = StatusCode::kOk;
  std::shared_ptr<const std::string> message_;  // shared: copying a status never allocates
};

inline Status invalid_argument(std::string m) { return {StatusCode::kInvalidArgument, std::move(m)}; }
inline Status not_found(std::string m) { return {StatusCode::kNotFound, std::move(m)}; }
inline Status busy(std::string m) { return {StatusCode::kBusy, std::move(m)}; }
inline Status internal_error(std::string m) { return {StatusCode::kInternal, std::move(m)}; }

/// A value or the Status explaining why there is none.
template <typename T>
class [[nodiscard]] Result {
  static_assert(!std::is_same_v<std::remove_cv_t<T>, Status>, "use Status directly");

 public:
  Result(T value) : storage_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit
  Result(Status status) : storage_(std::in_place_index<1>, std::move(status)) {  // NOLINT
    if (std::get<1>(storage_).is_ok()) {
      storage_.template emplace<1>(StatusCode::kInternal, "Result built from an ok Status");
    }
  }

  bool is_ok() const noexcept { return storage_.index() == 0; }
  explicit operator bool() const noexcept { return is_ok(); }

  /// The status: ok when a value is held.
  Status status() const { return is_ok() ? Status::ok() : std::get<1>(storage_); }

  T& value() & { return std::get<0>(storage_); }
  const T& value() const& { return std::get<0>(storage_); }
  T&& value() && { return std::get<0>(std::move(storage_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }

  void ignore() const noexcept {}

 private:
  std::variant<T, Status> storage_;
};

}  // namespace kvtier

/// Return early from the enclosing function when `expr` yields a non-ok Status.
#define KVTIER_RETURN_IF_ERROR(expr)          \
  do {                                        \
    ::kvtier::Status kvtier_status_ = (expr); \
    if (!kvtier_status_.is_ok()) return kvtier_status_; \
  } while (0)
