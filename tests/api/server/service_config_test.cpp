// ServiceConfig: a full kvtierd.toml parses; every bad input is refused naming its key; sizes
// parse with units; resolve() makes the secret once and reuses it, and auto sizes respect caps;
// tenant rules admit exactly the peers they list.
#include <catch2/catch.hpp>

#include <sys/stat.h>

#include <fstream>
#include <sstream>
#include <string>

#include "api/server/service_config.h"
#include "temp_dir.h"
#include "tiers/device_probe.h"

using namespace kvtier;
using kvtier::testing::TempDir;

namespace {

constexpr const char* kFullConfig = R"(
data_dir = "/srv/kvtier"
socket_path = "/run/kvtier/kvtierd.sock"
socket_mode = "0660"
allowed_uids = [1000, 1001]
allowed_gids = [2000]
metrics_listen = "0.0.0.0:9100"
secret = "s3cret"
secret_file = "/etc/kvtier/secret"

[layout]
layers = 80
kv_heads = 8
head_dim = 128
dtype = "fp16"
block_tokens = 32

[tiers]
host_bytes = "64GiB"
nvme_bytes = "1.5TiB"
hbm_bytes = 10000000000
high_watermark = 0.9
low_watermark = 0.7
write_policy = "write-through"
promote_on_hit = false
nvme_admission_min_uses = 3
fdatasync = false

[service]
max_clients = 64
max_clients_per_uid = 8
hello_timeout_ms = 250
idle_timeout_ms = 60000
max_inflight_request_bytes = "32MiB"
lease_ms = 5000
client_window_max_bytes = "8GiB"

[[tenant]]
name = "team-a"
salt = "salt-a"
uids = [1000]
gids = [3000]
tier_share = 0.5

[[tenant]]
name = "public"
everyone = true
max_priority = "normal"
max_pinned_blocks = 4096
)";

std::string write_file(const TempDir& dir, const std::string& name, const std::string& text) {
  std::ofstream(dir.file(name)) << text;
  return dir.file(name);
}

/// A config whose files live in `dir` and whose sizes are small and explicit.
ServiceConfig small_config(const TempDir& dir) {
  ServiceConfig c;
  c.data_dir = dir.file("data");
  c.layout = *KvLayout::standard(2, 2, 64, Dtype::kFp16, 16);
  c.metrics_listen = "";
  return c;
}

}  // namespace

TEST_CASE("A full kvtierd.toml parses into every field") {
  auto parsed = parse_config_toml(kFullConfig);
  REQUIRE(parsed.is_ok());
  const ServiceConfig& c = *parsed;
  CHECK(c.data_dir == "/srv/kvtier");
  CHECK(c.socket_path == "/run/kvtier/kvtierd.sock");
  CHECK(c.socket_mode == 0660);
  CHECK(c.allowed_uids == std::vector<uint32_t>{1000, 1001});
  CHECK(c.allowed_gids == std::vector<uint32_t>{2000});
  CHECK(c.metrics_listen == "0.0.0.0:9100");
  CHECK(c.secret == "s3cret");
  CHECK(c.secret_file == "/etc/kvtier/secret");
  CHECK(c.layout == *KvLayout::standard(80, 8, 128, Dtype::kFp16, 32));
  CHECK(c.kv_dtype == Dtype::kFp16);
  CHECK(c.host_bytes == 64ull << 30);
  CHECK(c.nvme_bytes == 3ull << 39);
  CHECK(c.hbm_bytes == 10000000000ull);
  CHECK(c.high_watermark == 0.9);
  CHECK(c.low_watermark == 0.7);
  CHECK(c.write_policy == WritePolicy::kWriteThrough);
  CHECK_FALSE(c.promote_on_hit);
  CHECK(c.nvme_admission_min_uses == 3);
  CHECK_FALSE(c.fdatasync);
  CHECK(c.max_clients == 64);
  CHECK(c.max_clients_per_uid == 8);
  CHECK(clients_per_uid_limit(c) == 8);
  CHECK(c.hello_timeout_ms == 250);
  CHECK(c.idle_timeout_ms == 60000);
  CHECK(c.max_inflight_request_bytes == 32ull << 20);
  CHECK(c.lease_ms == 5000);
  CHECK(c.client_window_max_bytes == 8ull << 30);
  REQUIRE(c.tenants.size() == 2);
  CHECK(c.tenants[0].name == "team-a");
  CHECK(c.tenants[0].salt == "salt-a");
  CHECK(c.tenants[0].uids == std::vector<uint32_t>{1000});
  CHECK(c.tenants[0].gids == std::vector<uint32_t>{3000});
  CHECK_FALSE(c.tenants[0].everyone);
  CHECK(c.tenants[1].name == "public");
  CHECK(c.tenants[1].salt.empty());
  CHECK(c.tenants[1].everyone);
  CHECK(c.tenants[0].max_priority == Priority::kRetained);  // no quota unless configured
  CHECK(c.tenants[0].max_pinned_blocks == 0);
  CHECK(c.tenants[1].max_priority == Priority::kNormal);
  CHECK(c.tenants[1].max_pinned_blocks == 4096);
  CHECK(c.tenants[0].tier_share == 0.5);
  CHECK(c.tenants[1].tier_share == 1.0);  // no share unless configured
}

