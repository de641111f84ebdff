// Verification: XXH3-64 computed where the bytes sit in host memory; a wrong expected value fails
// the job with kChecksumMismatch, the right one passes, on every verify point.
#define XXH_INLINE_ALL
#include <xxhash.h>

#include <catch2/catch.hpp>

#include "tiers/memory_arena.h"
#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("checksum verification", "[transfer][checksum]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  TransferEngineOptions options;
  options.staging_buffers = 3;
  options.staging_bytes = 32 << 10;
  auto engine = make_engine(kind, options);
  REQUIRE(engine);
  auto device = create_memory_device(4 << 20);
  constexpr uint64_t kBytes = 100 << 10;  // several chunks
  AlignedBuffer src = random_buffer(kBytes, 20);
  AlignedBuffer dst = zero_buffer(kBytes);
  const uint64_t good = XXH3_64bits(src.get(), kBytes);
  REQUIRE(device->write(0, {src.get(), align_up(kBytes, kIoAlignment)}).is_ok());

  auto job = [&](Location from, Location to, uint64_t expected) {
    Segment s = segment(0, kBytes, from, to);
    s.verify = true;
    s.expected_xxh3_64 = expected;
    return run_job(*engine, {s});
  };

  SECTION("storage -> host: hashed at the destination") {
    CHECK(job(Location::storage(device.get(), 0), Location::host(dst.get()), good).is_ok());
    CHECK(job(Location::storage(device.get(), 0), Location::host(dst.get()), good ^ 1).code() ==
          StatusCode::kChecksumMismatch);
  }
  SECTION("host -> storage: hashed at the source, nothing written on a mismatch") {
    CHECK(job(Location::host(src.get()), Location::storage(device.get(), 1 << 20), good ^ 1).code() ==
          StatusCode::kChecksumMismatch);
    CHECK(device->stats().bytes_written.load() == align_up(kBytes, kIoAlignment));  // only the setup write
    CHECK(job(Location::host(src.get()), Location::storage(device.get(), 1 << 20), good).is_ok());
  }
  SECTION("storage -> storage: hashed in staging, chunk by chunk, in order") {
    CHECK(job(Location::storage(device.get(), 0), Location::storage(device.get(), 2 << 20), good).is_ok());
    CHECK(job(Location::storage(device.get(), 0), Location::storage(device.get(), 2 << 20), good + 7).code() ==
          StatusCode::kChecksumMismatch);
  }
  SECTION("storage -> HBM arena") {
    HbmArenaOptions o;
    o.slot_bytes = kBytes;
    o.slots = 1;
    auto hbm = create_hbm_arena(o);
    REQUIRE(hbm.is_ok());
    CHECK(job(Location::storage(device.get(), 0), Location::device_memory((*hbm)->slot_ptr(0)), good).is_ok());
    CHECK(job(Location::storage(device.get(), 0), Location::device_memory((*hbm)->slot_ptr(0)), ~good).code() ==
          StatusCode::kChecksumMismatch);
  }
  CHECK(engine->stats().checksum_mismatches == 1);
  CHECK(engine->stats().jobs_failed == 1);
}
