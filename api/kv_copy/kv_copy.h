// Moves blocks between an engine's KvBuffer and contiguous canonical blocks in host memory (a
// store's scratch or a client's shared window). Shared by Store and Client so both accept the
// same buffers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/page_packer.h"
#include "kvtier/kv_buffer.h"
#include "kvtier/kv_layout.h"
#include "kvtier/kv_store.h"
#include "kvtier/status.h"
#include "kvtier/transfer_handle.h"
#include "transfer/copy_engine.h"

namespace kvtier {

/// Checks a buffer against the layout: memory kind, block pointers, paged fields and layer count.
Status check_kv_buffer(const KvLayout& layout, const KvBuffer& buf);

/// The checks every KvStore::save makes (the buffer, block count, first_block, extras); returns
/// the prompt's number of full blocks.
Result<size_t> check_save(const KvLayout& layout, size_t num_tokens, const KvBuffer& src,
                          std::span<const BlockExtra> extras, size_t first_block);
/// The checks every KvStore::load makes: the buffer, and no more blocks than the match has.
Status check_load(const KvLayout& layout, const Match& match, const KvBuffer& dst);

/// One copy between host memory and device memory: a block, or one layer of one.
struct BlockCopy {
  uint32_t layer = 0;  // the handle's layer it completes
  uint64_t bytes = 0;
  const std::byte* src = nullptr;
  std::byte* dst = nullptr;
  bool src_device = false;  // src is device memory
  bool dst_device = false;  // dst is device memory
};

/// What moves canonical blocks in and out of device memory as one job with per-layer completion:
/// the transfer engine in a Store (api/store/engine_copier.h), a copy engine in a client, which
/// links no transfer engine (copier_over below).
class DeviceCopier {
 public:
  virtual ~DeviceCopier() = default;
  /// Starts the copies; the handle's wait_layer(l) returns once every copy of layer l has landed.
  virtual Result<TransferHandle> copy(std::vector<BlockCopy> copies, uint32_t num_layers) = 0;
};

/// A DeviceCopier that submits each copy to `engine` (which must outlive it).
std::unique_ptr<DeviceCopier> copier_over(CopyEngine& engine);

/// What a buffer in device memory needs: `copier` copies canonical blocks, `packer` packs and
/// unpacks paged ones. Either may be null when the buffer does not need it.
struct DeviceMovers {
  DeviceCopier* copier = nullptr;
  kernels::DevicePagePacker* packer = nullptr;
};

/// The page packer for a copy engine's device memory: CUDA lanes where device memory is a GPU's,
/// host lanes running the CPU references where it is emulated in host memory. Each lane stages
/// up to `staging_bytes` (at least `min_staging_bytes`, one block) of canonical blocks.
std::unique_ptr<kernels::DevicePagePacker> create_page_packer(bool device_memory_is_host, uint64_t staging_bytes,
                                                              uint64_t min_staging_bytes);

/// Copies blocks [first, first + count) of `src` into `out` (count canonical blocks back to back,
/// host memory) and waits. Canonical device memory goes through the copier; paged layouts are
/// packed (on the CPU from host memory, by the packer's kernels from device memory).
Status gather_blocks(const KvLayout& layout, const KvBuffer& src, size_t first, size_t count,
                     std::byte* out, DeviceMovers movers);

/// Copies `count` canonical blocks from `in` (host memory) into blocks [first, first + count) of
/// `dst`. Canonical destinations get one segment per layer per block, so the handle's
/// wait_layer(l) returns as soon as layer l is in place; paged host destinations are unpacked
/// layer by layer, paged device ones by the packer, before the (already final) handle returns.
/// With a null copier (host destinations only) canonical blocks are copied in place, layer by
/// layer, before it returns.
///
/// With `layers` (default: all), `in` holds only those layers of each block, back to back
/// (count blocks of layers.size() × bytes_per_block_layer), and only they are written; the
/// handle's layer i is layer layers.begin + i.
Result<TransferHandle> scatter_blocks(const KvLayout& layout, const std::byte* in, const KvBuffer& dst,
                                      size_t first, size_t count, DeviceMovers movers,
                                      LayerRange layers = {});

/// Like scatter_blocks into a paged buffer in device memory, with `in` already in device memory
/// (a packer lane's staging, which a tier load filled): one or a few kernel launches, then waits.
Status unpack_in_device(const KvLayout& layout, const std::byte* in, const KvBuffer& dst, size_t first,
                        size_t count, kernels::DevicePagePacker::Lane& lane, LayerRange layers = {});

/// Like gather_blocks from a paged buffer in device memory, into `out` in device memory (a packer
/// lane's staging, which a tier save then reads): the pack kernel alone, then waits.
Status pack_in_device(const KvLayout& layout, const KvBuffer& src, size_t first, size_t count, std::byte* out,
                      kernels::DevicePagePacker::Lane& lane);

/// Extras must be sorted by block index and belong to full blocks (< full_blocks): a chunked
/// save hands each chunk the extras below its end, so an unsorted list would lose some.
Status check_extras(std::span<const BlockExtra> extras, size_t full_blocks);

/// The extras of blocks below `end_block` (extras sorted, as check_extras requires).
std::span<const BlockExtra> extras_below(std::span<const BlockExtra> extras, size_t end_block);

/// A handle that is already final with `status`, for work done synchronously.
TransferHandle finished_handle(uint32_t num_layers, Status status = Status::ok());

}  // namespace kvtier
