// Restore or recompute at run time: each tier's restore bandwidth measured from real loads, and a
// lookup that offers only the prefix whose restore beats the engine's declared prefill speed —
// with a device that turns slow, and back.
#include <catch2/catch.hpp>

#include <cstring>
#include <limits>

#include "api/store/store.h"
#include "tiers/fault_device.h"
#include "tier_manager_fixture.h"

using namespace kvtier;
using namespace kvtier::store_testing;

namespace {

BlockResidency block_in(Tier t, uint64_t bytes = 1 << 20) {
  BlockResidency r;
  r.tier_mask = tier_bit(t);
  r.byte_size = bytes;
  return r;
}

/// A Store over a fault-injecting NVMe device whose blocks, once flushed and reopened, live
/// only on NVMe; loads do not promote them, so every load reads the device.
struct SlowDiskStore {
  TempDir dir;
  std::shared_ptr<StorageDevice> disk;
  FaultInjectingDevice* fault = nullptr;
  std::unique_ptr<Store> store;
  NamespaceId ns = 0;

  void open(double prefill_tokens_per_second) {
    store.reset();
    TierManagerOptions o;
    o.layout = layout();
    o.host.capacity_bytes = 64 * layout().bytes_per_block();
    o.nvme.dir = dir.path();
    o.nvme.durability = Durability::kNone;
    o.nvme_limits.capacity_bytes = 256 * (layout().bytes_per_block() + 2 * 4096);
    o.nvme_admission_min_uses = 1;
    o.promote_on_hit = false;
    o.restore_probe_interval_ns = 0;  // every lookup that holds back may probe
    o.nvme.device_factory = [this](int, const std::string&, uint64_t size) -> Result<std::unique_ptr<StorageDevice>> {
      if (!disk) disk = create_memory_device(size);
      auto d = std::make_unique<FaultInjectingDevice>(create_shared_device(disk));
      fault = d.get();
      return std::unique_ptr<StorageDevice>(std::move(d));
    };
    auto s = Store::open({.tiers = std::move(o), .secret = "restore-test"});
    REQUIRE(s.is_ok());
    store = std::move(*s);
    auto id = store->open_namespace({.model_id = "m", .prefill_tokens_per_second = prefill_tokens_per_second});
    REQUIRE(id.is_ok());
    ns = *id;
  }

  /// Looks `t` up, loads what it offers and checks the bytes; the match.
  Match lookup_and_load(const std::vector<TokenId>& t) {
    auto m = store->lookup(ns, t);
    REQUIRE(m.is_ok());
    if (!m->blocks.empty()) {
      const uint64_t bb = layout().bytes_per_block();
      std::vector<std::byte> out(m->blocks.size() * bb);
      KvBuffer dst = KvBuffer::contiguous(out.data(), m->blocks.size(), bb);
      auto h = store->load(*m, dst);
      REQUIRE(h.is_ok());
      REQUIRE(h->wait().is_ok());
      CHECK(std::memcmp(out.data(), kv_for(t, layout()).data(), out.size()) == 0);
    }
    REQUIRE(store->release(*m).is_ok());
    return *m;
  }
};

}  // namespace

