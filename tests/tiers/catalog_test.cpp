// Catalog: block and namespace records survive close and reopen; removal is durable.
#include <catch2/catch.hpp>

#include <filesystem>
#include <map>

#include "tier_test_support.h"
#include "tiers/catalog.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {
CatalogEntry make_entry(uint64_t i) {
  CatalogEntry e;
  e.key = {mix64(i), mix64(i + 1000)};
  e.slot = i;
  e.payload_bytes = 4096 * (i + 1);
  e.checksum = mix64(i + 7);
  e.layout_fingerprint = 0xABCDEF;
  e.ns_root = {1, 2};
  e.parent = {mix64(i - 1), 3};
  e.block_index = static_cast<uint32_t>(i);
  for (uint32_t t = 0; t < 16; ++t) e.tokens.push_back(static_cast<TokenId>(i * 16 + t));
  if (i % 3 == 0) e.extras.push_back({i, i});
  e.priority = static_cast<Priority>(i % kNumPriorities);
  e.created_ns = 1000 + i;
  e.last_access_ns = 2000 + i;
  return e;
}
}  // namespace

TEST_CASE("Catalog entries round-trip across close and reopen") {
  TempDir dir;
  REQUIRE(dir.ok());
  std::map<BlockKey, CatalogEntry> expect;
  const KvLayout layout = *KvLayout::standard(32, 8, 128, Dtype::kBf16);
  const NamespaceRecord ns{{77, 88}, layout, "meta-llama/Llama-3.1-8B", "team-a"};
  {
    auto cat = Catalog::open(dir.file("catalog"));
    REQUIRE(cat.is_ok());
    for (uint64_t i = 0; i < 50; ++i) {
      CatalogEntry e = make_entry(i);
      REQUIRE((*cat)->put(e).is_ok());
      expect[e.key] = e;
    }
    for (uint64_t i = 0; i < 50; i += 5) {
      REQUIRE((*cat)->remove(make_entry(i).key).is_ok());
      expect.erase(make_entry(i).key);
    }
    REQUIRE((*cat)->remove(BlockKey{123, 456}).is_ok());  // absent: still ok
    REQUIRE((*cat)->put_namespace(ns).is_ok());
    REQUIRE((*cat)->put_meta("geometry", "v1").is_ok());
  }
  auto cat = Catalog::open(dir.file("catalog"));
  REQUIRE(cat.is_ok());
  std::map<BlockKey, CatalogEntry> seen;
  REQUIRE((*cat)->for_each([&](const CatalogEntry& e) { seen[e.key] = e; }).is_ok());
  CHECK(seen == expect);
  auto one = (*cat)->get(make_entry(1).key);
  REQUIRE(one.is_ok());
  CHECK(*one == make_entry(1));
  CHECK((*cat)->get(make_entry(5).key).status().code() == StatusCode::kNotFound);
  std::vector<NamespaceRecord> namespaces;
  REQUIRE((*cat)->for_each_namespace([&](const NamespaceRecord& r) { namespaces.push_back(r); })
              .is_ok());
  REQUIRE(namespaces.size() == 1);
  CHECK(namespaces[0] == ns);
  auto meta = (*cat)->get_meta("geometry");
  REQUIRE(meta.is_ok());
  CHECK(*meta == "v1");
  CHECK((*cat)->get_meta("nope").status().code() == StatusCode::kNotFound);
}

