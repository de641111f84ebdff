// FaultInjectingDevice: each fault kind yields its documented Status, counters move, and the
// device works again once the faults are cleared.
#include <catch2/catch.hpp>

#include <cstring>

#include "tier_test_support.h"
#include "tiers/fault_device.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
constexpr uint64_t kBytes = 256 * 1024;

struct Fixture {
  FaultInjectingDevice dev{create_memory_device(kBytes)};
  AlignedBuffer data = pattern_buffer(4 * 4096, 11);
  AlignedBuffer zeros = make_aligned_buffer(4 * 4096);
  Fixture() { std::memset(zeros.get(), 0, 4 * 4096); }
  std::span<const std::byte> in(size_t n = 4 * 4096) { return {data.get(), n}; }
  bool region_is(uint64_t offset, const std::byte* expect, size_t n) {
    auto out = make_aligned_buffer(n);
    if (!dev.inner().read(offset, std::span(out.get(), n)).is_ok()) return false;
    return same_bytes(out.get(), expect, n);
  }
  bool works_again() {
    dev.clear_faults();
    if (!dev.write(0, in()).is_ok()) return false;
    auto out = make_aligned_buffer(4 * 4096);
    if (!dev.read(0, std::span(out.get(), 4 * 4096)).is_ok()) return false;
    return same_bytes(out.get(), data.get(), 4 * 4096) && dev.flush().is_ok();
  }
};
}  // namespace

TEST_CASE("fail_nth_write fails exactly the Nth write with its errno and writes nothing") {
  Fixture f;
  FaultPlan plan;
  plan.fail_nth_write = 3;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(0, f.in(4096)).is_ok());
  CHECK(f.dev.write(4096, f.in(4096)).is_ok());
  Status third = f.dev.write(8192, f.in(4096));
  CHECK(third.code() == StatusCode::kIoError);
  CHECK(f.dev.write(12288, f.in(4096)).is_ok());
  CHECK(f.dev.faults().write_errors == 1);
  CHECK(f.dev.stats().write_errors == 1);
  CHECK(f.region_is(8192, f.zeros.get(), 4096));

  plan.fail_nth_write = 1;
  plan.fail_nth_write_errno = ENOSPC;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(0, f.in(4096)).code() == StatusCode::kResourceExhausted);
  CHECK(f.dev.faults().enospc == 1);
  CHECK(f.works_again());
}

TEST_CASE("fail_writes_at_offset fails every write covering that byte") {
  Fixture f;
  FaultPlan plan;
  plan.fail_writes_at_offset = 3 * 4096 + 100;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(0, f.in(3 * 4096)).is_ok());
  CHECK(f.dev.write(2 * 4096, f.in(2 * 4096)).code() == StatusCode::kIoError);
  CHECK(f.dev.write(3 * 4096, f.in(4096)).code() == StatusCode::kIoError);
  CHECK(f.dev.write(4 * 4096, f.in(4096)).is_ok());
  CHECK(f.dev.faults().write_errors == 2);
  CHECK(f.region_is(3 * 4096, f.zeros.get(), 4096));
  CHECK(f.works_again());
}

TEST_CASE("enospc_after_bytes runs the device out of space") {
  Fixture f;
  FaultPlan plan;
  plan.enospc_after_bytes = 2 * 4096;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(0, f.in(4096)).is_ok());
  CHECK(f.dev.write(4096, f.in(4096)).is_ok());
  Status full = f.dev.write(8192, f.in(4096));
  CHECK(full.code() == StatusCode::kResourceExhausted);
  CHECK(f.dev.write(8192, f.in(4096)).code() == StatusCode::kResourceExhausted);
  CHECK(f.dev.faults().enospc == 2);
  CHECK(f.works_again());
}

TEST_CASE("short_write_once stores half the buffer, fails, then writes succeed") {
  Fixture f;
  FaultPlan plan;
  plan.short_write_once = true;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(0, f.in()).code() == StatusCode::kIoError);
  CHECK(f.dev.faults().short_writes == 1);
  CHECK(f.region_is(0, f.data.get(), 2 * 4096));                    // first half landed
  CHECK(f.region_is(2 * 4096, f.zeros.get(), 2 * 4096));            // second half did not
  CHECK(f.dev.write(0, f.in()).is_ok());                            // once only
  CHECK(f.dev.faults().short_writes == 1);
}

TEST_CASE("torn_write_nth keeps only the first page of the Nth write") {
  Fixture f;
  FaultPlan plan;
  plan.torn_write_nth = 2;
  plan.torn_write_bytes = 4096;
  f.dev.set_plan(plan);
  CHECK(f.dev.write(16 * 4096, f.in()).is_ok());
  CHECK(f.dev.write(0, f.in()).code() == StatusCode::kIoError);
  CHECK(f.dev.faults().torn_writes == 1);
  CHECK(f.region_is(0, f.data.get(), 4096));
  CHECK(f.region_is(4096, f.zeros.get(), 3 * 4096));
  CHECK(f.works_again());
}

TEST_CASE("fail_flush fails flushes and one-in-N errors are seeded and replayable") {
  Fixture f;
  FaultPlan plan;
  plan.fail_flush = true;
  f.dev.set_plan(plan);
  CHECK(f.dev.flush().code() == StatusCode::kIoError);
  CHECK(f.dev.faults().flush_errors == 1);
  CHECK(f.dev.stats().flush_errors == 1);

  auto run = [&](uint64_t seed) {
    FaultPlan p;
    p.seed = seed;
    p.read_error_one_in = 3;
    p.write_error_one_in = 3;
    f.dev.set_plan(p);
    std::string pattern;
    auto out = make_aligned_buffer(4096);
    for (int i = 0; i < 60; ++i) {
      pattern += f.dev.write(0, f.in(4096)).is_ok() ? 'w' : 'W';
      pattern += f.dev.read(0, std::span(out.get(), 4096)).is_ok() ? 'r' : 'R';
    }
    return pattern;
  };
  const std::string a = run(7);
  const std::string b = run(7);
  CHECK(a == b);
  CHECK(a.find('W') != std::string::npos);
  CHECK(a.find('R') != std::string::npos);
  CHECK(a.find('w') != std::string::npos);
  CHECK(f.dev.faults().read_errors > 0);
  CHECK(f.dev.faults().write_errors > 0);
  CHECK(f.dev.native_fd() == -1);
  CHECK(f.works_again());
}
