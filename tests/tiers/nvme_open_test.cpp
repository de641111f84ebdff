// Opening an NVMe tier on a bad directory fails with a status that says what is wrong and what
// to do, never a crash: another layout, a second opener, a damaged catalog, a tier larger than
// its file system. And a full file system is survived: catalog writes fail with
// kResourceExhausted, committed blocks stay readable, writes resume when space returns, and a
// restart on the full disk serves what is committed.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "nvme_test_harness.h"
#include "tiers/catalog.h"
#include "tiers/nvme_tier.h"
#include "tiers/storage_device.h"
#include "tmpfs_mount.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {

/// A tier of `slots` slots in `dir` over real slot files (the default device factory).
NvmeTierOptions file_tier(const std::string& dir, uint64_t slots = 16, KvLayout layout = small_test_layout()) {
  NvmeTierOptions o;
  o.dir = dir;
  o.layout = layout;
  o.capacity_bytes = slots * (header_bytes_for(layout) + layout.bytes_per_block());
  o.durability = Durability::kNone;
  o.direct = false;
  return o;
}

bool contains(const Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

CatalogEntry store_block(NvmeTier& tier, uint64_t i, Status* failure = nullptr) {
  auto payload = test_payload(tier.layout(), 5, i);
  auto stored = tier.store(test_entry(5, i), std::span<const std::byte>(payload.get(), tier.layout().bytes_per_block()));
  if (!stored.is_ok()) {
    if (failure) *failure = stored.status();
    return {};
  }
  return *stored;
}

bool reads_back(NvmeTier& tier, uint64_t i) {
  const size_t n = tier.layout().bytes_per_block();
  auto want = test_payload(tier.layout(), 5, i);
  auto got = make_aligned_buffer(tier.payload_capacity());
  if (!tier.read_block(test_entry(5, i).key, std::span(got.get(), n)).is_ok()) return false;
  return same_bytes(want.get(), got.get(), n);
}

}  // namespace

TEST_CASE("An NVMe tier written with another layout is refused naming both layouts") {
  TempDir dir("kvtier_open");
  { REQUIRE(NvmeTier::open(file_tier(dir.file("tier"))).is_ok()); }
  const KvLayout other = *KvLayout::standard(2, 2, 64, Dtype::kFp16, 16);
  auto reopened = NvmeTier::open(file_tier(dir.file("tier"), 16, other));
  REQUIRE_FALSE(reopened.is_ok());
  INFO(reopened.status().to_string());
  CHECK(reopened.status().code() == StatusCode::kLayoutMismatch);
  CHECK(contains(reopened.status(), small_test_layout().describe()));
  CHECK(contains(reopened.status(), other.describe()));
  CHECK(contains(reopened.status(), "move " + dir.file("tier") + " aside"));
  // The slot file keeps the size of the layout it was written with.
  const uint64_t slot = header_bytes_for(small_test_layout()) + small_test_layout().bytes_per_block();
  CHECK(std::filesystem::file_size(dir.file("tier/slots.0")) == 16 * slot);
}

TEST_CASE("A data dir from before layouts were named still opens and names its layout afterwards") {
  TempDir dir("kvtier_open");
  {
    auto tier = NvmeTier::open(file_tier(dir.file("tier")));
    REQUIRE(tier.is_ok());
  }
  {
    // Remove the "layout" meta record as an older kvtier never wrote it: the geometry alone.
    auto catalog = Catalog::open(dir.file("tier/catalog"));
    REQUIRE(catalog.is_ok());
    auto geometry = (*catalog)->get_meta("geometry");
    REQUIRE(geometry.is_ok());
    auto fresh_dir = dir.file("old");
    auto old = Catalog::open(fresh_dir);
    REQUIRE(old.is_ok());
    REQUIRE((*old)->put_meta("geometry", *geometry).is_ok());
  }
  std::filesystem::remove_all(dir.file("tier/catalog"));
  std::filesystem::rename(dir.file("old"), dir.file("tier/catalog"));
  REQUIRE(NvmeTier::open(file_tier(dir.file("tier"))).is_ok());
  auto catalog = Catalog::open(dir.file("tier/catalog"));
  REQUIRE(catalog.is_ok());
  auto layout = (*catalog)->get_meta("layout");
  REQUIRE(layout.is_ok());
  CHECK(*layout == small_test_layout().describe());
}