TEST_CASE("The planner offers the prefix that saves the most time, block by block from its fastest tier") {
  RestorePlanner planner({.prior_bytes_per_second = {100e9, 10e9, 1e9}});
  // 1 MiB blocks of 16 tokens: host 0.1 ms, NVMe 1 ms each to restore.
  const std::vector<BlockResidency> blocks = {block_in(Tier::kHost), block_in(Tier::kHost), block_in(Tier::kNvme),
                                              block_in(Tier::kNvme), block_in(Tier::kHost)};
  SECTION("recompute slower than NVMe: everything") {
    const RestoreOffer o = planner.plan(blocks, 16 / 2e-3, 16);  // 2 ms per block
    CHECK(o.keep == 5);
    CHECK(o.held_back == 0);
    CHECK(o.seconds_saved == Approx(5 * 2e-3 - (3 * 0.105e-3 + 2 * 1.049e-3)).epsilon(0.02));
  }
  SECTION("recompute between host and NVMe: the host prefix, the NVMe blocks held back") {
    const RestoreOffer o = planner.plan(blocks, 16 / 0.5e-3, 16);  // 0.5 ms per block
    // Block 4 (host) after two NVMe blocks does not make up for them: 2 × (−0.55) + 0.4 < 0.
    CHECK(o.keep == 2);
    CHECK(o.held_back == 3);
    CHECK(o.held_back_tier == static_cast<int>(Tier::kNvme));
    CHECK(o.seconds_saved > 0);
  }
  SECTION("recompute faster than any restore: nothing") {
    const RestoreOffer o = planner.plan(blocks, 16 / 1e-6, 16);
    CHECK(o.keep == 0);
    CHECK(o.held_back == 5);
  }
  SECTION("no prefill speed declared: everything, nothing estimated") {
    const RestoreOffer o = planner.plan(blocks, 0, 16);
    CHECK(o.keep == 5);
    CHECK(o.seconds_saved == 0);
  }
}

TEST_CASE("The restore estimate starts at the prior, takes the first measurement whole, then moves by a quarter") {
  RestorePlanner planner({.prior_bytes_per_second = {100e9, 10e9, 2e9}});
  CHECK(planner.bytes_per_second(Tier::kNvme) == Approx(2e9));
  CHECK(planner.samples(Tier::kNvme) == 0);
  planner.record(Tier::kNvme, 1'000'000, 1'000'000);  // 1 GB/s
  CHECK(planner.bytes_per_second(Tier::kNvme) == Approx(1e9));
  planner.record(Tier::kNvme, 1'000'000, 5'000'000);  // 0.2 GB/s: 1 ns/B + 0.25 × 4 ns/B
  CHECK(planner.bytes_per_second(Tier::kNvme) == Approx(0.5e9));
  planner.record(Tier::kNvme, 0, 5);  // nothing measured
  CHECK(planner.samples(Tier::kNvme) == 2);
  CHECK(planner.last_sample_ns(Tier::kNvme) > 0);
  CHECK(planner.bytes_per_second(Tier::kHost) == Approx(10e9));
}

