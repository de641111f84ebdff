// Per-layer completion: wait_layer(i) returns once layer i's bytes have arrived, while later
// layers are still held at a gate; the callback fires exactly once.
#include <catch2/catch.hpp>

#include <atomic>

#include "transfer_test_support.h"

using namespace kvtier;
using namespace kvtier::testing;

TEST_CASE("wait_layer returns per layer, before the job is done", "[transfer][layers]") {
  const auto kind = GENERATE(IoEngineKind::kUring, IoEngineKind::kThreadPool);
  CAPTURE(io_engine_kind_name(kind));
  constexpr uint64_t kLayerBytes = 64 << 10;
  auto fast = create_memory_device(1 << 20);
  GatedDevice gated(1 << 20);
  AlignedBuffer layer0 = random_buffer(kLayerBytes, 10);
  AlignedBuffer layer1 = random_buffer(kLayerBytes, 11);
  REQUIRE(fast->write(0, {layer0.get(), kLayerBytes}).is_ok());
  REQUIRE(gated.write(0, {layer1.get(), kLayerBytes}).is_ok());

  auto engine = make_engine(kind);
  REQUIRE(engine);
  AlignedBuffer dst = zero_buffer(2 * kLayerBytes);
  std::atomic<int> callbacks{0};
  std::atomic<bool> callback_ok{false};
  JobSpec spec;
  spec.num_layers = 3;  // layer 2 has no segments: it counts as arrived from the start
  spec.segments.push_back(segment(1, kLayerBytes, Location::storage(&gated, 0), Location::host(dst.get() + kLayerBytes)));
  spec.segments.push_back(segment(0, kLayerBytes, Location::storage(fast.get(), 0), Location::host(dst.get())));
  spec.callback = [&](const Status& s) {
    callback_ok = s.is_ok();
    callbacks.fetch_add(1);
  };
  auto handle = engine->submit(std::move(spec));
  REQUIRE(handle.is_ok());

  REQUIRE(handle->wait_layer(0).is_ok());
  CHECK(same_bytes(dst.get(), layer0.get(), kLayerBytes));  // layer 0 is there
  CHECK_FALSE(handle->poll());                              // layer 1 is still at the gate
  CHECK(handle->state() == TransferState::kRunning);
  CHECK(handle->layers_done() == 2);
  CHECK(callbacks.load() == 0);
  CHECK(handle->wait_layer(7).code() == StatusCode::kInvalidArgument);

  gated.open_gate();
  REQUIRE(handle->wait_layer(1).is_ok());
  CHECK(same_bytes(dst.get() + kLayerBytes, layer1.get(), kLayerBytes));
  REQUIRE(handle->wait().is_ok());
  CHECK(handle->state() == TransferState::kDone);
  CHECK(handle->layers_done() == 3);
  CHECK(handle->bytes_done() == 2 * kLayerBytes);
  CHECK(callbacks.load() == 1);  // wait() returned, so the callback has run, once
  CHECK(callback_ok.load());
}

TEST_CASE("a layerwise restore through staging completes layer by layer", "[transfer][layers]") {
  // storage -> emulated/real HBM through staging, 2 staging buffers, 6 layers of 3 chunks each.
  auto device = create_memory_device(8 << 20);
  TransferEngineOptions options;
  options.staging_buffers = 2;
  options.staging_bytes = 16 << 10;
  auto engine = make_engine(IoEngineKind::kAuto, options);
  REQUIRE(engine);
  constexpr uint32_t kLayers = 6;
  constexpr uint64_t kLayerBytes = 48 << 10;
  AlignedBuffer src = random_buffer(kLayers * kLayerBytes, 12);
  AlignedBuffer mid = zero_buffer(kLayers * kLayerBytes);
  AlignedBuffer back = zero_buffer(kLayers * kLayerBytes);
  REQUIRE(device->write(0, {src.get(), kLayers * kLayerBytes}).is_ok());
  JobSpec spec;
  spec.num_layers = kLayers;
  for (uint32_t l = 0; l < kLayers; ++l) {
    spec.segments.push_back(segment(l, kLayerBytes, Location::storage(device.get(), l * kLayerBytes),
                                    Location::host(mid.get() + l * kLayerBytes + 0)));
  }
  auto handle = engine->submit(std::move(spec));
  REQUIRE(handle.is_ok());
  for (uint32_t l = 0; l < kLayers; ++l) {
    REQUIRE(handle->wait_layer(l).is_ok());
    CHECK(handle->layers_done() >= l + 1);
    CHECK(same_bytes(mid.get() + l * kLayerBytes, src.get() + l * kLayerBytes, kLayerBytes));
  }
  REQUIRE(handle->wait().is_ok());
}
