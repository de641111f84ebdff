// Key-addressed objects through kvtierd: put by one client, got by another, kept across a restart,
// refused clearly when the input is bad, with nothing stored.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "kvtier/client.h"
#include "kvtier/kvtier.h"
#include "service_fixture.h"
#include "temp_dir.h"
#include "test_bytes.h"

using namespace kvtier;
using namespace kvtier::testing;

namespace {

constexpr uint64_t kBlock = 4096;  // service_test_layout().bytes_per_block()

ServiceConfig test_config(const std::string& dir) { return test_service_config(dir, "object-test", 512); }

std::unique_ptr<Client> connect(const Server& s, uint64_t window = 16 * kBlock) {
  auto c = Client::connect({.socket_path = s.socket_path(), .window_bytes = window, .name = "objects"});
  REQUIRE(c.is_ok());
  return std::move(*c);
}

/// The object under `key`, or empty with the status in `why`.
std::vector<std::byte> get(Client& c, NamespaceId ns, std::string_view key, Status* why = nullptr) {
  std::vector<std::byte> dst(c.window_bytes());
  auto n = c.object_get(ns, key, dst);
  if (why) *why = n.status();
  if (!n) return {};
  dst.resize(*n);
  return dst;
}

}  // namespace

TEST_CASE("Daemon: an object one client puts, another gets byte for byte, also after a restart", "[service]") {
  TempDir dir("kvtier_obj");
  const auto page = pattern_bytes(1, 3 * kBlock + 123);
  const std::string key("sglang\0page-hash-1", 18);  // any bytes
  {
    auto server = start_test_server(test_config(dir.path()));
    auto a = connect(*server);
    auto b = connect(*server);
    auto na = a->open_namespace({"objects/model", "", ""});
    auto nb = b->open_namespace({"objects/model", "", ""});
    REQUIRE(na.is_ok());
    REQUIRE(nb.is_ok());
    REQUIRE(*a->object_put(*na, key, page));
    CHECK_FALSE(*b->object_put(*nb, key, pattern_bytes(2, 10)));  // stored already: kept
    CHECK(get(*b, *nb, key) == page);
    const std::vector<std::string> keys = {key, "absent", key};
    CHECK(*b->object_exists(*nb, keys) == 1);
    // Another namespace (another model) does not see it.
    auto other = b->open_namespace({"objects/other", "", ""});
    REQUIRE(other.is_ok());
    Status why;
    CHECK(get(*b, *other, key, &why).empty());
    CHECK(why.code() == StatusCode::kNotFound);
    const std::string text = *b->metrics_text();
    CHECK_THAT(text, Catch::Contains("kvtier_object_puts_total 1\n"));
    CHECK_THAT(text, Catch::Contains("kvtier_object_gets_total{result=\"hit\"} 1\n"));
    CHECK_THAT(text, Catch::Contains("kvtierd_requests_total{op=\"object_put\"} 2\n"));
    REQUIRE(*a->object_put(*na, "to-remove", pattern_bytes(3, 100)));
    server->request_stop();  // a graceful stop writes memory-only blocks back to NVMe
    REQUIRE(server->wait().is_ok());
  }
  auto server = start_test_server(test_config(dir.path()));
  auto c = connect(*server);
  auto ns = c->open_namespace({"objects/model", "", ""});
  REQUIRE(ns.is_ok());
  CHECK(get(*c, *ns, key) == page);  // from NVMe
  const std::vector<std::string> both = {"to-remove", "never-put"};
  CHECK(*c->object_remove(*ns, both) == 1);
  CHECK(*c->object_exists(*ns, both) == 0);
}

