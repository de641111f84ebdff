// Every route moves random bytes byte-identically, on a memory device and on an O_DIRECT file,
// once per io engine (io_uring, thread pool).
#include <catch2/catch.hpp>

#include "tiers/memory_arena.h"
#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {

constexpr uint64_t kDeviceBytes = 16ull << 20;

std::unique_ptr<StorageDevice> make_device(bool file, const TempDir& dir) {
  if (!file) return create_memory_device(kDeviceBytes);
  auto dev = create_file_device(dir.file("slots.bin"), kDeviceBytes);
  REQUIRE(dev.is_ok());
  return std::move(*dev);
}

std::unique_ptr<MemoryArena> make_hbm(uint64_t slot_bytes, uint64_t slots) {
  HbmArenaOptions o;
  o.slot_bytes = slot_bytes;
  o.slots = slots;
  auto arena = create_hbm_arena(o);
  REQUIRE(arena.is_ok());
  return std::move(*arena);
}

}  // namespace

TEST_CASE("every route round-trips random bytes", "[transfer][routes]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  const bool file = GENERATE(false, true);
  CAPTURE(io_engine_kind_name(kind), file);
  TempDir dir;
  REQUIRE(dir.ok());
  auto device = make_device(file, dir);
  TransferEngineOptions options;
  options.staging_buffers = 4;
  options.staging_bytes = 256 << 10;  // small, so 1 MiB segments split into chunks
  auto engine = make_engine(kind, options);
  REQUIRE(engine);
  REQUIRE(engine->io_engine().kind() == kind);

  const uint64_t block = (1ull << 20) + 3 * kIoAlignment;  // aligned, several chunks
  AlignedBuffer src = random_buffer(block, 1);
  AlignedBuffer back = zero_buffer(block);

  SECTION("host -> storage -> host (aligned: direct io)") {
    REQUIRE(run_job(*engine, {segment(0, block, Location::host(src.get()), Location::storage(device.get(), 0))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, block, Location::storage(device.get(), 0), Location::host(back.get()))}).is_ok());
    CHECK(same_bytes(src.get(), back.get(), block));
    auto stats = engine->stats();
    CHECK(stats.bytes_per_route[int(Route::kHostToStorage)] == block);
    CHECK(stats.bytes_per_route[int(Route::kStorageToHost)] == block);
    CHECK(stats.jobs_done == 2);
  }

  SECTION("host -> storage -> host (unaligned pointer and length: via staging)") {
    const uint64_t odd = 300'001;
    std::vector<std::byte> in(odd + 7), out(odd + 7);
    fill_pattern(std::span(in.data() + 7, odd), 2);
    REQUIRE(run_job(*engine, {segment(0, odd, Location::host(in.data() + 7), Location::storage(device.get(), 8 * kIoAlignment))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, odd, Location::storage(device.get(), 8 * kIoAlignment), Location::host(out.data() + 7))}).is_ok());
    CHECK(same_bytes(in.data() + 7, out.data() + 7, odd));
  }

  SECTION("host -> device -> storage -> device -> host, and device <-> device") {
    auto hbm = make_hbm(block, 3);
    std::byte* slot0 = hbm->slot_ptr(0);
    std::byte* slot1 = hbm->slot_ptr(1);
    std::byte* slot2 = hbm->slot_ptr(2);
    REQUIRE(run_job(*engine, {segment(0, block, Location::host(src.get()), Location::device_memory(slot0))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, block, Location::device_memory(slot0), Location::storage(device.get(), 0))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, block, Location::storage(device.get(), 0), Location::device_memory(slot1))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, block, Location::device_memory(slot1), Location::device_memory(slot2))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, block, Location::device_memory(slot2), Location::host(back.get()))}).is_ok());
    CHECK(same_bytes(src.get(), back.get(), block));
    auto stats = engine->stats();
    CHECK(stats.bytes_per_route[int(Route::kDeviceToStorage)] == block);
    CHECK(stats.bytes_per_route[int(Route::kStorageToDevice)] == block);
    CHECK(stats.bytes_per_route[int(Route::kDeviceToDevice)] == block);
  }

  SECTION("host <-> host, storage -> storage, and an unaligned storage length") {
    REQUIRE(run_job(*engine, {segment(0, block, Location::host(src.get()), Location::host(back.get()))}).is_ok());
    CHECK(same_bytes(src.get(), back.get(), block));
    const uint64_t odd = 5000;  // read rounded up to 8 KiB, written zero-padded
    REQUIRE(run_job(*engine, {segment(0, block, Location::host(src.get()), Location::storage(device.get(), 0))}).is_ok());
    REQUIRE(run_job(*engine, {segment(0, odd, Location::storage(device.get(), 0), Location::storage(device.get(), 4ull << 20))}).is_ok());
    AlignedBuffer tail = zero_buffer(2 * kIoAlignment);
    REQUIRE(run_job(*engine, {segment(0, 2 * kIoAlignment, Location::storage(device.get(), 4ull << 20), Location::host(tail.get()))}).is_ok());
    CHECK(same_bytes(tail.get(), src.get(), odd));
    CHECK(all_zero(tail.get() + odd, 2 * kIoAlignment - odd));
  }

  SECTION("a many-segment job across layers lands every segment") {
    constexpr uint32_t kLayers = 8;
    const uint64_t per = block / kLayers / kIoAlignment * kIoAlignment;
    std::vector<Segment> save, load;
    for (uint32_t l = 0; l < kLayers; ++l) {
      save.push_back(segment(l, per, Location::host(src.get() + l * per), Location::storage(device.get(), l * per)));
      load.push_back(segment(l, per, Location::storage(device.get(), l * per), Location::host(back.get() + l * per)));
    }
    REQUIRE(run_job(*engine, save, kLayers).is_ok());
    REQUIRE(run_job(*engine, load, kLayers).is_ok());
    CHECK(same_bytes(src.get(), back.get(), per * kLayers));
  }
}

