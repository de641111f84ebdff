// kvtier doctor and kvtier inspect (api/store/doctor.h).
#include "api/store/doctor.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "api/store/restore_planner.h"
#include "tiers/catalog.h"
#include "tiers/slot_files.h"

namespace kvtier {

namespace {

using json = nlohmann::ordered_json;

uint64_t now_wall_ns() {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch())
          .count());
}

/// Seconds from wall-clock `then` to `now` (0 for a `then` after it).
double seconds_since(uint64_t now, uint64_t then) { return static_cast<double>(now - std::min(now, then)) / 1e9; }

json tier_list(uint8_t mask) {
  json out = json::array();
  for (int t = 0; t < kNumTiers; ++t) {
    if (mask & tier_bit(static_cast<Tier>(t))) out.push_back(std::string(tier_name(static_cast<Tier>(t))));
  }
  return out;
}

json per_tier(const std::array<uint64_t, kNumTiers>& v) {
  json out = json::object();
  for (int t = 0; t < kNumTiers; ++t) out[std::string(tier_name(static_cast<Tier>(t)))] = v[t];
  return out;
}

json per_priority(const std::array<uint64_t, kNumPriorities>& v) {
  json out = json::object();
  for (int p = 0; p < kNumPriorities; ++p) {
    if (v[p]) out[std::string(priority_name(static_cast<Priority>(p)))] = v[p];
  }
  return out;
}

/// A namespace doctor can key a prompt under: its spec (salt included) and its tenant's name.
struct Candidate {
  NamespaceSpec spec;
  std::string tenant;
  BlockKey root;
};

json namespace_json(const NamespaceSpec& spec, const std::string& tenant) {
  return {{"model", spec.model_id}, {"tenant", tenant}, {"adapter", spec.adapter_id}, {"revision", spec.revision}};
}

/// A namespace record as inspect shows it.
json record_json(const BlockKey& root, const NamespaceRecord& r) {
  return {{"root", root.to_hex()}, {"model", r.model_id}, {"tenant", r.tenant}, {"adapter", r.adapter_id},
          {"revision", r.revision}, {"layout", r.layout.describe()}};
}

/// The parts of a namespace's name in which `c` differs from `spec` opened as `tenant`.
std::vector<std::string> differing_fields(const Candidate& c, const NamespaceSpec& spec, const std::string& tenant) {
  std::vector<std::string> out;
  if (c.tenant != tenant || c.spec.tenant_salt != spec.tenant_salt) out.push_back("tenant");
  if (c.spec.revision != spec.revision) out.push_back("revision");
  if (c.spec.adapter_id != spec.adapter_id) out.push_back("adapter");
  if (c.spec.model_id != spec.model_id) out.push_back("model");
  return out;
}

/// Every namespace the store knows and can rebuild a root for: those opened in this run, and the
/// records (earlier runs too) whose root one of `tenants`' salts reproduces.
std::vector<Candidate> known_namespaces(Store& store, std::span<const TenantSalt> tenants) {
  std::vector<Candidate> out;
  std::unordered_set<BlockKey> seen;
  auto add = [&](const NamespaceSpec& spec, const std::string& tenant) {
    auto ns = store.keys().make_namespace(spec);
    if (ns && seen.insert(ns->root).second) out.push_back({spec, tenant, ns->root});
  };
  for (const Store::OpenedNamespace& o : store.opened_namespaces()) add(o.spec, o.tenant);
  for (const NamespaceRecord& r : store.tiers().namespace_records()) {
    if (seen.contains(r.root) || r.layout != store.layout()) continue;
    // A record names its tenant; in-process a tenant is its own salt, and "" the shared one.
    std::vector<TenantSalt> tries(tenants.begin(), tenants.end());
    tries.push_back({r.tenant, r.tenant});
    tries.push_back({"", ""});
    for (const TenantSalt& t : tries) {
      if (!r.tenant.empty() && t.name != r.tenant) continue;
      NamespaceSpec spec{r.model_id, r.layout, t.salt, r.adapter_id, r.revision};
      auto ns = store.keys().make_namespace(spec);
      if (ns && ns->root == r.root) {
        add(spec, t.name);
        break;
      }
    }
  }
  return out;
}

/// The prompt's cached prefix under `root`, in blocks: the chain of its keys walked while the
/// index holds them (a look: no lease, no recency, no hit count).
size_t cached_prefix(Store& store, const BlockKey& root, std::span<const TokenId> tokens,
                     std::span<const BlockExtra> extras, std::vector<BlockKey>& keys) {
  Namespace ns{root, store.layout()};
  if (!store.keys().chain(ns, tokens, extras, keys)) return 0;
  size_t n = 0;
  while (n < keys.size() && store.tiers().index().get(keys[n])) ++n;
  return n;
}

}  // namespace

