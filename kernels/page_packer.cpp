// DevicePagePacker: the lane pool, the chunking through staging and the host backend.
#include "kernels/page_packer.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <new>
#include <string>
#include <utility>

namespace kvtier::kernels {

namespace {

uint32_t layers_of(const PagePackArgs& a) {
  return a.layer_count ? a.layer_count : a.layout.num_layers - a.layer_begin;
}

// Host staging and table: device memory emulated in host memory.
class HostPackLane final : public PackLaneBackend {
 public:
  HostPackLane(uint64_t staging_bytes, uint64_t table_bytes)
      : staging_bytes_(staging_bytes), table_bytes_(table_bytes),
        staging_(alloc(staging_bytes)), table_(alloc(table_bytes)) {
    if (!staging_ || !table_) throw std::bad_alloc();  // acquire() turns it into kResourceExhausted
  }
  std::byte* staging() noexcept override { return staging_.get(); }
  uint64_t staging_bytes() const noexcept override { return staging_bytes_; }
  std::byte* table() noexcept override { return table_.get(); }
  uint64_t table_bytes() const noexcept override { return table_bytes_; }
  Status copy_to_device(void* dst, const void* src, uint64_t bytes) override {
    std::memcpy(dst, src, bytes);
    return Status::ok();
  }
  Status copy_to_host(void* dst, const void* src, uint64_t bytes) override {
    std::memcpy(dst, src, bytes);
    return Status::ok();
  }
  Status launch(const PagePackArgs& args, bool pack) override {
    return pack ? pack_pages_cpu(args) : unpack_pages_cpu(args);
  }
  Status sync() override { return Status::ok(); }

