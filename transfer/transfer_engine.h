// TransferEngine: runs every move of bytes between host memory, the HBM arena and storage as an
// asynchronous job (DESIGN.md "Transfer"). It moves bytes and knows nothing of what they mean.
//
// A job is a list of Segments, each a run of bytes from one Location to another, tagged with the
// model layer it belongs to so a layerwise load can start on layer 0 while layer 1 is in flight.
// Routes (S = storage, H = host memory, D = HBM arena, CUDA or emulated):
//   S→H  io read straight into the host pointer when it and the length are 4 KiB-aligned,
//        else io read into staging and copy out
//   H→S  io write straight from the host pointer when aligned, else copy into staging first
//   S→D  io read into staging, then copy host→device      (pipelined: with ≥ 2 staging buffers
//   D→S  copy device→host into staging, then io write      the disk and the copy overlap)
//   S→S  io read into staging, then io write
//   H→D, D→H, D→D, H→H  one copy-engine op
// Segments larger than a staging buffer are split into chunks of staging_bytes.
//
// Storage rules: a storage offset must be 4 KiB-aligned. A storage length that is not a multiple
// of 4 KiB is read rounded up (the device must hold the rounded range) and written zero-padded to
// the next 4 KiB boundary: the bytes after the segment up to that boundary are overwritten.
//
// Back-pressure, never an unbounded queue: at most max_inflight_jobs jobs are admitted at once
// (submit blocks, try_submit returns kResourceExhausted), at most staging_buffers staged chunks and
// max_direct_ops unstaged operations are in flight. One dispatcher thread issues every operation,
// in submission order; completion threads only hand work back to it, so they never block.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kvtier/kv_buffer.h"  // LocationKind
#include "kvtier/status.h"
#include "tiers/storage_device.h"
#include "transfer/copy_engine.h"
#include "transfer/io_engine.h"
#include "kvtier/transfer_handle.h"

namespace kvtier {

/// Where a segment's bytes are or go. Make one with host(), device() or storage(). The pointer is
/// non-owning; the engine writes only through a segment's dst.
struct Location {
  LocationKind kind = LocationKind::kHost;
  std::byte* ptr = nullptr;              // kHost, kDevice
  StorageDevice* device = nullptr;       // kStorage
  uint64_t offset = 0;                   // kStorage: 4 KiB-aligned

  static Location host(const void* p) noexcept {
    return {LocationKind::kHost, static_cast<std::byte*>(const_cast<void*>(p)), nullptr, 0};
  }
  static Location device_memory(const void* p) noexcept {
    return {LocationKind::kDevice, static_cast<std::byte*>(const_cast<void*>(p)), nullptr, 0};
  }
  static Location storage(StorageDevice* dev, uint64_t off) noexcept {
    return {LocationKind::kStorage, nullptr, dev, off};
  }
};

/// One run of bytes of one layer.
struct Segment {
  uint32_t layer = 0;        // < JobSpec::num_layers
  uint64_t bytes = 0;        // > 0
  Location src;
  Location dst;
  /// When true, the engine computes XXH3-64 of the bytes while they sit in host memory (staging,
  /// a host source or destination, or emulated HBM) and fails the job with kChecksumMismatch when
  /// it differs from expected_xxh3_64 (default false). Refused (kInvalidArgument) for a CUDA D→D
  /// segment, whose bytes never touch host memory.
  bool verify = false;
  uint64_t expected_xxh3_64 = 0;
};

struct JobSpec {
  std::vector<Segment> segments;
  /// Layers the job covers; wait_layer(i) is valid for i < num_layers (default 1).
  uint32_t num_layers = 1;
  /// Runs once when the job is final (optional).
  TransferCallback callback;
};

enum class Route : uint8_t {
  kStorageToHost, kHostToStorage, kStorageToDevice, kDeviceToStorage, kStorageToStorage,
  kHostToDevice, kDeviceToHost, kDeviceToDevice, kHostToHost,
};
inline constexpr int kNumRoutes = 9;
std::string_view route_name(Route r) noexcept;

struct TransferStats {
  uint64_t jobs_submitted = 0, jobs_done = 0, jobs_failed = 0, jobs_cancelled = 0;
  uint64_t checksum_mismatches = 0;
  std::array<uint64_t, kNumRoutes> bytes_per_route{};  // index: Route; bytes that arrived
  uint64_t submitters_waiting = 0;  // submit() calls waiting now for a job to finish (back-pressure)
  bool shutting_down = false;       // shutdown() has begun: new jobs are refused
};

struct TransferEngineOptions {
  /// The io engine; null: create_io_engine(io) (default null).
  std::shared_ptr<IoEngine> io_engine;
  /// Used only when io_engine is null (defaults: auto, qd 64, 4 threads).
  IoEngineOptions io;
  /// The copy engine; null: create_copy_engine() (default null).
  std::shared_ptr<CopyEngine> copy_engine;
  /// Staging buffers, allocated once at create (default 8; at least 1).
  uint32_t staging_buffers = 8;
  /// Bytes per staging buffer, rounded up to 4 KiB (default 4 MiB). Page-locked where possible
  /// (mlock, cudaHostRegister with a GPU) and registered with the io engine.
  uint64_t staging_bytes = 4ull << 20;
  /// Most jobs admitted at once (default 64).
  uint32_t max_inflight_jobs = 64;
  /// Most unstaged operations (direct io, single copies) in flight at once (default 64).
  uint32_t max_direct_ops = 64;
};

class TransferEngine {
 public:
  /// kInvalidArgument for a zero option, kUnavailable when an engine cannot be made.
  static Result<std::unique_ptr<TransferEngine>> create(TransferEngineOptions options = {});

  /// Waits for every admitted job (shutdown()).
  ~TransferEngine();
  TransferEngine(const TransferEngine&) = delete;
  TransferEngine& operator=(const TransferEngine&) = delete;

  /// Admits a job, blocking while max_inflight_jobs are admitted. kInvalidArgument for a malformed
  /// spec (nothing runs, the callback does not fire), kUnavailable after shutdown().
  Result<TransferHandle> submit(JobSpec spec);
  /// As submit, but kResourceExhausted instead of blocking when full.
  Result<TransferHandle> try_submit(JobSpec spec);

  /// Refuses new jobs, waits for the admitted ones to finish, stops the threads. Idempotent.
  void shutdown();

  /// Registers more host memory (the host arena) with the io engine and the copy engine so reads
  /// and writes into it use fixed buffers and DMA. The region must outlive the engine. The io
  /// engine's refusal (the memlock limit) is logged and not an error: plain reads and writes serve
  /// the region instead. Only the copy engine's refusal is returned.
  [[nodiscard]] Status register_host_memory(void* base, size_t bytes);
  /// Forgets a region given to register_host_memory; call it before freeing the region, with no
  /// job on it in flight.
  void unregister_host_memory(void* base) noexcept;

  TransferStats stats() const;
  IoEngine& io_engine() noexcept;
  CopyEngine& copy_engine() noexcept;
  uint64_t staging_bytes() const noexcept;
  uint32_t staging_buffers() const noexcept;

  class Impl;

 private:
  explicit TransferEngine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace kvtier