Result<std::string> doctor_json(Store& store, const DoctorRequest& req, std::span<const TenantSalt> tenants) {
  const KvLayout& layout = store.layout();
  const uint32_t bt = layout.block_tokens;
  const size_t full = req.tokens.size() / bt, tail = req.tokens.size() % bt;
  NamespaceSpec spec = req.spec;
  spec.layout = layout;
  auto ns = store.keys().make_namespace(spec);
  if (!ns) return ns.status();
  KVTIER_RETURN_IF_ERROR(KeyChain::check_extras(req.extras, full));

  json out;
  out["namespace"] = namespace_json(spec, req.tenant);
  out["namespace"]["root"] = ns->root.to_hex();
  out["tokens"] = req.tokens.size();
  out["block_tokens"] = bt;
  out["full_blocks"] = full;
  out["tail_tokens"] = tail;

  const std::vector<Candidate> known = known_namespaces(store, tenants);
  const bool known_ns = std::any_of(known.begin(), known.end(), [&](const Candidate& c) { return c.root == ns->root; });
  out["namespace"]["known"] = known_ns;

  std::vector<BlockKey> keys;
  const size_t hit = cached_prefix(store, ns->root, req.tokens, req.extras, keys);
  std::array<uint64_t, kNumTiers> by_tier{};
  for (size_t i = 0; i < hit; ++i) {
    if (auto r = store.tiers().index().get(keys[i])) ++by_tier[static_cast<int>(fastest_tier(*r))];
  }
  out["hit_blocks"] = hit;
  out["hit_tokens"] = hit * bt;
  out["hit_blocks_by_fastest_tier"] = per_tier(by_tier);

  std::string cause, why;
  json evicted = nullptr;
  json alternatives = json::array();
  size_t would_hit = hit;
  const std::string of_block = "block " + std::to_string(hit) + " (tokens " + std::to_string(hit * bt) + ".." +
                               std::to_string((hit + 1) * bt - 1) + ")";
  if (req.engine_layout_fingerprint != 0 && req.engine_layout_fingerprint != layout.fingerprint()) {
    cause = "layout";
    why = "the engine's KV layout (fingerprint " + std::to_string(req.engine_layout_fingerprint) +
          ") is not kvtierd's (" + layout.describe() + ", fingerprint " + std::to_string(layout.fingerprint()) +
          "): blocks of one layout never match another's (dtype, heads, head size, layers and block size all count)";
  } else if (req.engine_block_tokens != 0 && req.engine_block_tokens % bt != 0) {
    cause = "block_size";
    why = "the engine's blocks are " + std::to_string(req.engine_block_tokens) + " tokens and kvtierd's " +
          std::to_string(bt) + ": an engine page must be a multiple of kvtierd's block_tokens";
  } else if (full == 0) {
    cause = "shorter_than_a_block";
    why = "the prompt has " + std::to_string(req.tokens.size()) + " tokens, less than one block of " +
          std::to_string(bt) + ": only full blocks are cached";
  } else if (hit == full) {
    cause = "all_cached";
    why = "every full block is cached";
    if (tail) why += "; the last " + std::to_string(tail) + " tokens are a partial block, which is never cached";
  } else if (auto r = store.tiers().index().get(keys[hit]); r && r->damaged) {
    cause = "damaged";
    why = of_block + " failed its checksum on NVMe and waits to be saved again";
  } else if (auto e = store.tiers().evicted(keys[hit])) {
    cause = "evicted";
    const double ago = seconds_since(now_wall_ns(), e->wall_ns);
    evicted = {{"tier", std::string(tier_name(e->tier))}, {"seconds_ago", ago}};
    why = of_block + " was evicted " + std::to_string(static_cast<uint64_t>(ago)) + " s ago from the " +
          std::string(tier_name(e->tier)) + " tier, its last copy" +
          (e->tier == Tier::kNvme ? "" : " (it was never written to NVMe: see nvme_admission_min_uses)");
  }
  if (cause.empty() || cause == "all_cached") {
    // Other namespaces that hold more of this prompt: the engine asked with another tenant,
    // revision, adapter or model than the blocks were saved with.
    std::vector<BlockKey> other_keys;
    const Candidate* best = nullptr;
    size_t best_hit = hit;
    for (const Candidate& c : known) {
      if (c.root == ns->root) continue;
      const size_t h = cached_prefix(store, c.root, req.tokens, req.extras, other_keys);
      if (h == 0) continue;
      json a = namespace_json(c.spec, c.tenant);
      a["hit_blocks"] = h;
      a["differs"] = differing_fields(c, spec, req.tenant);
      alternatives.push_back(a);
      if (h > best_hit) {
        best_hit = h;
        best = &c;
      }
    }
    if (cause.empty() && best != nullptr) {
      would_hit = best_hit;
      const std::vector<std::string> fields = differing_fields(*best, spec, req.tenant);
      cause = fields.size() == 1 ? "other_" + fields[0] : "other_namespace";
      std::string list;
      for (const auto& f : fields) list += (list.empty() ? "" : ", ") + f;
      auto quoted = [](const std::string& s) { return "'" + s + "'"; };
      why = std::to_string(best_hit) + " blocks of this prompt are cached under another " + list + " (model " +
            quoted(best->spec.model_id) + ", tenant " + quoted(best->tenant) + ", adapter " +
            quoted(best->spec.adapter_id) + ", revision " + quoted(best->spec.revision) +
            "), which this namespace never shares: keys include all four";
    }
  }
  if (cause.empty()) {
    cause = "never_saved";
    why = of_block + " is not cached in this namespace or any other kvtierd knows";
    if (!known_ns) why += "; kvtierd has never opened this namespace (check model id, tenant, adapter and revision)";
    if (hit > 0) why += "; the prompt diverges from what was saved there, or was saved only up to block " + std::to_string(hit);
    why += " (or it was evicted so long ago that kvtierd's eviction log has forgotten it)";
  }
  out["cause"] = cause;
  out["explanation"] = why;
  out["break_block"] = hit < full ? json(hit) : json(nullptr);
  out["evicted"] = evicted;
  out["alternatives"] = alternatives;
  out["would_hit_blocks"] = would_hit;
  return out.dump();
}

