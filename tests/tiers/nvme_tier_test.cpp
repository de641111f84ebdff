// NvmeTier: blocks round-trip and survive reopen; corruption is refused, never returned; a
// failed write or commit leaves nothing visible and the tier serving.
#include <catch2/catch.hpp>

#include <cstring>
#include <set>

#include "nvme_test_harness.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
NvmeHarness::Backing backing_named(const std::string& name) {
  return name == "file" ? NvmeHarness::Backing::kFile : NvmeHarness::Backing::kMemory;
}

/// The harness's options, with commits that fail like a crash before the catalog put while
/// `*crash` is set.
NvmeTierOptions crashing_options(NvmeHarness& h, const bool* crash) {
  auto options = h.options();
  options.before_catalog_commit = [crash]() -> Status {
    if (*crash) return Status(StatusCode::kIoError, "simulated crash before the catalog put");
    return Status::ok();
  };
  return options;
}

/// Flips one byte at `offset` of `dev` (read-modify-write of its page).
void flip_byte(StorageDevice& dev, uint64_t offset) {
  auto page = make_aligned_buffer(kIoAlignment);
  const uint64_t base = offset / kIoAlignment * kIoAlignment;
  REQUIRE(dev.read(base, std::span(page.get(), kIoAlignment)).is_ok());
  page[offset - base] ^= std::byte{0x5A};
  REQUIRE(dev.write(base, std::span<const std::byte>(page.get(), kIoAlignment)).is_ok());
}
}  // namespace

TEST_CASE("NvmeTier returns every stored block byte-identical, whole and by layer") {
  const std::string backing = GENERATE(as<std::string>{}, "memory", "file");
  const uint32_t files = GENERATE(1u, 3u);
  INFO(backing << " files=" << files);
  NvmeHarness h(backing_named(backing), 24, files);
  auto tier = h.open();
  CHECK(tier->slot_bytes() == 4096 + 32768);
  for (uint64_t i = 0; i < 20; ++i) h.store(*tier, 1, i);
  for (uint64_t i = 0; i < 20; ++i) CHECK(h.reads_back(*tier, 1, i));

  const uint64_t layer_bytes = h.layout().bytes_per_block_layer();
  auto layer = make_aligned_buffer(layer_bytes);
  for (uint32_t l = 0; l < h.layout().num_layers; ++l) {
    auto want = test_payload(h.layout(), 1, 5);
    REQUIRE(tier->read_layer(test_entry(1, 5).key, l, std::span(layer.get(), layer_bytes)).is_ok());
    CHECK(same_bytes(layer.get(), want.get() + l * layer_bytes, layer_bytes));
  }
  auto e = tier->entry(test_entry(1, 3).key);
  REQUIRE(e.is_ok());
  CHECK(e->tokens == test_entry(1, 3).tokens);
  CHECK(e->parent == test_entry(1, 3).parent);
  CHECK(e->payload_bytes == h.layout().bytes_per_block());
  const SlotLocation loc = tier->location(e->slot);
  CHECK(loc.device != nullptr);
  CHECK(loc.payload_offset == loc.header_offset + tier->header_bytes());
  CHECK(tier->location(tier->slot_count()).device == nullptr);

  const NvmeTierStats s = tier->stats();
  CHECK(s.blocks == 20);
  CHECK(s.slots == 24);
  CHECK(s.free_slots == 4);
  CHECK(s.bytes_used == 20 * h.layout().bytes_per_block());
  CHECK(s.checksum_errors == 0);
  CHECK(tier->read_block(BlockKey{1, 1}, std::span(layer.get(), layer_bytes)).code() ==
        StatusCode::kNotFound);
}

