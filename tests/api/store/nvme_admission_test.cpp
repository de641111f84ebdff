// Admission to NVMe: a block demoted from host DRAM is written to NVMe only once it was used
// again (or is of class high and above); the rest are dropped, sparing the disk the writes of
// one-off prompts. Write-through, flush and pins still persist.
#include <catch2/catch.hpp>

#include <map>
#include <sstream>
#include <string>

#include "api/metrics/metrics.h"
#include "api/store/store.h"
#include "tier_manager_fixture.h"

using namespace kvtier;
using namespace kvtier::store_testing;

namespace {

/// 8 host blocks, admission at `min_uses`, and reclaim inside each save (the order is the test's).
struct AdmissionFixture : Fixture {
  explicit AdmissionFixture(uint32_t min_uses) : Fixture(/*host_blocks=*/8, /*nvme_blocks=*/256) {
    opts.nvme_admission_min_uses = min_uses;
    opts.background_reclaim = false;
    reopen();
  }
};

bool on_nvme(Fixture& f, const std::vector<TokenId>& t) {
  auto m = f.tm->index().match(f.ns, t, {}, {.touch = false});
  if (m->blocks.size() != t.size() / 16) return false;
  for (const BlockResidency& b : m->blocks) {
    if (!b.resident_in(Tier::kNvme)) return false;
  }
  return true;
}

size_t cached_blocks(Fixture& f, const std::vector<TokenId>& t) {
  return f.tm->index().match(f.ns, t, {}, {.touch = false})->blocks.size();
}

/// Fills the host tier with prompts saved once, pushing every older block out of it.
void push_out_of_host(Fixture& f, uint64_t seed) {
  for (uint64_t i = 0; i < 3; ++i) {
    auto filler = prompt(seed + i, 8);
    REQUIRE(f.tm->save(f.ns, filler, kv_for(filler, layout())).is_ok());
  }
}

}  // namespace

TEST_CASE("Under the default admission a reused block is written to NVMe and a one-off block is dropped") {
  AdmissionFixture f(2);
  CHECK(TierManagerOptions{}.nvme_admission_min_uses == 2);  // the default this test runs with
  const auto reused = prompt(1, 4), once = prompt(2, 4);
  REQUIRE(*f.tm->save(f.ns, reused, kv_for(reused, layout())) == 4);
  CHECK(f.load_and_check(reused) == 4);  // its second use
  REQUIRE(*f.tm->save(f.ns, once, kv_for(once, layout())) == 4);
  CHECK(f.tm->recent_uses(f.tm->index().match(f.ns, reused, {}, {.touch = false})->blocks[0].key) >= 2);

  push_out_of_host(f, 100);
  CHECK(on_nvme(f, reused));
  CHECK(cached_blocks(f, once) == 0);  // dropped with its demotion, never written
  const TierManagerStats s = f.tm->stats();
  CHECK(s.nvme_admitted == 4);  // the reused prompt's 4 blocks (the first with its ancestors)
  CHECK(s.nvme_refused >= 4);
  // Only admitted blocks were written: the reused prompt's 4, and nothing of the fillers or `once`.
  CHECK(s.nvme_blocks_written == s.nvme_admitted);
  CHECK(s.nvme.blocks == 4);
  CHECK(f.load_and_check(reused) == 4);  // from NVMe, byte-identical
  REQUIRE(f.tm->index().check_invariants().is_ok());
}

TEST_CASE("Admission remembers a dropped block: saved again, it is written on its next demotion") {
  AdmissionFixture f(2);
  const auto t = prompt(3, 4);
  REQUIRE(*f.tm->save(f.ns, t, kv_for(t, layout())) == 4);
  push_out_of_host(f, 200);
  REQUIRE(cached_blocks(f, t) == 0);  // one use: refused
  // The engine recomputes it and saves it again: its second use, though the index forgot it.
  REQUIRE(*f.tm->save(f.ns, t, kv_for(t, layout())) == 4);
  push_out_of_host(f, 300);
  CHECK(on_nvme(f, t));
  CHECK(f.load_and_check(t) == 4);
}