TEST_CASE("Keys absent from the file keep the base's values and the empty file gives the defaults") {
  auto empty = parse_config_toml("");
  REQUIRE(empty.is_ok());
  CHECK(empty->data_dir == "/var/lib/kvtier");
  CHECK(empty->socket_mode == 0660);
  CHECK(empty->metrics_listen == "127.0.0.1:9477");
  CHECK(empty->layout == *KvLayout::standard(32, 8, 128, Dtype::kBf16, 16));
  CHECK(empty->write_policy == WritePolicy::kWriteBack);
  CHECK(empty->tenants.empty());
  // The connection bounds: half the slots per uid, a 5 s hello, no idle deadline, 256 MiB.
  CHECK(empty->max_clients_per_uid == 0);
  CHECK(clients_per_uid_limit(*empty) == 128);
  CHECK(empty->hello_timeout_ms == 5000);
  CHECK(empty->idle_timeout_ms == 0);
  CHECK(empty->max_inflight_request_bytes == 256ull << 20);
  ServiceConfig one_slot;
  one_slot.max_clients = 1;
  CHECK(clients_per_uid_limit(one_slot) == 1);  // never 0: a uid can always connect

  ServiceConfig base;
  base.data_dir = "/base";
  base.max_clients = 7;
  auto over = parse_config_toml("[service]\nlease_ms = 100\n[layout]\nlayers = 4\n", base);
  REQUIRE(over.is_ok());
  CHECK(over->data_dir == "/base");
  CHECK(over->max_clients == 7);
  CHECK(over->lease_ms == 100);
  CHECK(over->layout.num_layers == 4);
  CHECK(over->layout.num_kv_heads == 8);  // untouched fields of [layout] stay
}

TEST_CASE("Other spellings: octal integers, MLA layouts, \"off\" and \"auto\" sizes") {
  auto c = parse_config_toml(R"(
socket_mode = 0o600
[layout]
latent_dim = 576
layers = 61
[tiers]
nvme_bytes = "off"
hbm_bytes = "auto"
high_watermark = 1
)");
  REQUIRE(c.is_ok());
  CHECK(c->socket_mode == 0600);
  CHECK(c->layout == *KvLayout::latent(61, 576, Dtype::kBf16));
  CHECK_FALSE(c->nvme_enabled);
  CHECK(c->hbm_enabled);
  CHECK(c->hbm_bytes == 0);
  CHECK(c->high_watermark == 1.0);
}

