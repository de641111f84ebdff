#include "api/server/service_config.h"

// toml++ is used as Debian ships it: a shared library built with exceptions (ABI namespace
// toml::v3::ex). Compiling this file with TOML_EXCEPTIONS=0 would ask for the noex symbols the
// library does not export, so toml::parse_error is caught in parse_config_toml, the only call
// that throws, and turned into a Status there.
#include <toml++/toml.h>

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <charconv>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <limits>
#include <set>
#include <sstream>

#include "api/metrics/metrics.h"
#include "tiers/block_header.h"
#include "tiers/device_probe.h"
#include "tiers/storage_device.h"

#ifdef KVTIER_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace kvtier {

namespace {

constexpr uint64_t kGiB = 1ull << 30;
constexpr uint64_t kTiB = 1ull << 40;
constexpr uint64_t kHostAutoCap = 64 * kGiB;
constexpr uint64_t kNvmeAutoCap = kTiB;
constexpr uint64_t kMaxLeaseMs = 24ull * 3600 * 1000;  // keeps lease_ms × 1e6 far from overflow

// ---- TOML value access ----------------------------------------------------------------------

std::string_view type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::table: return "a table";
    case toml::node_type::array: return "an array";
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::date: return "a date";
    case toml::node_type::time: return "a time";
    case toml::node_type::date_time: return "a date-time";
    default: return "nothing";
  }
}

std::string at_line(const toml::node& n) {
  const auto line = n.source().begin.line;
  return line > 0 ? " (line " + std::to_string(line) + ")" : std::string();
}

Status key_error(const std::string& key, const toml::node& n, const std::string& why) {
  return invalid_argument("config: " + key + " " + why + at_line(n));
}

Status wrong_type(const std::string& key, const toml::node& n, std::string_view want) {
  return key_error(key, n, "must be " + std::string(want) + ", not " + std::string(type_name(n)));
}

Result<std::string> get_string(const toml::node& n, const std::string& key) {
  if (const auto* s = n.as_string()) return s->get();
  return wrong_type(key, n, "a string");
}

Result<bool> get_bool(const toml::node& n, const std::string& key) {
  if (const auto* b = n.as_boolean()) return b->get();
  return wrong_type(key, n, "true or false");
}

/// An integer in [min, max].
Result<uint64_t> get_uint(const toml::node& n, const std::string& key, uint64_t min, uint64_t max) {
  const auto* i = n.as_integer();
  if (i == nullptr) return wrong_type(key, n, "an integer");
  const int64_t v = i->get();
  if (v < 0) return key_error(key, n, "must not be negative (got " + std::to_string(v) + ")");
  if (static_cast<uint64_t>(v) < min || static_cast<uint64_t>(v) > max) {
    return key_error(key, n, "must be from " + std::to_string(min) + " to " + std::to_string(max) +
                                 " (got " + std::to_string(v) + ")");
  }
  return static_cast<uint64_t>(v);
}

Result<double> get_fraction(const toml::node& n, const std::string& key) {
  double v = 0;
  if (const auto* f = n.as_floating_point()) v = f->get();
  else if (const auto* i = n.as_integer()) v = static_cast<double>(i->get());
  else return wrong_type(key, n, "a number");
  if (!(v > 0.0 && v <= 1.0)) {
    return key_error(key, n, "must be in (0, 1] (got " + std::to_string(v) + ")");
  }
  return v;
}

/// An integer byte count or a string with a unit ("64GiB").
Result<uint64_t> get_bytes(const toml::node& n, const std::string& key) {
  if (const auto* i = n.as_integer()) {
    if (i->get() < 0) {
      return key_error(key, n, "must not be negative (got " + std::to_string(i->get()) + ")");
    }
    return static_cast<uint64_t>(i->get());
  }
  if (const auto* s = n.as_string()) {
    auto bytes = parse_bytes(s->get());
    if (!bytes.is_ok()) return key_error(key, n, std::string(bytes.status().message()));
    return *bytes;
  }
  return wrong_type(key, n, "a size (an integer, or a string such as \"64GiB\")");
}

/// A tier size: bytes, "auto" (0) or "off" (disabled).
struct TierSize {
  uint64_t bytes = 0;
  bool enabled = true;
};
Result<TierSize> get_tier_size(const toml::node& n, const std::string& key, bool may_be_off) {
  if (const auto* s = n.as_string()) {
    if (s->get() == "auto") return TierSize{0, true};
    if (s->get() == "off") {
      if (!may_be_off) return key_error(key, n, "cannot be \"off\": the host tier is required");
      return TierSize{0, false};
    }
  }
  auto bytes = get_bytes(n, key);
  if (!bytes.is_ok()) return bytes.status();
  return TierSize{*bytes, true};
}

Result<std::vector<uint32_t>> get_ids(const toml::node& n, const std::string& key) {
  const auto* arr = n.as_array();
  if (arr == nullptr) return wrong_type(key, n, "an array of integers");
  std::vector<uint32_t> ids;
  for (size_t i = 0; i < arr->size(); ++i) {
    auto id = get_uint((*arr)[i], key + "[" + std::to_string(i) + "]", 0,
                       std::numeric_limits<uint32_t>::max());
    if (!id.is_ok()) return id.status();
    ids.push_back(static_cast<uint32_t>(*id));
  }
  return ids;
}

