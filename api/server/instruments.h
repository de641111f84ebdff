// kvtierd's own metrics (Server::Instruments): per op, per tenant and per connection, registered
// once with the server's metrics registry. Internal to kvtier_server.
#pragma once

#include <vector>

#include "api/metrics/metrics.h"
#include "api/server/server.h"
#include "api/wire/protocol.h"

namespace kvtier {

struct Server::Instruments {
  struct PerOp {
    Counter* requests = nullptr;
    Counter* errors = nullptr;
    Histogram* seconds = nullptr;
  };
  PerOp ops[proto::kLastOp + 1];
  Counter* tokens_restored = nullptr;
  Counter* bytes_loaded = nullptr;
  Counter* bytes_saved = nullptr;
  Counter* blocks_from_nvme = nullptr;
  Counter* lookup_hit_tokens = nullptr;
  Counter* lookup_tokens = nullptr;
  Counter* clients_total = nullptr;
  Counter* clients_refused = nullptr;
  Counter* protocol_errors = nullptr;
  Counter* hello_timeouts = nullptr;
  Counter* idle_timeouts = nullptr;
  Counter* requests_over_budget = nullptr;
  Gauge* clients_connected = nullptr;
  Histogram* load_seconds_per_block = nullptr;
  // Per tenant, in config order: how much of its prompts its clients found cached, and saved.
  struct PerTenant {
    Counter* lookup_tokens = nullptr;
    Counter* hit_tokens = nullptr;
    Counter* save_bytes = nullptr;
    Counter* restored_tokens = nullptr;
  };
  std::vector<PerTenant> tenants;
  const TenantRule* first_tenant = nullptr;

  /// The counters of a tenant of the config; null for any other rule.
  PerTenant* of(const TenantRule* rule) {
    const std::less<const TenantRule*> before;  // a total order, also for find_tenant's static rule
    if (rule == nullptr || tenants.empty() || before(rule, first_tenant) ||
        !before(rule, first_tenant + tenants.size())) {
      return nullptr;
    }
    return &tenants[static_cast<size_t>(rule - first_tenant)];
  }

  Instruments(MetricsRegistry& r, const std::vector<TenantRule>& rules);
};

}  // namespace kvtier
