#include "api/store/engine_copier.h"

#include <utility>

namespace kvtier {

Result<TransferHandle> EngineCopier::copy(std::vector<BlockCopy> copies, uint32_t num_layers) {
  auto at = [](std::byte* p, bool device) { return device ? Location::device_memory(p) : Location::host(p); };
  JobSpec job;
  job.num_layers = num_layers;
  job.segments.reserve(copies.size());
  for (const BlockCopy& c : copies) {
    job.segments.push_back({.layer = c.layer, .bytes = c.bytes, .src = at(const_cast<std::byte*>(c.src), c.src_device),
                            .dst = at(c.dst, c.dst_device)});
  }
  return engine_.submit(std::move(job));
}

}  // namespace kvtier
