// SlotAllocator: hands out the fixed-size slots of one tier (arena or slot file). Thread-safe.
// A slot is either free or used; freeing a free slot or claiming a used one is an error, never
// silent, because either means two blocks would share bytes.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include "kvtier/status.h"
#include "kvtier/tier.h"

namespace kvtier {

class SlotAllocator {
 public:
  explicit SlotAllocator(uint64_t slots);

  /// A free slot (lowest-numbered free slots first after construction), or kResourceExhausted.
  Result<SlotId> allocate();
  /// Returns a used slot. kInvalidArgument when out of range or already free.
  Status free(SlotId slot);
  /// Marks a specific slot used (rebuilding from a catalog). kAlreadyExists when it is used.
  Status claim(SlotId slot);
  bool is_used(SlotId slot) const;

  uint64_t capacity() const noexcept { return used_.size(); }
  uint64_t used() const;
  uint64_t free_count() const;

 private:
  mutable std::mutex mu_;
  std::vector<SlotId> free_list_;  // a stack; popped from the back
  std::vector<bool> used_;
  uint64_t used_count_ = 0;
};

}  // namespace kvtier