TEST_CASE("Every bad input is refused with a message naming its key") {
  struct Case {
    const char* toml;
    const char* names;  // the message must contain this
  };
  const Case cases[] = {
      {"data_dri = \"/x\"", "unknown key 'data_dri'"},
      {"[tiers]\nhost_byte = 1", "unknown key 'tiers.host_byte'"},
      {"[layout]\nlayer = 1", "unknown key 'layout.layer'"},
      {"[service]\nlease = 1", "unknown key 'service.lease'"},
      {"[[tenant]]\nname = \"a\"\nuid = [1]", "unknown key 'tenant[0].uid'"},
      {"[metrics]\nlisten = \"x\"", "unknown key 'metrics'"},
      {"data_dir = 5", "data_dir must be a string, not an integer"},
      {"data_dir = \"\"", "data_dir"},
      {"socket_mode = 660", "socket_mode"},
      {"socket_mode = \"rw-rw----\"", "socket_mode"},
      {"socket_mode = true", "socket_mode"},
      {"allowed_uids = \"1000\"", "allowed_uids must be an array"},
      {"allowed_uids = [-1]", "allowed_uids[0] must not be negative"},
      {"allowed_gids = [1, \"x\"]", "allowed_gids[1] must be an integer"},
      {"allowed_gids = [4294967296]", "allowed_gids[0]"},
      {"metrics_listen = \"localhost\"", "metrics_listen"},
      {"metrics_listen = \"127.0.0.1:99999\"", "metrics_listen"},
      {"secret = 1", "secret must be a string"},
      {"layout = 3", "layout must be a table"},
      {"[layout]\nlayers = 0", "layout.layers"},
      {"[layout]\nkv_heads = -2", "layout.kv_heads must not be negative"},
      {"[layout]\nhead_dim = \"128\"", "layout.head_dim must be an integer"},
      {"[layout]\nblock_tokens = 100000", "layout.block_tokens"},
      {"[layout]\ndtype = \"fp7\"", "layout.dtype"},
      {"[layout]\nhf_config = \"/m/config.json\"\nlayers = 3", "layout.layers conflicts with layout.hf_config"},
      {"[layout]\nlatent_dim = 576\nkv_heads = 2", "layout.latent_dim"},
      {"[tiers]\nhost_bytes = -5", "tiers.host_bytes must not be negative"},
      {"[tiers]\nnvme_bytes = \"-1GiB\"", "tiers.nvme_bytes"},
      {"[tiers]\nhbm_bytes = \"12 parsecs\"", "tiers.hbm_bytes"},
      {"[tiers]\nhost_bytes = \"off\"", "tiers.host_bytes cannot be \"off\""},
      {"[tiers]\nhost_bytes = 1.5", "tiers.host_bytes must be a size"},
      {"[tiers]\nhigh_watermark = 1.5", "tiers.high_watermark must be in (0, 1]"},
      {"[tiers]\nlow_watermark = 0", "tiers.low_watermark must be in (0, 1]"},
      {"[tiers]\nlow_watermark = -0.5", "tiers.low_watermark"},
      {"[tiers]\nhigh_watermark = \"0.9\"", "tiers.high_watermark must be a number"},
      {"[tiers]\nhigh_watermark = 0.5\nlow_watermark = 0.8", "tiers.low_watermark (0.800000) must not exceed tiers.high_watermark"},
      {"[tiers]\nwrite_policy = \"sometimes\"", "tiers.write_policy"},
      {"[tiers]\npromote_on_hit = \"yes\"", "tiers.promote_on_hit must be true or false"},
      {"[tiers]\nnvme_admission_min_uses = 16", "tiers.nvme_admission_min_uses"},
      {"[tiers]\nnvme_admission_min_uses = -1", "tiers.nvme_admission_min_uses"},
      {"[tiers]\nfdatasync = 1", "tiers.fdatasync"},
      {"[service]\nlease_ms = 0", "service.lease_ms"},
      {"[service]\nmax_clients = \"many\"", "service.max_clients"},
      {"[service]\nmax_clients = 0", "service.max_clients"},
      {"[service]\nclient_window_max_bytes = 0", "service.client_window_max_bytes"},
      {"[service]\nmax_clients = 4\nmax_clients_per_uid = 5", "service.max_clients_per_uid (5) must not exceed"},
      {"[service]\nmax_clients_per_uid = -1", "service.max_clients_per_uid"},
      {"[service]\nhello_timeout_ms = 86400001", "service.hello_timeout_ms"},
      {"[service]\nidle_timeout_ms = \"soon\"", "service.idle_timeout_ms"},
      {"[service]\nmax_inflight_request_bytes = \"-1MiB\"", "service.max_inflight_request_bytes"},
      {"[tenant]\nname = \"a\"", "tenant must be an array of tables"},
      {"[[tenant]]\nsalt = \"x\"", "tenant[0].name is required"},
      {"[[tenant]]\nname = \"a\"\neveryone = \"yes\"", "tenant[0].everyone"},
      {"[[tenant]]\nname = \"a\"\n[[tenant]]\nname = \"a\"", "tenant[1].name \"a\" is used by another tenant"},
      {"[[tenant]]\nname = \"a\"\nmax_priority = \"urgent\"", "tenant[0].max_priority must be one of"},
      {"[[tenant]]\nname = \"a\"\nmax_priority = 2", "tenant[0].max_priority"},
      {"[[tenant]]\nname = \"a\"\nmax_pinned_blocks = -1", "tenant[0].max_pinned_blocks"},
      {"[[tenant]]\nname = \"a\"\ntier_share = 0", "tenant[0].tier_share must be in (0, 1]"},
      {"[[tenant]]\nname = \"a\"\ntier_share = 1.5", "tenant[0].tier_share must be in (0, 1]"},
      {"[[tenant]]\nname = \"a\"\ntier_share = \"half\"", "tenant[0].tier_share must be a number"},
      {"[[tenant]]\nname = \"a\"\nsalt = \"s\"\n[[tenant]]\nname = \"b\"\nsalt = \"s\"\ntier_share = 0.5",
       "tenant[1] (\"b\") sets tier_share but shares its salt with tenant \"a\""},
      {"data_dir = ", "line 1"},
  };
  for (const Case& c : cases) {
    INFO("config: " << c.toml);
    auto r = parse_config_toml(c.toml);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(r.status().message()), Catch::Contains(c.names));
  }
}

