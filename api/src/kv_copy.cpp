#include "api/src/kv_copy.h"

#include <cstring>
#include <numeric>
#include <string>
#include <vector>

#include "kernels/page_pack.h"
#include "transfer/job_state.h"
#include "transfer/transfer_handle.h"

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

KvBuffer KvBuffer::paged(kernels::EngineLayout engine, std::vector<void*> layer_base,
                         uint32_t engine_num_pages, std::vector<int32_t> pages, LocationKind memory) {
  KvBuffer b;
  b.memory = memory;
  b.engine = engine;
  b.layer_base = std::move(layer_base);
  b.engine_num_pages = engine_num_pages;
  b.pages = std::move(pages);
  return b;
}

namespace {

Status invalid(std::string m) { return Status(StatusCode::kInvalidArgument, std::move(m)); }

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
  a.arena_slots = slots.data();
  a.engine_pages = buf.pages.data() + first;
  a.num_blocks = static_cast<uint32_t>(count);
  return a;
}

}  // namespace

Status check_kv_buffer(const KvLayout& layout, const KvBuffer& buf, bool paged_device_ok) {
  if (buf.memory == LocationKind::kStorage) return invalid("KV buffers are host or device memory");
  if (!buf.is_paged()) {
    for (size_t i = 0; i < buf.blocks.size(); ++i) {
      if (!buf.blocks[i]) return invalid("KV buffer block " + std::to_string(i) + " is null");
    }
    return Status::ok();
  }
  if (buf.memory == LocationKind::kDevice && !paged_device_ok) {
    return Status(StatusCode::kUnavailable,
                  "paged KV in GPU memory is not wired to the CUDA pack kernels yet: pass canonical blocks");
  }
  if (layout.kind != AttentionKind::kStandard) return invalid("paged KV buffers need a standard (non-MLA) layout");
  if (buf.layer_base.size() != layout.num_layers) {
    return invalid("paged KV buffer has " + std::to_string(buf.layer_base.size()) + " layer tensors; the layout has " +
                   std::to_string(layout.num_layers) + " layers");
  }
  for (int32_t p : buf.pages) {
    if (p < 0 || static_cast<uint32_t>(p) >= buf.engine_num_pages) {
      return invalid("page " + std::to_string(p) + " is outside the engine's " +
                     std::to_string(buf.engine_num_pages) + " pages");
    }
  }
  for (void* base : buf.layer_base) {
    if (!base) return invalid("paged KV buffer has a null layer tensor");
  }
  return Status::ok();
}

Status gather_blocks(const KvLayout& layout, const KvBuffer& src, size_t first, size_t count,
                     std::byte* out, TransferEngine* engine) {
  if (first + count > src.block_count()) return invalid("gather past the KV buffer's blocks");
  const uint64_t bpb = layout.bytes_per_block();
  if (src.is_paged()) {
    std::vector<int32_t> slots;
    return kernels::pack_pages_cpu(pack_args(layout, src, first, count, out, slots));
  }
  if (src.memory == LocationKind::kHost) {
    for (size_t i = 0; i < count; ++i) std::memcpy(out + i * bpb, src.blocks[first + i], bpb);
    return Status::ok();
  }
  if (!engine) return invalid("device KV needs a copy engine");
  JobSpec job;
  for (size_t i = 0; i < count; ++i) {
    job.segments.push_back({.layer = 0, .bytes = bpb, .src = Location::device_memory(src.blocks[first + i]),
                            .dst = Location::host(out + i * bpb)});
  }
  if (job.segments.empty()) return Status::ok();
  auto h = engine->submit(std::move(job));
  return h ? h->wait() : h.status();
}

