// Shared by the tier-manager tests: a small layout, prompts and their KV bytes (a function of the
// tokens, so any copy can be checked), and a fixture holding a TierManager over a temp dir.
#pragma once

#include <catch2/catch.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "api/store/tier_manager.h"
#include "temp_dir.h"

namespace kvtier::store_testing {

using kvtier::testing::TempDir;

inline KvLayout layout() { return *KvLayout::standard(2, 2, 64, Dtype::kFp16, 16); }  // 16 KiB blocks

/// KV bytes for every full block of `tokens`: a function of the tokens so any copy can be checked.
inline std::vector<std::byte> kv_for(std::span<const TokenId> tokens, const KvLayout& l) {
  const size_t blocks = tokens.size() / l.block_tokens;
  std::vector<std::byte> kv(blocks * l.bytes_per_block());
  for (size_t b = 0; b < blocks; ++b) {
    uint64_t x = 0x9E3779B97F4A7C15ull;
    for (uint32_t t = 0; t <= b; ++t) x = (x ^ tokens[t * l.block_tokens]) * 0xBF58476D1CE4E5B9ull + t;
    for (size_t i = 0; i < l.bytes_per_block(); ++i) {
      x ^= x << 13, x ^= x >> 7, x ^= x << 17;
      kv[b * l.bytes_per_block() + i] = static_cast<std::byte>(x);
    }
  }
  return kv;
}

inline std::vector<TokenId> prompt(uint64_t seed, size_t blocks) {
  std::mt19937_64 rng(seed);
  std::vector<TokenId> t(blocks * 16);
  for (auto& x : t) x = static_cast<TokenId>(rng() % 32000);
  return t;
}

/// Overwrites bytes in the middle of an NVMe slot's payload, leaving its header intact: the block
/// stays indexed across a restart, and only its payload checksum can tell.
inline void corrupt_payload(const std::string& dir, SlotId slot) {
  int fd = ::open((dir + "/slots.0").c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  const uint64_t slot_bytes = align_up(layout().bytes_per_block(), 4096) + 4096;  // header, then payload
  char junk[64];
  std::memset(junk, 0xEE, sizeof junk);
  REQUIRE(pwrite(fd, junk, sizeof junk, static_cast<off_t>(slot * slot_bytes + 4096 + 5000)) == sizeof junk);
  ::close(fd);
}

struct Fixture {
  TempDir dir;
  KeyChain keys{"tier-manager-test"};
  TierManagerOptions opts;
  std::unique_ptr<TierManager> tm;
  Namespace ns;

  explicit Fixture(uint64_t host_blocks = 64, uint64_t nvme_blocks = 256, uint64_t hbm_blocks = 0) {
    opts.layout = layout();
    const uint64_t bb = layout().bytes_per_block();
    opts.host.capacity_bytes = host_blocks * bb;
    opts.hbm.capacity_bytes = hbm_blocks * bb;
    if (nvme_blocks) {
      opts.nvme.dir = dir.path();
      opts.nvme.durability = Durability::kNone;
      opts.nvme_limits.capacity_bytes = nvme_blocks * (bb + 4096 * 2);
    }
    opts.transfer.staging_buffers = 4;
    opts.transfer.staging_bytes = 64 << 10;
    // Most tests here are about write-back itself: every demoted block goes to NVMe. Admission
    // has its own tests, which set the default back.
    opts.nvme_admission_min_uses = 1;
    reopen();
  }
  void reopen() {
    tm.reset();
    auto r = TierManager::open(keys, opts);
    REQUIRE(r.is_ok());
    tm = std::move(*r);
    auto n = tm->add_namespace({"model", layout(), "", ""});
    REQUIRE(n.is_ok());
    ns = *n;
  }
  /// Matches `tokens` with a lease, loads every matched block into host memory, checks the bytes.
  size_t load_and_check(const std::vector<TokenId>& tokens) { return load_and_check_in(ns, tokens); }
  size_t load_and_check_in(const Namespace& in, const std::vector<TokenId>& tokens) {
    auto m = tm->index().match(in, tokens, {}, {.take_lease = true});
    REQUIRE(m.is_ok());
    if (m->blocks.empty()) return 0;  // no lease to load with
    const uint64_t bb = layout().bytes_per_block();
    std::vector<std::byte> out(m->blocks.size() * bb + 4096);
    std::byte* base = reinterpret_cast<std::byte*>(align_up(reinterpret_cast<uintptr_t>(out.data()), 4096));
    std::vector<std::byte*> dst;
    for (size_t b = 0; b < m->blocks.size(); ++b) dst.push_back(base + b * bb);
    auto h = tm->load(*m, dst);
    INFO(h.status().to_string());
    REQUIRE(h.is_ok());
    const Status loaded = h->wait();
    INFO(loaded.to_string());
    REQUIRE(loaded.is_ok());
    auto expect = kv_for(tokens, layout());
    CHECK(std::memcmp(base, expect.data(), m->blocks.size() * bb) == 0);
    tm->index().release(m->lease).ignore();
    return m->blocks.size();
  }
};


}  // namespace kvtier::store_testing
