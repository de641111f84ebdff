// kvtier fsck's engine: planted damage is found and named, a check without repair changes
// nothing, repair leaves a tier that checks clean and still serves its good blocks, and a tier a
// live process holds is refused.
#include <catch2/catch.hpp>

#include <fcntl.h>
#include <unistd.h>

#include <filesystem>
#include <map>

#include "nvme_test_harness.h"
#include "tiers/nvme_check.h"

namespace kvtier::testing {
namespace {

NamespaceRecord record_of(uint64_t seed, const KvLayout& layout) { return {{seed, 42}, layout, "model", ""}; }

/// Overwrites one byte of slot `slot` at `offset` in the tier's (single) slot file.
void flip_byte(const NvmeHarness& h, const NvmeTier& tier, SlotId slot, uint64_t offset) {
  const std::string path = h.dir().path() + "/tier/slots.0";
  const int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  const off_t at = static_cast<off_t>(slot * tier.slot_bytes() + offset);
  unsigned char b = 0;
  REQUIRE(::pread(fd, &b, 1, at) == 1);
  b ^= 0x5a;
  REQUIRE(::pwrite(fd, &b, 1, at) == 1);
  ::close(fd);
}

std::map<std::string, uint64_t> kinds(const NvmeCheckReport& r) {
  std::map<std::string, uint64_t> k;
  for (const auto& p : r.problems) k[p.kind]++;
  return k;
}

NvmeCheckReport check(const std::string& dir, bool repair = false) {
  NvmeCheckOptions o;
  o.repair = repair;
  auto r = check_nvme_tier(dir, o);
  INFO(r.status().to_string());
  REQUIRE(r.is_ok());
  return std::move(r).value();
}

}  // namespace

TEST_CASE("fsck: a healthy tier checks clean, and an erased block's slot is reported, not an error", "[tiers][fsck]") {
  NvmeHarness h(NvmeHarness::Backing::kFile, 16);
  {
    auto tier = h.open();
    REQUIRE(tier->put_namespace(record_of(1, h.layout())).is_ok());
    for (uint64_t i = 0; i < 4; ++i) h.store(*tier, 1, i);
    REQUIRE(tier->erase(test_entry(1, 3).key).is_ok());  // its header stays in the slot
  }
  uint64_t last_done = 0, calls = 0;
  NvmeCheckOptions o;
  o.progress = [&](uint64_t done, uint64_t total) {
    CHECK(done >= last_done);
    CHECK(done <= total);
    last_done = done;
    ++calls;
  };
  auto r = check_nvme_tier(h.dir().path() + "/tier", o);
  REQUIRE(r.is_ok());
  CHECK(r->errors() == 0);
  CHECK(r->entries == 3);
  CHECK(r->good_blocks == 3);
  CHECK(r->good_bytes == 3 * h.layout().bytes_per_block());
  CHECK(r->namespaces == 1);
  CHECK(r->slots == 16);
  CHECK(r->slots_without_entry == 1);
  REQUIRE(r->problems.size() == 1);
  CHECK(r->problems[0].kind == "slot_without_entry");
  CHECK(r->problems[0].key == test_entry(1, 3).key);
  CHECK(r->bytes_read >= 3 * h.layout().bytes_per_block());  // every payload was read
  CHECK(calls > 0);
  CHECK(last_done == r->bytes_read);
}

TEST_CASE("fsck: planted damage is named, and repair removes what cannot be served and keeps the rest", "[tiers][fsck]") {
  NvmeHarness h(NvmeHarness::Backing::kFile, 32);
  const std::string dir = h.dir().path() + "/tier";
  {
    auto tier = h.open();
    REQUIRE(tier->put_namespace(record_of(1, h.layout())).is_ok());
    REQUIRE(tier->put_namespace(record_of(4, h.layout())).is_ok());
    std::vector<CatalogEntry> a;
    for (uint64_t i = 0; i < 6; ++i) a.push_back(h.store(*tier, 1, i));
    for (uint64_t i = 0; i < 2; ++i) h.store(*tier, 2, i);  // seed 2 has no namespace record
    std::vector<CatalogEntry> b;
    for (uint64_t i = 0; i < 2; ++i) b.push_back(h.store(*tier, 4, i));
    // A rotted payload byte in block 3 of prefix 1 (its children 4 and 5 lose their parent), and
    // a damaged header of block 0 of prefix 4 (its child loses its parent).
    flip_byte(h, *tier, a[3].slot, tier->header_bytes() + 1000);
    flip_byte(h, *tier, b[0].slot, 20);
  }

  auto r = check(dir);
  INFO(r.problems.size());
  CHECK(r.entries == 10);
  CHECK(r.bad_slots == 2);
  CHECK(r.broken_chains == 3);
  CHECK(r.no_namespace == 2);
  CHECK(r.undecodable_entries == 0);
  CHECK(r.good_blocks == 3);
  CHECK(r.errors() == 7);
  CHECK(r.repaired == 0);
  auto k = kinds(r);
  CHECK(k["bad_slot"] == 2);
  CHECK(k["broken_chain"] == 3);
  CHECK(k["no_namespace"] == 2);
  for (const auto& p : r.problems) {
    CHECK_FALSE(p.repaired);
    if (p.kind == "bad_slot" && p.key == test_entry(1, 3).key) CHECK(p.detail.find("payload") != std::string::npos);
    if (p.kind == "bad_slot" && p.key == test_entry(4, 0).key) CHECK(p.detail.find("header") != std::string::npos);
  }

  // Without --repair nothing changed: the same findings again.
  auto again = check(dir);
  CHECK(again.errors() == 7);
  CHECK(again.entries == 10);

  auto fixed = check(dir, true);
  CHECK(fixed.errors() == 7);
  CHECK(fixed.repaired == 7 + fixed.slots_without_entry);
  for (const auto& p : fixed.problems) CHECK(p.repaired);

  auto clean = check(dir);
  CHECK(clean.errors() == 0);
  CHECK(clean.slots_without_entry == 0);
  CHECK(clean.entries == 3);
  CHECK(clean.good_blocks == 3);

  auto tier = h.open();
  for (uint64_t i = 0; i < 3; ++i) CHECK(h.reads_back(*tier, 1, i));
  CHECK_FALSE(tier->contains(test_entry(1, 3).key));
  CHECK_FALSE(tier->contains(test_entry(2, 0).key));
  CHECK(tier->stats().free_slots == tier->stats().slots - 3);
}

TEST_CASE("fsck: a tier a live process holds is refused, and so is a directory without a tier", "[tiers][fsck]") {
  NvmeHarness h(NvmeHarness::Backing::kFile, 8);
  auto tier = h.open();
  h.store(*tier, 1, 0);
  auto held = check_nvme_tier(h.dir().path() + "/tier");
  REQUIRE_FALSE(held.is_ok());
  CHECK(held.status().code() == StatusCode::kUnavailable);
  CHECK(held.status().message().find("LOCK") != std::string::npos);
  tier.reset();
  CHECK(check_nvme_tier(h.dir().path() + "/tier").is_ok());

  auto none = check_nvme_tier(h.dir().path());  // neither DIR/catalog nor DIR/nvme/catalog
  REQUIRE_FALSE(none.is_ok());
  CHECK(none.status().code() == StatusCode::kNotFound);
  CHECK(none.status().message().find("nvme/catalog") != std::string::npos);

  // A kvtierd data dir: the tier is in DIR/nvme.
  std::filesystem::rename(h.dir().path() + "/tier", h.dir().path() + "/nvme");
  auto data_dir = check_nvme_tier(h.dir().path());
  REQUIRE(data_dir.is_ok());
  CHECK(data_dir->dir == h.dir().path() + "/nvme");
  CHECK(data_dir->no_namespace == 1);  // no record was written for seed 1
}

}  // namespace kvtier::testing