TEST_CASE("NvmeTier brings back every committed block after close and reopen and erased ones stay gone") {
  const std::string backing = GENERATE(as<std::string>{}, "memory", "file");
  NvmeHarness h(backing_named(backing), 16, 2);
  const KvLayout layout = h.layout();
  const NamespaceRecord ns{{2, 42}, layout, "test-model"};
  std::set<BlockKey> erased;
  {
    auto tier = h.open();
    for (uint64_t i = 0; i < 12; ++i) h.store(*tier, 2, i);
    for (uint64_t i : {0, 5, 11}) {
      REQUIRE(tier->erase(test_entry(2, i).key).is_ok());
      erased.insert(test_entry(2, i).key);
    }
    CHECK(tier->erase(test_entry(2, 5).key).code() == StatusCode::kNotFound);
    REQUIRE(tier->put_namespace(ns).is_ok());
  }
  auto tier = h.open();
  const NvmeTierStats s = tier->stats();
  CHECK(s.blocks == 9);
  CHECK(s.free_slots == 16 - 9);
  CHECK(s.dropped_at_open == 0);
  std::set<BlockKey> listed;
  tier->for_each([&](const CatalogEntry& e) { listed.insert(e.key); });
  CHECK(listed.size() == 9);
  for (uint64_t i = 0; i < 12; ++i) {
    const BlockKey key = test_entry(2, i).key;
    if (erased.contains(key)) {
      CHECK_FALSE(tier->contains(key));
      CHECK_FALSE(listed.contains(key));
    } else {
      CHECK(listed.contains(key));
      CHECK(h.reads_back(*tier, 2, i));
    }
  }
  int namespaces = 0;
  REQUIRE(tier->for_each_namespace([&](const NamespaceRecord& r) {
                CHECK(r == ns);
                ++namespaces;
              }).is_ok());
  CHECK(namespaces == 1);
  // The freed slots are usable again.
  for (uint64_t i = 100; i < 107; ++i) h.store(*tier, 2, i);
  CHECK(tier->stats().free_slots == 0);
  CHECK(tier->allocate().status().code() == StatusCode::kResourceExhausted);
}

TEST_CASE("A corrupted payload byte is refused with a checksum error, never returned") {
  NvmeHarness h;
  auto tier = h.open();
  const CatalogEntry a = h.store(*tier, 3, 0);
  h.store(*tier, 3, 1);
  const SlotLocation loc = tier->location(a.slot);
  const uint64_t layer_bytes = h.layout().bytes_per_block_layer();
  flip_byte(*loc.device, loc.payload_offset + 2 * layer_bytes + 100);  // layer 2

  auto out = make_aligned_buffer(tier->payload_capacity());
  const size_t n = h.layout().bytes_per_block();
  Status s = tier->read_block(a.key, std::span(out.get(), n));
  CHECK(s.code() == StatusCode::kChecksumMismatch);
  CHECK(tier->stats().checksum_errors == 1);
  auto stored = test_payload(h.layout(), 3, 0);
  CHECK_FALSE(same_bytes(out.get(), stored.get(), layer_bytes));  // not even the good layers
  CHECK(tier->read_layer(a.key, 2, std::span(out.get(), layer_bytes)).code() ==
        StatusCode::kChecksumMismatch);
  CHECK(tier->stats().checksum_errors == 2);
  REQUIRE(tier->read_layer(a.key, 1, std::span(out.get(), layer_bytes)).is_ok());
  CHECK(same_bytes(out.get(), stored.get() + layer_bytes, layer_bytes));
  CHECK(h.reads_back(*tier, 3, 1));  // the neighbour is untouched
}

TEST_CASE("A corrupted slot header drops its entry at open and frees the slot") {
  NvmeHarness h;
  SlotId bad_slot;
  {
    auto tier = h.open();
    for (uint64_t i = 0; i < 5; ++i) h.store(*tier, 4, i);
    const CatalogEntry victim = *tier->entry(test_entry(4, 2).key);
    bad_slot = victim.slot;
    const SlotLocation loc = tier->location(bad_slot);
    flip_byte(*loc.device, loc.header_offset + 40);  // inside the parent key
    // The live tier already refuses it.
    auto out = make_aligned_buffer(tier->payload_capacity());
    CHECK(tier->read_block(victim.key, std::span(out.get(), h.layout().bytes_per_block()))
              .code() == StatusCode::kChecksumMismatch);
  }
  auto tier = h.open();
  const NvmeTierStats s = tier->stats();
  CHECK(s.dropped_at_open == 1);
  CHECK(s.blocks == 4);
  CHECK(s.free_slots == s.slots - 4);
  CHECK_FALSE(tier->contains(test_entry(4, 2).key));
  for (uint64_t i : {0, 1, 3, 4}) CHECK(h.reads_back(*tier, 4, i));
  // Dropped for good: the next open finds nothing to drop.
  tier.reset();
  tier = h.open();
  CHECK(tier->stats().dropped_at_open == 0);
}

