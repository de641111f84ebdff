#include "tiers/slot_allocator.h"

#include <string>

namespace kvtier {

SlotAllocator::SlotAllocator(uint64_t slots) : used_(slots, false) {
  free_list_.reserve(slots);
  // Pushed highest first so allocate() hands out slot 0 first: low slots stay dense.
  for (uint64_t s = slots; s > 0; --s) free_list_.push_back(s - 1);
}

Result<SlotId> SlotAllocator::allocate() {
  std::lock_guard lock(mu_);
  // A slot claimed during a rebuild may still sit in the free list; skip such stale entries.
  while (!free_list_.empty()) {
    SlotId slot = free_list_.back();
    free_list_.pop_back();
    if (!used_[slot]) {
      used_[slot] = true;
      ++used_count_;
      return slot;
    }
  }
  return Status(StatusCode::kResourceExhausted,
                "no free slot (" + std::to_string(used_.size()) + " slots, all in use)");
}

Status SlotAllocator::free(SlotId slot) {
  std::lock_guard lock(mu_);
  if (slot >= used_.size()) {
    return invalid_argument("slot " + std::to_string(slot) + " out of range (" +
                            std::to_string(used_.size()) + " slots)");
  }
  if (!used_[slot]) return invalid_argument("slot " + std::to_string(slot) + " is already free");
  used_[slot] = false;
  --used_count_;
  free_list_.push_back(slot);
  return Status::ok();
}

Status SlotAllocator::claim(SlotId slot) {
  std::lock_guard lock(mu_);
  if (slot >= used_.size()) {
    return invalid_argument("slot " + std::to_string(slot) + " out of range (" +
                            std::to_string(used_.size()) + " slots)");
  }
  if (used_[slot]) {
    return Status(StatusCode::kAlreadyExists, "slot " + std::to_string(slot) + " is already used");
  }
  used_[slot] = true;  // its stale free-list entry is skipped by allocate()
  ++used_count_;
  return Status::ok();
}

bool SlotAllocator::is_used(SlotId slot) const {
  std::lock_guard lock(mu_);
  return slot < used_.size() && used_[slot];
}

uint64_t SlotAllocator::used() const {
  std::lock_guard lock(mu_);
  return used_count_;
}

uint64_t SlotAllocator::free_count() const {
  std::lock_guard lock(mu_);
  return used_.size() - used_count_;
}

}  // namespace kvtier
