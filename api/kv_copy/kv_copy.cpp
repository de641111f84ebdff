#include "api/kv_copy/kv_copy.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/page_pack.h"
#include "transfer/job_state.h"
#include "kvtier/transfer_handle.h"

namespace kvtier {

KvBuffer KvBuffer::canonical(std::span<std::byte* const> blocks, LocationKind memory) {
  KvBuffer b;
  b.memory = memory;
  b.blocks.assign(blocks.begin(), blocks.end());
  return b;
}

KvBuffer KvBuffer::contiguous(std::byte* base, size_t count, uint64_t block_bytes, LocationKind memory) {
  KvBuffer b;
  b.memory = memory;
  b.blocks.reserve(count);
  for (size_t i = 0; i < count; ++i) b.blocks.push_back(base + i * block_bytes);
  return b;
}

KvBuffer KvBuffer::paged(EngineLayout engine, std::vector<void*> layer_base,
                         uint32_t engine_num_pages, std::vector<int32_t> pages, LocationKind memory,
                         uint32_t page_tokens) {
  KvBuffer b;
  b.page_tokens = page_tokens;
  b.memory = memory;
  b.engine = engine;
  b.layer_base = std::move(layer_base);
  b.engine_num_pages = engine_num_pages;
  b.pages = std::move(pages);
  return b;
}

namespace {

/// Each copy goes to the copy engine on its own; the job finishes when the last one lands.
class CopyEngineCopier final : public DeviceCopier {
 public:
  explicit CopyEngineCopier(CopyEngine& engine) : engine_(engine) {}

  Result<TransferHandle> copy(std::vector<BlockCopy> copies, uint32_t num_layers) override {
    std::vector<uint32_t> per_layer(num_layers, 0);
    for (const BlockCopy& c : copies) {
      if (c.layer >= num_layers) return invalid_argument("copy: a copy's layer is past the job's layers");
      ++per_layer[c.layer];
    }
    struct Shared {
      std::shared_ptr<detail::JobState> job;
      std::atomic<size_t> outstanding;
    };
    auto shared = std::make_shared<Shared>();
    shared->job = std::make_shared<detail::JobState>(std::move(per_layer), TransferCallback{});
    shared->outstanding.store(copies.size() + 1);  // + 1: the submitting loop's own reference
    auto landed = [shared] {
      if (shared->outstanding.fetch_sub(1) == 1) shared->job->finish({});
    };
    shared->job->mark_running();
    for (const BlockCopy& c : copies) {
      if (shared->job->should_stop()) {
        landed();
        continue;
      }
      const CopyDirection d = c.src_device ? (c.dst_device ? CopyDirection::kDeviceToDevice : CopyDirection::kDeviceToHost)
                                           : (c.dst_device ? CopyDirection::kHostToDevice : CopyDirection::kHostToHost);
      const uint32_t layer = c.layer;
      const uint64_t bytes = c.bytes;
      Status st = engine_.submit(c.dst, c.src, c.bytes, d, [shared, layer, bytes, landed](const Status& s) {
        if (s) {
          shared->job->add_bytes(bytes);
          shared->job->segment_arrived(layer);
        } else {
          shared->job->record_error(s);
        }
        landed();
      });
      if (!st) {
        shared->job->record_error(std::move(st));
        landed();
      }
    }
    TransferHandle handle(shared->job);
    landed();
    return handle;
  }

