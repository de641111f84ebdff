// StorageDevice: round trips on memory and file devices; the alignment and bounds rule.
#include <catch2/catch.hpp>

#include <fcntl.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>

#include "tier_test_support.h"
#include "tiers/storage_device.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
constexpr uint64_t kDeviceBytes = 1 << 20;

std::unique_ptr<StorageDevice> make_device(const std::string& kind, const TempDir& dir) {
  if (kind == "memory") return create_memory_device(kDeviceBytes);
  auto dev = create_file_device(dir.file("dev.slots"), kDeviceBytes);
  REQUIRE(dev.is_ok());
  return std::move(dev).value();
}
}  // namespace

TEST_CASE("A device reads back what was written, at every aligned offset tried") {
  const std::string kind = GENERATE(as<std::string>{}, "memory", "file");
  TempDir dir;
  REQUIRE(dir.ok());
  auto dev = make_device(kind, dir);
  INFO(dev->describe());
  CHECK(dev->size() == kDeviceBytes);

  for (uint64_t offset : {uint64_t{0}, uint64_t{4096}, kDeviceBytes - 3 * 4096}) {
    auto in = pattern_buffer(3 * 4096, offset + 7);
    REQUIRE(dev->write(offset, std::span<const std::byte>(in.get(), 3 * 4096)).is_ok());
    auto out = make_aligned_buffer(3 * 4096);
    std::memset(out.get(), 0, 3 * 4096);
    REQUIRE(dev->read(offset, std::span(out.get(), 3 * 4096)).is_ok());
    CHECK(same_bytes(in.get(), out.get(), 3 * 4096));
  }
  REQUIRE(dev->flush().is_ok());
  CHECK(dev->stats().writes == 3);
  CHECK(dev->stats().reads == 3);
  CHECK(dev->stats().bytes_written == 9 * 4096);
  CHECK(dev->stats().bytes_read == 9 * 4096);
  CHECK(dev->stats().flushes == 1);
  if (kind == "file") {
    CHECK(dev->native_fd() >= 0);
  } else {
    CHECK(dev->native_fd() == -1);
  }
}

TEST_CASE("A file device keeps its bytes across close and reopen") {
  TempDir dir;
  REQUIRE(dir.ok());
  auto in = pattern_buffer(8192, 42);
  {
    auto dev = create_file_device(dir.file("a"), kDeviceBytes);
    REQUIRE(dev.is_ok());
    REQUIRE((*dev)->write(8192, std::span<const std::byte>(in.get(), 8192)).is_ok());
    REQUIRE((*dev)->flush().is_ok());
  }
  auto dev = create_file_device(dir.file("a"), kDeviceBytes);
  REQUIRE(dev.is_ok());
  auto out = make_aligned_buffer(8192);
  REQUIRE((*dev)->read(8192, std::span(out.get(), 8192)).is_ok());
  CHECK(same_bytes(in.get(), out.get(), 8192));
}

TEST_CASE("Misaligned or out-of-range I/O is refused with nothing done and nothing counted") {
  const std::string kind = GENERATE(as<std::string>{}, "memory", "file");
  TempDir dir;
  REQUIRE(dir.ok());
  auto dev = make_device(kind, dir);
  auto zeros = make_aligned_buffer(2 * 4096);
  std::memset(zeros.get(), 0, 2 * 4096);
  REQUIRE(dev->write(0, std::span<const std::byte>(zeros.get(), 2 * 4096)).is_ok());
  auto junk = pattern_buffer(3 * 4096, 1);
  const uint64_t writes_before = dev->stats().writes;
  const uint64_t reads_before = dev->stats().reads;

  auto expect_invalid = [](const Status& s) {
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK_FALSE(s.message().empty());
  };
  expect_invalid(dev->write(512, std::span<const std::byte>(junk.get(), 4096)));     // offset
  expect_invalid(dev->write(0, std::span<const std::byte>(junk.get(), 1000)));       // length
  expect_invalid(dev->write(0, std::span<const std::byte>(junk.get() + 1, 4096)));   // address
  expect_invalid(dev->write(kDeviceBytes, std::span<const std::byte>(junk.get(), 4096)));
  expect_invalid(dev->write(kDeviceBytes - 4096, std::span<const std::byte>(junk.get(), 8192)));
  expect_invalid(dev->read(512, std::span(junk.get(), 4096)));
  expect_invalid(dev->read(0, std::span(junk.get() + 8, 4096)));
  expect_invalid(dev->read(kDeviceBytes, std::span(junk.get(), 4096)));
  expect_invalid(dev->read(~uint64_t{0} - 4095, std::span(junk.get(), 4096)));  // overflow

  CHECK(dev->stats().writes == writes_before);
  CHECK(dev->stats().reads == reads_before);
  CHECK(dev->stats().write_errors == 0);
  CHECK(dev->stats().read_errors == 0);
  auto out = make_aligned_buffer(2 * 4096);
  REQUIRE(dev->read(0, std::span(out.get(), 2 * 4096)).is_ok());
  CHECK(same_bytes(out.get(), zeros.get(), 2 * 4096));
}

