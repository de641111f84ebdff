// Back-pressure (bounded jobs, try_submit) and cancel, driven by a device whose reads wait at a
// gate the test opens: no sleeps, no timing.
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>

#include "tiers/memory_arena.h"
#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("try_submit says kResourceExhausted while max_inflight_jobs are admitted", "[transfer][backpressure]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  GatedDevice gated(1 << 20);
  TransferEngineOptions options;
  options.max_inflight_jobs = 2;
  auto engine = make_engine(kind, options);
  REQUIRE(engine);
  AlignedBuffer a = zero_buffer(4096), b = zero_buffer(4096), c = zero_buffer(4096);
  auto read_job = [&](std::byte* dst) {
    JobSpec spec;
    spec.segments.push_back(segment(0, 4096, Location::storage(&gated, 0), Location::host(dst)));
    return spec;
  };
  auto h1 = engine->try_submit(read_job(a.get()));
  auto h2 = engine->try_submit(read_job(b.get()));
  REQUIRE(h1.is_ok());
  REQUIRE(h2.is_ok());
  gated.wait_reads_started(2);
  auto h3 = engine->try_submit(read_job(c.get()));
  CHECK(h3.status().code() == StatusCode::kResourceExhausted);
  CHECK_FALSE(h1->poll());

  gated.open_gate();
  REQUIRE(h1->wait().is_ok());
  REQUIRE(h2->wait().is_ok());
  auto h4 = engine->try_submit(read_job(c.get()));
  REQUIRE(h4.is_ok());
  CHECK(h4->wait().is_ok());
}

TEST_CASE("a blocked submit proceeds once a job finishes", "[transfer][backpressure]") {
  GatedDevice gated(1 << 20);
  TransferEngineOptions options;
  options.max_inflight_jobs = 1;
  auto engine = make_engine(IoEngineKind::kThreadPool, options);
  REQUIRE(engine);
  AlignedBuffer a = zero_buffer(4096), b = zero_buffer(4096);
  JobSpec first;
  first.segments.push_back(segment(0, 4096, Location::storage(&gated, 0), Location::host(a.get())));
  auto h1 = engine->submit(std::move(first));
  REQUIRE(h1.is_ok());
  gated.wait_reads_started(1);
  // The second submit blocks in another thread until the gate opens and the first job finishes.
  std::atomic<bool> returned{false}, second_ok{false};
  std::thread submitter([&] {
    JobSpec second;
    second.segments.push_back(segment(0, 4096, Location::host(a.get()), Location::host(b.get())));
    auto h2 = engine->submit(std::move(second));
    returned = true;
    second_ok = h2.is_ok() && h2->wait().is_ok();
  });
  // Until it waits, or (back-pressure broken) returns at once.
  while (engine->stats().submitters_waiting == 0 && !returned.load()) std::this_thread::yield();
  CHECK_FALSE(returned.load());  // it waits while the first job holds the only slot
  CHECK(engine->stats().jobs_submitted == 1);
  gated.open_gate();
  submitter.join();
  CHECK(second_ok.load());
  CHECK(engine->stats().submitters_waiting == 0);
  CHECK(h1->wait().is_ok());
}

TEST_CASE("cancel skips the segments not yet started", "[transfer][cancel]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  GatedDevice gated(1 << 20);
  fill_pattern(std::span(gated.data(), 1 << 20), 40);
  TransferEngineOptions options;
  options.staging_buffers = 1;  // one staged chunk at a time: segment 1 waits for segment 0's buffer
  options.staging_bytes = 64 << 10;
  auto engine = make_engine(kind, options);
  REQUIRE(engine);
  HbmArenaOptions ho;
  ho.slot_bytes = 64 << 10;
  ho.slots = 3;
  auto hbm = create_hbm_arena(ho);
  REQUIRE(hbm.is_ok());
  std::atomic<int> callbacks{0};
  JobSpec spec;
  spec.num_layers = 3;
  for (uint32_t l = 0; l < 3; ++l) {
    spec.segments.push_back(segment(l, 64 << 10, Location::storage(&gated, l * (64 << 10)),
                                    Location::device_memory((*hbm)->slot_ptr(l))));
  }
  spec.callback = [&](const Status& s) {
    if (s.code() == StatusCode::kCancelled) callbacks.fetch_add(1);
  };
  auto handle = engine->submit(std::move(spec));
  REQUIRE(handle.is_ok());
  gated.wait_reads_started(1);  // segment 0 is parked in its read
  handle->cancel();
  gated.open_gate();
  CHECK(handle->wait().code() == StatusCode::kCancelled);
  CHECK(handle->state() == TransferState::kCancelled);
  CHECK(handle->status().code() == StatusCode::kCancelled);
  CHECK(handle->layers_done() == 0);
  CHECK(gated.reads_started() == 1);  // nothing after the cancel ran
  CHECK(callbacks.load() == 1);
  CHECK(engine->stats().jobs_cancelled == 1);

  // The engine goes on serving.
  AlignedBuffer dst = zero_buffer(4096);
  CHECK(run_job(*engine, {segment(0, 4096, Location::storage(&gated, 0), Location::host(dst.get()))}).is_ok());
  CHECK(same_bytes(dst.get(), gated.data(), 4096));
}