std::string inspect_json(Store& store, size_t top, std::string_view source, std::span<const TenantSalt> tenants) {
  TierManager& tm = store.tiers();
  const IndexSummary summary = tm.index().summarize(top);
  const TierManagerStats stats = tm.stats();
  const uint64_t bpb = store.layout().bytes_per_block();
  json out;
  out["source"] = source;
  out["layout"] = store.layout().describe();
  out["block_bytes"] = bpb;
  json tiers = json::array();
  for (int t = 0; t < kNumTiers; ++t) {
    const Tier tier = static_cast<Tier>(t);
    if (!tm.has_tier(tier)) continue;
    const TierCounters& c = stats.tiers[t];
    tiers.push_back({{"tier", std::string(tier_name(tier))},
                     {"capacity_blocks", c.capacity_slots},
                     {"used_blocks", c.used_slots},
                     {"capacity_bytes", c.capacity_slots * bpb},
                     {"used_bytes", c.used_slots * bpb}});
  }
  out["tiers"] = tiers;

  // NVMe ages per root, from the catalog's copies of the entries.
  struct Ages {
    uint64_t oldest = UINT64_MAX, newest = 0;
  };
  std::vector<CatalogEntry> nvme_entries;
  tm.for_each_nvme_block([&](const CatalogEntry& e) { nvme_entries.push_back(e); });
  std::unordered_map<BlockKey, Ages> ages;
  const auto nvme_roots = chain_roots(nvme_entries);
  for (const CatalogEntry& e : nvme_entries) {
    auto root = nvme_roots.find(e.key);
    if (root == nvme_roots.end()) continue;
    Ages& a = ages[root->second];
    a.oldest = std::min(a.oldest, e.created_ns);
    a.newest = std::max(a.newest, e.created_ns);
  }
  std::unordered_map<BlockKey, NamespaceRecord> records;
  for (const NamespaceRecord& r : tm.namespace_records()) records.emplace(r.root, r);
  std::unordered_map<BlockKey, const Candidate*> known;  // root → how it is opened (its tenant's name)
  const std::vector<Candidate> candidates = known_namespaces(store, tenants);
  for (const Candidate& c : candidates) known.emplace(c.root, &c);
  const uint64_t now = now_wall_ns();
  json namespaces = json::array();
  std::unordered_set<BlockKey> listed;
  auto describe = [&](const BlockKey& root) {
    auto k = known.find(root);
    if (auto it = records.find(root); it != records.end()) {
      json n = record_json(root, it->second);
      // A record names tenants with shares only; the root rebuilt from a tenant's salt names the others.
      if (it->second.tenant.empty() && k != known.end()) n["tenant"] = k->second->tenant;
      return n;
    }
    if (k != known.end()) return json{{"root", root.to_hex()}, {"model", k->second->spec.model_id},
                                      {"tenant", k->second->tenant}};
    return json{{"root", root.to_hex()}, {"model", nullptr}};  // no record: a restart drops these blocks
  };
  for (const RootSummary& r : summary.roots) {
    json n = describe(r.root);
    n["blocks"] = r.blocks;
    n["bytes"] = r.bytes;
    n["resident_blocks"] = per_tier(r.resident);
    n["hits"] = r.hits;
    n["by_priority"] = per_priority(r.by_priority);
    n["longest_blocks"] = r.longest_blocks;
    if (auto a = ages.find(r.root); a != ages.end()) {
      n["nvme_oldest_seconds"] = seconds_since(now, a->second.oldest);
      n["nvme_newest_seconds"] = seconds_since(now, a->second.newest);
    }
    listed.insert(r.root);
    namespaces.push_back(n);
  }
  for (const auto& [root, rec] : records) {  // known namespaces with nothing cached now
    if (listed.contains(root)) continue;
    json n = describe(root);
    n["blocks"] = 0;
    n["bytes"] = 0;
    namespaces.push_back(n);
  }
  out["namespaces"] = namespaces;
  json reused = json::array();
  for (const ReusedPrefix& p : summary.most_reused) {
    json j = describe(p.root);
    reused.push_back({{"model", j["model"]},
                      {"tenant", j.value("tenant", "")},
                      {"key", p.key.to_hex()},
                      {"blocks", p.blocks},
                      {"tokens", p.blocks * store.layout().block_tokens},
                      {"hits", p.hits},
                      {"tokens_restored", p.hits * p.blocks * store.layout().block_tokens},
                      {"tiers", tier_list(p.tier_mask)},
                      {"last_tokens", p.last_tokens}});
  }
  out["most_reused"] = reused;
  return out.dump();
}

