// ServiceConfig: what kvtierd reads from kvtierd.toml (docs/service.md "Configuration"), how the
// automatic sizes and the deployment secret are resolved, and who may use which tenant.
//
// Life of a config: parse_config_toml / load_config_file (pure: no I/O besides reading the file)
// → resolve() (creates data_dir and the secret, measures memory and disk, reads hf_config)
// → to_tier_options() for TierManager::open. Every error is a Status naming the offending key.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "api/store/tier_manager.h"
#include "api/vocab/byte_size.h"  // parse_bytes, format_bytes: sizes in the config
#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

namespace kvtier {

/// Which peers may open namespaces under one tenant salt.
struct TenantRule {
  std::string name;             // unique; clients ask for a tenant by this name
  std::string salt;             // folded into every root key: different salts never share blocks
  std::vector<uint32_t> uids;   // peers whose uid is listed are allowed
  std::vector<uint32_t> gids;   // peers whose primary gid (SO_PEERCRED) is listed are allowed
  bool everyone = false;        // any peer that passed peer_allowed()
  /// Quotas, so one tenant cannot push every other tenant's blocks out:
  /// the highest priority class its saves and pins may take (a request above it is refused) ...
  Priority max_priority = Priority::kRetained;
  /// ... and the most pinned blocks all its clients may hold at once (0: no limit) ...
  uint64_t max_pinned_blocks = 0;
  /// ... and its share of every tier, in (0, 1] (default 1: no share): while the tenant holds
  /// more than this fraction of a tier's slots, its blocks are evicted before anyone else's
  /// (TenantShare). A tenant sharing its salt with another cannot set one.
  double tier_share = 1.0;
};

struct ServiceConfig {
  /// NVMe slot files (data_dir/nvme), the catalog, the persisted secret. Default /var/lib/kvtier.
  std::string data_dir = "/var/lib/kvtier";
  /// Unix socket clients connect to. Default "" → data_dir + "/kvtierd.sock".
  std::string socket_path;
  /// Permission bits of the socket file (default 0660): with allowed_* the first gate.
  uint32_t socket_mode = 0660;
  /// Both empty (default) → any peer that can open the socket; else the peer's uid is in
  /// allowed_uids or its gid in allowed_gids. uid 0 is always allowed.
  std::vector<uint32_t> allowed_uids, allowed_gids;
  /// "host:port" of the Prometheus endpoint (default "127.0.0.1:9477"); "" disables it; port 0
  /// picks a free port.
  std::string metrics_listen = "127.0.0.1:9477";
  /// Deployment secret the block keys derive from. Default "" → read secret_file (or
  /// data_dir/secret), creating data_dir/secret (32 random bytes, hex, mode 0600) when missing,
  /// so keys stay stable across restarts.
  std::string secret;
  /// Explicit secret file (default ""). Unlike data_dir/secret it must exist: a shared secret
  /// that went missing must not be silently replaced by a fresh one.
  std::string secret_file;
  /// KV layout of every namespace (default Llama-3.1-8B: 32 layers, 8 kv heads, head dim 128,
  /// bf16, 16 tokens per block).
  KvLayout layout{AttentionKind::kStandard, 32, 8, 128, Dtype::kBf16, 16};
  /// Hugging Face config.json (default ""): resolve() takes layers, heads and head dim (or MLA
  /// latent width) and dtype from it; layout.block_tokens and kv_dtype still apply.
  std::string hf_config;
  /// Element type stored in the tiers when it differs from hf_config's dtype (e.g. fp8 KV on a
  /// bf16 model). Set by [layout] dtype; default none (the model's dtype).
  std::optional<Dtype> kv_dtype;