/// Permission bits: an integer (TOML's 0o660) or an octal string ("0660", "660", "0o660").
Result<uint32_t> get_mode(const toml::node& n, const std::string& key) {
  uint64_t mode = 0;
  if (const auto* i = n.as_integer()) {
    if (i->get() < 0) return key_error(key, n, "must not be negative");
    mode = static_cast<uint64_t>(i->get());
  } else if (const auto* s = n.as_string()) {
    std::string_view t = s->get();
    if (t.starts_with("0o")) t.remove_prefix(2);
    auto r = std::from_chars(t.data(), t.data() + t.size(), mode, 8);
    if (t.empty() || r.ec != std::errc() || r.ptr != t.data() + t.size()) {
      return key_error(key, n, "must be octal digits such as \"0660\" (got \"" + s->get() + "\")");
    }
  } else {
    return wrong_type(key, n, "an octal string such as \"0660\" or an integer such as 0o660");
  }
  if (mode > 0777) {
    // The usual slip is `socket_mode = 660`, which TOML reads as decimal 660 = 0o1224.
    return key_error(key, n, "must be at most 0o777; write \"0660\" or 0o660, not decimal 660");
  }
  return static_cast<uint32_t>(mode);
}

// Every table is walked key by key so that an unknown key (a typo) is an error, not ignored.
using KeyHandler = std::function<Status(const toml::node&, const std::string& key)>;
using KeyTable = std::vector<std::pair<std::string_view, KeyHandler>>;

Status walk(const toml::table& table, const std::string& prefix, const KeyTable& handlers) {
  for (auto&& [k, node] : table) {
    const std::string key = prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    auto h = std::find_if(handlers.begin(), handlers.end(),
                          [&](const auto& e) { return e.first == k.str(); });
    if (h == handlers.end()) {
      return invalid_argument("config: unknown key '" + key + "'" + at_line(node));
    }
    KVTIER_RETURN_IF_ERROR(h->second(node, key));
  }
  return Status::ok();
}

template <typename T, typename Field>
Status assign(Result<T> r, Field& field) {
  if (!r.is_ok()) return r.status();
  field = std::move(*r);
  return Status::ok();
}

/// The [layout] keys given, combined only after the whole table is read.
struct LayoutKeys {
  std::optional<uint64_t> layers, kv_heads, head_dim, latent_dim, block_tokens;
  std::optional<Dtype> dtype;
  std::optional<std::string> hf_config;
};

Status parse_layout(const toml::table& t, ServiceConfig& c) {
  LayoutKeys k;
  KVTIER_RETURN_IF_ERROR(walk(t, "layout", {
      {"layers", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxLayers), k.layers); }},
      {"kv_heads", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxKvHeads), k.kv_heads); }},
      {"head_dim", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxHeadDim), k.head_dim); }},
      {"latent_dim", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxHeadDim), k.latent_dim); }},
      {"block_tokens", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxBlockTokens), k.block_tokens); }},
      {"hf_config", [&](auto& n, auto& key) { return assign(get_string(n, key), k.hf_config); }},
      {"dtype", [&](auto& n, auto& key) -> Status {
         auto name = get_string(n, key);
         if (!name.is_ok()) return name.status();
         auto d = parse_dtype(*name);
         if (!d.is_ok()) return key_error(key, n, "names no known dtype: " + std::string(d.status().message()));
         k.dtype = *d;
         return Status::ok();
       }},
  }));

  if (k.hf_config) {
    // Two sources for the model's shape would leave the reader guessing which one won.
    const std::pair<bool, const char*> shape_keys[] = {{k.layers.has_value(), "layers"},
                                                        {k.kv_heads.has_value(), "kv_heads"},
                                                        {k.head_dim.has_value(), "head_dim"},
                                                        {k.latent_dim.has_value(), "latent_dim"}};
    for (auto [given, name] : shape_keys) {
      if (given) {
        return invalid_argument(std::string("config: layout.") + name +
                                " conflicts with layout.hf_config, which gives the model's shape");
      }
    }
    c.hf_config = *k.hf_config;
  }
  if (k.latent_dim && (k.kv_heads || k.head_dim)) {
    return invalid_argument("config: layout.latent_dim (MLA) conflicts with layout.kv_heads/head_dim");
  }
  KvLayout& l = c.layout;
  if (k.latent_dim) {
    l.kind = AttentionKind::kLatent;
    l.num_kv_heads = 1;
    l.head_dim = static_cast<uint32_t>(*k.latent_dim);
  }
  if (k.kv_heads || k.head_dim) l.kind = AttentionKind::kStandard;
  if (k.kv_heads) l.num_kv_heads = static_cast<uint32_t>(*k.kv_heads);
  if (k.head_dim) l.head_dim = static_cast<uint32_t>(*k.head_dim);
  if (k.layers) l.num_layers = static_cast<uint32_t>(*k.layers);
  if (k.block_tokens) l.block_tokens = static_cast<uint32_t>(*k.block_tokens);
  if (k.dtype) {
    l.dtype = *k.dtype;
    c.kv_dtype = *k.dtype;
  }
  if (c.hf_config.empty()) {
    Status s = l.validate();
    if (!s.is_ok()) return invalid_argument("config: [layout]: " + std::string(s.message()));
  }
  return Status::ok();
}

