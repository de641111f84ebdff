// StorageDevice: the checks and counters shared by every device, and the file and memory devices.
#include "tiers/storage_device.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <vector>

#include <spdlog/spdlog.h>

namespace kvtier {

// ---- the public, non-virtual half ---------------------------------------------------------------

Status StorageDevice::check_range(uint64_t offset, uint64_t length, const void* buffer) const {
  if (!is_aligned(offset, kIoAlignment)) {
    return invalid_argument("device offset " + std::to_string(offset) + " is not a multiple of " +
                            std::to_string(kIoAlignment));
  }
  if (!is_aligned(length, kIoAlignment)) {
    return invalid_argument("device length " + std::to_string(length) + " is not a multiple of " +
                            std::to_string(kIoAlignment));
  }
  if (!is_aligned(reinterpret_cast<uintptr_t>(buffer), kIoAlignment)) {
    return invalid_argument("device buffer address is not " + std::to_string(kIoAlignment) +
                            "-byte aligned");
  }
  if (offset > size_ || length > size_ - offset) {
    return invalid_argument("device range [" + std::to_string(offset) + ", +" +
                            std::to_string(length) + ") is outside the device of " +
                            std::to_string(size_) + " bytes");
  }
  return Status::ok();
}

Status StorageDevice::read(uint64_t offset, std::span<std::byte> out) {
  KVTIER_RETURN_IF_ERROR(check_range(offset, out.size(), out.data()));
  const int rc = read_impl(offset, out);
  record_read(out.size(), rc == 0);
  if (rc != 0) return errno_status(rc, "read of " + std::to_string(out.size()) + " bytes at " +
                                           std::to_string(offset) + " from " + describe());
  return Status::ok();
}

Status StorageDevice::write(uint64_t offset, std::span<const std::byte> in) {
  KVTIER_RETURN_IF_ERROR(check_range(offset, in.size(), in.data()));
  const int rc = write_impl(offset, in);
  record_write(in.size(), rc == 0);
  if (rc != 0) return errno_status(rc, "write of " + std::to_string(in.size()) + " bytes at " +
                                           std::to_string(offset) + " to " + describe());
  return Status::ok();
}

Status StorageDevice::flush() {
  const int rc = flush_impl();
  stats_.flushes.fetch_add(1, std::memory_order_relaxed);
  if (rc != 0) {
    stats_.flush_errors.fetch_add(1, std::memory_order_relaxed);
    return errno_status(rc, "flush of " + describe());
  }
  return Status::ok();
}

void StorageDevice::record_read(uint64_t bytes, bool ok) noexcept {
  stats_.reads.fetch_add(1, std::memory_order_relaxed);
  if (ok) {
    stats_.bytes_read.fetch_add(bytes, std::memory_order_relaxed);
  } else {
    stats_.read_errors.fetch_add(1, std::memory_order_relaxed);
  }
}

void StorageDevice::record_write(uint64_t bytes, bool ok) noexcept {
  stats_.writes.fetch_add(1, std::memory_order_relaxed);
  if (ok) {
    stats_.bytes_written.fetch_add(bytes, std::memory_order_relaxed);
  } else {
    stats_.write_errors.fetch_add(1, std::memory_order_relaxed);
  }
}

Status errno_status(int neg_errno, const std::string& what) {
  const int err = neg_errno < 0 ? -neg_errno : neg_errno;
  if (err == ENOSPC) {
    return {StatusCode::kResourceExhausted, what + ": " + std::strerror(err)};
  }
  return {StatusCode::kIoError, what + ": " + std::strerror(err)};
}

// ---- aligned buffers ----------------------------------------------------------------------------

void AlignedFree::operator()(void* p) const noexcept { std::free(p); }

AlignedBuffer make_aligned_buffer(size_t bytes, size_t alignment) {
  // aligned_alloc wants a size that is a multiple of the alignment (and non-zero).
  const size_t rounded = bytes == 0 ? alignment : static_cast<size_t>(align_up(bytes, alignment));
  void* p = std::aligned_alloc(alignment, rounded);
  if (p == nullptr) throw std::bad_alloc();  // the one exception the API lets escape
  return AlignedBuffer(static_cast<std::byte*>(p));
}

// ---- file device --------------------------------------------------------------------------------

namespace {

class FileDevice final : public StorageDevice {
 public:
  FileDevice(int fd, uint64_t size, bool direct, std::string path)
      : StorageDevice(size), fd_(fd), direct_(direct), path_(std::move(path)) {}
  ~FileDevice() override { ::close(fd_); }

