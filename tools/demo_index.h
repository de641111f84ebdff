// The prefix-index demo: simulated users share a system prompt and documents; prints hits.
#pragma once

#include <cstdint>

namespace kvtier {

struct IndexDemoOptions {
  uint32_t users = 16;            // simulated users
  uint32_t turns = 4;             // conversation turns per user
  uint32_t documents = 4;         // shared documents, each read by users % documents
  uint32_t system_tokens = 2048;  // shared system prompt
  uint32_t document_tokens = 4096;
  uint32_t question_tokens = 200;  // new tokens per turn
  uint64_t host_capacity_blocks = 1536;  // host tier capacity; beyond it blocks are evicted
  uint64_t seed = 7;
};

/// Runs the demo and prints its report; returns a process exit code.
int run_index_demo(const IndexDemoOptions& options);

}  // namespace kvtier