TEST_CASE("parse_bytes reads plain numbers, binary and decimal units, and fractions") {
  struct Case {
    const char* text;
    uint64_t bytes;
  };
  const Case good[] = {
      {"0", 0},
      {"4096", 4096},
      {"4096B", 4096},
      {"64GiB", 64ull << 30},
      {"64G", 64ull << 30},
      {"64 gib", 64ull << 30},
      {"512MiB", 512ull << 20},
      {"1.5TiB", 3ull << 39},
      {"10GB", 10'000'000'000ull},
      {"2kb", 2000},
      {"1KiB", 1024},
      {"0.5KiB", 512},
      {"0.1KiB", 102},  // fractions round down to whole bytes
      {" 3 MB ", 3'000'000},
      {"1PiB", 1ull << 50},
      {"18446744073709551615", ~0ull},
  };
  for (const Case& c : good) {
    INFO(c.text);
    auto r = parse_bytes(c.text);
    REQUIRE(r.is_ok());
    CHECK(*r == c.bytes);
  }
  for (const char* bad : {"", "GiB", "-1", "-1GiB", "12 parsecs", "1.2.3GiB", "64 GiB extra",
                          "18446744073709551616", "20000PiB", "0x10"}) {
    INFO(bad);
    auto r = parse_bytes(bad);
    REQUIRE_FALSE(r.is_ok());
    CHECK(r.status().code() == StatusCode::kInvalidArgument);
  }
  CHECK(format_bytes(512) == "512 B");
  CHECK(format_bytes(3ull << 29) == "1.50 GiB");
}

TEST_CASE("load_config_file: kNotFound for a missing file, the path in parse errors") {
  TempDir dir;
  REQUIRE(dir.ok());
  auto missing = load_config_file(dir.file("nope.toml"));
  REQUIRE_FALSE(missing.is_ok());
  CHECK(missing.status().code() == StatusCode::kNotFound);

  const std::string good = write_file(dir, "good.toml", kFullConfig);
  auto parsed = load_config_file(good);
  REQUIRE(parsed.is_ok());
  CHECK(parsed->layout.num_layers == 80);

  const std::string bad = write_file(dir, "bad.toml", "[tiers]\nhost_bytes = -1\n");
  auto refused = load_config_file(bad);
  REQUIRE_FALSE(refused.is_ok());
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains(bad));
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("tiers.host_bytes"));
}

