// Crash test: a child process writes and erases blocks in a loop and is SIGKILLed at a random
// point; the reopened tier must hold every block the child reported committed, byte-identical,
// nothing it reported erased, and no entry on a free slot. The child is this test binary
// re-executed (fork + exec), so it starts without the parent's threads.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <deque>
#include <random>
#include <set>
#include <string>
#include <vector>

extern char** environ;

#include "nvme_test_harness.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
constexpr uint64_t kCrashSeed = 77;
constexpr uint64_t kCrashSlots = 48;
constexpr size_t kChildMaxLive = 24;

enum : uint32_t { kCommitted = 'C', kEraseBegun = 'E', kErased = 'D', kFailed = 'F' };
struct Report {
  uint32_t tag;
  uint32_t index;
};

NvmeTierOptions crash_options(const std::string& dir) {
  NvmeTierOptions o;
  o.dir = dir;
  o.layout = small_test_layout();
  o.capacity_bytes = kCrashSlots * (header_bytes_for(o.layout) + o.layout.bytes_per_block());
  o.files = 2;
  o.durability = Durability::kFdatasync;
  return o;
}

bool send(int fd, uint32_t tag, uint64_t index) {
  const Report r{tag, static_cast<uint32_t>(index)};
  return ::write(fd, &r, sizeof r) == static_cast<ssize_t>(sizeof r);
}

[[noreturn]] void child_main(const std::string& dir, int fd, uint64_t start) {
  auto tier = NvmeTier::open(crash_options(dir));
  if (!tier.is_ok()) {
    send(fd, kFailed, 0);
    ::_exit(2);
  }
  std::deque<uint64_t> live;
  for (const CatalogEntry& e : (*tier)->entries()) live.push_back(e.block_index);
  const KvLayout layout = small_test_layout();
  for (uint64_t i = start; i < start + 100'000; ++i) {
    if (live.size() >= kChildMaxLive || (i % 3 == 0 && !live.empty())) {
      const uint64_t victim = live.front();
      live.pop_front();
      send(fd, kEraseBegun, victim);
      if (!(*tier)->erase(test_entry(kCrashSeed, victim).key).is_ok()) {
        send(fd, kFailed, victim);
        ::_exit(3);
      }
      send(fd, kErased, victim);
    }
    auto payload = test_payload(layout, kCrashSeed, i);
    auto stored = (*tier)->store(test_entry(kCrashSeed, i),
                                 std::span<const std::byte>(payload.get(), layout.bytes_per_block()));
    if (!stored.is_ok()) {
      send(fd, kFailed, i);
      ::_exit(4);
    }
    live.push_back(i);
    send(fd, kCommitted, i);
  }
  ::_exit(0);
}

bool read_report(int fd, Report& r) {
  size_t got = 0;
  while (got < sizeof r) {
    const ssize_t n = ::read(fd, reinterpret_cast<char*>(&r) + got, sizeof r - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    got += static_cast<size_t>(n);
  }
  return true;
}
}  // namespace

// Runs only inside the child process the crash test starts (hidden from normal runs).
TEST_CASE("nvme crash child", "[.][nvme_crash_child]") {
  const char* dir = std::getenv("KVTIER_CRASH_DIR");
  const char* fd = std::getenv("KVTIER_CRASH_FD");
  const char* start = std::getenv("KVTIER_CRASH_START");
  if (dir == nullptr || fd == nullptr || start == nullptr) return;
  child_main(dir, std::atoi(fd), std::strtoull(start, nullptr, 10));
}