Status parse_tiers(const toml::table& t, ServiceConfig& c) {
  return walk(t, "tiers", {
      {"host_bytes", [&](auto& n, auto& key) -> Status {
         auto s = get_tier_size(n, key, /*may_be_off=*/false);
         if (!s.is_ok()) return s.status();
         c.host_bytes = s->bytes;
         return Status::ok();
       }},
      {"nvme_bytes", [&](auto& n, auto& key) -> Status {
         auto s = get_tier_size(n, key, true);
         if (!s.is_ok()) return s.status();
         c.nvme_bytes = s->bytes;
         c.nvme_enabled = s->enabled;
         return Status::ok();
       }},
      {"hbm_bytes", [&](auto& n, auto& key) -> Status {
         auto s = get_tier_size(n, key, true);
         if (!s.is_ok()) return s.status();
         c.hbm_bytes = s->bytes;
         c.hbm_enabled = s->enabled;
         return Status::ok();
       }},
      {"high_watermark", [&](auto& n, auto& key) { return assign(get_fraction(n, key), c.high_watermark); }},
      {"low_watermark", [&](auto& n, auto& key) { return assign(get_fraction(n, key), c.low_watermark); }},
      {"promote_on_hit", [&](auto& n, auto& key) { return assign(get_bool(n, key), c.promote_on_hit); }},
      {"fdatasync", [&](auto& n, auto& key) { return assign(get_bool(n, key), c.fdatasync); }},
      {"write_policy", [&](auto& n, auto& key) -> Status {
         auto s = get_string(n, key);
         if (!s.is_ok()) return s.status();
         if (*s == "write-back") c.write_policy = WritePolicy::kWriteBack;
         else if (*s == "write-through") c.write_policy = WritePolicy::kWriteThrough;
         else return key_error(key, n, "must be \"write-back\" or \"write-through\" (got \"" + *s + "\")");
         return Status::ok();
       }},
  });
}

Status parse_service(const toml::table& t, ServiceConfig& c) {
  return walk(t, "service", {
      {"max_clients", [&](auto& n, auto& key) -> Status {
         auto v = get_uint(n, key, 1, 1u << 20);
         if (!v.is_ok()) return v.status();
         c.max_clients = static_cast<uint32_t>(*v);
         return Status::ok();
       }},
      {"lease_ms", [&](auto& n, auto& key) { return assign(get_uint(n, key, 1, kMaxLeaseMs), c.lease_ms); }},
      {"max_clients_per_uid", [&](auto& n, auto& key) -> Status {
         auto v = get_uint(n, key, 0, 1u << 20);
         if (!v.is_ok()) return v.status();
         c.max_clients_per_uid = static_cast<uint32_t>(*v);
         return Status::ok();
       }},
      {"hello_timeout_ms",
       [&](auto& n, auto& key) { return assign(get_uint(n, key, 0, kMaxLeaseMs), c.hello_timeout_ms); }},
      {"idle_timeout_ms",
       [&](auto& n, auto& key) { return assign(get_uint(n, key, 0, kMaxLeaseMs), c.idle_timeout_ms); }},
      {"max_inflight_request_bytes",
       [&](auto& n, auto& key) { return assign(get_bytes(n, key), c.max_inflight_request_bytes); }},
      {"client_window_max_bytes", [&](auto& n, auto& key) -> Status {
         auto v = get_bytes(n, key);
         if (!v.is_ok()) return v.status();
         if (*v == 0) return key_error(key, n, "must be greater than 0");
         c.client_window_max_bytes = *v;
         return Status::ok();
       }},
  });
}