TEST_CASE("resolve creates data_dir and the secret once, and reads the same secret afterwards") {
  TempDir dir;
  REQUIRE(dir.ok());
  ServiceConfig first = small_config(dir);
  first.data_dir = dir.file("a/b/data");  // mkdir -p
  REQUIRE(resolve(first).is_ok());
  CHECK(first.socket_path == first.data_dir + "/kvtierd.sock");
  CHECK(first.secret.size() == 64);
  CHECK(first.secret.find_first_not_of("0123456789abcdef") == std::string::npos);

  struct stat st{};
  REQUIRE(::stat((first.data_dir + "/secret").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  REQUIRE(::stat(first.data_dir.c_str(), &st) == 0);
  CHECK(S_ISDIR(st.st_mode));
  CHECK((st.st_mode & 0007) == 0);  // created 0750: nothing for others

  ServiceConfig second = small_config(dir);
  second.data_dir = first.data_dir;
  REQUIRE(resolve(second).is_ok());
  CHECK(second.secret == first.secret);

  ServiceConfig elsewhere = small_config(dir);
  elsewhere.data_dir = dir.file("other");
  REQUIRE(resolve(elsewhere).is_ok());
  CHECK(elsewhere.secret != first.secret);  // a fresh deployment gets a fresh secret

  SECTION("an explicit secret wins and no file is needed") {
    ServiceConfig c = small_config(dir);
    c.data_dir = dir.file("explicit");
    c.secret = "given";
    REQUIRE(resolve(c).is_ok());
    CHECK(c.secret == "given");
    CHECK(::stat((c.data_dir + "/secret").c_str(), &st) != 0);
  }
  SECTION("an explicit secret_file is read, and must exist") {
    ServiceConfig c = small_config(dir);
    c.secret_file = write_file(dir, "shared_secret", "shared-value\n");
    REQUIRE(resolve(c).is_ok());
    CHECK(c.secret == "shared-value");

    ServiceConfig m = small_config(dir);
    m.secret_file = dir.file("missing_secret");
    Status s = resolve(m);
    CHECK(s.code() == StatusCode::kNotFound);
    CHECK_THAT(std::string(s.message()), Catch::Contains("secret_file"));
  }
}

TEST_CASE("resolve sizes auto tiers within their caps and refuses sizes below one block") {
  TempDir dir;
  REQUIRE(dir.ok());
  ServiceConfig c = small_config(dir);
  REQUIRE(resolve(c).is_ok());
  const uint64_t block = c.layout.bytes_per_block();
  CHECK(c.host_bytes >= 4 * block);
  CHECK(c.host_bytes <= 64ull << 30);
  CHECK(c.nvme_enabled);  // /tmp has room for a few 4 KiB-aligned slots
  CHECK(c.nvme_bytes > 0);
  CHECK(c.nvme_bytes <= 1ull << 40);
  if (!probe_devices().has_gpu()) {
    CHECK(c.hbm_bytes == 0);
    CHECK_FALSE(c.hbm_enabled);
  } else {
    CHECK(c.hbm_bytes > 0);
  }
  REQUIRE(c.tenants.size() == 1);  // the shared default tenant
  CHECK(c.tenants[0].name.empty());
  CHECK(c.tenants[0].everyone);

  // Resolving again changes nothing that matters: sizes were fixed by the first pass.
  ServiceConfig again = c;
  REQUIRE(resolve(again).is_ok());
  CHECK(again.host_bytes == c.host_bytes);
  CHECK(again.hbm_bytes == c.hbm_bytes);
  CHECK(again.tenants.size() == 1);

  SECTION("explicit sizes are kept; below one block they are refused naming the key") {
    ServiceConfig e = small_config(dir);
    e.host_bytes = 1 << 20;
    e.nvme_enabled = false;
    REQUIRE(resolve(e).is_ok());
    CHECK(e.host_bytes == 1 << 20);
    CHECK(e.nvme_bytes == 0);

    ServiceConfig tiny = small_config(dir);
    tiny.host_bytes = 100;
    Status s = resolve(tiny);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("tiers.host_bytes"));

    ServiceConfig tiny_nvme = small_config(dir);
    tiny_nvme.nvme_bytes = 100;
    s = resolve(tiny_nvme);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("tiers.nvme_bytes"));
  }
  SECTION("a socket path too long for sockaddr_un is refused") {
    ServiceConfig l = small_config(dir);
    l.socket_path = "/tmp/" + std::string(200, 's');
    Status s = resolve(l);
    CHECK(s.code() == StatusCode::kInvalidArgument);
    CHECK_THAT(std::string(s.message()), Catch::Contains("socket_path"));
  }
}