TEST_CASE("A second NVMe tier on the same directory is refused naming the lock file and its holder") {
  TempDir dir("kvtier_open");
  auto first = NvmeTier::open(file_tier(dir.file("tier")));
  REQUIRE(first.is_ok());
  auto second = NvmeTier::open(file_tier(dir.file("tier")));
  REQUIRE_FALSE(second.is_ok());
  INFO(second.status().to_string());
  CHECK(second.status().code() == StatusCode::kUnavailable);
  CHECK(contains(second.status(), dir.file("tier/LOCK")));
  CHECK(contains(second.status(), "pid " + std::to_string(::getpid())));
  first->reset();
  CHECK(NvmeTier::open(file_tier(dir.file("tier"))).is_ok());  // the lock went with the first tier
}

TEST_CASE("Garbage in the catalog CURRENT file fails the open with RocksDB's error and what to do") {
  TempDir dir("kvtier_open");
  { REQUIRE(NvmeTier::open(file_tier(dir.file("tier"))).is_ok()); }
  std::ofstream(dir.file("tier/catalog/CURRENT"), std::ios::trunc) << "not a manifest name";
  auto reopened = NvmeTier::open(file_tier(dir.file("tier")));
  REQUIRE_FALSE(reopened.is_ok());
  INFO(reopened.status().to_string());
  CHECK(reopened.status().code() == StatusCode::kIoError);
  CHECK(contains(reopened.status(), "Corruption"));
  CHECK(contains(reopened.status(), "move " + dir.file("tier") + " aside"));
  CHECK(contains(reopened.status(), "no repair tool"));
}

TEST_CASE("An NVMe tier larger than its file system is refused with the sizes") {
  TempDir dir("kvtier_open");
  struct statvfs vfs{};
  REQUIRE(::statvfs("/tmp", &vfs) == 0);
  const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
  NvmeTierOptions o = file_tier(dir.file("tier"));
  o.capacity_bytes = 2 * free_bytes + (1ull << 30);
  auto tier = NvmeTier::open(o);
  REQUIRE_FALSE(tier.is_ok());
  INFO(tier.status().to_string());
  CHECK(tier.status().code() == StatusCode::kResourceExhausted);
  CHECK(contains(tier.status(), "do not fit the file system"));
  CHECK(contains(tier.status(), "set nvme_bytes to at most"));
  CHECK_FALSE(std::filesystem::exists(dir.file("tier/slots.0")));  // nothing preallocated
}

TEST_CASE("A slot file on a file system without fallocate is written full of zeros and keeps its data") {
  TempDir dir("kvtier_open");
  const std::string path = dir.file("slots.0");
  const uint64_t size = 64 * kIoAlignment;
  {
    // A sparse file as an older kvtier left it: data in one block, holes around it.
    const int fd = ::open(path.c_str(), O_RDWR | O_CREAT, 0644);
    REQUIRE(fd >= 0);
    REQUIRE(::ftruncate(fd, size / 2) == 0);
    const std::string data(kIoAlignment, 'd');
    REQUIRE(::pwrite(fd, data.data(), data.size(), 8 * kIoAlignment) == static_cast<ssize_t>(data.size()));
    ::close(fd);
  }
  FileDeviceOptions fo;
  fo.direct = false;
  int calls = 0;
  fo.fallocate_fn = [&](int, uint64_t) {
    ++calls;
    return EOPNOTSUPP;
  };
  auto dev = create_file_device(path, size, fo);
  INFO(dev.status().to_string());
  REQUIRE(dev.is_ok());
  CHECK(calls == 1);
  struct stat st{};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  CHECK(static_cast<uint64_t>(st.st_size) == size);
  CHECK(static_cast<uint64_t>(st.st_blocks) * 512 >= size);  // no hole left
  auto buf = make_aligned_buffer(kIoAlignment);
  REQUIRE((*dev)->read(8 * kIoAlignment, std::span(buf.get(), kIoAlignment)).is_ok());
  CHECK(static_cast<char>(buf[0]) == 'd');
  REQUIRE((*dev)->read(9 * kIoAlignment, std::span(buf.get(), kIoAlignment)).is_ok());
  CHECK(static_cast<char>(buf[0]) == 0);
}

TEST_CASE("A preallocation that fails for lack of space is refused with kResourceExhausted") {
  TempDir dir("kvtier_open");
  FileDeviceOptions fo;
  fo.direct = false;
  fo.fallocate_fn = [](int, uint64_t) { return ENOSPC; };
  auto dev = create_file_device(dir.file("slots.0"), 16 * kIoAlignment, fo);
  REQUIRE_FALSE(dev.is_ok());
  INFO(dev.status().to_string());
  CHECK(dev.status().code() == StatusCode::kResourceExhausted);
  CHECK(contains(dev.status(), "preallocating"));
}