Status parse_tenants(const toml::node& n, const std::string& key, ServiceConfig& c) {
  const auto* arr = n.as_array();
  if (arr == nullptr || !arr->is_array_of_tables()) {
    return wrong_type(key, n, "an array of tables: write each as [[tenant]]");
  }
  std::vector<TenantRule> tenants;
  for (size_t i = 0; i < arr->size(); ++i) {
    const std::string prefix = key + "[" + std::to_string(i) + "]";
    TenantRule rule;
    bool named = false;
    KVTIER_RETURN_IF_ERROR(walk(*(*arr)[i].as_table(), prefix, {
        {"name", [&](auto& node, auto& k) { named = true; return assign(get_string(node, k), rule.name); }},
        {"salt", [&](auto& node, auto& k) { return assign(get_string(node, k), rule.salt); }},
        {"uids", [&](auto& node, auto& k) { return assign(get_ids(node, k), rule.uids); }},
        {"gids", [&](auto& node, auto& k) { return assign(get_ids(node, k), rule.gids); }},
        {"everyone", [&](auto& node, auto& k) { return assign(get_bool(node, k), rule.everyone); }},
        {"max_priority", [&](auto& node, auto& k) -> Status {
           auto name = get_string(node, k);
           if (!name) return name.status();
           for (int p = 0; p < kNumPriorities; ++p) {
             if (*name == priority_name(static_cast<Priority>(p))) {
               rule.max_priority = static_cast<Priority>(p);
               return Status::ok();
             }
           }
           return key_error(k, node, "must be one of \"low\", \"normal\", \"high\", \"retained\"");
         }},
        {"max_pinned_blocks", [&](auto& node, auto& k) {
           return assign(get_uint(node, k, 0, uint64_t{1} << 40), rule.max_pinned_blocks);
         }},
        {"tier_share", [&](auto& node, auto& k) { return assign(get_fraction(node, k), rule.tier_share); }},
    }));
    if (!named) return invalid_argument("config: " + prefix + ".name is required" + at_line((*arr)[i]));
    tenants.push_back(std::move(rule));
  }
  c.tenants = std::move(tenants);
  return Status::ok();
}

/// Cross-field checks shared by parsing and resolve().
Status validate_fields(const ServiceConfig& c) {
  if (c.low_watermark > c.high_watermark) {
    return invalid_argument("config: tiers.low_watermark (" + std::to_string(c.low_watermark) +
                            ") must not exceed tiers.high_watermark (" +
                            std::to_string(c.high_watermark) + ")");
  }
  if (!(c.high_watermark > 0 && c.high_watermark <= 1) || !(c.low_watermark > 0 && c.low_watermark <= 1)) {
    return invalid_argument("config: tiers.high_watermark and tiers.low_watermark must be in (0, 1]");
  }
  if (c.data_dir.empty()) return invalid_argument("config: data_dir must not be empty");
  if (c.lease_ms == 0 || c.lease_ms > kMaxLeaseMs) {
    return invalid_argument("config: service.lease_ms must be from 1 to " + std::to_string(kMaxLeaseMs));
  }
  if (c.max_clients_per_uid > c.max_clients) {
    return invalid_argument("config: service.max_clients_per_uid (" + std::to_string(c.max_clients_per_uid) +
                            ") must not exceed service.max_clients (" + std::to_string(c.max_clients) + ")");
  }
  if (c.hello_timeout_ms > kMaxLeaseMs || c.idle_timeout_ms > kMaxLeaseMs) {
    return invalid_argument("config: service.hello_timeout_ms and service.idle_timeout_ms must be at most " +
                            std::to_string(kMaxLeaseMs) + " (24 h)");
  }
  std::set<std::string_view> names;
  for (size_t i = 0; i < c.tenants.size(); ++i) {
    if (!names.insert(c.tenants[i].name).second) {
      return invalid_argument("config: tenant[" + std::to_string(i) + "].name \"" + c.tenants[i].name +
                              "\" is used by another tenant");
    }
  }
  if (c.tenants.size() >= kMaxGroups) {
    return invalid_argument("config: at most " + std::to_string(kMaxGroups - 1) + " [[tenant]] tables, got " +
                            std::to_string(c.tenants.size()));
  }
  // Tenants with one salt share their blocks, so a share of a tier could not tell theirs apart.
  for (size_t i = 0; i < c.tenants.size(); ++i) {
    for (size_t j = 0; j < c.tenants.size(); ++j) {
      if (i != j && c.tenants[i].tier_share < 1.0 && c.tenants[i].salt == c.tenants[j].salt) {
        return invalid_argument("config: tenant[" + std::to_string(i) + "] (\"" + c.tenants[i].name +
                                "\") sets tier_share but shares its salt with tenant \"" + c.tenants[j].name +
                                "\", whose blocks are the same blocks: give it a salt of its own");
      }
    }
  }
  if (!c.metrics_listen.empty()) {
    auto a = parse_listen_address(c.metrics_listen);
    if (!a.is_ok()) return invalid_argument("config: metrics_listen: " + std::string(a.status().message()));
  }
  return Status::ok();
}

// ---- resolve() helpers ----------------------------------------------------------------------

Status os_error(const std::string& what, const std::string& path, int err) {
  return Status(StatusCode::kIoError, what + " " + path + ": " + std::strerror(err));
}

/// mkdir -p: missing components are created with `mode`; existing ones are left as they are.
Status make_dirs(const std::string& path, mode_t mode) {
  std::string prefix;
  size_t pos = 0;
  while (pos <= path.size()) {
    size_t next = path.find('/', pos);
    if (next == std::string::npos) next = path.size();
    prefix = path.substr(0, next);
    pos = next + 1;
    if (prefix.empty()) continue;  // the root of an absolute path
    if (::mkdir(prefix.c_str(), mode) != 0 && errno != EEXIST) return os_error("mkdir", prefix, errno);
  }
  struct stat st{};
  if (::stat(path.c_str(), &st) != 0) return os_error("stat", path, errno);
  if (!S_ISDIR(st.st_mode)) return Status(StatusCode::kIoError, "data_dir " + path + " is not a directory");
  return Status::ok();
}

