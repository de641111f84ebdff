// The service config, part 2 of 3: resolution — a parsed config made ready to run (socket path,
// data dir, the deployment secret, the KV layout, tier sizes sized from the machine) and turned
// into the tier manager's options. Part 1: service_config_toml.cpp; part 3: tenant_access.cpp.
#include "api/server/service_config.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <optional>

#include "api/metrics/metrics.h"
#include "api/server/service_config_detail.h"
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

}  // namespace

namespace config_detail {

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

}  // namespace config_detail

using config_detail::read_file;
using config_detail::validate_fields;

namespace {

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
  o.nvme_admission_min_uses = c.nvme_admission_min_uses;
  o.index.default_lease_ns = c.lease_ms * 1'000'000ull;
  for (const TenantRule& t : c.tenants) o.tenants.push_back({.name = t.name, .tier_share = t.tier_share});
  return o;
}

uint32_t clients_per_uid_limit(const ServiceConfig& c) {
  if (c.max_clients_per_uid != 0) return c.max_clients_per_uid;
  return std::max<uint32_t>(1, c.max_clients / 2);
}

}  // namespace kvtier