TEST_CASE("Blocks of class high and above are admitted without reuse, and min uses 1 admits every block") {
  SECTION("class high") {
    AdmissionFixture f(2);
    const auto high = prompt(4, 4);
    REQUIRE(*f.tm->save(f.ns, high, kv_for(high, layout()), Tier::kHost, Priority::kHigh) == 4);
    push_out_of_host(f, 400);
    CHECK(on_nvme(f, high));
  }
  SECTION("min uses 1") {
    AdmissionFixture f(1);
    const auto once = prompt(5, 4);
    REQUIRE(*f.tm->save(f.ns, once, kv_for(once, layout())) == 4);
    push_out_of_host(f, 500);
    CHECK(on_nvme(f, once));
    CHECK(f.tm->stats().nvme_refused == 0);
  }
}

TEST_CASE("Write-through and flush persist blocks admission would refuse") {
  SECTION("write-through") {
    Fixture f(/*host_blocks=*/8, /*nvme_blocks=*/256);
    f.opts.nvme_admission_min_uses = 2;
    f.opts.write_policy = WritePolicy::kWriteThrough;
    f.reopen();
    const auto t = prompt(6, 4);
    REQUIRE(*f.tm->save(f.ns, t, kv_for(t, layout())) == 4);
    CHECK(on_nvme(f, t));
  }
  SECTION("flush at shutdown") {
    AdmissionFixture f(2);
    const auto t = prompt(7, 4);
    REQUIRE(*f.tm->save(f.ns, t, kv_for(t, layout())) == 4);
    CHECK(*f.tm->flush() == 4);
    f.reopen();
    CHECK(f.load_and_check(t) == 4);
  }
}

TEST_CASE("NVMe admission shows in the metrics: admitted, refused and bytes written") {
  AdmissionFixture f(2);
  const auto reused = prompt(8, 4), once = prompt(9, 4);
  REQUIRE(f.tm->save(f.ns, reused, kv_for(reused, layout())).is_ok());
  CHECK(f.load_and_check(reused) == 4);
  REQUIRE(f.tm->save(f.ns, once, kv_for(once, layout())).is_ok());
  push_out_of_host(f, 600);
  const TierManagerStats s = f.tm->stats();
  const std::string text = f.tm->metrics().render();
  CHECK_THAT(text, Catch::Contains("kvtier_nvme_admission_total{decision=\"admitted\"} " + std::to_string(s.nvme_admitted)));
  CHECK_THAT(text, Catch::Contains("kvtier_nvme_admission_total{decision=\"refused\"} " + std::to_string(s.nvme_refused)));
  CHECK_THAT(text, Catch::Contains("kvtier_nvme_written_bytes_total " +
                                   std::to_string(s.nvme_blocks_written * layout().bytes_per_block())));
  CHECK(s.nvme_refused > 0);
}