Result<TransferHandle> scatter_blocks(const KvLayout& layout, const std::byte* in, const KvBuffer& dst,
                                      size_t first, size_t count, TransferEngine* engine, LayerRange range) {
  if (first + count > dst.block_count()) return invalid("scatter past the KV buffer's blocks");
  const uint32_t layers = range.size(layout.num_layers);
  if (layers == 0) return invalid("scatter: the layer range is outside the layout's layers");
  const uint64_t layer_bytes = layout.bytes_per_block_layer();
  const uint64_t stride = layers * layer_bytes;  // one block of `in`
  if (dst.is_paged()) {
    // `in` is canonical blocks of a model with just these layers; the engine tensors from
    // range.begin on are its layer tensors.
    KvLayout part = layout;
    part.num_layers = layers;
    KvBuffer view = dst;
    view.layer_base.erase(view.layer_base.begin(), view.layer_base.begin() + range.begin);
    view.layer_base.resize(layers);
    std::vector<int32_t> slots;
    kernels::PagePackArgs a = pack_args(part, view, first, count, in, slots);
    a.layer_count = 1;
    for (uint32_t l = 0; l < layers; ++l) {  // layer by layer, as a layered engine would consume it
      a.layer_begin = l;
      KVTIER_RETURN_IF_ERROR(kernels::unpack_pages_cpu(a));
    }
    return finished_handle(layers);
  }
  auto to = [&](size_t i, uint32_t l) { return dst.blocks[first + i] + uint64_t(range.begin + l) * layer_bytes; };
  if (!engine) {
    if (dst.memory != LocationKind::kHost) return invalid("device KV needs a copy engine");
    for (uint32_t l = 0; l < layers; ++l) {
      for (size_t i = 0; i < count; ++i) std::memcpy(to(i, l), in + i * stride + l * layer_bytes, layer_bytes);
    }
    return finished_handle(layers);
  }
  JobSpec job;
  job.num_layers = layers;
  for (uint32_t l = 0; l < layers; ++l) {
    for (size_t i = 0; i < count; ++i) {
      job.segments.push_back({.layer = l, .bytes = layer_bytes,
                              .src = Location::host(in + i * stride + l * layer_bytes),
                              .dst = dst.memory == LocationKind::kDevice ? Location::device_memory(to(i, l))
                                                                         : Location::host(to(i, l))});
    }
  }
  if (job.segments.empty()) return finished_handle(layers);
  return engine->submit(std::move(job));
}

Status check_extras(std::span<const BlockExtra> extras, size_t full_blocks) {
  for (size_t i = 0; i < extras.size(); ++i) {
    if (extras[i].block_index >= full_blocks) {
      return invalid("extra " + std::to_string(i) + " belongs to block " + std::to_string(extras[i].block_index) +
                     "; the prompt has " + std::to_string(full_blocks) + " full blocks");
    }
    if (i > 0 && extras[i].block_index < extras[i - 1].block_index) {
      return invalid("extras must be sorted by block index");
    }
  }
  return Status::ok();
}

Result<size_t> check_save(const KvLayout& layout, size_t num_tokens, const KvBuffer& src,
                          std::span<const BlockExtra> extras, size_t first_block, bool paged_device_ok) {
  KVTIER_RETURN_IF_ERROR(check_kv_buffer(layout, src, paged_device_ok));
  const size_t full = num_tokens / layout.block_tokens;
  if (first_block > full) {
    return invalid("first_block " + std::to_string(first_block) + " is past the prompt's " + std::to_string(full) +
                   " full blocks");
  }
  if (src.block_count() != full - first_block) {
    return invalid("save: the buffer has " + std::to_string(src.block_count()) + " blocks; blocks " +
                   std::to_string(first_block) + ".." + std::to_string(full) + " of the prompt need " +
                   std::to_string(full - first_block));
  }
  KVTIER_RETURN_IF_ERROR(check_extras(extras, full));
  return full;
}

Status check_load(const KvLayout& layout, const Match& match, const KvBuffer& dst, bool paged_device_ok) {
  KVTIER_RETURN_IF_ERROR(check_kv_buffer(layout, dst, paged_device_ok));
  if (dst.block_count() > match.blocks.size()) {
    return invalid("load: the buffer has " + std::to_string(dst.block_count()) + " blocks; the match has " +
                   std::to_string(match.blocks.size()));
  }
  return Status::ok();
}

std::span<const BlockExtra> extras_below(std::span<const BlockExtra> extras, size_t end_block) {
  size_t n = 0;
  while (n < extras.size() && extras[n].block_index < end_block) ++n;
  return extras.first(n);
}

TransferHandle finished_handle(uint32_t num_layers, Status status) {
  auto job = std::make_shared<detail::JobState>(std::vector<uint32_t>(num_layers, 0), TransferCallback{});
  job->mark_running();
  if (!status.is_ok()) job->record_error(std::move(status));
  job->finish({});
  return TransferHandle(std::move(job));
}

}  // namespace kvtier