Result<std::string> inspect_data_dir_json(const std::string& path) {
  auto tier = open_offline_catalog(path, /*writable=*/false);
  if (!tier) return tier.status();
  const auto& catalog = tier->catalog;
  std::map<BlockKey, NamespaceRecord> records;
  KVTIER_RETURN_IF_ERROR(catalog->for_each_namespace([&](const NamespaceRecord& r) { records.emplace(r.root, r); }));
  struct Sum {
    uint64_t blocks = 0, bytes = 0, oldest = UINT64_MAX, newest = 0;
    uint32_t longest = 0;
    std::array<uint64_t, kNumPriorities> by_priority{};
  };
  std::vector<CatalogEntry> entries;
  std::vector<BlockKey> bad;
  KVTIER_RETURN_IF_ERROR(catalog->for_each([&](const CatalogEntry& e) { entries.push_back(e); }, &bad));
  const auto root_of = chain_roots(entries);
  std::map<BlockKey, Sum> sums;  // BlockKey{} gathers the blocks whose chain is broken
  for (const CatalogEntry& e : entries) {
    auto it = root_of.find(e.key);
    Sum& s = sums[it == root_of.end() ? BlockKey{} : it->second];
    ++s.blocks;
    s.bytes += e.payload_bytes;
    s.oldest = std::min(s.oldest, e.created_ns);
    s.newest = std::max(s.newest, e.created_ns);
    s.longest = std::max(s.longest, e.block_index + 1);
    ++s.by_priority[static_cast<int>(e.priority)];
  }
  const uint64_t now = now_wall_ns();
  json out;
  out["source"] = "data_dir";
  out["dir"] = tier->dir;
  auto layout = catalog->get_meta("layout");
  out["layout"] = layout ? *layout : std::string();
  uint64_t blocks = 0, bytes = 0;
  json namespaces = json::array();
  for (const auto& [root, s] : sums) {
    auto it = records.find(root);
    // No record, or (root zero) blocks whose parent is gone: fsck names them.
    json n = it != records.end() ? record_json(root, it->second) : json{{"root", root.to_hex()}, {"model", nullptr}};
    n["blocks"] = s.blocks;
    n["bytes"] = s.bytes;
    n["resident_blocks"] = {{"nvme", s.blocks}};
    n["by_priority"] = per_priority(s.by_priority);
    n["longest_blocks"] = s.longest;
    n["nvme_oldest_seconds"] = seconds_since(now, s.oldest);
    n["nvme_newest_seconds"] = seconds_since(now, s.newest);
    blocks += s.blocks;
    bytes += s.bytes;
    namespaces.push_back(n);
  }
  for (const auto& [root, r] : records) {
    if (sums.contains(root)) continue;
    json n = record_json(root, r);
    n["blocks"] = 0;
    n["bytes"] = 0;
    namespaces.push_back(n);
  }
  out["tiers"] = json::array({{{"tier", "nvme"}, {"used_blocks", blocks}, {"used_bytes", bytes}}});
  out["namespaces"] = namespaces;
  out["most_reused"] = json::array();  // hit counts live in a running kvtierd only
  out["undecodable_entries"] = bad.size();
  return out.dump();
}

}  // namespace kvtier
