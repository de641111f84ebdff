#include "api/server/instruments.h"

#include <string>

namespace kvtier {

Server::Instruments::Instruments(MetricsRegistry& r, const std::vector<TenantRule>& rules) {
  first_tenant = rules.data();
  for (const TenantRule& rule : rules) {
    const MetricLabels labels{{"tenant", rule.name}};
    tenants.push_back({
        .lookup_tokens = &r.counter("kvtierd_tenant_lookup_tokens_total",
                                    "Tokens the tenant's clients asked about by lookups.", labels),
        .hit_tokens = &r.counter("kvtierd_tenant_hit_tokens_total",
                                 "Tokens the tenant's lookups found cached.", labels),
        .save_bytes = &r.counter("kvtierd_tenant_save_bytes_total", "KV bytes the tenant's clients saved.", labels),
        .restored_tokens = &r.counter("kvtierd_tenant_tokens_restored_total",
                                      "Tokens whose KV the tenant's clients restored instead of recomputing.", labels),
    });
  }
  for (const proto::OpInfo& info : proto::kOps) {
    if (!info.answered) continue;  // a doorbell is no request of its own
    const std::string name(info.name);
    PerOp& p = ops[static_cast<int>(info.op)];
    p.requests = &r.counter("kvtierd_requests_total", "Requests answered, per operation.", {{"op", name}});
    p.errors = &r.counter("kvtierd_request_errors_total", "Requests answered with an error, per operation.", {{"op", name}});
    p.seconds = &r.histogram("kvtierd_request_seconds", "Time to answer a request, per operation.",
                             default_latency_buckets(), {{"op", name}});
  }
  tokens_restored = &r.counter("kvtierd_tokens_restored_total", "Tokens whose KV was restored instead of recomputed.");
  bytes_loaded = &r.counter("kvtierd_load_bytes_total", "KV bytes copied into client windows.");
  bytes_saved = &r.counter("kvtierd_save_bytes_total", "KV bytes saved from client windows.");
  blocks_from_nvme = &r.counter("kvtierd_load_nvme_blocks_total", "Loaded blocks that were restored from NVMe.");
  lookup_hit_tokens = &r.counter("kvtierd_lookup_hit_tokens_total", "Tokens found cached by client lookups.");
  lookup_tokens = &r.counter("kvtierd_lookup_tokens_total", "Tokens asked about by client lookups.");
  clients_total = &r.counter("kvtierd_clients_total", "Client connections accepted.");
  clients_refused = &r.counter("kvtierd_clients_refused_total", "Connections refused (credentials or client limit).");
  protocol_errors = &r.counter("kvtierd_protocol_errors_total", "Connections closed for malformed input.");
  hello_timeouts = &r.counter("kvtierd_connections_timed_out_total",
                              "Connections closed at a deadline, per reason.", {{"reason", "hello"}});
  idle_timeouts = &r.counter("kvtierd_connections_timed_out_total",
                             "Connections closed at a deadline, per reason.", {{"reason", "idle"}});
  requests_over_budget = &r.counter("kvtierd_requests_over_budget_total",
                                    "Request frames refused because max_inflight_request_bytes was held.");
  clients_connected = &r.gauge("kvtierd_clients_connected", "Client connections now open.");
  load_seconds_per_block = &r.histogram("kvtierd_load_block_seconds", "Load time divided by blocks loaded.",
                                        default_latency_buckets());
}

}  // namespace kvtier
