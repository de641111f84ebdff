// TmpfsMount: a small tmpfs mounted on a fresh temp dir for the test's lifetime (root only), and
// a filler file that takes every free byte of it: the full file system the full-disk tests need.
#pragma once

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "temp_dir.h"

namespace kvtier::testing {

class TmpfsMount {
 public:
  explicit TmpfsMount(uint64_t bytes) : dir_("kvtier_tmpfs") {
    if (::geteuid() != 0) {
      why_not_ = "not root: mounting a tmpfs needs CAP_SYS_ADMIN";
      return;
    }
    const std::string data = "size=" + std::to_string(bytes);
    if (!dir_.ok() || ::mount("kvtier-test", dir_.path().c_str(), "tmpfs", 0, data.c_str()) != 0) {
      why_not_ = std::string("mount -t tmpfs: ") + std::strerror(errno);
      return;
    }
    mounted_ = true;
  }
  ~TmpfsMount() {
    if (mounted_) ::umount2(dir_.path().c_str(), MNT_DETACH);  // TempDir removes the empty mount point
  }
  TmpfsMount(const TmpfsMount&) = delete;
  TmpfsMount& operator=(const TmpfsMount&) = delete;

  bool ok() const { return mounted_; }
  /// Why ok() is false, for the WARN of a skipped test.
  const std::string& why_not() const { return why_not_; }
  const std::string& path() const { return dir_.path(); }

  uint64_t free_bytes() const {
    struct statvfs vfs{};
    if (::statvfs(path().c_str(), &vfs) != 0) return 0;
    return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  }

  /// Writes path()/filler until the file system refuses a single byte more; returns its size.
  uint64_t fill() {
    const int fd = ::open(filler().c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return 0;
    std::vector<char> chunk(1 << 20, 'f');
    uint64_t written = 0;
    for (size_t n = chunk.size(); n > 0;) {
      const ssize_t w = ::write(fd, chunk.data(), n);
      if (w > 0) {
        written += static_cast<uint64_t>(w);
      } else {
        n /= 2;  // ENOSPC: smaller writes take what is left of the last page
      }
    }
    ::close(fd);
    return written;
  }
  /// Deletes the filler: the space comes back.
  void unfill() { ::unlink(filler().c_str()); }

 private:
  std::string filler() const { return path() + "/filler"; }

  TempDir dir_;
  bool mounted_ = false;
  std::string why_not_;
};

}  // namespace kvtier::testing