/// The whole file; kNotFound when it does not exist.
Result<std::string> read_file(const std::string& what, const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return not_found(what + " " + path + " does not exist");
    return os_error("open " + what, path, errno);
  }
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int err = errno;
      ::close(fd);
      return os_error("read " + what, path, err);
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return text;
}

Result<std::string> read_secret_file(const std::string& path) {
  auto text = read_file("secret file", path);
  if (!text.is_ok()) return text.status();
  std::string s = std::move(*text);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ' || s.back() == '\t')) {
    s.pop_back();
  }
  if (s.empty()) return invalid_argument("secret file " + path + " is empty");
  struct stat st{};
  if (::stat(path.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
    spdlog::warn("kvtier: secret file {} is readable by others (mode {:o}); chmod 600 it", path,
                 st.st_mode & 0777);
  }
  return s;
}

/// Writes a fresh secret to a temporary file and link()s it into place, so a concurrent reader
/// sees either no file or the whole secret, and two creators agree on one secret.
Result<std::string> create_secret_file(const std::string& path) {
  uint8_t raw[32];
  size_t got = 0;
  while (got < sizeof(raw)) {
    const ssize_t n = ::getrandom(raw + got, sizeof(raw) - got, 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return os_error("getrandom for", path, errno);
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string secret;
  for (uint8_t b : raw) {
    secret += kHex[b >> 4];
    secret += kHex[b & 15];
  }
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) return os_error("create", tmp, errno);
  const std::string text = secret + "\n";
  const bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) &&
                       ::fsync(fd) == 0;
  const int err = errno;
  ::close(fd);
  if (!written) {
    ::unlink(tmp.c_str());
    return os_error("write", tmp, err);
  }
  const int linked = ::link(tmp.c_str(), path.c_str());
  const int link_err = errno;
  ::unlink(tmp.c_str());
  if (linked != 0) {
    if (link_err == EEXIST) return read_secret_file(path);  // another process won the race
    return os_error("link", path, link_err);
  }
  const std::string dir = path.substr(0, path.rfind('/') == std::string::npos ? 0 : path.rfind('/'));
  const int dfd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {  // make the new name durable; keys must survive a power loss too
    (void)::fsync(dfd);
    ::close(dfd);
  }
  spdlog::info("kvtier: created a new deployment secret in {}", path);
  return secret;
}

Status resolve_secret(ServiceConfig& c) {
  if (!c.secret.empty()) return Status::ok();
  if (!c.secret_file.empty()) {
    auto s = read_secret_file(c.secret_file);
    if (!s.is_ok()) {
      return Status(s.status().code(),
                    "config: secret_file: " + std::string(s.status().message()) +
                        " (kvtierd creates only data_dir/secret, never an explicit secret_file)");
    }
    c.secret = std::move(*s);
    return Status::ok();
  }
  const std::string path = c.data_dir + "/secret";
  auto s = read_secret_file(path);
  if (s.is_ok()) {
    c.secret = std::move(*s);
    return Status::ok();
  }
  if (s.status().code() != StatusCode::kNotFound) return s.status();
  auto created = create_secret_file(path);
  if (!created.is_ok()) return created.status();
  c.secret = std::move(*created);
  return Status::ok();
}

/// MemAvailable from /proc/meminfo in bytes; 0 when unknown.
uint64_t mem_available_bytes() {
  std::ifstream in("/proc/meminfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("MemAvailable:", 0) == 0) {
      uint64_t kb = 0;
      std::istringstream(line.substr(13)) >> kb;
      return kb * 1024;
    }
  }
  return 0;
}

/// Bytes the NVMe tier's slot files already take: counted as available, so an auto size does
/// not shrink on every restart because the previous run's files used the space.
uint64_t existing_slot_bytes(const std::string& nvme_dir) {
  uint64_t total = 0;
  for (int i = 0;; ++i) {
    struct stat st{};
    if (::stat((nvme_dir + "/slots." + std::to_string(i)).c_str(), &st) != 0) break;
    total += static_cast<uint64_t>(st.st_blocks) * 512;
  }
  return total;
}

/// Free bytes of device 0 when a CUDA device is there; nullopt otherwise.
std::optional<uint64_t> gpu_free_bytes() {
  const DeviceProbe& probe = probe_devices();
  if (!probe.has_gpu()) return std::nullopt;
#ifdef KVTIER_WITH_CUDA
  int prev = 0;
  (void)cudaGetDevice(&prev);
  (void)cudaSetDevice(0);  // the HBM arena lives on device 0
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
  (void)cudaSetDevice(prev);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    spdlog::warn("kvtier: cudaMemGetInfo: {}", cudaGetErrorString(err));
    return std::nullopt;
  }
  return free_bytes;
#else
  return std::nullopt;
#endif
}