 private:
  struct Free {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  static std::unique_ptr<std::byte, Free> alloc(uint64_t bytes) {
    const uint64_t rounded = std::max<uint64_t>(256, (bytes + 255) / 256 * 256);
    return std::unique_ptr<std::byte, Free>(static_cast<std::byte*>(std::aligned_alloc(256, rounded)));
  }
  uint64_t staging_bytes_, table_bytes_;
  std::unique_ptr<std::byte, Free> staging_, table_;
};

}  // namespace

// The device table of one launch: layer tensor pointers, then slots, then pages.
struct DevicePagePacker::Lane::TableLayout {
  uint64_t slots_at = 0;  // byte offsets
  uint64_t pages_at = 0;
  uint64_t bytes = 0;
  static TableLayout of(uint32_t layers, uint32_t blocks) {
    TableLayout t;
    t.slots_at = uint64_t(layers) * sizeof(void*);
    t.pages_at = t.slots_at + uint64_t(blocks) * sizeof(int32_t);
    t.bytes = t.pages_at + uint64_t(blocks) * sizeof(int32_t);
    return t;
  }
  // Blocks one table of `table_bytes` holds beside `layers` pointers.
  static uint64_t capacity(uint64_t table_bytes, uint32_t layers) {
    const uint64_t fixed = uint64_t(layers) * sizeof(void*);
    return table_bytes > fixed ? (table_bytes - fixed) / (2 * sizeof(int32_t)) : 0;
  }
};

DevicePagePacker::DevicePagePacker(PackLaneFactory factory, PagePackerOptions options)
    : factory_(std::move(factory)), options_(options) {
  options_.max_lanes = std::max<uint32_t>(options_.max_lanes, 1);
}

Result<DevicePagePacker::Lane> DevicePagePacker::acquire() {
  std::unique_lock lock(mu_);
  ++waiting_;
  freed_.wait(lock, [&] { return !idle_.empty() || made_ < options_.max_lanes; });
  --waiting_;
  if (!idle_.empty()) {
    auto backend = std::move(idle_.back());
    idle_.pop_back();
    return Lane(this, std::move(backend));
  }
  ++made_;
  lock.unlock();  // making a lane allocates device memory: not under the lock
  Result<std::unique_ptr<PackLaneBackend>> backend = Status(StatusCode::kInternal, "page packer: no lane");
  try {
    backend = factory_(options_.staging_bytes, options_.table_bytes);
  } catch (const std::exception& e) {  // bad_alloc: the slot it counted must come back
    backend = Status(StatusCode::kResourceExhausted, std::string("page packer: cannot make a lane: ") + e.what());
  }
  if (!backend || !*backend) {
    lock.lock();
    --made_;
    freed_.notify_one();
    if (!backend) return backend.status();
    return Status(StatusCode::kInternal, "page packer: the lane factory made no lane");
  }
  return Lane(this, std::move(*backend));
}

uint32_t DevicePagePacker::lanes() const {
  std::lock_guard lock(mu_);
  return made_;
}

uint32_t DevicePagePacker::waiters() const {
  std::lock_guard lock(mu_);
  return waiting_;
}

void DevicePagePacker::give_back(std::unique_ptr<PackLaneBackend> backend, bool failed) {
  std::unique_ptr<PackLaneBackend> dropped;  // freed outside the lock
  {
    std::lock_guard lock(mu_);
    if (failed) {
      dropped = std::move(backend);
      --made_;
    } else {
      idle_.push_back(std::move(backend));
    }
  }
  freed_.notify_one();
}

DevicePagePacker::Lane::Lane(Lane&& other) noexcept
    : owner_(std::exchange(other.owner_, nullptr)), backend_(std::move(other.backend_)),
      failed_(other.failed_), host_table_(std::move(other.host_table_)) {}

DevicePagePacker::Lane::~Lane() {
  if (owner_ && backend_) owner_->give_back(std::move(backend_), failed_);
}

Status DevicePagePacker::Lane::fail(Status s) {
  failed_ = true;
  backend_->sync().ignore();  // let queued work end before the lane's memory can be freed
  return s;
}

Status DevicePagePacker::Lane::check_tensors(const PagePackArgs& args) {
  const uint32_t end = args.layer_begin + layers_of(args);
  for (uint32_t l = args.layer_begin; l < end; ++l) {
    KVTIER_RETURN_IF_ERROR(backend_->check_reachable(args.layer_base[l], "an engine layer tensor"));
  }
  return Status::ok();
}

Status DevicePagePacker::Lane::queue_table(const TableLayout& t, uint64_t k, void* const* layer_base,
                                           const int32_t* slots, const int32_t* pages, uint32_t count,
                                           PagePackArgs& a) {
  std::byte* host = host_table_.data() + k * t.bytes;
  std::memcpy(host, layer_base, t.slots_at);
  std::memcpy(host + t.slots_at, slots, count * sizeof(int32_t));
  std::memcpy(host + t.pages_at, pages, count * sizeof(int32_t));
  std::byte* device_table = backend_->table();
  KVTIER_RETURN_IF_ERROR(backend_->copy_to_device(device_table, host, t.bytes));
  a.layer_base = reinterpret_cast<void* const*>(device_table);
  a.arena_slots = reinterpret_cast<const int32_t*>(device_table + t.slots_at);
  a.engine_pages = reinterpret_cast<const int32_t*>(device_table + t.pages_at);
  a.num_blocks = count;
  return Status::ok();
}

Status DevicePagePacker::Lane::unpack_device(const PagePackArgs& args) { return in_device(args, false); }
Status DevicePagePacker::Lane::pack_device(const PagePackArgs& args) { return in_device(args, true); }

Status DevicePagePacker::Lane::in_device(const PagePackArgs& args, bool pack) {
  KVTIER_RETURN_IF_ERROR(check_page_pack(args));
  KVTIER_RETURN_IF_ERROR(check_page_pack_indices(args));
  if (args.num_blocks == 0) return Status::ok();
  KVTIER_RETURN_IF_ERROR(check_tensors(args));
  KVTIER_RETURN_IF_ERROR(backend_->check_reachable(args.arena, "the canonical arena"));
  const uint32_t layers = args.layout.num_layers;
  const uint64_t per_launch = std::min<uint64_t>(TableLayout::capacity(backend_->table_bytes(), layers),
                                                 args.num_blocks);
  if (per_launch == 0) return invalid_argument("page packer: the device table cannot hold this many layers");
  // One host table per launch, all alive until the sync.
  const TableLayout t = TableLayout::of(layers, uint32_t(per_launch));
  const uint64_t launches = (args.num_blocks + per_launch - 1) / per_launch;
  host_table_.assign(launches * t.bytes, std::byte{0});
  PagePackArgs a = args;
  for (uint64_t k = 0; k < launches; ++k) {
    const uint32_t first = uint32_t(k * per_launch);
    const uint32_t count = uint32_t(std::min<uint64_t>(per_launch, args.num_blocks - first));
    if (Status s = queue_table(t, k, args.layer_base, args.arena_slots + first, args.engine_pages + first, count, a);
        !s) {
      return fail(s);
    }
    if (Status s = backend_->launch(a, pack); !s) return fail(s);
  }
  if (Status s = backend_->sync(); !s) return fail(s);
  return Status::ok();
}

Status DevicePagePacker::Lane::unpack_from_host(const PagePackArgs& args) { return staged(args, false); }
Status DevicePagePacker::Lane::pack_to_host(const PagePackArgs& args) { return staged(args, true); }

// The layer range of each block goes to (or comes from) staging, blocks back to back, so a launch
// sees a model of just those layers: layer_base starts at the range's first layer.
Status DevicePagePacker::Lane::staged(const PagePackArgs& args, bool pack) {
  KVTIER_RETURN_IF_ERROR(check_page_pack(args));
  KVTIER_RETURN_IF_ERROR(check_page_pack_indices(args));
  if (args.num_blocks == 0) return Status::ok();
  KVTIER_RETURN_IF_ERROR(check_tensors(args));
  const KvLayout& layout = args.layout;
  const uint32_t layers = layers_of(args);
  const uint64_t layer_bytes = layout.bytes_per_block_layer();
  const uint64_t block_bytes = uint64_t(layers) * layer_bytes;  // of one block in staging
  const uint64_t slot_stride = args.slot_stride_bytes ? args.slot_stride_bytes : layout.bytes_per_block();
  const uint64_t per_launch =
      std::min<uint64_t>({backend_->staging_bytes() / block_bytes,
                          TableLayout::capacity(backend_->table_bytes(), layers), args.num_blocks});
  if (per_launch == 0) {
    return invalid_argument("page packer: staging of " + std::to_string(backend_->staging_bytes()) +
                            " bytes cannot hold one block of " + std::to_string(block_bytes) + " bytes");
  }
  PagePackArgs a = args;
  a.layout.num_layers = layers;
  a.slot_stride_bytes = 0;
  a.layer_begin = 0;
  a.layer_count = layers;
  a.arena = backend_->staging();
  a.num_slots = uint32_t(per_launch);

  const TableLayout t = TableLayout::of(layers, uint32_t(per_launch));
  const uint64_t launches = (args.num_blocks + per_launch - 1) / per_launch;
  host_table_.assign(launches * t.bytes, std::byte{0});
  std::vector<int32_t> staged_slots(per_launch);
  for (uint64_t i = 0; i < per_launch; ++i) staged_slots[i] = int32_t(i);
  auto* host_arena = static_cast<std::byte*>(args.arena);
  std::byte* staging = backend_->staging();

  // Copies blocks [first, first + count) between host slots and staging, one copy per run of
  // blocks that are back to back on both sides.
  auto move_blocks = [&](uint32_t first, uint32_t count) -> Status {
    uint32_t run = 0;
    for (uint32_t i = 1; i <= count; ++i) {
      const bool joins = i < count && slot_stride == block_bytes &&
                         args.arena_slots[first + i] == args.arena_slots[first + i - 1] + 1;
      if (joins) continue;
      std::byte* host = host_arena + uint64_t(args.arena_slots[first + run]) * slot_stride +
                        uint64_t(args.layer_begin) * layer_bytes;
      std::byte* dev = staging + uint64_t(run) * block_bytes;
      const uint64_t bytes = uint64_t(i - run) * block_bytes;
      Status s = pack ? backend_->copy_to_host(host, dev, bytes) : backend_->copy_to_device(dev, host, bytes);
      if (!s) return s;
      run = i;
    }
    return Status::ok();
  };

  for (uint64_t k = 0; k < launches; ++k) {
    const uint32_t first = uint32_t(k * per_launch);
    const uint32_t count = uint32_t(std::min<uint64_t>(per_launch, args.num_blocks - first));
    // Staging slot i holds the piece's block i.
    if (Status s = queue_table(t, k, args.layer_base + args.layer_begin, staged_slots.data(),
                               args.engine_pages + first, count, a);
        !s) {
      return fail(s);
    }
    // Stream order keeps each step after the one before: the next piece's copy into staging
    // waits for this launch, and a pack's copy out waits for its launch.
    if (!pack) {
      if (Status s = move_blocks(first, count); !s) return fail(s);
    }
    if (Status s = backend_->launch(a, pack); !s) return fail(s);
    if (pack) {
      if (Status s = move_blocks(first, count); !s) return fail(s);
    }
  }
  if (Status s = backend_->sync(); !s) return fail(s);
  return Status::ok();
}

std::unique_ptr<PackLaneBackend> make_host_pack_lane(uint64_t staging_bytes, uint64_t table_bytes) {
  return std::make_unique<HostPackLane>(staging_bytes, table_bytes);
}

std::unique_ptr<DevicePagePacker> create_host_page_packer(const PagePackerOptions& options) {
  return std::make_unique<DevicePagePacker>(
      [](uint64_t staging, uint64_t table) -> Result<std::unique_ptr<PackLaneBackend>> {
        return make_host_pack_lane(staging, table);
      },
      options);
}

}  // namespace kvtier::kernels