  /// Host DRAM tier bytes. 0 (default) = auto: 25% of MemAvailable, at most 64 GiB, at least 4
  /// blocks.
  uint64_t host_bytes = 0;
  /// NVMe tier bytes. 0 (default) = auto: 50% of the free space of data_dir's file system, at
  /// most 1 TiB; no free space → NVMe disabled with a warning.
  uint64_t nvme_bytes = 0;
  /// HBM tier bytes. 0 (default) = auto: 50% of device 0's free memory with a CUDA device, else
  /// disabled. Set without a GPU, an emulated arena in host memory stands in.
  uint64_t hbm_bytes = 0;
  /// false: the tier is off whatever its size ("off" in the file). resolve() clears them when
  /// auto-sizing finds nothing, so resolving twice gives the same result. Default true.
  bool nvme_enabled = true;
  bool hbm_enabled = true;
  /// Watermarks of every tier, 0 < low <= high <= 1 (defaults 0.95 / 0.85).
  double high_watermark = 0.95, low_watermark = 0.85;
  /// Default kWriteBack.
  WritePolicy write_policy = WritePolicy::kWriteBack;
  /// Copy NVMe-only blocks up to host on a hit (default true).
  bool promote_on_hit = true;
  /// NVMe admission (TierManagerOptions::nvme_admission_min_uses): uses a block needs lately
  /// before its demotion from host writes it to NVMe; 0 or 1 admits every block (default 2).
  uint32_t nvme_admission_min_uses = 2;
  /// fdatasync NVMe slot files before committing a block (Durability::kFdatasync, default true);
  /// false survives a process crash but not power loss.
  bool fdatasync = true;
  /// Connected clients at most (default 256).
  uint32_t max_clients = 256;
  /// Connected clients of one uid at most, so one uid opening connections in a loop cannot take
  /// every slot. 0 (default) = auto: half of max_clients (at least 1), which leaves the other
  /// half to everyone else and is still far more than one machine's engine processes need. uid 0
  /// is never limited by it, only by max_clients: root can stop the daemon anyway, and a
  /// deployment whose engines all run as root keeps every slot. A deployment that runs every
  /// engine under one other uid and wants all slots for it sets this to max_clients. At most
  /// max_clients.
  uint32_t max_clients_per_uid = 0;
  /// A connection that has not completed its hello this long after it was accepted is closed
  /// (answered with kUnavailable first), so connections that never speak cannot hold slots.
  /// Default 5000 ms; 0 = no deadline; at most 24 h.
  uint64_t hello_timeout_ms = 5000;
  /// A connection that holds no lease, no pin and no registered memory and sends no request for
  /// this long is closed (without an answer: its next request fails with kUnavailable).
  /// Registered memory exempts it because an engine that registered its KV cache is long-lived
  /// and re-registering costs it a reconnect. Default 0 = off: the thin client does not
  /// reconnect, so an engine idle between batches would see its next call fail. The per-uid
  /// limit is what bounds idle connections by default. At most 24 h.
  uint64_t idle_timeout_ms = 0;
  /// Request bytes held at once over all connections, in frames partly received or being
  /// handled, beyond each frame's first 64 KiB (RequestBudget, socket_io.h). A frame that cannot
  /// get its bytes is answered kResourceExhausted and its connection closed. Only bytes that
  /// arrived count, never the size a header announces. Default 256 MiB (32 frames of the largest
  /// size, kMaxPayload 8 MiB); 0 admits only frames of at most 64 KiB.
  uint64_t max_inflight_request_bytes = 256ull << 20;
  /// Lifetime of a lookup lease a client did not release (default 30000 ms, at most 24 h).
  uint64_t lease_ms = 30000;
  /// Largest shared-memory window a client may hand over (default 4 GiB).
  uint64_t client_window_max_bytes = 4ull << 30;
  /// Tenants (default empty → one tenant "" with salt "" for everyone; resolve() adds it).
  std::vector<TenantRule> tenants;
};

/// Parses kvtierd.toml text over `base`: keys present replace base's fields, others keep them.
/// kInvalidArgument, naming the key, for syntax errors, unknown keys, wrong types, negative or
/// malformed sizes, watermarks outside (0, 1] or low > high, and duplicate tenant names.
/// toml++ throws toml::parse_error; that exception is caught here and nowhere else escapes.
Result<ServiceConfig> parse_config_toml(std::string_view text, ServiceConfig base = {});
/// Reads and parses a file. kNotFound when it does not exist, kIoError when it cannot be read.
Result<ServiceConfig> load_config_file(const std::string& path, ServiceConfig base = {});

/// Makes a parsed config ready to run: socket_path default, data_dir created (mkdir -p, 0750),
/// secret loaded or created, hf_config applied, auto sizes measured (logged with spdlog),
/// layout and tenants validated, the default tenant added when none is configured.
Status resolve(ServiceConfig& config);

/// Tier manager options for a resolved config: host/NVMe/HBM limits with the watermarks, NVMe
/// in data_dir/nvme (one slot file), durability, write policy, promote_on_hit, lease length.
/// kInvalidArgument when the config is not resolved (host_bytes 0) or the layout is invalid.
Result<TierManagerOptions> to_tier_options(const ServiceConfig& config);

/// The per-uid connection limit max_clients_per_uid stands for (its auto value resolved).
uint32_t clients_per_uid_limit(const ServiceConfig& config);

/// The tenant called `name`, or null. With no tenants configured, "" names the shared default.
const TenantRule* find_tenant(const ServiceConfig& config, std::string_view name);
/// True when the rule admits a peer with this uid and primary gid (everyone, uid or gid listed).
bool tenant_allows(const TenantRule& rule, uint32_t uid, uint32_t gid);
/// The service-wide gate: uid 0, or no allow lists, or uid/gid listed.
bool peer_allowed(const ServiceConfig& config, uint32_t uid, uint32_t gid);
/// Names of every tenant this peer may use, in config order: none when peer_allowed() refuses
/// it, {""} when no tenants are configured.
std::vector<std::string> tenants_for(const ServiceConfig& config, uint32_t uid, uint32_t gid);

}  // namespace kvtier
