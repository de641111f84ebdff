// The io engines on their own: reads and writes on memory and O_DIRECT file devices, registered
// buffers, errors as -errno, device stats counted, bounded queue.
#include <catch2/catch.hpp>

#include <atomic>
#include <condition_variable>
#include <mutex>

#include <sys/mman.h>

#include "tiers/fault_device.h"
#include "transfer/copy_engine.h"
#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {

/// Waits for `n` callbacks; collects their results.
struct Completions {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int64_t> results;
  IoCallback callback() {
    return [this](int64_t r) {
      std::lock_guard lock(mu);
      results.push_back(r);
      cv.notify_all();
    };
  }
  std::vector<int64_t> wait(size_t n) {
    std::unique_lock lock(mu);
    cv.wait(lock, [&] { return results.size() >= n; });
    return results;
  }
};

}  // namespace

TEST_CASE("io engines read and write", "[transfer][io]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  const bool file = GENERATE(false, true);
  CAPTURE(io_engine_kind_name(kind), file);
  TempDir dir;
  REQUIRE(dir.ok());
  std::unique_ptr<StorageDevice> device;
  if (file) {
    auto made = create_file_device(dir.file("io.bin"), 8 << 20);
    REQUIRE(made.is_ok());
    device = std::move(*made);
  } else {
    device = create_memory_device(8 << 20);
  }
  IoEngineOptions o;
  o.kind = kind;
  o.queue_depth = 4;
  auto engine = create_io_engine(o);
  REQUIRE(engine.is_ok());
  CHECK((*engine)->kind() == kind);
  constexpr uint64_t kBytes = 256 << 10;
  constexpr int kOps = 16;
  AlignedBuffer src = random_buffer(kBytes * kOps, 50);
  AlignedBuffer dst = zero_buffer(kBytes * kOps);
  IoRegion region{src.get(), kBytes * kOps};  // writes from a registered (fixed) buffer
  CHECK((*engine)->register_buffers({&region, 1}).is_ok());

  Completions writes;
  for (int i = 0; i < kOps; ++i) {  // more ops than queue_depth: submit blocks, never fails
    REQUIRE((*engine)->write_async(device.get(), i * kBytes, {src.get() + i * kBytes, kBytes}, writes.callback()).is_ok());
  }
  for (int64_t r : writes.wait(kOps)) CHECK(r == int64_t(kBytes));
  Completions reads;
  for (int i = 0; i < kOps; ++i) {
    REQUIRE((*engine)->read_async(device.get(), i * kBytes, {dst.get() + i * kBytes, kBytes}, reads.callback()).is_ok());
  }
  for (int64_t r : reads.wait(kOps)) CHECK(r == int64_t(kBytes));
  CHECK(same_bytes(src.get(), dst.get(), kBytes * kOps));
  CHECK(device->stats().bytes_written.load() == kBytes * kOps);
  CHECK(device->stats().bytes_read.load() == kBytes * kOps);

  // Misaligned requests are refused up front; the callback never runs (it would run on an engine
  // thread, where no Catch assertion may be made: a flag is checked here instead).
  std::atomic<bool> ran{false};
  CHECK((*engine)->read_async(device.get(), 100, {dst.get(), kBytes}, [&](int64_t) { ran = true; }).code() ==
        StatusCode::kInvalidArgument);
  (*engine)->unregister_buffers(src.get());
  (*engine)->drain();
  CHECK_FALSE(ran.load());
}

TEST_CASE("io engines report device errors as -errno", "[transfer][io]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  FaultInjectingDevice device(create_memory_device(1 << 20));
  FaultPlan plan;
  plan.read_error_one_in = 1;
  device.set_plan(plan);
  IoEngineOptions o;
  o.kind = kind;
  auto engine = create_io_engine(o);
  REQUIRE(engine.is_ok());
  AlignedBuffer buf = zero_buffer(4096);
  Completions done;
  REQUIRE((*engine)->read_async(&device, 0, {buf.get(), 4096}, done.callback()).is_ok());
  CHECK(done.wait(1)[0] == -EIO);
}

