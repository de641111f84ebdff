// Key-addressed objects (object_store.h): put, get, exists and remove by an engine's own keys,
// stored as chains of blocks in the same tiers as prompts.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "api/metrics/metrics.h"
#include "api/store/object_store.h"
#include "test_bytes.h"
#include "tier_manager_fixture.h"

using namespace kvtier;
using namespace kvtier::store_testing;
using kvtier::testing::pattern_bytes;

namespace {

struct Objects : Fixture {
  std::unique_ptr<ObjectStore> objects;
  explicit Objects(uint64_t host_blocks = 64, uint64_t nvme_blocks = 256) : Fixture(host_blocks, nvme_blocks) {
    objects = std::make_unique<ObjectStore>(*tm, keys);
  }
  void reopen_all() {
    objects.reset();
    reopen();
    objects = std::make_unique<ObjectStore>(*tm, keys);
  }
  Result<bool> put(const std::string& key, std::span<const std::byte> bytes, const Namespace* in = nullptr) {
    const uint64_t bpb = layout().bytes_per_block();
    std::vector<std::byte> laid(object_blocks(bytes.size(), bpb) * bpb);
    lay_out_object(bytes, laid);
    return objects->put(in ? *in : ns, key, bytes.size(), laid);
  }
  /// The object's bytes, or empty with the status in `why`.
  std::vector<std::byte> get(const std::string& key, Status* why = nullptr, const Namespace* in = nullptr) {
    std::vector<std::byte> dst(64 * layout().bytes_per_block());
    auto n = objects->get(in ? *in : ns, key, dst);
    if (why) *why = n.status();
    if (!n) return {};
    dst.resize(*n);
    return dst;
  }
};

}  // namespace

TEST_CASE("An object put under a key is got back byte for byte, whatever its size") {
  Objects f;
  const uint64_t bpb = layout().bytes_per_block();
  // Sizes around the block boundaries: the length trailer pushes bpb - 8 + 1 into a second block.
  const size_t size = GENERATE_COPY(values<size_t>({0, 1, 100, bpb - 8, bpb - 7, bpb, 3 * bpb + 5, 10 * bpb - 8}));
  CAPTURE(size);
  const auto bytes = pattern_bytes(size + 1, size);
  const std::string key = "page/" + std::to_string(size);
  REQUIRE(*f.put(key, bytes));
  CHECK(f.objects->chain(f.ns, key)->keys.size() == object_blocks(size, bpb));
  CHECK(f.get(key) == bytes);
  SECTION("a second put of the key keeps what is there") {
    CHECK_FALSE(*f.put(key, pattern_bytes(99, 10)));
    CHECK(f.get(key) == bytes);
  }
  SECTION("after a restart, from NVMe") {
    REQUIRE(f.tm->flush().is_ok());
    f.reopen_all();
    CHECK(f.get(key) == bytes);
  }
}

TEST_CASE("exists counts the stored keys from the first and stops at the first missing one") {
  Objects f;
  for (const char* k : {"a", "b", "d"}) REQUIRE(*f.put(k, pattern_bytes(k[0], 3000)));
  const std::vector<std::string> keys = {"a", "b", "c", "d"};
  CHECK(*f.objects->exists(f.ns, keys) == 2);
  CHECK(*f.objects->exists(f.ns, std::vector<std::string>{"d"}) == 1);
  CHECK(*f.objects->exists(f.ns, std::vector<std::string>{}) == 0);
  SECTION("other namespaces do not see them") {
    auto other = f.tm->add_namespace({"other-model", layout(), "", ""});
    REQUIRE(other.is_ok());
    CHECK(*f.objects->exists(*other, keys) == 0);
    Status why;
    CHECK(f.get("a", &why, &*other).empty());
    CHECK(why.code() == StatusCode::kNotFound);
  }
}

TEST_CASE("remove erases an object from every tier, and a missing key removes nothing") {
  Objects f;
  const auto bytes = pattern_bytes(5, 5 * layout().bytes_per_block());
  REQUIRE(*f.put("gone", bytes));
  REQUIRE(*f.put("kept", bytes));
  REQUIRE(f.tm->flush().is_ok());  // on NVMe too
  const uint64_t used = f.tm->stats().tiers[int(Tier::kNvme)].used_slots;
  CHECK(*f.objects->remove(f.ns, "gone") == 6);
  CHECK(*f.objects->remove(f.ns, "gone") == 0);
  CHECK(*f.objects->exists(f.ns, std::vector<std::string>{"gone"}) == 0);
  CHECK(f.tm->stats().tiers[int(Tier::kNvme)].used_slots == used - 6);
  CHECK(f.get("kept") == bytes);
  f.reopen_all();  // the catalog forgot it too
  Status why;
  CHECK(f.get("gone", &why).empty());
  CHECK(why.code() == StatusCode::kNotFound);
  CHECK(f.get("kept") == bytes);
  REQUIRE(f.tm->index().check_invariants().is_ok());
}

TEST_CASE("An object whose tail was evicted is missing for exists and get, and a put stores it whole again") {
  Objects f;
  const uint64_t bpb = layout().bytes_per_block();
  const auto bytes = pattern_bytes(6, 3 * bpb);  // 4 blocks
  REQUIRE(*f.put("tail", bytes));
  auto chain = f.objects->chain(f.ns, "tail");
  REQUIRE(chain->whole);
  const std::vector<BlockKey> last = {chain->keys.back()};
  REQUIRE(*f.tm->erase(last) == 1);  // what eviction does first: the leaf
  CHECK_FALSE(f.objects->chain(f.ns, "tail")->whole);
  CHECK(*f.objects->exists(f.ns, std::vector<std::string>{"tail"}) == 0);
  Status why;
  CHECK(f.get("tail", &why).empty());
  CHECK(why.code() == StatusCode::kNotFound);
  REQUIRE(*f.put("tail", bytes));
  CHECK(f.get("tail") == bytes);
}

