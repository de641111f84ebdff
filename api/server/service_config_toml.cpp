// The service config, part 1 of 3: reading kvtierd.toml (toml++) into a ServiceConfig, and the
// cross-field checks every config passes. Part 2 (service_config_resolve.cpp) makes a parsed config
// ready to run; part 3 (tenant_access.cpp) answers who may open which tenant.
#include "api/server/service_config.h"

// toml++ is used as Debian ships it: a shared library built with exceptions (ABI namespace
// toml::v3::ex). Compiling this file with TOML_EXCEPTIONS=0 would ask for the noex symbols the
// library does not export, so toml::parse_error is caught in parse_config_toml, the only call
// that throws, and turned into a Status there.
#include <toml++/toml.h>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

#include "api/metrics/metrics.h"  // parse_listen_address
#include "api/server/service_config_detail.h"

namespace kvtier {

namespace {

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
      {"nvme_admission_min_uses",
       [&](auto& n, auto& key) { return assign(get_uint(n, key, 0, FrequencySketch::kMaxCount), c.nvme_admission_min_uses); }},
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

}  // namespace

namespace config_detail {

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

}  // namespace config_detail

using config_detail::read_file;
using config_detail::validate_fields;

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

}  // namespace kvtier