Status resolve_sizes(ServiceConfig& c) {
  const KvLayout& l = c.layout;
  const uint64_t block_bytes = l.bytes_per_block();
  const uint64_t host_slot = align_up(block_bytes, kIoAlignment);
  const uint64_t nvme_slot = header_bytes_for(l) + align_up(block_bytes, kIoAlignment);

  // Host DRAM.
  if (c.host_bytes == 0) {
    const uint64_t avail = mem_available_bytes();
    if (avail == 0) spdlog::warn("kvtier: MemAvailable unknown; host tier gets the 4-block minimum");
    c.host_bytes = std::max(std::min(avail / 4, kHostAutoCap), 4 * host_slot);
    spdlog::info("kvtier: host tier {} (auto: 25% of {} available, at most {}, at least 4 blocks)",
                 format_bytes(c.host_bytes), format_bytes(avail), format_bytes(kHostAutoCap));
  } else if (c.host_bytes < host_slot) {
    return invalid_argument("config: tiers.host_bytes (" + format_bytes(c.host_bytes) +
                            ") is smaller than one block (" + format_bytes(host_slot) + ")");
  } else {
    spdlog::info("kvtier: host tier {}", format_bytes(c.host_bytes));
  }

  // NVMe.
  if (!c.nvme_enabled) {
    c.nvme_bytes = 0;
    spdlog::info("kvtier: NVMe tier off");
  } else if (c.nvme_bytes == 0) {
    struct statvfs vfs{};
    if (::statvfs(c.data_dir.c_str(), &vfs) != 0) return os_error("statvfs", c.data_dir, errno);
    const uint64_t free_bytes = static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
    const uint64_t usable = free_bytes + existing_slot_bytes(c.data_dir + "/nvme");
    const uint64_t size = std::min(usable / 2, kNvmeAutoCap);
    if (size < nvme_slot) {
      spdlog::warn("kvtier: NVMe tier disabled: {} free in {} holds no {} slot", format_bytes(free_bytes),
                   c.data_dir, format_bytes(nvme_slot));
      c.nvme_enabled = false;
    } else {
      c.nvme_bytes = size;
      spdlog::info("kvtier: NVMe tier {} in {}/nvme (auto: 50% of {} free, at most {})",
                   format_bytes(size), c.data_dir, format_bytes(usable), format_bytes(kNvmeAutoCap));
    }
  } else if (c.nvme_bytes < nvme_slot) {
    return invalid_argument("config: tiers.nvme_bytes (" + format_bytes(c.nvme_bytes) +
                            ") is smaller than one slot (" + format_bytes(nvme_slot) + ")");
  } else {
    spdlog::info("kvtier: NVMe tier {} in {}/nvme", format_bytes(c.nvme_bytes), c.data_dir);
  }

  // HBM.
  if (!c.hbm_enabled) {
    c.hbm_bytes = 0;
    spdlog::info("kvtier: HBM tier off");
  } else if (c.hbm_bytes == 0) {
    const auto free_bytes = gpu_free_bytes();
    if (!free_bytes || *free_bytes / 2 < host_slot) {
      c.hbm_enabled = false;
      spdlog::info("kvtier: HBM tier off (auto: {})",
                   free_bytes ? "too little free device memory" : "no CUDA device");
    } else {
      c.hbm_bytes = *free_bytes / 2;
      spdlog::info("kvtier: HBM tier {} (auto: 50% of {} free on device 0)", format_bytes(c.hbm_bytes),
                   format_bytes(*free_bytes));
    }
  } else {
    if (c.hbm_bytes < host_slot) {
      return invalid_argument("config: tiers.hbm_bytes (" + format_bytes(c.hbm_bytes) +
                              ") is smaller than one block (" + format_bytes(host_slot) + ")");
    }
    if (!probe_devices().has_gpu()) {
      spdlog::warn("kvtier: HBM tier {} without a CUDA device: emulated in host memory",
                   format_bytes(c.hbm_bytes));
    } else {
      spdlog::info("kvtier: HBM tier {}", format_bytes(c.hbm_bytes));
    }
  }
  if (c.write_policy == WritePolicy::kWriteThrough && !c.nvme_enabled) {
    spdlog::warn("kvtier: write-through has no effect without the NVMe tier");
  }
  return Status::ok();
}

}  // namespace

// ---- public functions -----------------------------------------------------------------------

