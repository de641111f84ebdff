// Helpers shared by the transfer tests: a temp directory, deterministic bytes, engines made per
// io engine kind, and a GatedDevice whose reads wait until the test opens the gate.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include "temp_dir.h"
#include "test_bytes.h"
#include "tiers/storage_device.h"
#include "transfer/transfer_engine.h"

namespace kvtier::testing {

/// An aligned buffer of `bytes` random bytes.
inline AlignedBuffer random_buffer(size_t bytes, uint64_t seed) {
  AlignedBuffer buf = make_aligned_buffer(align_up(bytes, kIoAlignment));
  std::memset(buf.get(), 0, align_up(bytes, kIoAlignment));
  fill_pattern(std::span(buf.get(), bytes), seed);
  return buf;
}
inline AlignedBuffer zero_buffer(size_t bytes) {
  AlignedBuffer buf = make_aligned_buffer(align_up(bytes, kIoAlignment));
  std::memset(buf.get(), 0, align_up(bytes, kIoAlignment));
  return buf;
}

inline bool all_zero(const std::byte* p, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (p[i] != std::byte{0}) return false;
  }
  return true;
}

/// A memory device whose reads block until open() (writes never block). Counts reads started so a
/// test can wait until one is parked at the gate: no sleeps.
class GatedDevice final : public StorageDevice {
 public:
  explicit GatedDevice(uint64_t size) : StorageDevice(size), bytes_(size) {}

  void open_gate() {
    {
      std::lock_guard lock(mu_);
      open_ = true;
    }
    cv_.notify_all();
  }
  /// Blocks until at least `n` reads have reached the gate.
  void wait_reads_started(uint64_t n) {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return reads_started_ >= n; });
  }
  uint64_t reads_started() {
    std::lock_guard lock(mu_);
    return reads_started_;
  }
  std::byte* data() { return bytes_.data(); }
  std::string describe() const override { return "gated memory device"; }

 private:
  int read_impl(uint64_t offset, std::span<std::byte> out) override {
    std::unique_lock lock(mu_);
    ++reads_started_;
    cv_.notify_all();
    cv_.wait(lock, [&] { return open_; });
    std::memcpy(out.data(), bytes_.data() + offset, out.size());
    return 0;
  }
  int write_impl(uint64_t offset, std::span<const std::byte> in) override {
    std::lock_guard lock(mu_);
    std::memcpy(bytes_.data() + offset, in.data(), in.size());
    return 0;
  }
  int flush_impl() override { return 0; }

  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
  uint64_t reads_started_ = 0;
  std::vector<std::byte> bytes_;
};

/// A transfer engine on the io engine `kind` with the host copy engine or, with a GPU, CUDA.
inline std::unique_ptr<TransferEngine> make_engine(IoEngineKind kind, TransferEngineOptions options = {}) {
  options.io.kind = kind;
  auto engine = TransferEngine::create(std::move(options));
  if (!engine) return nullptr;
  return std::move(*engine);
}

inline Segment segment(uint32_t layer, uint64_t bytes, Location src, Location dst) {
  Segment s;
  s.layer = layer;
  s.bytes = bytes;
  s.src = src;
  s.dst = dst;
  return s;
}

/// Submits a one-layer job of `segments` and waits for it.
inline Status run_job(TransferEngine& engine, std::vector<Segment> segments, uint32_t layers = 1) {
  JobSpec spec;
  spec.segments = std::move(segments);
  spec.num_layers = layers;
  auto handle = engine.submit(std::move(spec));
  if (!handle) return handle.status();
  return handle->wait();
}

}  // namespace kvtier::testing