TEST_CASE("A crash between the data write and the catalog put leaves the block absent") {
  NvmeHarness h;
  bool crash = false;
  const auto options = crashing_options(h, &crash);
  SlotId lost_slot;
  {
    auto tier = h.open(options);
    h.store(*tier, 5, 0);
    crash = true;
    auto slot = tier->allocate();
    REQUIRE(slot.is_ok());
    lost_slot = *slot;
    auto payload = test_payload(h.layout(), 5, 1);
    auto written = tier->write_block(
        *slot, test_entry(5, 1),
        std::span<const std::byte>(payload.get(), h.layout().bytes_per_block()));
    REQUIRE(written.is_ok());
    CHECK(tier->commit(*written).code() == StatusCode::kIoError);
    CHECK_FALSE(tier->contains(test_entry(5, 1).key));
    CHECK(tier->stats().blocks == 1);
    // "Crash": the process goes away without releasing the reserved slot.
  }
  crash = false;
  auto tier = h.open(options);
  CHECK_FALSE(tier->contains(test_entry(5, 1).key));
  CHECK(tier->stats().blocks == 1);
  CHECK(tier->stats().free_slots == tier->slot_count() - 1);
  CHECK(h.reads_back(*tier, 5, 0));
  // Its slot is free: filling the tier uses it.
  std::set<SlotId> used;
  for (uint64_t i = 10; i < 10 + tier->slot_count() - 1; ++i) used.insert(h.store(*tier, 5, i).slot);
  CHECK(used.contains(lost_slot));
}

TEST_CASE("Every injected fault during a write or commit reaches the caller and the tier serves on") {
  struct Case {
    const char* name;
    FaultPlan plan;
    StatusCode expect;
  };
  std::vector<Case> cases;
  auto add = [&](const char* name, auto edit, StatusCode code) {
    FaultPlan p;
    edit(p);
    cases.push_back({name, p, code});
  };
  add("payload write fails", [](FaultPlan& p) { p.fail_nth_write = 1; }, StatusCode::kIoError);
  add("header write fails", [](FaultPlan& p) { p.fail_nth_write = 2; }, StatusCode::kIoError);
  add("payload write ENOSPC", [](FaultPlan& p) { p.fail_nth_write = 1; p.fail_nth_write_errno = ENOSPC; },
      StatusCode::kResourceExhausted);
  add("device full", [](FaultPlan& p) { p.enospc_after_bytes = 8192; },
      StatusCode::kResourceExhausted);
  add("torn payload", [](FaultPlan& p) { p.torn_write_nth = 1; }, StatusCode::kIoError);
  add("torn header", [](FaultPlan& p) { p.torn_write_nth = 2; p.torn_write_bytes = 0; },
      StatusCode::kIoError);
  add("short write", [](FaultPlan& p) { p.short_write_once = true; }, StatusCode::kIoError);
  add("flush fails", [](FaultPlan& p) { p.fail_flush = true; }, StatusCode::kIoError);
  add("every write fails", [](FaultPlan& p) { p.write_error_one_in = 1; }, StatusCode::kIoError);

  NvmeHarness h(NvmeHarness::Backing::kMemory, 8);
  h.wrap_faults(true);
  auto tier = h.open();
  h.store(*tier, 6, 0);
  h.store(*tier, 6, 1);
  uint64_t next = 2;
  for (const Case& c : cases) {
    INFO(c.name);
    const uint64_t io_errors = tier->stats().io_errors;
    h.fault().set_plan(c.plan);
    auto payload = test_payload(h.layout(), 6, next);
    auto r = tier->store(test_entry(6, next),
                         std::span<const std::byte>(payload.get(), h.layout().bytes_per_block()));
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == c.expect);
    CHECK(tier->stats().io_errors > io_errors);
    CHECK_FALSE(tier->contains(test_entry(6, next).key));
    CHECK(tier->stats().blocks == 2);
    CHECK(tier->stats().free_slots == 6);
    h.fault().clear_faults();
    CHECK(h.reads_back(*tier, 6, 0));
    CHECK(h.reads_back(*tier, 6, 1));
    ++next;
  }
  // Reads that fail are I/O errors, not checksum errors, and do not return bytes either.
  FaultPlan reads;
  reads.read_error_one_in = 1;
  h.fault().set_plan(reads);
  auto out = make_aligned_buffer(tier->payload_capacity());
  CHECK(tier->read_block(test_entry(6, 0).key, std::span(out.get(), h.layout().bytes_per_block()))
            .code() == StatusCode::kIoError);
  CHECK(tier->stats().checksum_errors == 0);
  CHECK(h.fault().faults().read_errors == 1);
  h.fault().clear_faults();
  // After all that, writing works and everything survives a reopen.
  h.store(*tier, 6, next);
  tier.reset();
  h.wrap_faults(false);
  tier = h.open();
  CHECK(tier->stats().blocks == 3);
  CHECK(tier->stats().dropped_at_open == 0);
  CHECK(h.reads_back(*tier, 6, 0));
  CHECK(h.reads_back(*tier, 6, next));
}