Result<uint64_t> parse_bytes(std::string_view text) {
  const std::string original(text);
  auto bad = [&](const std::string& why) {
    return invalid_argument("size \"" + original + "\" " + why);
  };
  auto trim = [](std::string_view& s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  };
  trim(text);
  if (text.empty()) return bad("is empty");
  if (text.front() == '-') return bad("is negative");
  if (text.front() == '+') text.remove_prefix(1);

  // Digits, an optional fraction, then a unit; kept in integers so "1.5TiB" is exact.
  size_t i = 0;
  unsigned __int128 whole = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    whole = whole * 10 + static_cast<unsigned>(text[i] - '0');
    if (whole > std::numeric_limits<uint64_t>::max()) return bad("is too large");
    ++i;
  }
  const size_t whole_digits = i;
  uint64_t frac = 0, frac_scale = 1;
  size_t frac_digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (frac_digits < 18) {  // beyond 18 digits nothing changes a whole byte count
        frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
        frac_scale *= 10;
      }
      ++frac_digits;
      ++i;
    }
  }
  if (whole_digits == 0 && frac_digits == 0) return bad("does not start with a number");

  std::string_view unit = text.substr(i);
  trim(unit);
  std::string u;
  for (char ch : unit) u += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  static const std::pair<std::string_view, uint64_t> kUnits[] = {
      {"", 1},           {"b", 1},
      {"k", 1ull << 10}, {"kib", 1ull << 10}, {"kb", 1000ull},
      {"m", 1ull << 20}, {"mib", 1ull << 20}, {"mb", 1000ull * 1000},
      {"g", 1ull << 30}, {"gib", 1ull << 30}, {"gb", 1000ull * 1000 * 1000},
      {"t", 1ull << 40}, {"tib", 1ull << 40}, {"tb", 1000ull * 1000 * 1000 * 1000},
      {"p", 1ull << 50}, {"pib", 1ull << 50}, {"pb", 1000ull * 1000 * 1000 * 1000 * 1000},
  };
  const auto* it = std::find_if(std::begin(kUnits), std::end(kUnits),
                                [&](const auto& e) { return e.first == u; });
  if (it == std::end(kUnits)) {
    return bad("has an unknown unit \"" + std::string(unit) +
               "\" (use B, KiB, MiB, GiB, TiB, PiB, or KB, MB, GB, TB, PB)");
  }
  const unsigned __int128 bytes =
      whole * it->second + static_cast<unsigned __int128>(frac) * it->second / frac_scale;
  if (bytes > std::numeric_limits<uint64_t>::max()) return bad("is too large");
  return static_cast<uint64_t>(bytes);
}

std::string format_bytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

Result<ServiceConfig> parse_config_toml(std::string_view text, ServiceConfig base) {
  toml::table root;
  try {
    root = toml::parse(text);
  } catch (const toml::parse_error& e) {
    return invalid_argument("config: line " + std::to_string(e.source().begin.line) + ", column " +
                            std::to_string(e.source().begin.column) + ": " + std::string(e.description()));
  }

  ServiceConfig& c = base;
  auto table_of = [](const toml::node& n, const std::string& key,
                     const std::function<Status(const toml::table&)>& fn) -> Status {
    const auto* t = n.as_table();
    if (t == nullptr) return wrong_type(key, n, "a table: write it as [" + key + "]");
    return fn(*t);
  };
  KVTIER_RETURN_IF_ERROR(walk(root, "", {
      {"data_dir", [&](auto& n, auto& key) { return assign(get_string(n, key), c.data_dir); }},
      {"socket_path", [&](auto& n, auto& key) { return assign(get_string(n, key), c.socket_path); }},
      {"socket_mode", [&](auto& n, auto& key) { return assign(get_mode(n, key), c.socket_mode); }},
      {"allowed_uids", [&](auto& n, auto& key) { return assign(get_ids(n, key), c.allowed_uids); }},
      {"allowed_gids", [&](auto& n, auto& key) { return assign(get_ids(n, key), c.allowed_gids); }},
      {"metrics_listen", [&](auto& n, auto& key) -> Status {
         auto s = get_string(n, key);
         if (!s.is_ok()) return s.status();
         if (!s->empty()) {
           auto a = parse_listen_address(*s);
           if (!a.is_ok()) return key_error(key, n, std::string(a.status().message()));
         }
         c.metrics_listen = std::move(*s);
         return Status::ok();
       }},
      {"secret", [&](auto& n, auto& key) { return assign(get_string(n, key), c.secret); }},
      {"secret_file", [&](auto& n, auto& key) { return assign(get_string(n, key), c.secret_file); }},
      {"layout", [&](auto& n, auto& key) {
         return table_of(n, key, [&](const toml::table& t) { return parse_layout(t, c); });
       }},
      {"tiers", [&](auto& n, auto& key) {
         return table_of(n, key, [&](const toml::table& t) { return parse_tiers(t, c); });
       }},
      {"service", [&](auto& n, auto& key) {
         return table_of(n, key, [&](const toml::table& t) { return parse_service(t, c); });
       }},
      {"tenant", [&](auto& n, auto& key) { return parse_tenants(n, key, c); }},
  }));
  KVTIER_RETURN_IF_ERROR(validate_fields(c));
  return base;
}

Result<ServiceConfig> load_config_file(const std::string& path, ServiceConfig base) {
  auto text = read_file("config file", path);
  if (!text.is_ok()) return text.status();
  auto parsed = parse_config_toml(*text, std::move(base));
  if (!parsed.is_ok()) {
    return Status(parsed.status().code(), path + ": " + std::string(parsed.status().message()));
  }
  return parsed;
}