TEST_CASE("hf_config gives the model's shape while the layout table's dtype and block_tokens still apply") {
  TempDir dir;
  REQUIRE(dir.ok());
  const std::string hf = write_file(dir, "config.json", R"({
    "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "hidden_size": 512, "torch_dtype": "bfloat16"})");
  auto c = parse_config_toml("data_dir = \"" + dir.file("data") + "\"\nmetrics_listen = \"\"\n" +
                             "[layout]\nhf_config = \"" + hf + "\"\ndtype = \"fp8_e4m3\"\nblock_tokens = 32\n");
  REQUIRE(c.is_ok());
  REQUIRE(resolve(*c).is_ok());
  CHECK(c->layout == *KvLayout::standard(4, 2, 64, Dtype::kFp8E4M3, 32));

  ServiceConfig missing = small_config(dir);
  missing.hf_config = dir.file("absent.json");
  Status s = resolve(missing);
  CHECK_FALSE(s.is_ok());
  CHECK_THAT(std::string(s.message()), Catch::Contains("layout.hf_config"));
}

TEST_CASE("to_tier_options carries sizes, watermarks, NVMe dir and durability, lease") {
  TempDir dir;
  REQUIRE(dir.ok());
  ServiceConfig c = small_config(dir);
  CHECK(to_tier_options(c).status().code() == StatusCode::kInvalidArgument);  // not resolved

  c.host_bytes = 8 << 20;
  c.nvme_bytes = 16 << 20;
  c.high_watermark = 0.9;
  c.low_watermark = 0.5;
  c.fdatasync = false;
  c.lease_ms = 1234;
  c.write_policy = WritePolicy::kWriteThrough;
  c.promote_on_hit = false;
  c.nvme_admission_min_uses = 5;
  REQUIRE(resolve(c).is_ok());
  auto o = to_tier_options(c);
  REQUIRE(o.is_ok());
  CHECK(o->layout == c.layout);
  CHECK(o->host.capacity_bytes == 8 << 20);
  CHECK(o->host.high_watermark == 0.9);
  CHECK(o->host.low_watermark == 0.5);
  CHECK(o->nvme_limits.capacity_bytes == 16 << 20);
  CHECK(o->nvme_limits.low_watermark == 0.5);
  CHECK(o->nvme.dir == c.data_dir + "/nvme");
  CHECK(o->nvme.capacity_bytes == 16 << 20);
  CHECK(o->nvme.layout == c.layout);
  CHECK(o->nvme.durability == Durability::kNone);
  CHECK(o->hbm.capacity_bytes == c.hbm_bytes);
  CHECK_FALSE(o->shared_host_arena);
  CHECK(o->write_policy == WritePolicy::kWriteThrough);
  CHECK_FALSE(o->promote_on_hit);
  CHECK(o->nvme_admission_min_uses == 5);
  CHECK(o->index.default_lease_ns == 1234ull * 1'000'000);
  REQUIRE(o->tenants.size() == 1);  // resolve() added the shared default tenant
  CHECK(o->tenants[0].name.empty());
  CHECK(o->tenants[0].tier_share == 1.0);

  c.tenants = {TenantRule{.name = "a", .salt = "sa", .tier_share = 0.25}, TenantRule{.name = "b", .salt = "sb"}};
  auto shared = to_tier_options(c);
  REQUIRE(shared.is_ok());
  REQUIRE(shared->tenants.size() == 2);
  CHECK(shared->tenants[0].name == "a");
  CHECK(shared->tenants[0].tier_share == 0.25);
  CHECK(shared->tenants[1].tier_share == 1.0);

  c.nvme_enabled = false;
  auto off = to_tier_options(c);
  REQUIRE(off.is_ok());
  CHECK(off->nvme.dir.empty());
  CHECK(off->nvme_limits.capacity_bytes == 0);
}