TEST_CASE("A full tier says so and erasing makes room") {
  NvmeHarness h(NvmeHarness::Backing::kMemory, 3);
  auto tier = h.open();
  for (uint64_t i = 0; i < 3; ++i) h.store(*tier, 7, i);
  auto payload = test_payload(h.layout(), 7, 3);
  auto full = tier->store(test_entry(7, 3),
                          std::span<const std::byte>(payload.get(), h.layout().bytes_per_block()));
  CHECK(full.status().code() == StatusCode::kResourceExhausted);
  REQUIRE(tier->erase(test_entry(7, 1).key).is_ok());
  h.store(*tier, 7, 3);
  CHECK(h.reads_back(*tier, 7, 3));
  CHECK_FALSE(h.reads_back(*tier, 7, 1));
}

TEST_CASE("NvmeTier refuses misuse without touching stored blocks") {
  NvmeHarness h(NvmeHarness::Backing::kMemory, 4);
  auto tier = h.open();
  const CatalogEntry a = h.store(*tier, 8, 0);
  const size_t n = h.layout().bytes_per_block();
  auto payload = test_payload(h.layout(), 8, 0);
  // The same key twice.
  auto again = tier->store(test_entry(8, 0), std::span<const std::byte>(payload.get(), n));
  CHECK(again.status().code() == StatusCode::kAlreadyExists);
  CHECK(tier->stats().free_slots == 3);
  // A misaligned payload or read buffer.
  auto slot = tier->allocate();
  REQUIRE(slot.is_ok());
  auto big = make_aligned_buffer(n + kIoAlignment);
  CHECK(tier->write_block(*slot, test_entry(8, 1), std::span<const std::byte>(big.get() + 8, n))
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(tier->read_block(a.key, std::span(big.get() + 8, n)).code() ==
        StatusCode::kInvalidArgument);
  // Too large a payload; writing or committing a slot that is not reserved.
  CHECK(tier->write_block(*slot, test_entry(8, 1), std::span<const std::byte>(big.get(), n + 4096))
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(tier->write_block(a.slot, test_entry(8, 1), std::span<const std::byte>(payload.get(), n))
            .status()
            .code() == StatusCode::kInvalidArgument);
  CHECK(tier->release_uncommitted(a.slot).code() == StatusCode::kInvalidArgument);
  REQUIRE(tier->release_uncommitted(*slot).is_ok());
  CHECK(tier->release_uncommitted(*slot).code() == StatusCode::kInvalidArgument);
  // A short read buffer.
  CHECK(tier->read_block(a.key, std::span(big.get(), n - 4096)).code() ==
        StatusCode::kInvalidArgument);
  CHECK(h.reads_back(*tier, 8, 0));
  CHECK(tier->stats().checksum_errors == 0);
}

TEST_CASE("Reopening with another layout or file count is a layout mismatch") {
  NvmeHarness h(NvmeHarness::Backing::kFile, 4);
  {
    auto tier = h.open();
    h.store(*tier, 9, 0);
  }
  auto options = h.options();
  options.layout = *KvLayout::standard(8, 2, 64, Dtype::kFp16, 16);
  auto other = NvmeTier::open(options);
  CHECK(other.status().code() == StatusCode::kLayoutMismatch);
  auto tier = h.open();
  CHECK(h.reads_back(*tier, 9, 0));
}

namespace {
/// Allocates a slot and writes block i of `seed` into it, uncommitted; returns the entry to commit.
CatalogEntry write_uncommitted(NvmeHarness& h, NvmeTier& tier, uint64_t seed, uint64_t i) {
  auto slot = tier.allocate();
  REQUIRE(slot.is_ok());
  auto payload = test_payload(h.layout(), seed, i);
  auto written = tier.write_block(*slot, test_entry(seed, i),
                                  std::span<const std::byte>(payload.get(), h.layout().bytes_per_block()));
  REQUIRE(written.is_ok());
  return *written;
}
}  // namespace

TEST_CASE("A commit batch costs one flush, refuses bad entries alone and survives reopen") {
  NvmeHarness h(NvmeHarness::Backing::kMemory, 16);
  h.wrap_faults(true);
  auto tier = h.open();
  std::vector<CatalogEntry> batch;
  for (uint64_t i = 0; i < 5; ++i) batch.push_back(write_uncommitted(h, *tier, 8, i));
  h.store(*tier, 8, 9);
  // Refused up front, each alone: a key already stored, a slot never reserved, a slot twice.
  CatalogEntry stored_again = write_uncommitted(h, *tier, 8, 5);
  stored_again.key = test_entry(8, 9).key;
  CatalogEntry unreserved = batch[0];
  unreserved.key = test_entry(8, 6).key;
  unreserved.slot = tier->slot_count() - 1;
  batch.push_back(stored_again);
  batch.push_back(unreserved);
  batch.push_back(batch[1]);  // slot and key named twice

  const uint64_t flushes = h.fault().stats().flushes;
  const std::vector<Status> done = tier->commit_batch(batch);
  REQUIRE(done.size() == batch.size());
  for (size_t i = 0; i < 5; ++i) CHECK(done[i].is_ok());
  CHECK(done[5].code() == StatusCode::kAlreadyExists);
  CHECK(done[6].code() == StatusCode::kInvalidArgument);
  CHECK(done[7].code() == StatusCode::kInvalidArgument);
  CHECK(h.fault().stats().flushes == flushes + 1);  // one fdatasync for the five blocks
  CHECK(tier->stats().blocks == 6);
  REQUIRE(tier->release_uncommitted(stored_again.slot).is_ok());

  tier.reset();
  h.wrap_faults(false);
  tier = h.open();
  CHECK(tier->stats().blocks == 6);
  CHECK(tier->stats().free_slots == 10);
  for (uint64_t i = 0; i < 5; ++i) CHECK(h.reads_back(*tier, 8, i));
}

TEST_CASE("A batch that fails its flush or crashes before the catalog commits nothing") {
  NvmeHarness h(NvmeHarness::Backing::kMemory, 16);
  h.wrap_faults(true);
  bool crash = false;
  const auto options = crashing_options(h, &crash);
  auto tier = h.open(options);
  h.store(*tier, 9, 0);

  std::vector<CatalogEntry> batch;
  for (uint64_t i = 1; i < 5; ++i) batch.push_back(write_uncommitted(h, *tier, 9, i));
  FaultPlan plan;
  plan.fail_flush = true;
  h.fault().set_plan(plan);
  const auto failed = tier->commit_batch(batch);
  REQUIRE(failed.size() == batch.size());
  for (const Status& s : failed) CHECK(s.code() == StatusCode::kIoError);
  h.fault().clear_faults();
  CHECK(tier->stats().blocks == 1);
  // The slots stay reserved: the same batch commits on retry.
  const auto retried = tier->commit_batch(batch);
  REQUIRE(retried.size() == batch.size());
  for (const Status& s : retried) CHECK(s.is_ok());
  CHECK(tier->stats().blocks == 5);

  std::vector<CatalogEntry> lost;
  for (uint64_t i = 5; i < 9; ++i) lost.push_back(write_uncommitted(h, *tier, 9, i));
  crash = true;
  const auto crashed = tier->commit_batch(lost);
  REQUIRE(crashed.size() == lost.size());
  for (const Status& s : crashed) CHECK(s.code() == StatusCode::kIoError);
  // "Crash": the process goes away holding the reserved slots.
  tier.reset();
  crash = false;
  h.wrap_faults(false);
  tier = h.open(options);
  CHECK(tier->stats().blocks == 5);
  CHECK(tier->stats().free_slots == 11);
  for (uint64_t i = 0; i < 5; ++i) CHECK(h.reads_back(*tier, 9, i));
  for (uint64_t i = 5; i < 9; ++i) CHECK_FALSE(tier->contains(test_entry(9, i).key));
}

TEST_CASE("A replaced block reads its new copy and frees the old slot, but a crash before the switch keeps the old") {
  NvmeHarness h;
  bool crash = false;
  const auto options = crashing_options(h, &crash);
  const size_t bb = h.layout().bytes_per_block();
  auto write_copy = [&](NvmeTier& tier, uint64_t i) {
    auto slot = tier.allocate();
    REQUIRE(slot.is_ok());
    auto payload = test_payload(h.layout(), 6, i);
    auto written = tier.write_block(*slot, test_entry(6, i), std::span<const std::byte>(payload.get(), bb));
    REQUIRE(written.is_ok());
    return *written;
  };
  SlotId new_slot;
  {
    auto tier = h.open(options);
    const CatalogEntry a = h.store(*tier, 6, 0);
    const CatalogEntry b = h.store(*tier, 6, 1);
    const SlotLocation loc = tier->location(a.slot);
    flip_byte(*loc.device, loc.payload_offset + 100);
    auto out = make_aligned_buffer(tier->payload_capacity());
    REQUIRE(tier->read_block(a.key, std::span(out.get(), bb)).code() == StatusCode::kChecksumMismatch);

    const CatalogEntry fresh = write_copy(*tier, 0);
    new_slot = fresh.slot;
    const uint64_t free_before = tier->stats().free_slots;
    REQUIRE(tier->replace(fresh).is_ok());
    CHECK(tier->entry(a.key)->slot == new_slot);
    CHECK(tier->stats().free_slots == free_before + 1);  // the corrupt slot
    CHECK(tier->stats().blocks == 2);
    CHECK(tier->stats().bytes_used == 2 * bb);
    CHECK(h.reads_back(*tier, 6, 0));

    // Misuse changes nothing: a slot committed already, a key not stored.
    CHECK(tier->replace(fresh).code() == StatusCode::kInvalidArgument);
    const CatalogEntry stranger = write_copy(*tier, 9);
    CHECK(tier->replace(stranger).code() == StatusCode::kNotFound);
    REQUIRE(tier->release_uncommitted(stranger.slot).is_ok());

    // A crash before the catalog put: the old copy stays named and readable; the new slot stays
    // reserved for the caller to release.
    crash = true;
    const CatalogEntry lost = write_copy(*tier, 1);
    CHECK(tier->replace(lost).code() == StatusCode::kIoError);
    CHECK(tier->entry(b.key)->slot == b.slot);
    CHECK(h.reads_back(*tier, 6, 1));
    CHECK(tier->release_uncommitted(lost.slot).is_ok());
    crash = false;
  }
  auto tier = h.open(options);
  CHECK(tier->stats().dropped_at_open == 0);
  CHECK(tier->entry(test_entry(6, 0).key)->slot == new_slot);
  CHECK(h.reads_back(*tier, 6, 0));
  CHECK(h.reads_back(*tier, 6, 1));
  CHECK(tier->stats().free_slots == tier->slot_count() - 2);
}
