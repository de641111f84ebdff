// SlotFiles (tiers/slot_files.h).
#include "tiers/slot_files.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <sstream>

#include "tiers/storage_device.h"

namespace kvtier {

namespace {

Status os_error(const std::string& what, const std::string& path, int err) {
  return {StatusCode::kIoError, what + " " + path + ": " + std::strerror(err)};
}

}  // namespace

Result<SlotGeometry> SlotGeometry::parse(const std::string& text, const std::string& dir) {
  SlotGeometry g;
  std::map<std::string, std::string> fields;
  std::istringstream in(text);
  for (std::string part; in >> part;) {
    if (auto eq = part.find('='); eq != std::string::npos) fields[part.substr(0, eq)] = part.substr(eq + 1);
  }
  try {
    if (fields.at("slot_format") != std::to_string(kSlotFormatVersion)) {
      return invalid_argument("nvme tier in " + dir + " has slot format " + fields.at("slot_format") +
                              ", this kvtier reads format " + std::to_string(kSlotFormatVersion));
    }
    g.fingerprint = std::stoull(fields.at("layout"));
    g.slot_bytes = std::stoull(fields.at("slot_bytes"));
    g.files = static_cast<uint32_t>(std::stoul(fields.at("files")));
  } catch (const std::exception&) {
    return Status(StatusCode::kChecksumMismatch, "nvme tier in " + dir + ": its geometry record '" + text +
                                                     "' does not parse");
  }
  if (g.slot_bytes == 0 || g.slot_bytes % kIoAlignment != 0 || g.files == 0) {
    return Status(StatusCode::kChecksumMismatch, "nvme tier in " + dir + ": impossible geometry '" + text + "'");
  }
  return g;
}

Result<SlotFiles> SlotFiles::open(const std::string& dir, const SlotGeometry& g, bool writable) {
  SlotFiles f;
  f.slot_bytes_ = g.slot_bytes;
  for (uint32_t i = 0; i < g.files; ++i) {
    const std::string path = dir + "/slots." + std::to_string(i);
    const int fd = ::open(path.c_str(), (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC);
    if (fd < 0) return os_error("open", path, errno);
    f.fds_.push_back(fd);
    const off_t size = ::lseek(fd, 0, SEEK_END);
    if (size < 0) return os_error("seek", path, errno);
    f.per_file_.push_back(static_cast<uint64_t>(size) / g.slot_bytes);
  }
  return f;
}

SlotFiles::SlotFiles(SlotFiles&& o) noexcept
    : fds_(std::move(o.fds_)), per_file_(std::move(o.per_file_)), slot_bytes_(o.slot_bytes_) {
  o.fds_.clear();
}

SlotFiles::~SlotFiles() {
  for (int fd : fds_) ::close(fd);
}

uint64_t SlotFiles::count() const {
  uint64_t n = 0;
  for (uint64_t c : per_file_) n += c;
  return n;
}

bool SlotFiles::in_range(SlotId s) const { return s / fds_.size() < per_file_[s % fds_.size()]; }

Status SlotFiles::read(SlotId s, uint64_t offset, std::span<std::byte> out) const {
  const int fd = fds_[s % fds_.size()];
  const uint64_t at = (s / fds_.size()) * slot_bytes_ + offset;
  size_t done = 0;
  while (done < out.size()) {
    const ssize_t n = ::pread(fd, out.data() + done, out.size() - done, static_cast<off_t>(at + done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return os_error("read slot " + std::to_string(s) + " of", "its slot file", errno);
    if (n == 0) return {StatusCode::kIoError, "slot " + std::to_string(s) + ": short read"};
    done += static_cast<size_t>(n);
  }
  return Status::ok();
}

Result<SlotHeader> SlotFiles::read_header(SlotId s, std::vector<std::byte>& buf, uint64_t& bytes_read) const {
  buf.resize(kIoAlignment);
  KVTIER_RETURN_IF_ERROR(read(s, 0, buf));
  bytes_read += kIoAlignment;
  uint32_t magic = 0, header_bytes = 0;
  std::memcpy(&magic, buf.data(), 4);
  std::memcpy(&header_bytes, buf.data() + 8, 4);
  if (magic != kSlotMagic) return Status(StatusCode::kNotFound, "no block header (magic)");
  if (header_bytes == 0 || header_bytes % kIoAlignment != 0 || header_bytes >= slot_bytes_) {
    return Status(StatusCode::kChecksumMismatch, "header region of " + std::to_string(header_bytes) + " bytes");
  }
  if (header_bytes > kIoAlignment) {
    buf.resize(header_bytes);
    KVTIER_RETURN_IF_ERROR(read(s, 0, buf));
    bytes_read += header_bytes - kIoAlignment;
  }
  auto info = decode_block_header(std::span<const std::byte>(buf.data(), header_bytes));
  if (!info) return info.status();
  return SlotHeader{std::move(info).value(), header_bytes};
}

Status SlotFiles::wipe_header(SlotId s) const {
  std::vector<std::byte> zero(kIoAlignment);
  const int fd = fds_[s % fds_.size()];
  const uint64_t at = (s / fds_.size()) * slot_bytes_;
  if (::pwrite(fd, zero.data(), zero.size(), static_cast<off_t>(at)) != static_cast<ssize_t>(zero.size())) {
    return os_error("wipe the header of slot " + std::to_string(s) + " in", "its slot file", errno);
  }
  return Status::ok();
}

Status SlotFiles::sync() const {
  for (int fd : fds_) {
    if (::fdatasync(fd) != 0) return os_error("fdatasync", "a slot file", errno);
  }
  return Status::ok();
}

Result<std::string> find_nvme_tier_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::is_directory(dir + "/catalog", ec)) return dir;
  if (fs::is_directory(dir + "/nvme/catalog", ec)) return dir + "/nvme";
  if (!fs::exists(dir, ec)) return Status(StatusCode::kNotFound, dir + ": no such directory");
  return Status(StatusCode::kNotFound, dir + " holds no NVMe tier: neither " + dir + "/catalog nor " + dir +
                                           "/nvme/catalog exists");
}

Result<OfflineCatalog> open_offline_catalog(const std::string& path, bool writable) {
  auto dir = find_nvme_tier_dir(path);
  if (!dir) return dir.status();
  CatalogOptions co;
  co.create = false;
  co.read_only = !writable;
  co.lock_file = *dir + "/LOCK";  // a live kvtierd holds it
  auto catalog = Catalog::open(*dir + "/catalog", co);
  if (!catalog) return catalog.status();
  return OfflineCatalog{*dir, std::move(catalog).value()};
}

Result<OfflineTier> open_offline_tier(const std::string& path, bool writable) {
  auto c = open_offline_catalog(path, writable);
  if (!c) return c.status();
  auto text = c->catalog->get_meta("geometry");
  if (!text) {
    return Status(text.status().code(),
                  "nvme tier in " + c->dir + ": no geometry record: " + std::string(text.status().message()));
  }
  auto geometry = SlotGeometry::parse(*text, c->dir);
  if (!geometry) return geometry.status();
  auto files = SlotFiles::open(c->dir, *geometry, writable);
  if (!files) return files.status();
  return OfflineTier{std::move(c->dir), std::move(c->catalog), *geometry, std::move(files).value()};
}

std::string header_mismatch(const SlotHeader& header, const CatalogEntry& e, const SlotGeometry& geometry) {
  const BlockHeaderInfo& h = header.info;
  if (h.key != e.key) return "the slot holds block " + h.key.to_hex() + " (claimed by another entry, or reused)";
  if (e.layout_fingerprint != geometry.fingerprint || h.layout_fingerprint != e.layout_fingerprint) {
    return "the block's layout is not the tier's";
  }
  if (h.payload_bytes != e.payload_bytes || h.payload_checksum != e.checksum || h.parent != e.parent ||
      h.tokens != e.tokens) {
    return "the slot header disagrees with the catalog entry";
  }
  if (header.header_bytes + e.payload_bytes > geometry.slot_bytes) {
    return "its payload of " + std::to_string(e.payload_bytes) + " bytes overruns the slot";
  }
  return {};
}

}  // namespace kvtier
