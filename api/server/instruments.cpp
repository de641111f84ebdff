#include "api/server/instruments.h"

#include <string>
#include <string_view>

namespace kvtier {

using proto::Op;

namespace {

std::string_view op_name(uint16_t op) {
  switch (static_cast<Op>(op)) {
    case Op::kHello: return "hello";
    case Op::kOpenNamespace: return "open_namespace";
    case Op::kLookup: return "lookup";
    case Op::kLoad: return "load";
    case Op::kRelease: return "release";
    case Op::kSave: return "save";
    case Op::kPrefetch: return "prefetch";
    case Op::kPin: return "pin";
    case Op::kUnpin: return "unpin";
    case Op::kStats: return "stats";
    case Op::kDoorbell: return "doorbell";
    case Op::kRegisterMemory: return "register_memory";
    case Op::kUnregisterMemory: return "unregister_memory";
    case Op::kLoadTo: return "load_to";
    case Op::kSaveFrom: return "save_from";
  }
  return "unknown";
}

constexpr Op kAllOps[] = {Op::kHello, Op::kOpenNamespace, Op::kLookup, Op::kLoad, Op::kRelease,
                          Op::kSave, Op::kPrefetch, Op::kPin, Op::kUnpin, Op::kStats,
                          Op::kRegisterMemory, Op::kUnregisterMemory, Op::kLoadTo, Op::kSaveFrom};

}  // namespace

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
  for (Op op : kAllOps) {
    const std::string name(op_name(static_cast<uint16_t>(op)));
    PerOp& p = ops[static_cast<int>(op)];
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
