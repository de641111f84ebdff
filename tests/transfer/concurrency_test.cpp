// Many threads submitting at once (tsan target): every job lands its own bytes. Worker threads
// count failures; only the main thread asserts (Catch2 is not thread-safe).
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("many threads submit at once", "[transfer][concurrency]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  TempDir dir;
  REQUIRE(dir.ok());
  constexpr int kThreads = 6;
  constexpr int kJobsPerThread = 24;
  constexpr uint64_t kBytes = 24 << 10;
  auto file = create_file_device(dir.file("slots.bin"), kThreads * kBytes * 2);
  REQUIRE(file.is_ok());
  auto memory = create_memory_device(kThreads * kBytes * 2);
  TransferEngineOptions options;
  options.max_inflight_jobs = 4;  // small, so submitters block on each other
  options.staging_buffers = 2;
  options.staging_bytes = 16 << 10;
  auto engine = make_engine(kind, options);
  REQUIRE(engine);

  std::atomic<int> failures{0};
  std::atomic<int> callbacks{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      StorageDevice* device = t % 2 == 0 ? file->get() : memory.get();
      AlignedBuffer src = random_buffer(kBytes, 100 + t);
      AlignedBuffer back = zero_buffer(kBytes);
      std::vector<std::byte> odd(kBytes + 1);
      for (int j = 0; j < kJobsPerThread; ++j) {
        const uint64_t offset = t * kBytes * 2 + (j % 2) * kBytes;
        JobSpec save;
        save.segments.push_back(segment(0, kBytes, Location::host(src.get()), Location::storage(device, offset)));
        save.callback = [&](const Status&) { callbacks.fetch_add(1); };
        auto h = engine->submit(std::move(save));
        if (!h || !h->wait().is_ok()) {
          failures.fetch_add(1);
          continue;
        }
        // Alternate a direct load and a staged (unaligned) load.
        std::byte* dst = j % 2 == 0 ? back.get() : odd.data() + 1;
        JobSpec load;
        load.num_layers = 2;
        load.segments.push_back(segment(0, kBytes / 2, Location::storage(device, offset), Location::host(dst)));
        load.segments.push_back(segment(1, kBytes / 2, Location::storage(device, offset + kBytes / 2),
                                        Location::host(dst + kBytes / 2)));
        auto l = engine->submit(std::move(load));
        if (!l || !l->wait_layer(0).is_ok() || !same_bytes(dst, src.get(), kBytes / 2) || !l->wait().is_ok() ||
            !same_bytes(dst, src.get(), kBytes)) {
          failures.fetch_add(1);
        }
        std::memset(dst, 0, kBytes);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(failures.load() == 0);
  CHECK(callbacks.load() == kThreads * kJobsPerThread);
  auto stats = engine->stats();
  CHECK(stats.jobs_done == 2 * kThreads * kJobsPerThread);
  CHECK(stats.jobs_failed == 0);
}

TEST_CASE("shutdown waits for admitted jobs and refuses new ones", "[transfer][concurrency]") {
  GatedDevice gated(1 << 20);
  auto engine = make_engine(IoEngineKind::kAuto);
  REQUIRE(engine);
  AlignedBuffer dst = zero_buffer(4096);
  auto h = engine->submit(JobSpec{{segment(0, 4096, Location::storage(&gated, 0), Location::host(dst.get()))}, 1, {}});
  REQUIRE(h.is_ok());
  gated.wait_reads_started(1);
  auto closer = std::async(std::launch::async, [&] { engine->shutdown(); });
  while (!engine->stats().shutting_down) std::this_thread::yield();
  // Shutdown has begun and refuses new jobs, but the admitted one is still held by the gate.
  CHECK(engine->try_submit(JobSpec{}).status().code() == StatusCode::kUnavailable);
  CHECK(closer.wait_for(std::chrono::seconds(0)) == std::future_status::timeout);
  CHECK_FALSE(h->poll());
  gated.open_gate();
  closer.get();
  CHECK(h->poll());
  CHECK(h->wait().is_ok());
  CHECK(engine->try_submit(JobSpec{}).status().code() == StatusCode::kUnavailable);
}