  int native_fd() const noexcept override { return fd_; }
  bool direct_io() const noexcept override { return direct_; }
  std::string describe() const override {
    return "file " + path_ + (direct_ ? " (O_DIRECT)" : " (buffered)");
  }

 private:
  int read_impl(uint64_t offset, std::span<std::byte> out) override {
    size_t done = 0;
    while (done < out.size()) {
      const ssize_t n = ::pread(fd_, out.data() + done, out.size() - done,
                                static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return -errno;
      }
      if (n == 0) return -EIO;  // past the end: the file is shorter than it claims
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int write_impl(uint64_t offset, std::span<const std::byte> in) override {
    size_t done = 0;
    while (done < in.size()) {
      const ssize_t n = ::pwrite(fd_, in.data() + done, in.size() - done,
                                 static_cast<off_t>(offset + done));
      if (n < 0) {
        if (errno == EINTR) continue;
        return -errno;
      }
      if (n == 0) return -EIO;
      done += static_cast<size_t>(n);
    }
    return 0;
  }

  int flush_impl() override {
    while (::fdatasync(fd_) != 0) {
      if (errno != EINTR) return -errno;
    }
    return 0;
  }

  int fd_;
  bool direct_;
  std::string path_;
};

Status os_error(const std::string& what, const std::string& path, int err) {
  return errno_status(-err, what + " " + path);
}

/// Writes zeros into every hole of `path` below `size` (and up to `size` past its end) through a
/// buffered descriptor of its own, for file systems without fallocate: holes read as zeros, so
/// the content is unchanged, and the blocks are allocated now, not at the first write (which a
/// full disk would fail). Returns 0 or an errno.
int zero_fill_holes(const std::string& path, uint64_t size) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0) return errno;
  static constexpr size_t kChunk = 1 << 20;
  const std::vector<char> zeros(kChunk, 0);
  int err = 0;
  uint64_t at = 0;
  while (at < size && err == 0) {
    off_t hole = ::lseek(fd, static_cast<off_t>(at), SEEK_HOLE);
    if (hole < 0) {
      if (errno != ENXIO) {
        err = errno;
        break;
      }
      hole = static_cast<off_t>(at);  // at or past the end: the rest is one hole
    }
    if (static_cast<uint64_t>(hole) >= size) break;
    const off_t data = ::lseek(fd, hole, SEEK_DATA);
    if (data < 0 && errno != ENXIO) {
      err = errno;
      break;
    }
    const uint64_t end = data < 0 ? size : std::min<uint64_t>(static_cast<uint64_t>(data), size);
    for (uint64_t off = static_cast<uint64_t>(hole); off < end && err == 0;) {
      const ssize_t n = ::pwrite(fd, zeros.data(), std::min<uint64_t>(kChunk, end - off), static_cast<off_t>(off));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        err = n < 0 ? errno : EIO;
        break;
      }
      off += static_cast<uint64_t>(n);
    }
    at = end;
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  ::close(fd);
  return err;
}

/// Allocates every byte of [0, size) of a regular file: fallocate, or zero_fill_holes where the
/// file system has no fallocate. Returns 0 or an errno.
int preallocate(int fd, const std::string& path, uint64_t size, const FileDeviceOptions& options) {
  int rc;
  do {
    rc = options.fallocate_fn ? options.fallocate_fn(fd, size)
                              : (::fallocate(fd, 0, 0, static_cast<off_t>(size)) == 0 ? 0 : errno);
  } while (rc == EINTR);
  if (rc != EOPNOTSUPP) return rc;
  spdlog::info("kvtier: {}: the file system has no fallocate; writing zeros to preallocate {} bytes", path, size);
  return zero_fill_holes(path, size);
}

uint64_t free_bytes_at(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
  struct statvfs vfs{};
  if (::statvfs(dir.c_str(), &vfs) != 0) return 0;
  return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

}  // namespace

Result<std::unique_ptr<StorageDevice>> create_file_device(const std::string& path, uint64_t size,
                                                          const FileDeviceOptions& options) {
  size = size / kIoAlignment * kIoAlignment;
  const int base_flags = O_RDWR | O_CLOEXEC | (options.create ? O_CREAT : 0);
  bool direct = options.direct;
  auto open_file = [&](int flags) {
    return options.open_fn ? options.open_fn(path.c_str(), flags, 0644) : ::open(path.c_str(), flags, 0644);
  };
  int fd = open_file(base_flags | (direct ? O_DIRECT : 0));
  if (fd < 0 && direct && errno == EINVAL) {
    if (options.require_direct) {
      return Status(StatusCode::kIoError, "open " + path + ": the file system refuses O_DIRECT");
    }
    spdlog::warn("kvtier: {} refuses O_DIRECT; falling back to buffered I/O", path);
    direct = false;
    fd = open_file(base_flags);
  }
  if (fd < 0) return os_error("open", path, errno);

  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    return os_error("fstat", path, err);
  }
  if (S_ISBLK(st.st_mode)) {
    uint64_t dev_bytes = 0;
    if (::ioctl(fd, BLKGETSIZE64, &dev_bytes) != 0) {
      const int err = errno;
      ::close(fd);
      return os_error("BLKGETSIZE64", path, err);
    }
    if (dev_bytes < size) {
      ::close(fd);
      return Status(StatusCode::kResourceExhausted,
                    "block device " + path + " holds " + std::to_string(dev_bytes) +
                        " bytes, fewer than the " + std::to_string(size) + " asked for");
    }
  } else if (S_ISREG(st.st_mode)) {
    // Allocated bytes, not the length: a file left sparse by an older kvtier is filled too.
    if (options.create && static_cast<uint64_t>(st.st_blocks) * 512 < size) {
      const int rc = preallocate(fd, path, size, options);
      if (rc != 0) {
        // A failed fallocate may keep what it allocated past the old end: give that back.
        if (::ftruncate(fd, st.st_size) != 0) spdlog::warn("kvtier: {}: truncating after a failed preallocation: {}", path, std::strerror(errno));
        ::close(fd);
        if (rc == ENOSPC) {
          return Status(StatusCode::kResourceExhausted,
                        "preallocating " + std::to_string(size) + " bytes for " + path +
                            ": no space left on the file system (" + std::to_string(free_bytes_at(path)) +
                            " bytes free)");
        }
        return os_error("preallocating " + std::to_string(size) + " bytes for", path, rc);
      }
    } else if (static_cast<uint64_t>(st.st_size) < size) {
      ::close(fd);
      return invalid_argument(path + " holds " + std::to_string(st.st_size) + " bytes, fewer than " +
                              std::to_string(size));
    }
  } else {
    ::close(fd);
    return invalid_argument(path + " is neither a regular file nor a block device");
  }
  return std::unique_ptr<StorageDevice>(new FileDevice(fd, size, direct, path));
}

// ---- memory device ------------------------------------------------------------------------------

namespace {

class MemoryDevice final : public StorageDevice {
 public:
  explicit MemoryDevice(uint64_t size) : StorageDevice(size), bytes_(size) {}
  std::string describe() const override {
    return "memory device of " + std::to_string(size()) + " bytes";
  }

