// A temp-dir NvmeTier for tests: memory devices that survive "reopen", or real files; optional
// fault-injecting wrappers; deterministic blocks from an index.
#pragma once

#include <catch2/catch.hpp>

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "tier_test_support.h"
#include "tiers/fault_device.h"
#include "tiers/nvme_tier.h"

namespace kvtier::testing {

inline KvLayout small_test_layout() {
  // 4 layers × K|V × 16 tokens × 2 heads × 64 dims × fp16 = 32 KiB per block, 8 KiB per layer.
  return *KvLayout::standard(4, 2, 64, Dtype::kFp16, 16);
}

/// The entry fields a caller supplies for block `i` of stream `seed`.
inline CatalogEntry test_entry(uint64_t seed, uint64_t i) {
  CatalogEntry e;
  e.key = {mix64(seed * 1'000'003 + 2 * i), mix64(seed * 1'000'003 + 2 * i + 1) | 1};
  e.parent = i == 0 ? BlockKey{} : BlockKey{mix64(seed * 1'000'003 + 2 * i - 2),
                                            mix64(seed * 1'000'003 + 2 * i - 1) | 1};
  e.ns_root = {seed, 42};
  e.block_index = static_cast<uint32_t>(i);
  for (uint32_t t = 0; t < 16; ++t) e.tokens.push_back(static_cast<TokenId>(mix64(i * 16 + t)));
  if (i % 4 == 1) e.extras.push_back({mix64(i), 7});
  e.priority = static_cast<Priority>(i % kNumPriorities);
  return e;
}

inline AlignedBuffer test_payload(const KvLayout& layout, uint64_t seed, uint64_t i) {
  return pattern_buffer(layout.bytes_per_block(), seed * 7'777'777 + i);
}

class NvmeHarness {
 public:
  enum class Backing { kMemory, kFile };

  explicit NvmeHarness(Backing backing = Backing::kMemory, uint64_t slots = 32, uint32_t files = 1)
      : backing_(backing), slots_(slots), files_(files) {
    REQUIRE(dir_.ok());
    layout_ = small_test_layout();
  }

  NvmeTierOptions options() {
    NvmeTierOptions o;
    o.dir = dir_.path() + "/tier";
    o.layout = layout_;
    o.capacity_bytes = slots_ * (header_bytes_for(layout_) + layout_.bytes_per_block());
    o.files = files_;
    o.durability = Durability::kFdatasync;
    o.device_factory = [this](int index, const std::string& path,
                              uint64_t size) -> Result<std::unique_ptr<StorageDevice>> {
      std::unique_ptr<StorageDevice> dev;
      if (backing_ == Backing::kMemory) {
        if (memory_.size() <= static_cast<size_t>(index)) memory_.resize(index + 1);
        if (!memory_[index]) memory_[index] = create_memory_device(size);
        dev = create_shared_device(memory_[index]);
      } else {
        auto file = create_file_device(path, size);
        if (!file.is_ok()) return file.status();
        dev = std::move(file).value();
      }
      if (!wrap_faults_) return dev;
      auto fault = std::make_unique<FaultInjectingDevice>(std::move(dev));
      if (faults_.size() <= static_cast<size_t>(index)) faults_.resize(index + 1);
      faults_[index] = fault.get();
      return std::unique_ptr<StorageDevice>(std::move(fault));
    };
    return o;
  }

  std::unique_ptr<NvmeTier> open(NvmeTierOptions o) {
    auto tier = NvmeTier::open(std::move(o));
    INFO(tier.status().to_string());
    REQUIRE(tier.is_ok());
    return std::move(tier).value();
  }
  std::unique_ptr<NvmeTier> open() { return open(options()); }

  /// Wrap every device of the next open() in a FaultInjectingDevice (see fault()).
  void wrap_faults(bool on) { wrap_faults_ = on; }
  FaultInjectingDevice& fault(int file = 0) { return *faults_.at(file); }

  /// Stores block i of `seed` and remembers its payload in `expected`.
  CatalogEntry store(NvmeTier& tier, uint64_t seed, uint64_t i) {
    auto payload = test_payload(layout_, seed, i);
    auto stored = tier.store(test_entry(seed, i),
                             std::span<const std::byte>(payload.get(), layout_.bytes_per_block()));
    INFO(stored.status().to_string());
    REQUIRE(stored.is_ok());
    return *stored;
  }

  /// True when the tier returns exactly block i of `seed` for its key.
  bool reads_back(NvmeTier& tier, uint64_t seed, uint64_t i) {
    const size_t n = layout_.bytes_per_block();
    auto want = test_payload(layout_, seed, i);
    auto got = make_aligned_buffer(tier.payload_capacity());
    if (!tier.read_block(test_entry(seed, i).key, std::span(got.get(), n)).is_ok()) return false;
    return same_bytes(want.get(), got.get(), n);
  }

  const KvLayout& layout() const { return layout_; }
  const TempDir& dir() const { return dir_; }

 private:
  TempDir dir_;
  Backing backing_;
  uint64_t slots_;
  uint32_t files_;
  KvLayout layout_;
  bool wrap_faults_ = false;
  std::vector<std::shared_ptr<StorageDevice>> memory_;
  std::vector<FaultInjectingDevice*> faults_;
};

}  // namespace kvtier::testing
