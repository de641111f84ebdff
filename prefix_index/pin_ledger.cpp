// PinLedger: the priority pins one holder (a Store, a kvtierd session) took, given back by it alone.
#include "prefix_index/index_internals.h"

namespace kvtier {

Status PinLedger::pin(PrefixIndex& index, const BlockKey& key, Priority at) {
  KVTIER_RETURN_IF_ERROR(index.pin(key, at));
  pins_[key].push_back(at);
  ++count_;
  return Status::ok();
}

Status PinLedger::unpin(PrefixIndex& index, const BlockKey& key) {
  auto it = pins_.find(key);
  if (it == pins_.end()) return not_found("no pin of this holder on block " + key.to_hex());
  const Priority at = it->second.back();
  it->second.pop_back();
  if (it->second.empty()) pins_.erase(it);
  --count_;
  return index.unpin(key, at);
}

void PinLedger::unpin_all(PrefixIndex& index) {
  for (const auto& [key, classes] : pins_) {
    for (Priority at : classes) index.unpin(key, at).ignore();  // pinned blocks cannot leave
  }
  pins_.clear();
  count_ = 0;
}

}  // namespace kvtier
