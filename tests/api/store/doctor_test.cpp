// kvtier doctor and kvtier inspect over an in-process Store: each planted miss gets its cause (a
// tail, another tenant, revision, adapter or model, a block size or layout, eviction and its tier,
// never saved), doctor only looks, and inspect counts what is cached, per namespace and tier, from
// a running store and from a data dir.
#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include "api/store/doctor.h"
#include "tier_manager_fixture.h"

namespace kvtier::store_testing {
namespace {

using json = nlohmann::json;

struct Doctor {
  TempDir dir;
  std::unique_ptr<Store> store;

  explicit Doctor(uint64_t host_blocks = 64, bool nvme = false) {
    TierManagerOptions o;
    o.layout = layout();
    o.host.capacity_bytes = host_blocks * layout().bytes_per_block();
    o.background_reclaim = false;  // a save over the watermark evicts before it returns
    if (nvme) {
      o.nvme.dir = dir.path() + "/nvme";
      o.nvme.durability = Durability::kNone;
      o.nvme_limits.capacity_bytes = 256 * (layout().bytes_per_block() + 2 * 4096);
      o.nvme_admission_min_uses = 1;
    }
    auto s = Store::open({.tiers = std::move(o), .secret = "doctor-test"});
    REQUIRE(s.is_ok());
    store = std::move(*s);
  }

