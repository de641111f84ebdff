// The service config, part 3 of 3: tenant access — which tenants a peer's uid and gid may open,
// and whether it may connect at all. Parts 1 and 2: service_config_toml.cpp, service_config_resolve.cpp.
#include "api/server/service_config.h"

#include <algorithm>

namespace kvtier {

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
