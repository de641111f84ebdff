// StorageDevice: the I/O seam under the NVMe tier (as CacheLib Navy's Device). Public non-virtual
// read/write/flush check alignment and bounds, count bytes and errors, and turn -errno into a
// Status; implementations only do the I/O. Factories hide the implementations:
//   create_file_device   a regular file or block device, O_DIRECT by default (the real tier)
//   create_memory_device an in-memory device for tests and machines without a disk to spare
//   FaultInjectingDevice (tiers/fault_device.h) wraps any device and fails on purpose
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "kvtier/status.h"

namespace kvtier {

/// Alignment of every offset, length and buffer address given to a device (O_DIRECT's rule).
inline constexpr uint32_t kIoAlignment = 4096;

constexpr uint64_t align_up(uint64_t v, uint64_t a) noexcept { return (v + a - 1) / a * a; }
constexpr bool is_aligned(uint64_t v, uint64_t a) noexcept { return v % a == 0; }

struct DeviceStats {
  std::atomic<uint64_t> reads{0}, writes{0}, flushes{0};
  std::atomic<uint64_t> bytes_read{0}, bytes_written{0};
  std::atomic<uint64_t> read_errors{0}, write_errors{0}, flush_errors{0};
};

class StorageDevice {
 public:
  virtual ~StorageDevice() = default;
  StorageDevice(const StorageDevice&) = delete;
  StorageDevice& operator=(const StorageDevice&) = delete;

  /// Capacity in bytes (a multiple of kIoAlignment).
  uint64_t size() const noexcept { return size_; }

  /// Reads exactly out.size() bytes at `offset`. offset, size and address must be
  /// kIoAlignment-aligned and inside the device (kInvalidArgument otherwise, nothing read).
  /// A failed or short read is kIoError.
  Status read(uint64_t offset, std::span<std::byte> out);
  /// Writes exactly in.size() bytes at `offset`; the same rules. ENOSPC is kResourceExhausted.
  Status write(uint64_t offset, std::span<const std::byte> in);
  /// Makes completed writes durable (fdatasync for files).
  Status flush();

  /// The file descriptor an I/O engine (io_uring) may submit to directly, or -1 when the device
  /// must be driven through read()/write() (memory and fault-injecting devices).
  virtual int native_fd() const noexcept { return -1; }
  /// True when the descriptor was opened with O_DIRECT.
  virtual bool direct_io() const noexcept { return false; }
  /// A short description for logs: "file /data/kv.slots (O_DIRECT)".
  virtual std::string describe() const = 0;

  /// For I/O engines that drive native_fd() themselves: count the outcome of one operation.
  void record_read(uint64_t bytes, bool ok) noexcept;
  void record_write(uint64_t bytes, bool ok) noexcept;

  const DeviceStats& stats() const noexcept { return stats_; }

  /// Checks the alignment and bounds rule; kInvalidArgument with a message when broken.
  Status check_range(uint64_t offset, uint64_t length, const void* buffer) const;

 protected:
  explicit StorageDevice(uint64_t size) : size_(size) {}

 private:
  /// Implementations return 0 or -errno; a short transfer is -EIO (the caller retries nothing).
  virtual int read_impl(uint64_t offset, std::span<std::byte> out) = 0;
  virtual int write_impl(uint64_t offset, std::span<const std::byte> in) = 0;
  virtual int flush_impl() = 0;

  uint64_t size_;
  DeviceStats stats_;
};

/// Turns -errno from a device or an I/O engine into a Status ("what" names the operation).
Status errno_status(int neg_errno, const std::string& what);

struct FileDeviceOptions {
  /// Open with O_DIRECT (default true). Falls back to buffered I/O, with a warning in the log,
  /// on file systems that refuse O_DIRECT (tmpfs) unless `require_direct` is set.
  bool direct = true;
  /// Fail instead of falling back when O_DIRECT is refused (default false).
  bool require_direct = false;
  /// Create the file when missing and preallocate `size` bytes (default true): fallocate(2), or,
  /// on a file system that cannot (ext2), zeros written into every hole, so the file is never
  /// left sparse; an existing file's holes are filled the same way. kResourceExhausted when the
  /// file system has too little space. A block device is used as it is; its size must be at
  /// least `size`.
  bool create = true;
  /// Stands in for ::open(path, flags, mode) (default: ::open). Tests play a file system that
  /// refuses O_DIRECT with it, whatever the machine's file systems do.
  std::function<int(const char*, int, mode_t)> open_fn;
  /// Stands in for fallocate(fd, 0, 0, length), returning 0 or an errno (default: fallocate).
  /// Tests play a file system without fallocate (EOPNOTSUPP) with it.
  std::function<int(int fd, uint64_t length)> fallocate_fn;
};

/// Opens (and preallocates) a slot file or block device of `size` bytes (rounded down to
/// kIoAlignment). kIoError with the path and errno text when it cannot.
Result<std::unique_ptr<StorageDevice>> create_file_device(const std::string& path, uint64_t size,
                                                          const FileDeviceOptions& options = {});

/// A device held in memory (zero-filled), for tests.
std::unique_ptr<StorageDevice> create_memory_device(uint64_t size);

/// A device that forwards to `shared`, which outlives it: lets a test "close" a tier over an
/// in-memory device and open it again over the same bytes.
std::unique_ptr<StorageDevice> create_shared_device(std::shared_ptr<StorageDevice> shared);

/// An aligned heap buffer for device I/O (freed with std::free).
struct AlignedFree {
  void operator()(void* p) const noexcept;
};
using AlignedBuffer = std::unique_ptr<std::byte[], AlignedFree>;
AlignedBuffer make_aligned_buffer(size_t bytes, size_t alignment = kIoAlignment);

}  // namespace kvtier