TEST_CASE("io_uring batches: one submit call for a batch, none of it sent before the batch ends",
          "[transfer][io][batch]") {
  TempDir dir;
  REQUIRE(dir.ok());
  auto device = create_file_device(dir.file("batch.bin"), 4 << 20);
  REQUIRE(device.is_ok());
  IoEngineOptions o;
  o.kind = IoEngineKind::kUring;
  o.queue_depth = 32;
  auto engine = create_io_engine(o);
  REQUIRE(engine.is_ok());
  IoEngine& io = **engine;
  constexpr uint64_t kBytes = 64 << 10;
  constexpr int kOps = 16;
  AlignedBuffer src = random_buffer(kBytes * kOps, 70);
  AlignedBuffer dst = zero_buffer(kBytes * kOps);

  const IoEngineStats before = io.stats();
  Completions writes;
  {
    IoBatch batch(io);
    for (int i = 0; i < kOps; ++i) {
      REQUIRE(io.write_async(device->get(), i * kBytes, {src.get() + i * kBytes, kBytes}, writes.callback()).is_ok());
    }
    // Nothing was sent, so nothing can have completed yet.
    std::lock_guard lock(writes.mu);
    CHECK(writes.results.empty());
  }
  for (int64_t r : writes.wait(kOps)) CHECK(r == int64_t(kBytes));
  const IoEngineStats after = io.stats();
  CHECK(after.ops - before.ops == kOps);
  CHECK(after.submit_calls - before.submit_calls == 1);

  // Without a batch, every op is its own submit call.
  Completions reads;
  for (int i = 0; i < kOps; ++i) {
    REQUIRE(io.read_async(device->get(), i * kBytes, {dst.get() + i * kBytes, kBytes}, reads.callback()).is_ok());
  }
  for (int64_t r : reads.wait(kOps)) CHECK(r == int64_t(kBytes));
  CHECK(io.stats().submit_calls - after.submit_calls == kOps);
  CHECK(same_bytes(src.get(), dst.get(), kBytes * kOps));
}

TEST_CASE("an io batch larger than the queue depth sends as it fills, and drain sends an open batch",
          "[transfer][io][batch]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  TempDir dir;
  REQUIRE(dir.ok());
  auto device = create_file_device(dir.file("batch.bin"), 4 << 20);
  REQUIRE(device.is_ok());
  IoEngineOptions o;
  o.kind = kind;
  o.queue_depth = 4;
  auto engine = create_io_engine(o);
  REQUIRE(engine.is_ok());
  IoEngine& io = **engine;
  constexpr uint64_t kBytes = 64 << 10;
  constexpr int kOps = 40;  // ten times the queue depth, in one batch: the submit that finds the
                            // engine full must send the batch's own ops, or it would wait forever
  AlignedBuffer src = random_buffer(kBytes * kOps, 71);
  AlignedBuffer dst = zero_buffer(kBytes * kOps);
  Completions writes;
  {
    IoBatch batch(io);
    for (int i = 0; i < kOps; ++i) {
      REQUIRE(io.write_async(device->get(), (i * kBytes) % (4 << 20), {src.get() + i * kBytes, kBytes},
                             writes.callback()).is_ok());
    }
  }
  for (int64_t r : writes.wait(kOps)) CHECK(r == int64_t(kBytes));

  // drain() inside an open batch sends it and returns once it completed.
  Completions reads;
  {
    IoBatch batch(io);
    for (int i = 0; i < 3; ++i) {
      REQUIRE(io.read_async(device->get(), i * kBytes, {dst.get() + i * kBytes, kBytes}, reads.callback()).is_ok());
    }
    io.drain();
    std::lock_guard lock(reads.mu);
    CHECK(reads.results.size() == 3);
  }
  CHECK(same_bytes(src.get(), dst.get(), 3 * kBytes));
}

TEST_CASE("the host copy engine copies", "[transfer][copy]") {
  auto engine = create_host_copy_engine({});
  AlignedBuffer src = random_buffer(1 << 20, 60), dst = zero_buffer(1 << 20);
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  for (int i = 0; i < 4; ++i) {
    REQUIRE(engine->submit(dst.get() + i * (256 << 10), src.get() + i * (256 << 10), 256 << 10,
                           CopyDirection::kHostToHost, [&](const Status& s) {
                             std::lock_guard lock(mu);
                             done += s.is_ok() ? 1 : 100;
                             cv.notify_all();
                           })
                .is_ok());
  }
  std::unique_lock lock(mu);
  cv.wait(lock, [&] { return done >= 4; });
  CHECK(done == 4);
  CHECK(same_bytes(src.get(), dst.get(), 1 << 20));
  CHECK(engine->device_memory_is_host());
}