TEST_CASE("Daemon: bad object requests get a clear error and store nothing", "[service]") {
  TempDir dir("kvtier_obj");
  auto server = start_test_server(test_config(dir.path()));
  auto c = connect(*server, 4 * kBlock);
  auto ns = c->open_namespace({"objects/model", "", ""});
  REQUIRE(ns.is_ok());
  SECTION("an object larger than the window, laid out") {
    auto r = c->object_put(*ns, "big", pattern_bytes(1, 4 * kBlock - 7));  // + 8 bytes of length: 5 blocks
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains("window"));
    CHECK(*c->object_put(*ns, "fits", pattern_bytes(1, 4 * kBlock - 8)));
  }
  SECTION("an empty key and one over the limit") {
    CHECK(c->object_put(*ns, "", pattern_bytes(1, 10)).status().code() == StatusCode::kInvalidArgument);
    const std::string long_key(kMaxObjectKeyBytes + 1, 'k');
    CHECK(c->object_put(*ns, long_key, pattern_bytes(1, 10)).status().code() == StatusCode::kInvalidArgument);
    std::vector<std::byte> dst(16);
    CHECK(c->object_get(*ns, "", dst).status().code() == StatusCode::kInvalidArgument);
  }
  SECTION("a namespace this connection did not open") {
    CHECK(c->object_put(*ns + 100, "k", pattern_bytes(1, 10)).status().code() == StatusCode::kNotFound);
    const std::vector<std::string> keys = {"k"};
    CHECK(c->object_exists(*ns + 100, keys).status().code() == StatusCode::kNotFound);
  }
  SECTION("a buffer shorter than the object") {
    const auto bytes = pattern_bytes(4, 5000);
    REQUIRE(*c->object_put(*ns, "k", bytes));
    std::vector<std::byte> dst(4999);
    auto r = c->object_get(*ns, "k", dst);
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains("5000"));
  }
  const std::vector<std::string> keys = {"big", "k"};
  CHECK(*c->object_exists(*ns, keys) == 0);  // "big" was never stored
  // The connection is still good.
  REQUIRE(*c->object_put(*ns, "after", pattern_bytes(5, 10)));
  CHECK(get(*c, *ns, "after") == pattern_bytes(5, 10));
}

TEST_CASE("C API: objects put, got, counted and removed", "[service]") {
  TempDir dir("kvtier_obj");
  auto server = start_test_server(test_config(dir.path()));
  kvtier_client* c = nullptr;
  REQUIRE(kvtier_connect(server->socket_path().c_str(), 16 * kBlock, &c) == KVTIER_OK);
  uint32_t ns = 0;
  REQUIRE(kvtier_open_namespace(c, "objects/model", "", "", &ns) == KVTIER_OK);
  const auto bytes = pattern_bytes(9, 2 * kBlock);
  int stored = -1;
  REQUIRE(kvtier_object_put(c, ns, "key", 3, bytes.data(), bytes.size(), 1, &stored) == KVTIER_OK);
  CHECK(stored == 1);
  std::vector<std::byte> dst(bytes.size());
  size_t length = 0;
  REQUIRE(kvtier_object_get(c, ns, "key", 3, dst.data(), dst.size(), &length) == KVTIER_OK);
  CHECK(length == bytes.size());
  CHECK(dst == bytes);
  CHECK(kvtier_object_get(c, ns, "nope", 4, dst.data(), dst.size(), &length) == KVTIER_NOT_FOUND);
  CHECK(kvtier_object_get(c, ns, "key", 3, dst.data(), 10, &length) == KVTIER_INVALID_ARGUMENT);
  const void* keys[] = {"key", "nope"};
  const size_t lens[] = {3, 4};
  size_t present = 9;
  REQUIRE(kvtier_object_exists(c, ns, keys, lens, 2, &present) == KVTIER_OK);
  CHECK(present == 1);
  CHECK(kvtier_object_exists(c, ns, nullptr, lens, 2, &present) == KVTIER_INVALID_ARGUMENT);
  size_t removed = 9;
  REQUIRE(kvtier_object_remove(c, ns, keys, lens, 2, &removed) == KVTIER_OK);
  CHECK(removed == 1);
  kvtier_disconnect(c);
}