TEST_CASE("Objects are evicted under pressure like blocks, never returned torn") {
  Objects f(/*host_blocks=*/16, /*nvme_blocks=*/0);  // no NVMe: what leaves host DRAM is gone
  const uint64_t bpb = layout().bytes_per_block();
  std::vector<std::string> keys;
  for (int i = 0; i < 12; ++i) {
    keys.push_back("obj" + std::to_string(i));
    REQUIRE(f.put(keys.back(), pattern_bytes(i, 2 * bpb)).is_ok());  // 3 blocks each, 36 in all
  }
  size_t whole = 0;
  for (int i = 0; i < 12; ++i) {
    Status why;
    const auto got = f.get(keys[i], &why);
    if (why.is_ok()) {
      CHECK(got == pattern_bytes(i, 2 * bpb));
      ++whole;
    } else {
      CHECK(why.code() == StatusCode::kNotFound);
    }
  }
  CHECK(whole >= 1);
  CHECK(whole <= 5);
  CHECK(f.get(keys.back()) == pattern_bytes(11, 2 * bpb));  // the newest stays
  REQUIRE(f.tm->index().check_invariants().is_ok());
}

TEST_CASE("Bad object input is refused with a clear error and nothing stored") {
  Objects f;
  const uint64_t bpb = layout().bytes_per_block();
  SECTION("an empty key or one over the limit") {
    CHECK(f.put("", pattern_bytes(1, 10)).status().code() == StatusCode::kInvalidArgument);
    CHECK(f.put(std::string(kMaxObjectKeyBytes + 1, 'k'), pattern_bytes(1, 10)).status().code() ==
          StatusCode::kInvalidArgument);
    CHECK(*f.put(std::string(kMaxObjectKeyBytes, 'k'), pattern_bytes(1, 10)));
  }
  SECTION("a layout that does not end in the length given") {
    std::vector<std::byte> laid(bpb);
    lay_out_object(pattern_bytes(1, 10), laid);
    auto r = f.objects->put(f.ns, "k", 11, laid);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK(f.objects->put(f.ns, "k", bpb, laid).status().code() == StatusCode::kInvalidArgument);  // 2 blocks
    CHECK(f.tm->index().stats().entries == 0);
  }
  SECTION("a buffer shorter than the object, and one just long enough") {
    const auto bytes = pattern_bytes(2, 2 * bpb + 100);
    REQUIRE(*f.put("big", bytes));
    std::vector<std::byte> small(bytes.size() - 1);
    auto r = f.objects->get(f.ns, "big", small);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(std::to_string(bytes.size())));
    std::vector<std::byte> exact(bytes.size());
    REQUIRE(*f.objects->get(f.ns, "big", exact) == bytes.size());
    CHECK(exact == bytes);
  }
  SECTION("a layout with blocks too short for an object's key") {
    auto tiny = KvLayout::standard(2, 2, 64, Dtype::kFp16, 4);
    REQUIRE(tiny.is_ok());
    f.opts.layout = *tiny;
    f.opts.nvme = {};  // the fixture's NVMe tier holds the other layout's blocks
    f.opts.nvme_limits = {};
    f.tm.reset();
    f.objects.reset();
    auto tm = TierManager::open(f.keys, f.opts);
    INFO(tm.status().to_string());
    REQUIRE(tm.is_ok());
    auto n = (*tm)->add_namespace({"model", *tiny, "", ""});
    REQUIRE(n.is_ok());
    ObjectStore objects(**tm, f.keys);
    auto r = objects.exists(*n, std::vector<std::string>{"k"});
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains("at least 7 tokens"));
  }
}

TEST_CASE("An object being read cannot be removed until the read is done") {
  Objects f;
  REQUIRE(*f.put("held", pattern_bytes(3, 100)));
  auto chain = f.objects->chain(f.ns, "held");
  REQUIRE(f.tm->index().pin(chain->keys[0]).is_ok());  // as read_blocks holds it while it reads
  CHECK(f.objects->remove(f.ns, "held").status().code() == StatusCode::kBusy);
  REQUIRE(f.tm->index().unpin(chain->keys[0]).is_ok());
  CHECK(*f.objects->remove(f.ns, "held") == 1);
}

TEST_CASE("Object puts, gets and removes show in the metrics") {
  Objects f;
  REQUIRE(*f.put("m", pattern_bytes(4, 10)));
  CHECK_FALSE(*f.put("m", pattern_bytes(4, 10)));
  CHECK_FALSE(f.get("m").empty());
  Status why;
  CHECK(f.get("absent", &why).empty());
  REQUIRE(*f.objects->remove(f.ns, "m") == 1);
  const std::string text = f.tm->metrics().render();
  CHECK_THAT(text, Catch::Contains("kvtier_object_puts_total 1\n"));
  CHECK_THAT(text, Catch::Contains("kvtier_object_puts_kept_total 1\n"));
  CHECK_THAT(text, Catch::Contains("kvtier_object_gets_total{result=\"hit\"} 1\n"));
  CHECK_THAT(text, Catch::Contains("kvtier_object_gets_total{result=\"miss\"} 1\n"));
  CHECK_THAT(text, Catch::Contains("kvtier_object_removes_total 1\n"));
}