TEST_CASE("a refused buffer registration keeps the buffers registered before", "[transfer][io]") {
  IoEngineOptions o;
  o.kind = IoEngineKind::kUring;
  auto engine = create_io_engine(o);
  REQUIRE(engine.is_ok());
  auto device = create_memory_device(1 << 20);
  AlignedBuffer kept = random_buffer(256 << 10, 7);
  IoRegion region{kept.get(), 256 << 10};
  REQUIRE((*engine)->register_buffers({&region, 1}).is_ok());
  REQUIRE_THAT((*engine)->describe(), Catch::Contains("1 fixed buffers"));

  // Memory the kernel cannot pin (as the memlock limit would refuse it): the registration fails
  // with a reason, and the region registered before stays registered.
  const size_t bad_bytes = 1 << 20;
  void* bad = mmap(nullptr, bad_bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  REQUIRE(bad != MAP_FAILED);
  IoRegion refused{bad, bad_bytes};
  CHECK((*engine)->register_buffers({&refused, 1}).code() == StatusCode::kResourceExhausted);
  CHECK_THAT((*engine)->describe(), Catch::Contains("1 fixed buffers"));
  munmap(bad, bad_bytes);

  // And the engine still moves bytes through it.
  Completions writes;
  REQUIRE((*engine)->write_async(device.get(), 0, {kept.get(), 256 << 10}, writes.callback()).is_ok());
  CHECK(writes.wait(1).at(0) == int64_t(256 << 10));
  AlignedBuffer back = zero_buffer(256 << 10);
  Completions reads;
  REQUIRE((*engine)->read_async(device.get(), 0, {back.get(), 256 << 10}, reads.callback()).is_ok());
  CHECK(reads.wait(1).at(0) == int64_t(256 << 10));
  CHECK(same_bytes(kept.get(), back.get(), 256 << 10));
  (*engine)->unregister_buffers(kept.get());
}

namespace {

/// An io engine whose fixed-buffer registrations are all refused, as io_uring refuses them past a
/// daemon user's memlock limit; reads and writes go to a thread-pool engine.
class RefusingIoEngine final : public IoEngine {
 public:
  explicit RefusingIoEngine(std::unique_ptr<IoEngine> inner)
      : IoEngine(inner->queue_depth()), inner_(std::move(inner)) {}
  Status submit(const IoRequest& request, IoCallback done) override {
    return inner_->submit(request, std::move(done));
  }
  Status register_buffers(std::span<const IoRegion>) override {
    return {StatusCode::kResourceExhausted, "io_uring_register_buffers: Cannot allocate memory"};
  }
  void unregister_buffers(const void*) noexcept override {}
  void drain() override { inner_->drain(); }
  IoEngineStats stats() const noexcept override { return inner_->stats(); }
  IoEngineKind kind() const noexcept override { return inner_->kind(); }
  std::string describe() const override { return "refusing " + inner_->describe(); }

 private:
  std::unique_ptr<IoEngine> inner_;
};

}  // namespace

TEST_CASE("host memory the io engine refuses to register still serves transfers", "[transfer][io]") {
  IoEngineOptions o;
  o.kind = IoEngineKind::kThreadPool;
  auto inner = create_io_engine(o);
  REQUIRE(inner.is_ok());
  TransferEngineOptions options;
  options.io_engine = std::make_shared<RefusingIoEngine>(std::move(*inner));
  auto engine = TransferEngine::create(options);
  REQUIRE(engine.is_ok());  // its staging registration was refused too
  AlignedBuffer arena = random_buffer(1 << 20, 9);
  // kvtierd registers its host arena at start: a refusal there must not stop the daemon.
  CHECK((*engine)->register_host_memory(arena.get(), 1 << 20).is_ok());
  (*engine)->unregister_host_memory(arena.get());
}