 private:
  CopyEngine& engine_;
};

kernels::PagePackArgs pack_args(const KvLayout& layout, const KvBuffer& buf, size_t first, size_t count,
                                const std::byte* canonical, std::vector<int32_t>& slots) {
  slots.resize(count);
  std::iota(slots.begin(), slots.end(), 0);
  kernels::PagePackArgs a;
  a.layout = layout;
  a.arena = const_cast<std::byte*>(canonical);
  a.num_slots = static_cast<uint32_t>(count);
  a.engine = buf.engine;
  a.layer_base = buf.layer_base.data();
  a.engine_num_pages = buf.engine_num_pages;
  a.page_tokens = buf.page_tokens;
  a.arena_slots = slots.data();
  a.engine_pages = buf.pages.data() + first;
  a.num_blocks = static_cast<uint32_t>(count);
  return a;
}

}  // namespace

Status check_kv_buffer(const KvLayout& layout, const KvBuffer& buf) {
  if (buf.memory == LocationKind::kStorage) return invalid_argument("KV buffers are host or device memory");
  if (!buf.is_paged()) {
    for (size_t i = 0; i < buf.blocks.size(); ++i) {
      if (!buf.blocks[i]) return invalid_argument("KV buffer block " + std::to_string(i) + " is null");
    }
    return Status::ok();
  }
  if (layout.kind != AttentionKind::kStandard) return invalid_argument("paged KV buffers need a standard (non-MLA) layout");
  if (buf.layer_base.size() != layout.num_layers) {
    return invalid_argument("paged KV buffer has " + std::to_string(buf.layer_base.size()) + " layer tensors; the layout has " +
                   std::to_string(layout.num_layers) + " layers");
  }
  if (static_cast<uint8_t>(buf.engine) >= kNumEngineLayouts) return invalid_argument("paged KV buffer: unknown engine layout");
  if (buf.page_tokens % layout.block_tokens != 0) {
    return invalid_argument("engine pages of " + std::to_string(buf.page_tokens) + " tokens are not whole blocks of " +
                            std::to_string(layout.block_tokens) + " tokens");
  }
  if (buf.engine == EngineLayout::kVllmCpu && buf.memory != LocationKind::kHost) {
    return invalid_argument("the vllm_cpu layout is vLLM's CPU backend's: host memory only");
  }
  const uint64_t pieces = uint64_t(buf.engine_num_pages) * (buf.page_tokens ? buf.page_tokens / layout.block_tokens : 1);
  for (int32_t p : buf.pages) {
    if (p < 0 || static_cast<uint64_t>(p) >= pieces) {
      return invalid_argument(buf.page_tokens > layout.block_tokens
                                  ? "block piece " + std::to_string(p) + " is outside the engine's " +
                                        std::to_string(buf.engine_num_pages) + " pages of " +
                                        std::to_string(buf.page_tokens) + " tokens"
                                  : "page " + std::to_string(p) + " is outside the engine's " +
                                        std::to_string(buf.engine_num_pages) + " pages");
    }
  }
  for (void* base : buf.layer_base) {
    if (!base) return invalid_argument("paged KV buffer has a null layer tensor");
  }
  return Status::ok();
}

std::unique_ptr<kernels::DevicePagePacker> create_page_packer(bool device_memory_is_host, uint64_t staging_bytes,
                                                              uint64_t min_staging_bytes) {
  kernels::PagePackerOptions o;
  o.staging_bytes = std::max(staging_bytes, min_staging_bytes);
#ifdef KVTIER_WITH_CUDA
  if (!device_memory_is_host) return kernels::create_cuda_page_packer(o);
#else
  (void)device_memory_is_host;  // without CUDA in the build, device memory is always emulated
#endif
  return kernels::create_host_page_packer(o);
}

Status gather_blocks(const KvLayout& layout, const KvBuffer& src, size_t first, size_t count,
                     std::byte* out, DeviceMovers movers) {
  if (first + count > src.block_count()) return invalid_argument("gather past the KV buffer's blocks");
  const uint64_t bpb = layout.bytes_per_block();
  if (src.is_paged()) {
    std::vector<int32_t> slots;
    const kernels::PagePackArgs a = pack_args(layout, src, first, count, out, slots);
    if (src.memory == LocationKind::kHost) return kernels::pack_pages_cpu(a);
    if (!movers.packer) return invalid_argument("paged KV in device memory needs a page packer");
    auto lane = movers.packer->acquire();
    if (!lane) return lane.status();
    return lane->pack_to_host(a);
  }
  if (src.memory == LocationKind::kHost) {
    for (size_t i = 0; i < count; ++i) std::memcpy(out + i * bpb, src.blocks[first + i], bpb);
    return Status::ok();
  }
  if (!movers.copier) return invalid_argument("device KV needs a copy engine");
  std::vector<BlockCopy> copies;
  for (size_t i = 0; i < count; ++i) {
    copies.push_back({.layer = 0, .bytes = bpb, .src = src.blocks[first + i], .dst = out + i * bpb,
                      .src_device = true});
  }
  if (copies.empty()) return Status::ok();
  auto h = movers.copier->copy(std::move(copies), 1);
  return h ? h->wait() : h.status();
}

namespace {
// Calls `fn` with pack arguments for `count` canonical blocks of `range`'s layers back to back at
// `in` and blocks [first, first + count) of paged `dst`: a model of just those layers, whose
// layer tensors are dst's from range.begin on.
template <class Fn>
Status with_range_args(const KvLayout& layout, const std::byte* in, const KvBuffer& dst, size_t first,
                       size_t count, LayerRange range, Fn&& fn) {
  const uint32_t layers = range.size(layout.num_layers);
  KvLayout part = layout;
  part.num_layers = layers;
  KvBuffer view = dst;
  view.layer_base.erase(view.layer_base.begin(), view.layer_base.begin() + range.begin);
  view.layer_base.resize(layers);
  std::vector<int32_t> slots;
  return fn(pack_args(part, view, first, count, in, slots));
}
}  // namespace

Status unpack_in_device(const KvLayout& layout, const std::byte* in, const KvBuffer& dst, size_t first,
                        size_t count, kernels::DevicePagePacker::Lane& lane, LayerRange range) {
  if (first + count > dst.block_count()) return invalid_argument("unpack past the KV buffer's blocks");
  if (range.size(layout.num_layers) == 0) return invalid_argument("unpack: the layer range is outside the layout's layers");
  return with_range_args(layout, in, dst, first, count, range,
                         [&](const kernels::PagePackArgs& a) { return lane.unpack_device(a); });
}

Status pack_in_device(const KvLayout& layout, const KvBuffer& src, size_t first, size_t count, std::byte* out,
                      kernels::DevicePagePacker::Lane& lane) {
  if (first + count > src.block_count()) return invalid_argument("pack past the KV buffer's blocks");
  std::vector<int32_t> slots;
  return lane.pack_device(pack_args(layout, src, first, count, out, slots));
}

Result<TransferHandle> scatter_blocks(const KvLayout& layout, const std::byte* in, const KvBuffer& dst,
                                      size_t first, size_t count, DeviceMovers movers, LayerRange range) {
  if (first + count > dst.block_count()) return invalid_argument("scatter past the KV buffer's blocks");
  const uint32_t layers = range.size(layout.num_layers);
  if (layers == 0) return invalid_argument("scatter: the layer range is outside the layout's layers");
  const uint64_t layer_bytes = layout.bytes_per_block_layer();
  const uint64_t stride = layers * layer_bytes;  // one block of `in`
  if (dst.is_paged()) {
    Status st;
    if (dst.memory == LocationKind::kHost) {
      st = with_range_args(layout, in, dst, first, count, range, [&](kernels::PagePackArgs a) {
        a.layer_count = 1;
        for (uint32_t l = 0; l < layers; ++l) {  // layer by layer, as a layered engine would consume it
          a.layer_begin = l;
          KVTIER_RETURN_IF_ERROR(kernels::unpack_pages_cpu(a));
        }
        return Status::ok();
      });
    } else if (!movers.packer) {
      st = invalid_argument("paged KV in device memory needs a page packer");
    } else if (auto lane = movers.packer->acquire(); !lane) {
      st = lane.status();
    } else {
      st = with_range_args(layout, in, dst, first, count, range,
                           [&](const kernels::PagePackArgs& a) { return lane->unpack_from_host(a); });
    }
    if (!st) return st;
    return finished_handle(layers);
  }
  auto to = [&](size_t i, uint32_t l) { return dst.blocks[first + i] + uint64_t(range.begin + l) * layer_bytes; };
  DeviceCopier* copier = movers.copier;
  if (!copier) {
    if (dst.memory != LocationKind::kHost) return invalid_argument("device KV needs a copy engine");
    for (uint32_t l = 0; l < layers; ++l) {
      for (size_t i = 0; i < count; ++i) std::memcpy(to(i, l), in + i * stride + l * layer_bytes, layer_bytes);
    }
    return finished_handle(layers);
  }
  std::vector<BlockCopy> copies;
  for (uint32_t l = 0; l < layers; ++l) {
    for (size_t i = 0; i < count; ++i) {
      copies.push_back({.layer = l, .bytes = layer_bytes, .src = in + i * stride + l * layer_bytes, .dst = to(i, l),
                        .dst_device = dst.memory == LocationKind::kDevice});
    }
  }
  if (copies.empty()) return finished_handle(layers);
  return copier->copy(std::move(copies), layers);
}

Status check_extras(std::span<const BlockExtra> extras, size_t full_blocks) {
  for (size_t i = 0; i < extras.size(); ++i) {
    if (extras[i].block_index >= full_blocks) {
      return invalid_argument("extra " + std::to_string(i) + " belongs to block " + std::to_string(extras[i].block_index) +
                     "; the prompt has " + std::to_string(full_blocks) + " full blocks");
    }
    if (i > 0 && extras[i].block_index < extras[i - 1].block_index) {
      return invalid_argument("extras must be sorted by block index");
    }
  }
  return Status::ok();
}

Result<size_t> check_save(const KvLayout& layout, size_t num_tokens, const KvBuffer& src,
                          std::span<const BlockExtra> extras, size_t first_block) {
  KVTIER_RETURN_IF_ERROR(check_kv_buffer(layout, src));
  const size_t full = num_tokens / layout.block_tokens;
  if (first_block > full) {
    return invalid_argument("first_block " + std::to_string(first_block) + " is past the prompt's " + std::to_string(full) +
                   " full blocks");
  }
  if (src.block_count() != full - first_block) {
    return invalid_argument("save: the buffer has " + std::to_string(src.block_count()) + " blocks; blocks " +
                   std::to_string(first_block) + ".." + std::to_string(full) + " of the prompt need " +
                   std::to_string(full - first_block));
  }
  KVTIER_RETURN_IF_ERROR(check_extras(extras, full));
  return full;
}

Status check_load(const KvLayout& layout, const Match& match, const KvBuffer& dst) {
  KVTIER_RETURN_IF_ERROR(check_kv_buffer(layout, dst));
  if (dst.block_count() > match.blocks.size()) {
    return invalid_argument("load: the buffer has " + std::to_string(dst.block_count()) + " blocks; the match has " +
                   std::to_string(match.blocks.size()));
  }
  return Status::ok();
}

std::span<const BlockExtra> extras_below(std::span<const BlockExtra> extras, size_t end_block) {
  size_t n = 0;
  while (n < extras.size() && extras[n].block_index < end_block) ++n;
  return extras.first(n);
}

std::unique_ptr<DeviceCopier> copier_over(CopyEngine& engine) { return std::make_unique<CopyEngineCopier>(engine); }

TransferHandle finished_handle(uint32_t num_layers, Status status) {
  auto job = std::make_shared<detail::JobState>(std::vector<uint32_t>(num_layers, 0), TransferCallback{});
  job->mark_running();
  if (!status.is_ok()) job->record_error(std::move(status));
  job->finish({});
  return TransferHandle(std::move(job));
}

}  // namespace kvtier
