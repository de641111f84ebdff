// kvtier inspect and kvtier doctor: what a store holds, and why a prompt's lookup missed. Both
// answer with JSON (the schema is in docs/operations.md), built here once for kvtierd (through the
// wire), the in-process Store and a data dir no daemon holds; the Python tools print it.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "api/store/store.h"
#include "kvtier/status.h"

namespace kvtier {

/// A tenant as the deployment names it, and the salt that goes into its roots. Namespace records
/// name a tenant, never its salt: doctor tries these to rebuild a record's root.
struct TenantSalt {
  std::string name;
  std::string salt;
};

struct DoctorRequest {
  /// The namespace the engine used (the tenant's salt in spec.tenant_salt) and the tenant's name.
  NamespaceSpec spec;
  std::string tenant;
  std::vector<TokenId> tokens;
  std::vector<BlockExtra> extras;
  /// The engine's block (page) size: it must be a multiple of the store's block_tokens. 0: the
  /// store's.
  uint32_t engine_block_tokens = 0;
  /// The fingerprint of the KV layout the engine computes. 0: the store's.
  uint64_t engine_layout_fingerprint = 0;
};

/// How much of the prompt is cached, where the chain breaks and why, and the namespaces that hold
/// more of it. `cause` is one of: all_cached, shorter_than_a_block, block_size, layout, evicted,
/// damaged, other_tenant, other_revision, other_adapter, other_model, other_namespace, never_saved.
/// Looks only (no lease, no recency, no hit counts). kInvalidArgument for a bad spec or extras.
Result<std::string> doctor_json(Store& store, const DoctorRequest& request, std::span<const TenantSalt> tenants);

/// Namespaces (model, tenant, adapter, revision, layout) with their blocks and bytes per tier,
/// hits, priorities and ages; each tier's use; the `top` most reused prefixes.
/// `source` names where it came from ("kvtierd", "store" in-process); `tenants` as doctor_json
/// takes them, to name the tenant of a namespace whose record does not.
std::string inspect_json(Store& store, size_t top, std::string_view source, std::span<const TenantSalt> tenants);

/// The same from a data dir (DATA_DIR/nvme or the NVMe tier directory itself) no kvtierd holds,
/// its catalog opened read-only: NVMe blocks only, and no hit counts (those live in a daemon).
/// kUnavailable when a live kvtierd holds it.
Result<std::string> inspect_data_dir_json(const std::string& dir);

}  // namespace kvtier