 private:
  // A lock so concurrent reads and writes of one range behave as a disk's would (no torn
  // memcpy visible to a sanitizer as a data race); different ranges still serialize briefly.
  int read_impl(uint64_t offset, std::span<std::byte> out) override {
    std::shared_lock lock(mu_);
    std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return 0;
  }
  int write_impl(uint64_t offset, std::span<const std::byte> in) override {
    std::unique_lock lock(mu_);
    std::memcpy(bytes_.data() + offset, in.data(), in.size());
    return 0;
  }
  int flush_impl() override { return 0; }

  std::shared_mutex mu_;
  std::vector<std::byte> bytes_;
};

}  // namespace

std::unique_ptr<StorageDevice> create_memory_device(uint64_t size) {
  return std::make_unique<MemoryDevice>(size / kIoAlignment * kIoAlignment);
}

// ---- shared device ------------------------------------------------------------------------------

namespace {

class SharedDevice final : public StorageDevice {
 public:
  explicit SharedDevice(std::shared_ptr<StorageDevice> shared)
      : StorageDevice(shared->size()), shared_(std::move(shared)) {}
  std::string describe() const override { return "shared " + shared_->describe(); }

 private:
  // Errors come back as Status from the shared device; map them to an errno for this layer.
  static int to_errno(const Status& s) {
    if (s.is_ok()) return 0;
    return s.code() == StatusCode::kResourceExhausted ? -ENOSPC : -EIO;
  }
  int read_impl(uint64_t offset, std::span<std::byte> out) override {
    return to_errno(shared_->read(offset, out));
  }
  int write_impl(uint64_t offset, std::span<const std::byte> in) override {
    return to_errno(shared_->write(offset, in));
  }
  int flush_impl() override { return to_errno(shared_->flush()); }

  std::shared_ptr<StorageDevice> shared_;
};

}  // namespace

std::unique_ptr<StorageDevice> create_shared_device(std::shared_ptr<StorageDevice> shared) {
  return std::make_unique<SharedDevice>(std::move(shared));
}

}  // namespace kvtier