  NamespaceId open(const std::string& model, const std::string& tenant, const std::string& adapter = "",
                   const std::string& revision = "") {
    auto id = store->open_namespace({.model_id = model, .tenant = tenant, .adapter_id = adapter, .revision = revision});
    REQUIRE(id.is_ok());
    return *id;
  }
  void save(NamespaceId ns, const std::vector<TokenId>& t) {
    auto kv = kv_for(t, layout());
    auto saved = store->save(ns, t, KvBuffer::contiguous(kv.data(), t.size() / 16, layout().bytes_per_block()));
    REQUIRE(saved.is_ok());
  }
  json doctor(const std::vector<TokenId>& t, const std::string& model, const std::string& tenant,
              const std::string& adapter = "", const std::string& revision = "", uint32_t engine_block_tokens = 0,
              uint64_t engine_fp = 0) {
    DoctorRequest req{.spec = {.model_id = model, .tenant_salt = tenant, .adapter_id = adapter, .revision = revision},
                      .tenant = tenant,
                      .tokens = t,
                      .engine_block_tokens = engine_block_tokens,
                      .engine_layout_fingerprint = engine_fp};
    auto r = doctor_json(*store, req, {});
    INFO(r.status().to_string());
    REQUIRE(r.is_ok());
    return json::parse(*r);
  }
};

std::vector<TokenId> concat(std::vector<TokenId> a, const std::vector<TokenId>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

}  // namespace

TEST_CASE("doctor names the cause of each planted miss", "[store][doctor]") {
  Doctor d;
  const auto p = prompt(1, 4);
  d.save(d.open("m", "a", "", "r1"), p);
  const uint64_t lookups = d.store->tiers().index().stats().lookups;

  auto tail = d.doctor(concat(p, std::vector<TokenId>(5, 7)), "m", "a", "", "r1");
  CHECK(tail["cause"] == "all_cached");
  CHECK(tail["hit_blocks"] == 4);
  CHECK(tail["full_blocks"] == 4);
  CHECK(tail["tail_tokens"] == 5);
  CHECK(tail["explanation"].get<std::string>().find("partial block") != std::string::npos);
  CHECK(tail["namespace"]["known"] == true);
  CHECK(tail["hit_blocks_by_fastest_tier"]["host"] == 4);

  CHECK(d.doctor(std::vector<TokenId>(p.begin(), p.begin() + 10), "m", "a", "", "r1")["cause"] ==
        "shorter_than_a_block");

  auto tenant = d.doctor(p, "m", "b", "", "r1");
  CHECK(tenant["cause"] == "other_tenant");
  CHECK(tenant["hit_blocks"] == 0);
  CHECK(tenant["break_block"] == 0);
  CHECK(tenant["would_hit_blocks"] == 4);
  REQUIRE(tenant["alternatives"].size() == 1);
  CHECK(tenant["alternatives"][0]["tenant"] == "a");
  CHECK(tenant["alternatives"][0]["differs"] == json::array({"tenant"}));
  CHECK(tenant["namespace"]["known"] == false);

  CHECK(d.doctor(p, "m", "a", "", "r2")["cause"] == "other_revision");
  CHECK(d.doctor(p, "m", "a", "lora-1", "r1")["cause"] == "other_adapter");
  CHECK(d.doctor(p, "m2", "a", "", "r1")["cause"] == "other_model");
  auto two = d.doctor(p, "m", "b", "", "r2");
  CHECK(two["cause"] == "other_namespace");
  CHECK(two["alternatives"][0]["differs"] == json::array({"tenant", "revision"}));

  auto page = d.doctor(p, "m", "a", "", "r1", 24);
  CHECK(page["cause"] == "block_size");
  CHECK(page["explanation"].get<std::string>().find("24") != std::string::npos);
  CHECK(d.doctor(p, "m", "a", "", "r1", 32)["cause"] == "all_cached");  // a multiple of 16 is fine
  CHECK(d.doctor(p, "m", "a", "", "r1", 0, layout().fingerprint() + 1)["cause"] == "layout");
  CHECK(d.doctor(p, "m", "a", "", "r1", 0, layout().fingerprint())["cause"] == "all_cached");

  auto fresh = d.doctor(prompt(2, 3), "m", "a", "", "r1");
  CHECK(fresh["cause"] == "never_saved");
  CHECK(fresh["hit_blocks"] == 0);
  CHECK(fresh["alternatives"].empty());

  // A prompt that shares the first two blocks and then diverges: the break is at block 2.
  auto diverged = concat(std::vector<TokenId>(p.begin(), p.begin() + 32), prompt(3, 2));
  auto split = d.doctor(diverged, "m", "a", "", "r1");
  CHECK(split["cause"] == "never_saved");
  CHECK(split["hit_blocks"] == 2);
  CHECK(split["break_block"] == 2);

  // Doctor only looks: no lookup was counted, no lease taken.
  CHECK(d.store->tiers().index().stats().lookups == lookups);
  CHECK(d.store->tiers().index().stats().leases_active == 0);

  DoctorRequest bad{.spec = {.model_id = ""}, .tokens = p};
  CHECK(doctor_json(*d.store, bad, {}).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("doctor names a block evicted from host, and the tier its last copy left", "[store][doctor]") {
  Doctor d(8);  // no NVMe: an evicted block is gone
  const NamespaceId ns = d.open("m", "");
  const auto first = prompt(1, 4);
  d.save(ns, first);
  for (uint64_t i = 2; i <= 4; ++i) d.save(ns, prompt(i, 4));  // 16 blocks through 8 slots
  auto r = d.doctor(first, "m", "");
  INFO(r.dump());
  CHECK(r["cause"] == "evicted");
  CHECK(r["evicted"]["tier"] == "host");
  CHECK(r["evicted"]["seconds_ago"].get<double>() >= 0);
  CHECK(r["explanation"].get<std::string>().find("never written to NVMe") != std::string::npos);
  CHECK(r["hit_blocks"].get<int>() < 4);
  CHECK(d.doctor(prompt(4, 4), "m", "")["cause"] == "all_cached");  // the latest stays
}

TEST_CASE("inspect counts each namespace's blocks, hits and the most reused prefixes", "[store][inspect]") {
  Doctor d;
  const NamespaceId a = d.open("m", "team-a", "", "r1");
  const NamespaceId b = d.open("m2", "team-b", "lora", "r9");
  const auto p = prompt(1, 4), q = prompt(2, 6);
  d.save(a, p);
  d.save(b, q);
  for (int i = 0; i < 3; ++i) {
    auto m = d.store->lookup(a, p);
    REQUIRE(m.is_ok());
    REQUIRE(d.store->release(*m).is_ok());
  }
  const json r = json::parse(inspect_json(*d.store, 5, "store", {}));
  CHECK(r["source"] == "store");
  CHECK(r["block_bytes"] == layout().bytes_per_block());
  REQUIRE(r["tiers"].size() == 1);
  CHECK(r["tiers"][0]["tier"] == "host");
  CHECK(r["tiers"][0]["used_blocks"] == 10);
  REQUIRE(r["namespaces"].size() == 2);
  const json& big = r["namespaces"][0];  // most blocks first
  CHECK(big["model"] == "m2");
  CHECK(big["tenant"] == "team-b");
  CHECK(big["adapter"] == "lora");
  CHECK(big["revision"] == "r9");
  CHECK(big["blocks"] == 6);
  CHECK(big["resident_blocks"]["host"] == 6);
  CHECK(big["hits"] == 0);
  CHECK(big["longest_blocks"] == 6);
  const json& small = r["namespaces"][1];
  CHECK(small["model"] == "m");
  CHECK(small["blocks"] == 4);
  CHECK(small["bytes"] == 4 * layout().bytes_per_block());
  CHECK(small["hits"] == 12);
  CHECK(small["by_priority"]["normal"] == 4);
  REQUIRE(r["most_reused"].size() == 1);
  const json& top = r["most_reused"][0];
  CHECK(top["model"] == "m");
  CHECK(top["blocks"] == 4);
  CHECK(top["hits"] == 3);
  CHECK(top["tokens_restored"] == 3 * 4 * 16);
  CHECK(top["last_tokens"].get<std::vector<TokenId>>() == std::vector<TokenId>(p.end() - 16, p.end()));
}

TEST_CASE("inspect of a data dir reads its catalog, and is refused while a store holds it", "[store][inspect]") {
  Doctor d(64, /*nvme=*/true);
  const NamespaceId a = d.open("m", "", "", "r1");
  d.save(a, prompt(1, 5));
  auto held = inspect_data_dir_json(d.dir.path());
  REQUIRE_FALSE(held.is_ok());
  CHECK(held.status().code() == StatusCode::kUnavailable);
  REQUIRE(d.store->close().is_ok());  // writes every block back to NVMe
  d.store.reset();
  auto text = inspect_data_dir_json(d.dir.path());
  INFO(text.status().to_string());
  REQUIRE(text.is_ok());
  const json r = json::parse(*text);
  CHECK(r["source"] == "data_dir");
  INFO(r.dump());
  REQUIRE(r["namespaces"].size() == 1);
  CHECK(r["namespaces"][0]["model"] == "m");
  CHECK(r["namespaces"][0]["revision"] == "r1");
  CHECK(r["namespaces"][0]["blocks"] == 5);
  CHECK(r["namespaces"][0]["nvme_oldest_seconds"].get<double>() >= 0);
  CHECK(r["tiers"][0]["used_blocks"] == 5);
  CHECK(inspect_data_dir_json(d.dir.path() + "/none").status().code() == StatusCode::kNotFound);
}

}  // namespace kvtier::store_testing