TEST_CASE("malformed jobs are refused before anything runs", "[transfer][routes]") {
  auto engine = make_engine(IoEngineKind::kThreadPool);
  REQUIRE(engine);
  auto device = create_memory_device(1 << 20);
  AlignedBuffer buf = zero_buffer(8192);
  CHECK(run_job(*engine, {segment(0, 0, Location::host(buf.get()), Location::host(buf.get()))}).code() ==
        StatusCode::kInvalidArgument);
  CHECK(run_job(*engine, {segment(3, 4096, Location::host(buf.get()), Location::host(buf.get()))}, 2).code() ==
        StatusCode::kInvalidArgument);
  CHECK(run_job(*engine, {segment(0, 4096, Location::host(buf.get()), Location::storage(device.get(), 100))}).code() ==
        StatusCode::kInvalidArgument);
  CHECK(run_job(*engine, {segment(0, 8192, Location::host(buf.get()), Location::storage(device.get(), (1 << 20) - 4096))}).code() ==
        StatusCode::kInvalidArgument);
  CHECK(run_job(*engine, {segment(0, 4096, Location::host(nullptr), Location::host(buf.get()))}).code() ==
        StatusCode::kInvalidArgument);
  TransferHandle empty;
  CHECK(empty.wait().code() == StatusCode::kInvalidArgument);
  CHECK(engine->stats().jobs_submitted == 0);
  // A job with no segments is done at once.
  CHECK(run_job(*engine, {}).is_ok());
}

TEST_CASE("the dispatcher sends its reads and writes to io_uring in batches", "[transfer][routes][batch]") {
  TempDir dir;
  REQUIRE(dir.ok());
  auto engine = make_engine(IoEngineKind::kUring);
  REQUIRE(engine);
  auto device = make_device(true, dir);
  auto hbm = make_hbm(1 << 20, 4);
  constexpr uint64_t kPiece = 64 << 10;
  constexpr uint32_t kPieces = 64;  // 4 MiB in 64 KiB segments
  AlignedBuffer src = random_buffer(kPiece * kPieces, 80), back = zero_buffer(kPiece * kPieces);
  std::vector<Segment> save, load, to_hbm, from_hbm;
  for (uint32_t i = 0; i < kPieces; ++i) {
    save.push_back(segment(0, kPiece, Location::host(src.get() + i * kPiece), Location::storage(device.get(), i * kPiece)));
    load.push_back(segment(0, kPiece, Location::storage(device.get(), i * kPiece), Location::host(back.get() + i * kPiece)));
  }
  // Staged routes: disk -> staging -> HBM and back, 16 pieces each way.
  for (uint32_t i = 0; i < 16; ++i) {
    to_hbm.push_back(segment(0, kPiece, Location::storage(device.get(), i * kPiece), Location::device_memory(hbm->slot_ptr(0) + i * kPiece)));
    from_hbm.push_back(segment(0, kPiece, Location::device_memory(hbm->slot_ptr(0) + i * kPiece),
                               Location::storage(device.get(), (8 << 20) + i * kPiece)));
  }
  const IoEngineStats before = engine->io_engine().stats();
  REQUIRE(run_job(*engine, save).is_ok());
  REQUIRE(run_job(*engine, load).is_ok());
  REQUIRE(run_job(*engine, to_hbm).is_ok());
  REQUIRE(run_job(*engine, from_hbm).is_ok());
  const IoEngineStats after = engine->io_engine().stats();
  CHECK(same_bytes(src.get(), back.get(), kPiece * kPieces));
  AlignedBuffer again = zero_buffer(16 * kPiece);
  REQUIRE(run_job(*engine, {segment(0, 16 * kPiece, Location::storage(device.get(), 8 << 20), Location::host(again.get()))}).is_ok());
  CHECK(same_bytes(src.get(), again.get(), 16 * kPiece));
  const uint64_t ops = after.ops - before.ops, calls = after.submit_calls - before.submit_calls;
  CAPTURE(ops, calls);
  CHECK(ops == 2 * kPieces + 2 * 16);
  // One call per op before batching (160); 21 here on an idle machine. Staged chunks refill one
  // staging buffer at a time, so a slow machine sends more of them alone: the bound leaves room.
  CHECK(calls * 2 <= ops);
}
