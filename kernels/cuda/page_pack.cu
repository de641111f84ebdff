// Page pack/unpack on the GPU: one CTA per (block, layer, K|V plane) copies block_tokens ×
// kv_heads rows in 16-byte pieces, four loads in flight per thread. vLLM and FlashInfer NHD keep
// a page's plane in canonical order, so that copy is linear; HND transposes tokens and heads row
// by row. A page may hold several blocks (page_tokens); a block is then a piece of its page.
// vLLM's CPU layout (kVllmCpu) is host memory only and refused here. An engine tensor that is not 16-byte aligned (a sliced tensor) falls back to byte
// copies, decided per CTA.
#include <cstdint>

#include "kernels/cuda/kernels_cuda.h"

namespace kvtier::kernels {
namespace cuda {
namespace {

struct PackLaunch {
  PagePackArgs args;
  uint64_t slot_stride;
  uint64_t layer_bytes;  // one layer of one canonical block
  uint64_t row_bytes;    // head_dim × element bytes
  uint32_t elem_bytes;
  uint32_t page_tokens;
  bool to_arena;
};

template <class Piece>
__device__ __forceinline__ void copy_plane(const PackLaunch& p, uint8_t* canonical, uint8_t* engine,
                                           uint32_t page, uint32_t t0, uint32_t plane) {
  const KvLayout& l = p.args.layout;
  const uint64_t pieces_per_row = p.row_bytes / sizeof(Piece);
  const uint64_t total = uint64_t(l.block_tokens) * l.num_kv_heads * pieces_per_row;
  const bool linear = p.args.engine != EngineLayout::kFlashInferHnd;
  const uint64_t engine_plane =
      engine_row_offset(p.args.engine, p.args.engine_num_pages, p.page_tokens, l.num_kv_heads, l.head_dim,
                        p.elem_bytes, page, plane, t0, 0);
  auto engine_offset = [&](uint64_t i) -> uint64_t {
    if (linear) return engine_plane + i * sizeof(Piece);
    const uint64_t r = i / pieces_per_row;  // canonical row = token × kv_heads + head
    const uint32_t t = uint32_t(r / l.num_kv_heads);
    const uint32_t h = uint32_t(r % l.num_kv_heads);
    return engine_row_offset(p.args.engine, p.args.engine_num_pages, p.page_tokens, l.num_kv_heads, l.head_dim,
                             p.elem_bytes, page, plane, t0 + t, h) +
           (i % pieces_per_row) * sizeof(Piece);
  };
  // kInFlight pieces per thread are loaded before any is stored, so each thread keeps that many
  // loads outstanding instead of one.
  constexpr int kInFlight = 4;
  for (uint64_t i0 = threadIdx.x; i0 < total; i0 += uint64_t(blockDim.x) * kInFlight) {
    Piece v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const uint64_t i = i0 + uint64_t(u) * blockDim.x;
      if (i < total) {
        const uint8_t* from = p.to_arena ? engine + engine_offset(i) : canonical + i * sizeof(Piece);
        v[u] = *reinterpret_cast<const Piece*>(from);
      }
    }
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) {
      const uint64_t i = i0 + uint64_t(u) * blockDim.x;
      if (i < total) {
        uint8_t* to = p.to_arena ? canonical + i * sizeof(Piece) : engine + engine_offset(i);
        *reinterpret_cast<Piece*>(to) = v[u];
      }
    }
  }
}

// grid: x = block of the batch, y = layer offset, z = plane.
__global__ void __launch_bounds__(256) page_copy_kernel(const PackLaunch p) {
  const PagePackArgs& a = p.args;
  const uint32_t b = blockIdx.x;
  const uint32_t layer = a.layer_begin + blockIdx.y;
  const uint32_t plane = blockIdx.z;
  uint8_t* canonical = static_cast<uint8_t*>(a.arena) + uint64_t(a.arena_slots[b]) * p.slot_stride +
                       layer * p.layer_bytes + plane * (p.layer_bytes / 2);
  uint8_t* engine = static_cast<uint8_t*>(a.layer_base[layer]);
  const uint32_t pieces = p.page_tokens / a.layout.block_tokens;
  const uint32_t page = uint32_t(a.engine_pages[b]) / pieces;
  const uint32_t t0 = uint32_t(a.engine_pages[b]) % pieces * a.layout.block_tokens;
  if ((reinterpret_cast<uintptr_t>(engine) & 15u) == 0 && p.row_bytes % 16 == 0) {
    copy_plane<uint4>(p, canonical, engine, page, t0, plane);
  } else {
    copy_plane<uint8_t>(p, canonical, engine, page, t0, plane);
  }
}

Status launch(const PagePackArgs& args, bool to_arena, cudaStream_t stream) {
  KVTIER_RETURN_IF_ERROR(check_page_pack(args));
  if (args.engine == EngineLayout::kVllmCpu) {
    return invalid_argument("page pack (cuda): the vllm_cpu layout is vLLM's CPU backend's, in host memory");
  }
  const KvLayout& l = args.layout;
  const uint64_t slot_stride = args.slot_stride_bytes ? args.slot_stride_bytes : l.bytes_per_block();
  if ((reinterpret_cast<uintptr_t>(args.arena) & 15u) != 0 || slot_stride % 16 != 0) {
    return invalid_argument("page pack (cuda): arena and slot stride must be 16-byte aligned");
  }
  if (args.num_blocks == 0) return Status::ok();
  const uint32_t layers = args.layer_count ? args.layer_count : l.num_layers - args.layer_begin;
  if (layers > 65535) return invalid_argument("page pack (cuda): at most 65535 layers per launch");
  PackLaunch p{args, slot_stride, l.bytes_per_block_layer(),
               uint64_t(l.head_dim) * dtype_bits(l.dtype) / 8, dtype_bits(l.dtype) / 8,
               engine_page_tokens(args), to_arena};
  page_copy_kernel<<<dim3(args.num_blocks, layers, 2), 256, 0, stream>>>(p);
  return status_from_cuda(cudaGetLastError(), to_arena ? "pack_pages_cuda" : "unpack_pages_cuda");
}

}  // namespace
}  // namespace cuda

Status pack_pages_cuda(const PagePackArgs& args, cudaStream_t stream) {
  return cuda::launch(args, true, stream);
}
Status unpack_pages_cuda(const PagePackArgs& args, cudaStream_t stream) {
  return cuda::launch(args, false, stream);
}

}  // namespace kvtier::kernels
