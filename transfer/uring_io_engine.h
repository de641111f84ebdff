// UringIoEngine: one io_uring for every device with a native fd (liburing 2.3).
//
// - Registered files: a sparse table of kFixedFiles slots; a device's fd takes a slot on first use
//   (io_uring_register_files_update). Each use re-checks the fd's inode so a closed-and-reused fd
//   number never reaches another device's file through a stale slot.
// - Registered buffers: register_buffers() regions (host arena, staging) become fixed buffers,
//   used through read_fixed/write_fixed whenever a request's buffer lies inside one.
// - In flight: at most queue_depth operations; submit() blocks while full. The SQ holds
//   queue_depth entries, so a submit or resubmit always finds a free SQE.
// - One completion thread reaps CQEs in batches, resubmits short transfers and -EAGAIN for the
//   remainder (batched into one io_uring_submit), counts each op on the device
//   (record_read/record_write) and runs the callback.
// - Batches (IoBatch): a thread inside one leaves its SQEs in the SQ and the batch's end sends them
//   with one io_uring_submit. A submit that finds the engine full, and drain(), send the pending
//   SQEs before they wait, so a batch can never wait on its own unsent operations. A submit
//   outside a batch sends whatever is pending, its own SQE and any batch's.
// - Devices with native_fd() == -1 go to an internal ThreadPoolIoEngine.
#pragma once

#include <liburing.h>

#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "transfer/io_engine.h"
#include "transfer/thread_pool_io_engine.h"

namespace kvtier {

class UringIoEngine final : public IoEngine {
 public:
  static constexpr unsigned kFixedFiles = 64;

  /// kUnavailable with the errno text when io_uring_queue_init is refused.
  static Result<std::unique_ptr<UringIoEngine>> create(const IoEngineOptions& options);
  ~UringIoEngine() override;

  Status submit(const IoRequest& request, IoCallback done) override;
  Status register_buffers(std::span<const IoRegion> regions) override;
  void unregister_buffers(const void* base) noexcept override;
  void begin_batch() noexcept override;
  void end_batch() override;
  void drain() override;
  IoEngineStats stats() const noexcept override;
  IoEngineKind kind() const noexcept override { return IoEngineKind::kUring; }
  std::string describe() const override;

 private:
  struct Op {
    IoRequest request;
    IoCallback done;
    uint64_t completed = 0;  // bytes already moved (short transfers)
    int fd = -1;             // raw fd or fixed-file index
    bool fixed_file = false;
    int buffer_index = -1;   // fixed buffer index, or -1
    // Released by the submitter, acquired by the completion thread: the kernel orders the two,
    // but ThreadSanitizer cannot see through io_uring, so the order is also made explicit here.
    std::atomic<bool> published{false};
  };
  struct FileSlot {
    int fd = -1;
    dev_t dev = 0;
    ino_t ino = 0;
  };

  UringIoEngine(uint32_t queue_depth, uint32_t threads);
  void completion_loop();
  /// Fills one SQE for the op's remainder; ring_mu_ held.
  void prep_locked(Op* op);
  /// Sends every prepared SQE with one io_uring_submit (none pending: no call); ring_mu_ held.
  void send_locked();
  /// send_locked() under the lock.
  void send();
  /// Whether the calling thread is inside a batch on this engine.
  bool in_batch() const noexcept;
  /// The fixed-file index for fd, or -1 (table full, unregistered); ring_mu_ held.
  int file_index_locked(int fd);
  int buffer_index_locked(const std::byte* p, uint64_t len) const;
  void finish_op(Op* op, int64_t result);

  io_uring ring_{};
  bool ring_ready_ = false;
  std::unique_ptr<ThreadPoolIoEngine> pool_;  // devices without a native fd

  std::mutex ring_mu_;  // the SQ, the file table, the buffer table
  bool files_registered_ = false;
  std::vector<FileSlot> file_slots_;
  std::unordered_map<int, int> fd_to_slot_;
  std::vector<iovec> buffers_;         // registered fixed buffers, in index order
  std::vector<const void*> owners_;    // the region base each buffer came from
  /// Registers `wanted` as the whole table; ring_mu_ held.
  Status install_buffers_locked(std::vector<iovec> wanted, std::vector<const void*> owners);

  std::mutex inflight_mu_;
  std::condition_variable inflight_cv_;
  uint32_t inflight_ = 0;
  bool stopping_ = false;

  std::thread completion_thread_;

  std::atomic<uint64_t> ops_{0}, submit_calls_{0};
};

}  // namespace kvtier
