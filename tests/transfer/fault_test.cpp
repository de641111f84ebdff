// Faults: a FaultInjectingDevice failing reads or writes makes the handle report kIoError, and
// the engine serves the next job fine.
#include <catch2/catch.hpp>

#include "tiers/fault_device.h"
#include "tiers/memory_arena.h"
#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("device faults reach the handle and the engine keeps working", "[transfer][faults]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  FaultInjectingDevice device(create_memory_device(4 << 20));
  TransferEngineOptions options;
  options.staging_buffers = 2;
  options.staging_bytes = 64 << 10;
  auto engine = make_engine(kind, options);
  REQUIRE(engine);
  constexpr uint64_t kBytes = 256 << 10;
  AlignedBuffer src = random_buffer(kBytes, 30);
  AlignedBuffer dst = zero_buffer(kBytes);
  HbmArenaOptions ho;
  ho.slot_bytes = kBytes;
  ho.slots = 1;
  auto hbm = create_hbm_arena(ho);
  REQUIRE(hbm.is_ok());

  auto save = [&] { return run_job(*engine, {segment(0, kBytes, Location::host(src.get()), Location::storage(&device, 0))}); };
  auto load = [&] { return run_job(*engine, {segment(0, kBytes, Location::storage(&device, 0), Location::host(dst.get()))}); };

  SECTION("failed writes") {
    FaultPlan plan;
    plan.write_error_one_in = 1;
    device.set_plan(plan);
    CHECK(save().code() == StatusCode::kIoError);
    device.clear_faults();
    CHECK(save().is_ok());
    CHECK(load().is_ok());
    CHECK(same_bytes(src.get(), dst.get(), kBytes));
  }
  SECTION("failed reads, direct and staged (storage -> HBM)") {
    REQUIRE(save().is_ok());
    FaultPlan plan;
    plan.read_error_one_in = 1;
    device.set_plan(plan);
    CHECK(load().code() == StatusCode::kIoError);
    CHECK(run_job(*engine, {segment(0, kBytes, Location::storage(&device, 0), Location::device_memory((*hbm)->slot_ptr(0)))})
              .code() == StatusCode::kIoError);
    device.clear_faults();
    CHECK(load().is_ok());
    CHECK(same_bytes(src.get(), dst.get(), kBytes));
  }
  SECTION("a failure in one layer fails the job; wait_layer of the failed layer reports it") {
    REQUIRE(save().is_ok());
    FaultPlan plan;
    plan.read_error_one_in = 1;
    device.set_plan(plan);
    JobSpec spec;
    spec.num_layers = 2;
    spec.segments.push_back(segment(0, 4096, Location::host(src.get()), Location::host(dst.get())));
    spec.segments.push_back(segment(1, kBytes, Location::storage(&device, 0), Location::host(dst.get())));
    auto handle = engine->submit(std::move(spec));
    REQUIRE(handle.is_ok());
    CHECK(handle->wait_layer(1).code() == StatusCode::kIoError);
    CHECK(handle->wait().code() == StatusCode::kIoError);
    CHECK(handle->state() == TransferState::kFailed);
    CHECK(handle->status().code() == StatusCode::kIoError);
  }
  CHECK(engine->stats().jobs_failed >= 1);
}