TEST_CASE("NvmeTier keeps every committed block through SIGKILL at random points") {
  TempDir temp;
  REQUIRE(temp.ok());
  const std::string dir = temp.path() + "/tier";
  const unsigned seed = std::random_device{}();
  INFO("random seed " << seed);
  std::mt19937 rng(seed);
  std::set<uint64_t> committed, erase_begun, erased;
  const KvLayout layout = small_test_layout();

  for (int round = 0; round < 15; ++round) {
    INFO("round " << round);
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const uint64_t start = static_cast<uint64_t>(round) * 10'000;
    // Everything the child needs is built before fork(): between fork and exec it may only
    // make async-signal-safe calls (the parent has RocksDB threads that may hold malloc locks).
    std::vector<std::string> env_strings = {"KVTIER_CRASH_DIR=" + dir,
                                            "KVTIER_CRASH_FD=" + std::to_string(fds[1]),
                                            "KVTIER_CRASH_START=" + std::to_string(start)};
    for (char** e = environ; *e != nullptr; ++e) env_strings.emplace_back(*e);
    std::vector<char*> envp;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    char arg0[] = "tiers_tests";
    char arg1[] = "[nvme_crash_child]";
    char* argv[] = {arg0, arg1, nullptr};
    const int devnull = ::open("/dev/null", O_WRONLY | O_CLOEXEC);
    REQUIRE(devnull >= 0);
    const pid_t pid = ::fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
      ::close(fds[0]);
      ::dup2(devnull, STDOUT_FILENO);  // stderr stays: a sanitizer report in the child shows
      ::execve("/proc/self/exe", argv, envp.data());
      ::_exit(127);
    }
    ::close(devnull);
    ::close(fds[1]);
    const int kill_after = 1 + static_cast<int>(rng() % 30);
    int commits = 0;
    int failures = 0;
    Report r{};
    auto note = [&](const Report& rep) {
      switch (rep.tag) {
        case kCommitted: committed.insert(rep.index); ++commits; break;
        case kEraseBegun: erase_begun.insert(rep.index); break;
        case kErased: erased.insert(rep.index); break;
        default: ++failures; break;
      }
    };
    while (commits < kill_after && read_report(fds[0], r)) note(r);
    ::kill(pid, SIGKILL);
    int wstatus = 0;
    REQUIRE(::waitpid(pid, &wstatus, 0) == pid);
    while (read_report(fds[0], r)) note(r);  // reports written before the kill
    ::close(fds[0]);
    CHECK(commits >= kill_after);  // the child did not die early
    CHECK(failures == 0);
    CHECK(WIFSIGNALED(wstatus));

    auto opened = NvmeTier::open(crash_options(dir));
    INFO(opened.status().to_string());
    REQUIRE(opened.is_ok());
    NvmeTier& tier = **opened;
    const NvmeTierStats s = tier.stats();
    CHECK(s.dropped_at_open == 0);
    std::set<SlotId> slots;
    std::set<uint64_t> present;
    int bad_bytes = 0;
    auto out = make_aligned_buffer(tier.payload_capacity());
    for (const CatalogEntry& e : tier.entries()) {
      slots.insert(e.slot);
      present.insert(e.block_index);
      const CatalogEntry want = test_entry(kCrashSeed, e.block_index);
      CHECK(e.key == want.key);
      CHECK(e.tokens == want.tokens);
      auto expect = test_payload(layout, kCrashSeed, e.block_index);
      if (!tier.read_block(e.key, std::span(out.get(), layout.bytes_per_block())).is_ok() ||
          !same_bytes(out.get(), expect.get(), layout.bytes_per_block())) {
        ++bad_bytes;
      }
    }
    CHECK(bad_bytes == 0);
    CHECK(slots.size() == s.blocks);                // no two entries share a slot
    CHECK(s.slots - s.free_slots == s.blocks);      // every used slot has an entry, and back
    CHECK(tier.stats().checksum_errors == 0);
    int missing = 0, resurrected = 0;
    for (uint64_t i : committed) {
      if (!erase_begun.contains(i) && !present.contains(i)) ++missing;
    }
    for (uint64_t i : erased) {
      if (present.contains(i)) ++resurrected;
    }
    CHECK(missing == 0);
    CHECK(resurrected == 0);
    // Unreported commits may be present; a block whose erase began may be either.
    for (uint64_t i : present) {
      if (!committed.contains(i)) committed.insert(i);
      erase_begun.erase(i);
      erased.erase(i);
    }
    for (uint64_t i : std::set<uint64_t>(erase_begun)) {
      if (!present.contains(i)) {
        committed.erase(i);
        erase_begun.erase(i);
      }
    }
  }
}
