#include "transfer/staging_pool.h"

#include <spdlog/spdlog.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>

namespace kvtier {

Result<std::unique_ptr<StagingPool>> StagingPool::create(uint32_t count, uint64_t bytes, IoEngine& io,
                                                         CopyEngine& copy) {
  if (count == 0 || bytes == 0) return invalid_argument("staging pool needs count > 0 and bytes > 0");
  bytes = align_up(bytes, kIoAlignment);
  const uint64_t total = bytes * count;
  AlignedBuffer region = make_aligned_buffer(total, kIoAlignment);
  if (!region) return Status(StatusCode::kResourceExhausted, "cannot allocate staging buffers");
  std::memset(region.get(), 0, total);  // touch every page before locking and registering it
  std::unique_ptr<StagingPool> pool(new StagingPool(count, bytes, std::move(region), io, copy));
  for (uint32_t i = count; i-- > 0;) pool->free_.push_back(i);

  if (mlock(pool->region_.get(), total) == 0) {
    pool->mlocked_ = true;
  } else {
    spdlog::warn("kvtier transfer: staging not page-locked (mlock: {}); it still works",
                 std::strerror(errno));
  }
  if (Status s = copy.register_host_memory(pool->region_.get(), total); s.is_ok()) {
    pool->copy_registered_ = true;
  } else {
    spdlog::warn("kvtier transfer: staging not registered with the copy engine: {}", s.to_string());
  }
  IoRegion region_desc{pool->region_.get(), total};
  if (Status s = io.register_buffers({&region_desc, 1}); !s.is_ok()) {
    spdlog::warn("kvtier transfer: staging not registered with the io engine: {}", s.to_string());
  }
  return pool;
}

StagingPool::~StagingPool() {
  io_.unregister_buffers(region_.get());
  if (copy_registered_) copy_.unregister_host_memory(region_.get());
  if (mlocked_) munlock(region_.get(), bytes_ * count_);
}

}  // namespace kvtier