TEST_CASE("A namespace record written before tenants were recorded still decodes with no tenant") {
  const NamespaceRecord ns{{5, 6}, *KvLayout::standard(2, 2, 64, Dtype::kFp16), "m", "team-a"};
  const std::string v2 = Catalog::encode_namespace(ns);
  auto back = Catalog::decode_namespace(v2);
  REQUIRE(back.is_ok());
  CHECK(*back == ns);

  // Version 1, byte by byte as kvtierd wrote it before tenants: version, root, layout, model.
  std::string v1;
  auto put = [&](auto v) { v1.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(uint8_t{1});
  put(uint64_t{5});  // root.lo
  put(uint64_t{6});  // root.hi
  put(static_cast<uint8_t>(ns.layout.kind));
  put(uint32_t{2});  // layers
  put(uint32_t{2});  // kv heads
  put(uint32_t{64});  // head dim
  put(static_cast<uint8_t>(Dtype::kFp16));
  put(ns.layout.block_tokens);
  put(uint32_t{1});
  v1 += "m";
  auto old = Catalog::decode_namespace(v1);
  REQUIRE(old.is_ok());
  CHECK(old->tenant.empty());
  CHECK(old->model_id == "m");
  CHECK(old->layout == ns.layout);
  CHECK(old->root == ns.root);
  // A record with no tenant is still written as version 1, which older kvtierds read.
  NamespaceRecord untenanted = ns;
  untenanted.tenant.clear();
  CHECK(Catalog::encode_namespace(untenanted) == v1);

  // A version 2 record cut short, or an unknown version, is refused.
  CHECK(Catalog::decode_namespace(v2.substr(0, v2.size() - 1)).status().code() == StatusCode::kChecksumMismatch);
  std::string v9 = v2;
  v9[0] = 9;
  CHECK(!Catalog::decode_namespace(v9).is_ok());
}

TEST_CASE("Catalog values are versioned and truncation is detected") {
  const std::string value = Catalog::encode_entry(make_entry(4));
  CHECK(value[0] == static_cast<char>(kCatalogValueVersion));
  auto ok = Catalog::decode_entry(value);
  REQUIRE(ok.is_ok());
  CHECK(*ok == make_entry(4));
  for (size_t cut = 0; cut < value.size(); ++cut) {
    CHECK_FALSE(Catalog::decode_entry(std::string_view(value).substr(0, cut)).is_ok());
  }
  std::string future = value;
  future[0] = static_cast<char>(kCatalogValueVersion + 1);
  CHECK(Catalog::decode_entry(future).status().code() == StatusCode::kInvalidArgument);
}

TEST_CASE("Opening a catalog where none can be created is an I/O error with RocksDB's reason") {
  auto cat = Catalog::open("/proc/definitely/not/here");
  REQUIRE_FALSE(cat.is_ok());
  CHECK(cat.status().code() == StatusCode::kIoError);
  CHECK_FALSE(cat.status().message().empty());
}

TEST_CASE("Opens with no write between them leave no WAL files behind") {
  // A kvtierd killed before its first catalog write (NVMe admission makes such runs common) used
  // to leave its empty WAL for good: one more file per restart.
  TempDir dir;
  REQUIRE(dir.ok());
  {
    auto cat = Catalog::open(dir.file("catalog"));
    REQUIRE(cat.is_ok());
    REQUIRE((*cat)->put(make_entry(1)).is_ok());
  }
  for (int i = 0; i < 30; ++i) REQUIRE(Catalog::open(dir.file("catalog")).is_ok());
  size_t logs = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir.file("catalog"))) logs += f.path().extension() == ".log";
  CHECK(logs <= 2);
  auto cat = Catalog::open(dir.file("catalog"));
  REQUIRE(cat.is_ok());
  CHECK((*cat)->get(make_entry(1).key).is_ok());
}

TEST_CASE("A namespace record keeps its adapter and revision, and one without them is written as before") {
  NamespaceRecord ns{{5, 6}, *KvLayout::standard(2, 2, 64, Dtype::kFp16), "m", "", "lora-7", "abc123"};
  const std::string v3 = Catalog::encode_namespace(ns);
  CHECK(v3[0] == 3);
  auto back = Catalog::decode_namespace(v3);
  REQUIRE(back.is_ok());
  CHECK(*back == ns);
  ns.tenant = "team-a";
  back = Catalog::decode_namespace(Catalog::encode_namespace(ns));
  REQUIRE(back.is_ok());
  CHECK(*back == ns);
  for (size_t cut = 1; cut < v3.size(); ++cut) CHECK_FALSE(Catalog::decode_namespace(v3.substr(0, cut)).is_ok());
  ns.adapter_id.clear();
  ns.revision.clear();
  CHECK(Catalog::encode_namespace(ns)[0] == 2);  // a tenant alone: version 2, as before revisions
}

TEST_CASE("A catalog opened read-only reads everything and writes nothing") {
  TempDir dir;
  REQUIRE(dir.ok());
  {
    auto cat = Catalog::open(dir.file("catalog"));
    REQUIRE(cat.is_ok());
    REQUIRE((*cat)->put(make_entry(1)).is_ok());
  }
  auto listing = [&] {
    std::map<std::string, uintmax_t> files;
    for (const auto& f : std::filesystem::directory_iterator(dir.file("catalog"))) {
      files[f.path().filename().string()] = f.file_size();
    }
    return files;
  };
  const auto before = listing();
  CatalogOptions o;
  o.read_only = true;
  o.create = false;
  {
    auto cat = Catalog::open(dir.file("catalog"), o);
    REQUIRE(cat.is_ok());
    CHECK((*cat)->get(make_entry(1).key).is_ok());
    Status put = (*cat)->put(make_entry(2));
    CHECK(put.code() == StatusCode::kInvalidArgument);
    CHECK(put.message().find("read-only") != std::string::npos);
    CHECK((*cat)->remove(make_entry(1).key).code() == StatusCode::kInvalidArgument);
    CHECK_FALSE((*cat)->out_of_space());
  }
  CHECK(listing() == before);
  auto missing = Catalog::open(dir.file("nothing-here"), o);
  CHECK_FALSE(missing.is_ok());
}