TEST_CASE("Tenant rules: uid match, gid match, everyone, none") {
  auto parsed = parse_config_toml(R"(
allowed_uids = [1000, 1001, 1002]
allowed_gids = [500]
[[tenant]]
name = "by-uid"
salt = "u"
uids = [1000]
[[tenant]]
name = "by-gid"
salt = "g"
gids = [500]
[[tenant]]
name = "all"
everyone = true
[[tenant]]
name = "nobody"
)");
  REQUIRE(parsed.is_ok());
  const ServiceConfig& c = *parsed;
  const TenantRule* by_uid = find_tenant(c, "by-uid");
  const TenantRule* by_gid = find_tenant(c, "by-gid");
  const TenantRule* all = find_tenant(c, "all");
  const TenantRule* nobody = find_tenant(c, "nobody");
  REQUIRE((by_uid && by_gid && all && nobody));
  CHECK(by_uid->salt == "u");
  CHECK(find_tenant(c, "") == nullptr);  // tenants are configured: no implicit default
  CHECK(find_tenant(c, "missing") == nullptr);

  CHECK(tenant_allows(*by_uid, 1000, 1));
  CHECK_FALSE(tenant_allows(*by_uid, 1001, 1));
  CHECK(tenant_allows(*by_gid, 1001, 500));
  CHECK_FALSE(tenant_allows(*by_gid, 1001, 501));
  CHECK(tenant_allows(*all, 4242, 4242));
  CHECK_FALSE(tenant_allows(*nobody, 1000, 500));

  CHECK(peer_allowed(c, 1000, 1));
  CHECK(peer_allowed(c, 9999, 500));   // by gid
  CHECK(peer_allowed(c, 0, 0));        // root always
  CHECK_FALSE(peer_allowed(c, 9999, 9999));

  CHECK(tenants_for(c, 1000, 500) == std::vector<std::string>{"by-uid", "by-gid", "all"});
  CHECK(tenants_for(c, 1001, 1) == std::vector<std::string>{"all"});
  CHECK(tenants_for(c, 9999, 9999).empty());  // refused at the gate

  ServiceConfig open;  // no allow lists, no tenants
  CHECK(peer_allowed(open, 12345, 12345));
  CHECK(tenants_for(open, 12345, 12345) == std::vector<std::string>{""});
  const TenantRule* shared = find_tenant(open, "");
  REQUIRE(shared != nullptr);
  CHECK(shared->salt.empty());
  CHECK(tenant_allows(*shared, 12345, 12345));
}

TEST_CASE("The example kvtierd.toml in docs/service.md parses to the defaults") {
  // Keeps the documentation honest: its first ```toml block must be a valid config.
  const std::string path = std::string(KVTIER_SOURCE_DIR) + "/docs/service.md";
  std::ifstream in(path);
  REQUIRE(in.good());
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string doc = ss.str();
  const size_t begin = doc.find("```toml\n");
  REQUIRE(begin != std::string::npos);
  const size_t end = doc.find("```", begin + 8);
  REQUIRE(end != std::string::npos);
  auto parsed = parse_config_toml(std::string_view(doc).substr(begin + 8, end - begin - 8));
  INFO(parsed.status().to_string());
  REQUIRE(parsed.is_ok());
  const ServiceConfig defaults;
  CHECK(parsed->data_dir == defaults.data_dir);
  CHECK(parsed->socket_mode == defaults.socket_mode);
  CHECK(parsed->metrics_listen == defaults.metrics_listen);
  CHECK(parsed->layout == defaults.layout);
  CHECK(parsed->host_bytes == 0);
  CHECK(parsed->high_watermark == defaults.high_watermark);
  CHECK(parsed->low_watermark == defaults.low_watermark);
  CHECK(parsed->client_window_max_bytes == defaults.client_window_max_bytes);
  CHECK(parsed->lease_ms == defaults.lease_ms);
  CHECK(parsed->max_clients_per_uid == defaults.max_clients_per_uid);
  CHECK(parsed->hello_timeout_ms == defaults.hello_timeout_ms);
  CHECK(parsed->idle_timeout_ms == defaults.idle_timeout_ms);
  CHECK(parsed->max_inflight_request_bytes == defaults.max_inflight_request_bytes);
  CHECK(parsed->tenants.empty());
}