TEST_CASE("A slow disk's deep prefixes stop being offered, and are offered again once the disk is fast") {
  SlowDiskStore s;
  // 16 KiB blocks of 16 tokens recompute in 1 ms; a memory device restores one in microseconds,
  // a device that takes 50 ms a read in milliseconds however many reads it runs at once.
  s.open(/*prefill_tokens_per_second=*/16'000);
  const auto t = prompt(1, 12);
  const auto kv = kv_for(t, layout());
  REQUIRE(*s.store->save(s.ns, t, KvBuffer::contiguous(const_cast<std::byte*>(kv.data()), 12, layout().bytes_per_block())) == 12);
  REQUIRE(s.store->close().is_ok());  // flushed: on NVMe
  s.open(16'000);                     // reopened: on NVMe only
  TierManager& tiers = s.store->tiers();

  // A fast disk: every block is offered, and the load measures it.
  Match fast = s.lookup_and_load(t);
  CHECK(fast.blocks.size() == 12);
  CHECK(fast.held_back_blocks == 0);
  CHECK(fast.seconds_saved > 0);
  CHECK(tiers.restore_planner().samples(Tier::kNvme) >= 1);

  // The disk turns slow: 50 ms a read. Loads measure it, and within a few the NVMe-only blocks
  // are held back.
  s.fault->set_plan({.read_delay_us = 50'000});
  Match slow;
  for (int i = 0; i < 10; ++i) {
    slow = s.lookup_and_load(t);
    if (slow.held_back_blocks > 0) break;
  }
  CHECK(slow.blocks.empty());
  CHECK(slow.held_back_blocks == 12);
  CHECK(slow.lease == kNoLease);  // nothing offered: nothing pinned
  CHECK(tiers.stats().restore_held_back_tokens >= 12 * 16);
  tiers.wait_for_probes();

  // A prefix in host DRAM is still offered ahead of the held-back NVMe blocks.
  auto first4 = s.store->cached_prefix(s.ns, std::span(t).first(4 * 16));
  REQUIRE(first4.is_ok());
  REQUIRE(*tiers.promote(*first4, Tier::kHost) == 4);
  auto mixed = s.store->lookup(s.ns, t);
  REQUIRE(mixed.is_ok());
  CHECK(mixed->blocks.size() == 4);
  CHECK(mixed->held_back_blocks == 8);
  for (const BlockResidency& b : mixed->blocks) CHECK(b.resident_in(Tier::kHost));
  REQUIRE(s.store->release(*mixed).is_ok());
  tiers.wait_for_probes();

  // The disk is fast again. Nothing is loaded from it while its blocks are held back, but the
  // lookups that hold them back probe it, and the estimate follows.
  s.fault->clear_faults();
  const uint64_t probes_before = tiers.stats().restore_probes;
  Match back;
  for (int i = 0; i < 40; ++i) {
    tiers.wait_for_probes();
    back = s.lookup_and_load(t);
    if (back.held_back_blocks == 0) break;
  }
  CHECK(back.blocks.size() == 12);
  CHECK(back.held_back_blocks == 0);
  CHECK(tiers.stats().restore_probes > probes_before);
  tiers.wait_for_probes();
}

TEST_CASE("Without a declared prefill speed a slow disk's blocks are all offered") {
  SlowDiskStore s;
  s.open(/*prefill_tokens_per_second=*/0);
  const auto t = prompt(2, 6);
  const auto kv = kv_for(t, layout());
  REQUIRE(*s.store->save(s.ns, t, KvBuffer::contiguous(const_cast<std::byte*>(kv.data()), 6, layout().bytes_per_block())) == 6);
  REQUIRE(s.store->close().is_ok());
  s.open(0);
  s.fault->set_plan({.read_delay_us = 5'000});
  for (int i = 0; i < 3; ++i) {
    const Match m = s.lookup_and_load(t);
    CHECK(m.blocks.size() == 6);
    CHECK(m.held_back_blocks == 0);
    CHECK(m.seconds_saved == 0);
  }
  CHECK(s.store->tiers().stats().restore_held_back_tokens == 0);
}

TEST_CASE("A prefill speed that is negative or not finite is refused") {
  SlowDiskStore s;
  s.open(0);
  CHECK(s.store->open_namespace({.model_id = "m", .prefill_tokens_per_second = -1}).status().code() ==
        StatusCode::kInvalidArgument);
  CHECK(s.store->open_namespace({.model_id = "m", .prefill_tokens_per_second = std::numeric_limits<double>::infinity()})
            .status()
            .code() == StatusCode::kInvalidArgument);
}

TEST_CASE("The metrics show the restore estimates and what lookups offered and held back") {
  SlowDiskStore s;
  s.open(16'000);
  const auto t = prompt(3, 4);
  const auto kv = kv_for(t, layout());
  REQUIRE(s.store->save(s.ns, t, KvBuffer::contiguous(const_cast<std::byte*>(kv.data()), 4, layout().bytes_per_block())).is_ok());
  s.lookup_and_load(t);
  const std::string text = *s.store->metrics_text();
  CHECK_THAT(text, Catch::Contains("kvtier_restore_offered_tokens_total 64"));
  CHECK_THAT(text, Catch::Contains("kvtier_restore_held_back_tokens_total 0"));
  CHECK_THAT(text, Catch::Contains("kvtier_restore_bandwidth_bytes_per_second{tier=\"nvme\"}"));
  CHECK_THAT(text, Catch::Contains("kvtier_restore_seconds_saved_total"));
}
