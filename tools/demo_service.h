// `kvtier service-demo`: the service end to end. It starts the real kvtierd as a separate process,
// runs several user processes that share a system prompt and documents through it (every
// restored byte checked), prints the hit rate, restore latency and tier occupancy, then stops the
// daemon with SIGTERM, starts it again on the same data directory and shows the cache survived.
#pragma once

#include <cstdint>
#include <string>

namespace kvtier {

/// The prompts every user process derives on its own: request (user u, turn t) is the system
/// prompt, then document (u + t) % documents, then a question of its own.
struct ServiceDemoWorkload {
  uint32_t users = 4;              // user processes running at once
  uint32_t turns = 4;              // requests per user
  uint32_t documents = 4;          // shared documents
  uint32_t system_tokens = 2048;   // the system prompt every request starts with
  uint32_t document_tokens = 2048;
  uint32_t question_tokens = 64;   // each request's own question
};

struct ServiceDemoOptions {
  std::string dir = "/var/tmp/kvtier-demo/service";  // the daemon's data dir (wiped at start)
  ServiceDemoWorkload workload;
  std::string host_bytes = "256MiB";  // smaller than the working set, so blocks go to NVMe
  std::string nvme_bytes = "4GiB";
  uint64_t window_mib = 64;           // each user's shared-memory window
};

/// Runs the demo and prints its report; returns a process exit code (non-zero when a restored
/// byte differed or anything failed).
int run_service_demo(const ServiceDemoOptions& options);

/// One user process (the hidden `service-demo-user` subcommand the demo starts).
struct ServiceDemoUserOptions {
  std::string socket;
  ServiceDemoWorkload workload;
  uint32_t user = 0;     // which user this process is
  bool replay = false;   // instead: replay turn 0 of every user, one after another
  int report_fd = -1;    // a pipe: one ServiceDemoTurn record per request
  uint64_t window_mib = 64;
};

/// Runs one user's requests; returns a process exit code.
int run_service_demo_user(const ServiceDemoUserOptions& options);

/// `kvtier crash-loop`: starts kvtierd on a fresh data dir, drives a workload that shares
/// prefixes (every restored byte checked), SIGKILLs the daemon between or in the middle of
/// requests, and checks after each restart that every block the NVMe catalog held was indexed
/// again (none orphaned or dropped). Exit code non-zero on any loss or wrong byte.
struct CrashLoopOptions {
  std::string dir = "/var/tmp/kvtier-demo/crash-loop";  // the daemon's data dir (wiped at start)
  uint32_t cycles = 100;          // SIGKILLs (and restarts)
  uint64_t seed = 1;
  std::string host_bytes = "2MiB";  // 32 blocks of 64 KiB: the workload overflows onto NVMe
  std::string nvme_bytes = "64MiB";
  bool write_through = false;
  uint64_t fill_blocks = 0;       // blocks of prompts of their own saved before the first crash
};
int run_crash_loop(const CrashLoopOptions& options);

}  // namespace kvtier