TEST_CASE("A shared device lets two handles see one set of bytes") {
  std::shared_ptr<StorageDevice> mem = create_memory_device(kDeviceBytes);
  auto in = pattern_buffer(4096, 3);
  {
    auto first = create_shared_device(mem);
    REQUIRE(first->write(4096, std::span<const std::byte>(in.get(), 4096)).is_ok());
  }
  auto second = create_shared_device(mem);
  auto out = make_aligned_buffer(4096);
  REQUIRE(second->read(4096, std::span(out.get(), 4096)).is_ok());
  CHECK(same_bytes(in.get(), out.get(), 4096));
}

TEST_CASE("errno_status maps ENOSPC to resource exhausted and the rest to I/O errors") {
  CHECK(errno_status(-ENOSPC, "write").code() == StatusCode::kResourceExhausted);
  Status s = errno_status(-EIO, "read of x");
  CHECK(s.code() == StatusCode::kIoError);
  CHECK(std::string(s.message()).find("read of x") != std::string::npos);
}

TEST_CASE("Preallocating more than the file system holds is a clear resource error") {
  TempDir dir;
  REQUIRE(dir.ok());
  auto dev = create_file_device(dir.file("huge"), uint64_t{1} << 60);
  REQUIRE_FALSE(dev.is_ok());
  // EFBIG or ENOSPC depending on the file system: either way an error, never a device.
  CHECK((dev.status().code() == StatusCode::kResourceExhausted ||
         dev.status().code() == StatusCode::kIoError));
}

namespace {

/// One 4 KiB block written at offset 0 reads back the same.
void check_round_trip(StorageDevice& device, uint64_t seed) {
  auto in = pattern_buffer(4096, seed);
  auto out = make_aligned_buffer(4096);
  REQUIRE(device.write(0, std::span<const std::byte>(in.get(), 4096)).is_ok());
  REQUIRE(device.read(0, std::span(out.get(), 4096)).is_ok());
  CHECK(same_bytes(in.get(), out.get(), 4096));
}

}  // namespace

TEST_CASE("A file system that refuses O_DIRECT gets buffered I/O, or an error when required") {
  TempDir dir;
  REQUIRE(dir.ok());
  const std::string path = dir.file("dev");
  // A file system that refuses O_DIRECT, whatever this machine's do: open fails with EINVAL.
  std::atomic<int> direct_opens{0};
  auto refuse_direct = [&](const char* p, int flags, mode_t mode) {
    if (flags & O_DIRECT) {
      ++direct_opens;
      errno = EINVAL;
      return -1;
    }
    return ::open(p, flags, mode);
  };
  FileDeviceOptions strict;
  strict.require_direct = true;
  strict.open_fn = refuse_direct;
  auto refused = create_file_device(path, 64 * 1024, strict);
  CHECK(refused.status().code() == StatusCode::kIoError);
  CHECK(refused.status().message().find("refuses O_DIRECT") != std::string::npos);
  FileDeviceOptions options;
  options.open_fn = refuse_direct;
  auto relaxed = create_file_device(path, 64 * 1024, options);
  REQUIRE(relaxed.is_ok());
  CHECK(direct_opens == 2);
  CHECK_FALSE((*relaxed)->direct_io());
  CHECK((*relaxed)->describe().find("buffered") != std::string::npos);
  check_round_trip(**relaxed, 9);
  relaxed = Status(StatusCode::kCancelled, "closed");
}

TEST_CASE("On tmpfs a file device works with or without O_DIRECT, as the kernel allows") {
  // tmpfs refused O_DIRECT before Linux 6.6 and accepts it since: either way the device works.
  std::string pattern = "/dev/shm/kvtier_direct_XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) {
    WARN("skipped: no /dev/shm here");
    SUCCEED("skipped");
    return;
  }
  const std::string path = pattern + "/dev";
  FileDeviceOptions strict;
  strict.require_direct = true;
  auto refused = create_file_device(path, 64 * 1024, strict);
  auto relaxed = create_file_device(path, 64 * 1024);
  REQUIRE(relaxed.is_ok());
  if ((*relaxed)->direct_io()) {
    CHECK(refused.is_ok());  // this kernel's tmpfs takes O_DIRECT
  } else {
    CHECK(refused.status().code() == StatusCode::kIoError);
  }
  check_round_trip(**relaxed, 10);
  relaxed = Status(StatusCode::kCancelled, "closed");
  refused = Status(StatusCode::kCancelled, "closed");
  std::error_code ec;
  std::filesystem::remove_all(pattern, ec);
}
