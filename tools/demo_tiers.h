// The tiered-store demo: users share a system prompt and documents; KV bytes really move between
// the host tier, (emulated) HBM and NVMe; then the store restarts and the cache is still there.
#pragma once

#include <cstdint>
#include <string>

namespace kvtier {

struct TierDemoOptions {
  std::string dir = "/tmp/kvtier-demo";  // NVMe tier directory (wiped at start)
  uint32_t users = 8;
  uint32_t turns = 3;
  uint32_t documents = 2;
  uint32_t system_tokens = 1024;
  uint32_t document_tokens = 1024;
  uint32_t question_tokens = 100;
  uint64_t host_mib = 256;   // host tier capacity: smaller than the working set, so blocks go to NVMe
  uint64_t nvme_mib = 4096;  // NVMe tier capacity
  uint64_t seed = 7;
};

/// Runs the demo and prints its report; returns a process exit code.
int run_tier_demo(const TierDemoOptions& options);

}  // namespace kvtier