TEST_CASE("The metrics tell the counts the stats tell, each series once") {
  AdmissionFixture f(2);
  const auto reused = prompt(11, 4);
  REQUIRE(*f.tm->save(f.ns, reused, kv_for(reused, layout())) == 4);
  REQUIRE(*f.tm->save(f.ns, reused, kv_for(reused, layout())) == 0);  // skipped: cached
  CHECK(f.load_and_check(reused) == 4);
  push_out_of_host(f, 700);
  CHECK(f.load_and_check(reused) == 4);  // from NVMe: promoted into host again
  const TierManagerStats s = f.tm->stats();
  const IndexStats ix = f.tm->index().stats();
  // Each series line of the text, by name and labels.
  std::map<std::string, double> series;
  std::map<std::string, int> helps;
  std::istringstream lines(f.tm->metrics().render());
  for (std::string line; std::getline(lines, line);) {
    if (line.starts_with("# HELP ")) {
      helps[line.substr(7, line.find(' ', 7) - 7)]++;
    } else if (!line.starts_with("#")) {
      const size_t space = line.rfind(' ');
      CHECK(series.emplace(line.substr(0, space), std::stod(line.substr(space + 1))).second);
    }
  }
  for (const auto& [name, n] : helps) CHECK(n == 1);
  auto value = [&](const std::string& key) {
    INFO(key);
    REQUIRE(series.contains(key));
    return series.at(key);
  };
  const double bpb = double(layout().bytes_per_block());
  CHECK(value("kvtier_saved_blocks_total") == double(s.saved_blocks));
  CHECK(value("kvtier_save_skipped_blocks_total") == 4);
  CHECK(value("kvtier_loaded_blocks_total") == 8);
  CHECK(value("kvtier_tier_demotions_total{tier=\"host\"}") == double(s.tiers[int(Tier::kHost)].demotions_out));
  CHECK(value("kvtier_tier_promotions_total{tier=\"host\"}") == double(s.tiers[int(Tier::kHost)].promotions_in));
  CHECK(s.tiers[int(Tier::kHost)].promotions_in > 0);
  CHECK(value("kvtier_tier_drops_total{tier=\"host\"}") == double(s.tiers[int(Tier::kHost)].drops));
  CHECK(value("kvtier_nvme_admission_total{decision=\"admitted\"}") == double(s.nvme_admitted));
  CHECK(value("kvtier_nvme_admission_total{decision=\"refused\"}") == double(s.nvme_refused));
  CHECK(value("kvtier_nvme_written_bytes_total") == double(s.nvme_blocks_written) * bpb);
  CHECK(value("kvtier_reclaim_rounds_total{by=\"foreground\"}") == double(s.foreground_rounds));
  CHECK(s.foreground_rounds > 0);
  CHECK(value("kvtier_reclaim_rounds_total{by=\"background\"}") == 0);
  CHECK(value("kvtier_store_errors_total") == 0);
  CHECK(value("kvtier_tier_capacity_bytes{tier=\"host\"}") == double(s.tiers[int(Tier::kHost)].capacity_slots) * bpb);
  CHECK(value("kvtier_tier_used_bytes{tier=\"nvme\"}") == double(s.tiers[int(Tier::kNvme)].used_slots) * bpb);
  CHECK_FALSE(series.contains("kvtier_tier_capacity_bytes{tier=\"hbm\"}"));  // no HBM tier here
  CHECK(value("kvtier_tier_blocks{tier=\"nvme\"}") == double(ix.resident_blocks[int(Tier::kNvme)]));
  CHECK(value("kvtier_index_entries") == double(ix.entries));
  CHECK(value("kvtier_lookups_total") == double(ix.lookups));
  CHECK(ix.lookups >= 2);
  CHECK(value("kvtier_hit_blocks_total") == double(ix.hit_blocks));
  CHECK(value("kvtier_transfer_bytes_total{route=\"storage_to_host\"}") ==
        double(s.transfer.bytes_per_route[int(Route::kStorageToHost)]));
  CHECK(value("kvtier_recovery_dropped_blocks_total{cause=\"no_namespace\"}") == 0);
  CHECK(value("kvtier_recovery_dropped_blocks_total{cause=\"corrupt\"}") == 0);
  CHECK(value("kvtier_io_ops_total") > 0);
}

TEST_CASE("A pinned prefix is never refused: it stays in memory under pressure and a flush persists it") {
  AdmissionFixture f(2);
  const auto pinned = prompt(10, 4);
  REQUIRE(*f.tm->save(f.ns, pinned, kv_for(pinned, layout())) == 4);  // one use: admission would refuse it
  auto m = f.tm->index().match(f.ns, pinned, {}, {.touch = false});
  for (const BlockResidency& b : m->blocks) REQUIRE(f.tm->index().pin(b.key, Priority::kRetained).is_ok());
  push_out_of_host(f, 700);
  CHECK(cached_blocks(f, pinned) == 4);  // not a victim while pinned
  CHECK(*f.tm->flush() >= 4);            // the graceful shutdown's flush writes it
  CHECK(on_nvme(f, pinned));
  for (const BlockResidency& b : m->blocks) REQUIRE(f.tm->index().unpin(b.key, Priority::kRetained).is_ok());
}