Status resolve(ServiceConfig& c) {
  KVTIER_RETURN_IF_ERROR(validate_fields(c));
  if (c.socket_path.empty()) c.socket_path = c.data_dir + "/kvtierd.sock";
  if (c.socket_path.size() >= sizeof(sockaddr_un::sun_path)) {
    return invalid_argument("config: socket_path " + c.socket_path + " is longer than the " +
                            std::to_string(sizeof(sockaddr_un::sun_path) - 1) +
                            " bytes a Unix socket path may have");
  }
  KVTIER_RETURN_IF_ERROR(make_dirs(c.data_dir, 0750));
  KVTIER_RETURN_IF_ERROR(resolve_secret(c));

  if (!c.hf_config.empty()) {
    auto l = KvLayout::from_hf_config_file(c.hf_config, c.layout.block_tokens,
                                           c.kv_dtype ? &*c.kv_dtype : nullptr);
    if (!l.is_ok()) {
      return Status(l.status().code(), "config: layout.hf_config " + c.hf_config + ": " +
                                           std::string(l.status().message()));
    }
    c.layout = *l;
  }
  Status layout_ok = c.layout.validate();
  if (!layout_ok.is_ok()) return invalid_argument("config: [layout]: " + std::string(layout_ok.message()));
  spdlog::info("kvtier: layout {}", c.layout.describe());

  KVTIER_RETURN_IF_ERROR(resolve_sizes(c));

  if (c.tenants.empty()) {
    c.tenants.push_back(TenantRule{.name = "", .salt = "", .everyone = true});
  }
  for (const TenantRule& t : c.tenants) {
    if (!t.everyone && t.uids.empty() && t.gids.empty()) {
      spdlog::warn("kvtier: tenant \"{}\" admits nobody (no uids, gids or everyone)", t.name);
    }
  }
  return Status::ok();
}

Result<TierManagerOptions> to_tier_options(const ServiceConfig& c) {
  KVTIER_RETURN_IF_ERROR(validate_fields(c));
  Status layout_ok = c.layout.validate();
  if (!layout_ok.is_ok()) return invalid_argument("config: [layout]: " + std::string(layout_ok.message()));
  if (c.host_bytes == 0) return invalid_argument("config: host_bytes is 0: call resolve() first");

  TierManagerOptions o;
  o.layout = c.layout;
  const TierLimits marks{.capacity_bytes = 0, .high_watermark = c.high_watermark,
                         .low_watermark = c.low_watermark};
  o.host = marks;
  o.host.capacity_bytes = c.host_bytes;
  o.hbm = marks;
  o.hbm.capacity_bytes = c.hbm_enabled ? c.hbm_bytes : 0;
  o.nvme_limits = marks;
  if (c.nvme_enabled && c.nvme_bytes > 0) {
    o.nvme_limits.capacity_bytes = c.nvme_bytes;
    o.nvme.dir = c.data_dir + "/nvme";
    o.nvme.capacity_bytes = c.nvme_bytes;
    o.nvme.files = 1;
    o.nvme.layout = c.layout;
    o.nvme.durability = c.fdatasync ? Durability::kFdatasync : Durability::kNone;
  }
  o.shared_host_arena = false;
  o.write_policy = c.write_policy;
  o.promote_on_hit = c.promote_on_hit;
  o.index.default_lease_ns = c.lease_ms * 1'000'000ull;
  for (const TenantRule& t : c.tenants) o.tenants.push_back({.name = t.name, .tier_share = t.tier_share});
  return o;
}

uint32_t clients_per_uid_limit(const ServiceConfig& c) {
  if (c.max_clients_per_uid != 0) return c.max_clients_per_uid;
  return std::max<uint32_t>(1, c.max_clients / 2);
}

const TenantRule* find_tenant(const ServiceConfig& c, std::string_view name) {
  static const TenantRule kDefault{.name = "", .salt = "", .everyone = true};
  if (c.tenants.empty()) return name.empty() ? &kDefault : nullptr;
  for (const TenantRule& t : c.tenants) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

bool tenant_allows(const TenantRule& rule, uint32_t uid, uint32_t gid) {
  return rule.everyone || std::find(rule.uids.begin(), rule.uids.end(), uid) != rule.uids.end() ||
         std::find(rule.gids.begin(), rule.gids.end(), gid) != rule.gids.end();
}

bool peer_allowed(const ServiceConfig& c, uint32_t uid, uint32_t gid) {
  if (uid == 0) return true;
  if (c.allowed_uids.empty() && c.allowed_gids.empty()) return true;
  return std::find(c.allowed_uids.begin(), c.allowed_uids.end(), uid) != c.allowed_uids.end() ||
         std::find(c.allowed_gids.begin(), c.allowed_gids.end(), gid) != c.allowed_gids.end();
}

std::vector<std::string> tenants_for(const ServiceConfig& c, uint32_t uid, uint32_t gid) {
  if (!peer_allowed(c, uid, gid)) return {};
  if (c.tenants.empty()) return {""};
  std::vector<std::string> names;
  for (const TenantRule& t : c.tenants) {
    if (tenant_allows(t, uid, gid)) names.push_back(t.name);
  }
  return names;
}

}  // namespace kvtier