TEST_CASE("The catalog writes no RocksDB LOG file and removes those older versions left") {
  TempDir dir("kvtier_open");
  std::filesystem::create_directories(dir.file("catalog"));
  std::ofstream(dir.file("catalog/LOG.old.1700000000000000")) << "old";
  { REQUIRE(Catalog::open(dir.file("catalog")).is_ok()); }
  { REQUIRE(Catalog::open(dir.file("catalog")).is_ok()); }
  CHECK_FALSE(std::filesystem::exists(dir.file("catalog/LOG")));
  CHECK_FALSE(std::filesystem::exists(dir.file("catalog/LOG.old.1700000000000000")));
}

TEST_CASE("On a full file system the NVMe tier refuses writes and still serves and resumes") {
  TmpfsMount fs(16 << 20);
  if (!fs.ok()) {
    WARN("skipped: " + fs.why_not());
    SUCCEED("skipped");
    return;
  }
  const std::string dir = fs.path() + "/tier";
  const uint64_t slots = 64;
  auto opened = NvmeTier::open(file_tier(dir, slots));
  REQUIRE(opened.is_ok());
  auto tier = std::move(*opened);
  for (uint64_t i = 0; i < 4; ++i) REQUIRE(store_block(*tier, i).slot != kNoSlot);
  REQUIRE(fs.fill() > 0);
  CHECK(fs.free_bytes() == 0);

  // The slot files are preallocated; the catalog's WAL finds the disk full within a few writes.
  Status failure;
  uint64_t next = 4;
  while (next < slots && store_block(*tier, next, &failure).slot != kNoSlot) ++next;
  INFO(failure.to_string());
  REQUIRE(next < slots);
  CHECK(failure.code() == StatusCode::kResourceExhausted);
  CHECK(contains(failure, dir + "/catalog"));
  const uint64_t committed = next;
  for (uint64_t i = 0; i < committed; ++i) CHECK(reads_back(*tier, i));
  CHECK_FALSE(tier->contains(test_entry(5, committed).key));
  CHECK(tier->stats().free_slots == slots - committed);  // the failed store gave its slot back

  SECTION("writes resume once space is freed") {
    fs.unfill();
    REQUIRE(store_block(*tier, committed).slot != kNoSlot);
    REQUIRE(store_block(*tier, committed + 1).slot != kNoSlot);
    for (uint64_t i = 0; i < committed + 2; ++i) CHECK(reads_back(*tier, i));
  }
  SECTION("a restart on the full disk serves the committed blocks and resumes once space is freed") {
    tier.reset();
    fs.fill();  // whatever closing the catalog freed
    auto again = NvmeTier::open(file_tier(dir, slots));
    INFO(again.status().to_string());
    REQUIRE(again.is_ok());
    tier = std::move(*again);
    CHECK(tier->stats().blocks == committed);
    for (uint64_t i = 0; i < committed; ++i) CHECK(reads_back(*tier, i));
    Status refused;
    CHECK(store_block(*tier, committed, &refused).slot == kNoSlot);
    CHECK(refused.code() == StatusCode::kResourceExhausted);
    fs.unfill();
    REQUIRE(store_block(*tier, committed).slot != kNoSlot);
    CHECK(reads_back(*tier, committed));
  }
}

TEST_CASE("On a full file system the catalog resumes by itself when space returns") {
  TmpfsMount fs(8 << 20);
  if (!fs.ok()) {
    WARN("skipped: " + fs.why_not());
    SUCCEED("skipped");
    return;
  }
  auto opened = Catalog::open(fs.path() + "/catalog", {.sync = true});
  REQUIRE(opened.is_ok());
  Catalog& catalog = **opened;
  REQUIRE(catalog.put(test_entry(1, 0)).is_ok());
  fs.fill();
  Status failed;
  uint64_t i = 1;
  for (; i < 100000 && (failed = catalog.put(test_entry(1, i))).is_ok(); ++i) {
  }
  INFO(failed.to_string());
  REQUIRE(failed.code() == StatusCode::kResourceExhausted);
  CHECK(catalog.out_of_space());
  CHECK(catalog.put(test_entry(1, i)).code() == StatusCode::kResourceExhausted);  // still full: no resume
  CHECK(catalog.resumes() == 0);
  for (uint64_t j = 0; j < i; ++j) CHECK(catalog.get(test_entry(1, j).key).is_ok());
  fs.unfill();
  REQUIRE(catalog.put(test_entry(1, i)).is_ok());
  CHECK_FALSE(catalog.out_of_space());
  CHECK(catalog.resumes() == 1);
  CHECK(catalog.get(test_entry(1, i).key).is_ok());
}
