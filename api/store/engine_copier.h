// EngineCopier: the Store's DeviceCopier (api/kv_copy/kv_copy.h): device copies as one job of the
// tier manager's transfer engine, so they share its queues, back-pressure and route counters.
#pragma once

#include "api/kv_copy/kv_copy.h"
#include "transfer/transfer_engine.h"

namespace kvtier {

class EngineCopier final : public DeviceCopier {
 public:
  explicit EngineCopier(TransferEngine& engine) : engine_(engine) {}
  Result<TransferHandle> copy(std::vector<BlockCopy> copies, uint32_t num_layers) override;

 private:
  TransferEngine& engine_;
};

}  // namespace kvtier
