#include "tiers/catalog.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/iterator.h>
#include <rocksdb/listener.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>
#include <spdlog/spdlog.h>

namespace kvtier {

namespace {

// Key space: one prefix byte per record kind, then the record's own key.
constexpr char kBlockPrefix = 'b';
constexpr char kNamespacePrefix = 'n';
constexpr char kMetaPrefix = 'm';

class Writer {
 public:
  template <typename T>
  void put(T v) {
    static_assert(std::endian::native == std::endian::little, "encoding assumes little-endian");
    const size_t at = out_.size();
    out_.resize(at + sizeof v);
    std::memcpy(out_.data() + at, &v, sizeof v);
  }
  void put_key(const BlockKey& k) {
    put(k.lo);
    put(k.hi);
  }
  void put_bytes(std::string_view s) {
    put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  std::string take() { return std::move(out_); }

 private:
  std::string out_;
};

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  template <typename T>
  bool get(T& v) {
    if (in_.size() - at_ < sizeof v) return false;
    std::memcpy(&v, in_.data() + at_, sizeof v);
    at_ += sizeof v;
    return true;
  }
  bool get_key(BlockKey& k) { return get(k.lo) && get(k.hi); }
  bool get_bytes(std::string& s) {
    uint32_t n = 0;
    if (!get(n) || in_.size() - at_ < n) return false;
    s.assign(in_.substr(at_, n));
    at_ += n;
    return true;
  }
  bool done() const { return at_ == in_.size(); }

 private:
  std::string_view in_;
  size_t at_ = 0;
};

// Big-endian key bytes so RocksDB's bytewise order is BlockKey's order.
std::string record_key(char prefix, const BlockKey& k) {
  std::string out(17, '\0');
  out[0] = prefix;
  for (int i = 0; i < 8; ++i) {
    out[1 + i] = static_cast<char>(k.hi >> (56 - 8 * i));
    out[9 + i] = static_cast<char>(k.lo >> (56 - 8 * i));
  }
  return out;
}

BlockKey key_from_record(std::string_view rk) {
  BlockKey k;
  for (int i = 0; i < 8; ++i) {
    k.hi = (k.hi << 8) | static_cast<uint8_t>(rk[1 + i]);
    k.lo = (k.lo << 8) | static_cast<uint8_t>(rk[9 + i]);
  }
  return k;
}

/// RocksDB's info log, forwarded to spdlog so that RocksDB writes no LOG file beside the data.
/// Why: RocksDB asserts (SIGABRT) when it cannot append its own LOG on a full file system, and
/// keeps a LOG.old.* per open. Its warnings and errors log as ours; its info lines only at
/// spdlog's debug level (they are many: every option at every open).
class SpdlogRocksLogger final : public rocksdb::Logger {
 public:
  explicit SpdlogRocksLogger(std::string dir)
      : rocksdb::Logger(spdlog::should_log(spdlog::level::debug) ? rocksdb::InfoLogLevel::INFO_LEVEL
                                                                 : rocksdb::InfoLogLevel::WARN_LEVEL),
        dir_(std::move(dir)) {}

  using rocksdb::Logger::Logv;
  void Logv(const char* format, va_list ap) override { Logv(rocksdb::InfoLogLevel::INFO_LEVEL, format, ap); }
  void Logv(const rocksdb::InfoLogLevel level, const char* format, va_list ap) override {
    if (level < GetInfoLogLevel()) return;
    char line[1024];
    va_list copy;
    va_copy(copy, ap);
    std::vsnprintf(line, sizeof line, format, copy);
    va_end(copy);
    try {  // nothing may propagate into RocksDB
      spdlog::log(spdlog_level(level), "kvtier catalog {}: rocksdb: {}", dir_, line);
    } catch (...) {
    }
  }

 private:
  static spdlog::level::level_enum spdlog_level(rocksdb::InfoLogLevel level) {
    switch (level) {
      case rocksdb::InfoLogLevel::WARN_LEVEL: return spdlog::level::warn;
      case rocksdb::InfoLogLevel::ERROR_LEVEL: return spdlog::level::err;
      case rocksdb::InfoLogLevel::FATAL_LEVEL: return spdlog::level::critical;
      default: return spdlog::level::debug;
    }
  }
  std::string dir_;
};

/// Turns off RocksDB's own recovery from a no-space error. Why: it waits on a thread of its
/// SstFileManager, polling every 5 s, for a whole write buffer (64 MiB) of free space, and while
/// it waits DB::Resume is refused (Busy). The catalog resumes itself instead, at the first write
/// that finds room (Catalog::resume_if_room), which a test can step.
class ManualRecovery final : public rocksdb::EventListener {
 public:
  void OnErrorRecoveryBegin(rocksdb::BackgroundErrorReason, rocksdb::Status bg_error, bool* auto_recovery) override {
    bg_error.PermitUncheckedError();
    *auto_recovery = false;
  }
};

rocksdb::Options db_options_for(const std::string& dir, const CatalogOptions& options) {
  rocksdb::Options o;
  o.create_if_missing = options.create;
  o.paranoid_checks = true;
  o.info_log = std::make_shared<SpdlogRocksLogger>(dir);
  o.info_log_level = o.info_log->GetInfoLogLevel();
  // Recovery replays the WAL into the memtable without writing an SST first, so an open needs
  // less free space.
  o.avoid_flush_during_recovery = true;
  o.listeners.push_back(std::make_shared<ManualRecovery>());
  return o;
}

uint64_t free_bytes_of(const std::string& dir) {
  struct statvfs vfs{};
  if (::statvfs(dir.c_str(), &vfs) != 0) return 0;
  return static_cast<uint64_t>(vfs.f_bavail) * vfs.f_frsize;
}

bool is_no_space(const rocksdb::Status& s) {
  // Some paths (DB::Open's OPTIONS file) rewrap the error and lose the subcode: read the text too.
  return s.IsNoSpace() || (s.IsIOError() && s.ToString().find("No space left") != std::string::npos);
}

/// Takes an exclusive flock on `path` (created when missing) and writes our pid into it;
/// returns the descriptor that holds the lock.
Result<int> lock_exclusively(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Status(StatusCode::kIoError, "open lock file " + path + ": " + std::strerror(errno));
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char text[32] = {};
    const ssize_t n = ::pread(fd, text, sizeof text - 1, 0);
    ::close(fd);
    if (err != EWOULDBLOCK) return Status(StatusCode::kIoError, "flock " + path + ": " + std::strerror(err));
    std::string pid(text, n > 0 ? static_cast<size_t>(n) : 0);
    while (!pid.empty() && (pid.back() == '\n' || pid.back() == ' ')) pid.pop_back();
    return Status(StatusCode::kUnavailable,
                  path + " is locked by another process" + (pid.empty() ? "" : " (pid " + pid + ")") +
                      ": another kvtierd or store uses this directory; stop it, or give this one another data_dir");
  }
  // The pid is for the message above only; a full disk may keep it from being written.
  const std::string pid = std::to_string(::getpid()) + "\n";
  if (::ftruncate(fd, 0) != 0 || ::pwrite(fd, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size())) {
    spdlog::debug("kvtier: could not write the pid into {}: {}", path, std::strerror(errno));
  }
  return fd;
}

/// RocksDB writes no info log now (SpdlogRocksLogger); the LOG and LOG.old.* files of earlier
/// versions are only text, removed so they stop piling up.
void remove_old_info_logs(const std::string& dir) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name == "LOG" || name.starts_with("LOG.old.")) std::filesystem::remove(e.path(), ec);
  }
}

Status open_error(const rocksdb::Status& s, const std::string& dir) {
  const std::string text = s.ToString();
  if (s.IsIOError() && text.find("lock") != std::string::npos) {
    return {StatusCode::kUnavailable, "catalog " + dir + " is held by another process (" + text + ")"};
  }
  if (s.IsCorruption()) return {StatusCode::kIoError, "catalog " + dir + " is damaged: " + text};
  if (is_no_space(s)) {
    return {StatusCode::kResourceExhausted, "catalog " + dir + " cannot be opened: no space left on the file system (" +
                                                text + ")"};
  }
  return {StatusCode::kIoError, "catalog " + dir + " cannot be opened: " + text};
}

Status undecodable(const std::string& what) {
  return {StatusCode::kChecksumMismatch, "catalog value does not decode: " + what};
}

}  // namespace

#if defined(__SANITIZE_THREAD__)
#define KVTIER_CATALOG_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVTIER_CATALOG_TSAN 1
#endif
#endif

class Catalog::TsanGuard {
 public:
#ifdef KVTIER_CATALOG_TSAN
  explicit TsanGuard(std::mutex& mu) : lock_(mu) {}

 private:
  std::lock_guard<std::mutex> lock_;
#else
  explicit TsanGuard(std::mutex&) {}
#endif
};

std::string Catalog::encode_entry(const CatalogEntry& e) {
  Writer w;
  w.put<uint8_t>(kCatalogValueVersion);
  w.put_key(e.key);
  w.put<uint64_t>(e.slot);
  w.put<uint64_t>(e.payload_bytes);
  w.put<uint64_t>(e.checksum);
  w.put<uint64_t>(e.layout_fingerprint);
  w.put_key(e.ns_root);
  w.put_key(e.parent);
  w.put<uint32_t>(e.block_index);
  w.put<uint8_t>(static_cast<uint8_t>(e.priority));
  w.put<uint64_t>(e.created_ns);
  w.put<uint64_t>(e.last_access_ns);
  w.put<uint32_t>(static_cast<uint32_t>(e.tokens.size()));
  for (TokenId t : e.tokens) w.put<uint32_t>(t);
  w.put<uint32_t>(static_cast<uint32_t>(e.extras.size()));
  for (const BlockKey& x : e.extras) w.put_key(x);
  return w.take();
}

std::string Catalog::encode_namespace(const NamespaceRecord& r) {
  // The lowest version that holds the record, so a kvtierd from before reads it too.
  const uint8_t version = !r.adapter_id.empty() || !r.revision.empty() ? 3 : !r.tenant.empty() ? 2 : 1;
  Writer w;
  w.put<uint8_t>(version);
  w.put_key(r.root);
  w.put<uint8_t>(static_cast<uint8_t>(r.layout.kind));
  w.put<uint32_t>(r.layout.num_layers);
  w.put<uint32_t>(r.layout.num_kv_heads);
  w.put<uint32_t>(r.layout.head_dim);
  w.put<uint8_t>(static_cast<uint8_t>(r.layout.dtype));
  w.put<uint32_t>(r.layout.block_tokens);
  w.put_bytes(r.model_id);
  if (version >= 2) w.put_bytes(r.tenant);
  if (version >= 3) {
    w.put_bytes(r.adapter_id);
    w.put_bytes(r.revision);
  }
  return w.take();
}

Result<NamespaceRecord> Catalog::decode_namespace(std::string_view value) {
  Reader r(value);
  NamespaceRecord rec;
  uint8_t version = 0, kind = 0, dtype = 0;
  if (!r.get(version)) return undecodable("empty namespace record");
  if (version < 1 || version > kNamespaceRecordVersion) {
    return invalid_argument("catalog namespace record version " + std::to_string(version));
  }
  // Version 1 (before tenant shares) has no tenant: its blocks count under no tenant.
  if (!r.get_key(rec.root) || !r.get(kind) || !r.get(rec.layout.num_layers) ||
      !r.get(rec.layout.num_kv_heads) || !r.get(rec.layout.head_dim) || !r.get(dtype) ||
      !r.get(rec.layout.block_tokens) || !r.get_bytes(rec.model_id) ||
      (version >= 2 && !r.get_bytes(rec.tenant)) ||
      (version >= 3 && (!r.get_bytes(rec.adapter_id) || !r.get_bytes(rec.revision))) || !r.done()) {
    return undecodable("truncated namespace record");
  }
  rec.layout.kind = static_cast<AttentionKind>(kind);
  rec.layout.dtype = static_cast<Dtype>(dtype);
  return rec;
}

Result<CatalogEntry> Catalog::decode_entry(std::string_view value) {
  Reader r(value);
  CatalogEntry e;
  uint8_t version = 0, priority = 0;
  uint32_t tokens = 0, extras = 0;
  if (!r.get(version)) return undecodable("empty block record");
  if (version != kCatalogValueVersion) {
    return invalid_argument("catalog block record version " + std::to_string(version));
  }
  if (!r.get_key(e.key) || !r.get(e.slot) || !r.get(e.payload_bytes) || !r.get(e.checksum) ||
      !r.get(e.layout_fingerprint) || !r.get_key(e.ns_root) || !r.get_key(e.parent) ||
      !r.get(e.block_index) || !r.get(priority) || !r.get(e.created_ns) ||
      !r.get(e.last_access_ns) || !r.get(tokens)) {
    return undecodable("truncated block record");
  }
  if (priority >= kNumPriorities || tokens > kMaxBlockTokens) return undecodable("bad fields");
  e.priority = static_cast<Priority>(priority);
  e.tokens.resize(tokens);
  for (auto& t : e.tokens) {
    if (!r.get(t)) return undecodable("truncated tokens");
  }
  if (!r.get(extras) || extras > kMaxHeaderExtras) return undecodable("bad extras count");
  e.extras.resize(extras);
  for (auto& x : e.extras) {
    if (!r.get_key(x)) return undecodable("truncated extras");
  }
  if (!r.done()) return undecodable("trailing bytes");
  return e;
}

std::unordered_map<BlockKey, BlockKey> chain_roots(std::span<const CatalogEntry> entries) {
  std::vector<const CatalogEntry*> order;
  order.reserve(entries.size());
  for (const CatalogEntry& e : entries) order.push_back(&e);
  std::sort(order.begin(), order.end(),
            [](const CatalogEntry* a, const CatalogEntry* b) { return a->block_index < b->block_index; });
  std::unordered_map<BlockKey, BlockKey> root_of;
  root_of.reserve(entries.size());
  for (const CatalogEntry* e : order) {
    if (e->block_index == 0) {
      root_of.emplace(e->key, e->parent.is_zero() ? e->ns_root : e->parent);
    } else if (auto it = root_of.find(e->parent); it != root_of.end()) {
      const BlockKey root = it->second;  // emplace may rehash
      root_of.emplace(e->key, root);
    }
  }
  return root_of;
}

Result<std::unique_ptr<Catalog>> Catalog::open(const std::string& dir, CatalogOptions options) {
  int lock_fd = -1;
  if (!options.lock_file.empty()) {
    auto fd = lock_exclusively(options.lock_file);
    if (!fd) return fd.status();
    lock_fd = *fd;
  }
  if (options.create) {
    std::error_code ec;  // RocksDB's own create logs an error when the directory is missing
    std::filesystem::create_directories(dir, ec);
  }
  const rocksdb::Options db_options = db_options_for(dir, options);
  rocksdb::DB* raw = nullptr;
  bool read_only = options.read_only;
  rocksdb::Status s = read_only ? rocksdb::DB::OpenForReadOnly(db_options, dir, &raw)
                                : rocksdb::DB::Open(db_options, dir, &raw);
  if (!s.ok() && !read_only && !s.IsCorruption() && free_bytes_of(dir) < options.resume_headroom_bytes) {
    // A full file system: RocksDB cannot write the MANIFEST and OPTIONS file an open writes.
    // Read-only still serves what is committed; the first write with room reopens.
    rocksdb::DB* ro = nullptr;
    rocksdb::Status rs = rocksdb::DB::OpenForReadOnly(db_options, dir, &ro);
    if (rs.ok()) {
      spdlog::warn("kvtier catalog {}: the file system is full ({}); opened read-only: NVMe writes fail "
                   "until space is freed",
                   dir, s.ToString());
      raw = ro;
      read_only = true;
      s = rs;
    }
  }
  if (!s.ok()) {
    if (lock_fd >= 0) ::close(lock_fd);
    return open_error(s, dir);
  }
  if (!read_only && free_bytes_of(dir) >= options.resume_headroom_bytes) {
    // Recovery left the WALs of every run that crashed in place (avoid_flush_during_recovery):
    // one flush now turns them into a table and deletes them, so files do not pile up over
    // restarts and the next open replays nothing. A failure here only delays that.
    // A WAL that held nothing (a run killed before its first catalog write) leaves an empty
    // memtable, and a flush of nothing moves no log number on: those WALs would stay for good,
    // one per such restart (kvtier crash-loop found 62 after 100 kills once NVMe admission made
    // write-free runs common). One small record makes the flush real, so every older WAL goes.
    rocksdb::WriteOptions wo;
    wo.sync = false;  // the flush below persists it
    const std::string opened = std::to_string(std::chrono::duration_cast<std::chrono::seconds>(
                                                  std::chrono::system_clock::now().time_since_epoch())
                                                  .count());
    if (rocksdb::Status ps = raw->Put(wo, std::string(1, kMetaPrefix) + "last_open", opened); !ps.ok()) {
      spdlog::warn("kvtier catalog {}: recording the open failed: {}", dir, ps.ToString());
    }
    rocksdb::FlushOptions fo;
    if (rocksdb::Status fs = raw->Flush(fo); !fs.ok()) {
      spdlog::warn("kvtier catalog {}: flush after open failed: {}", dir, fs.ToString());
    }
  }
  if (!options.read_only) remove_old_info_logs(dir);
  return std::unique_ptr<Catalog>(
      new Catalog(dir, std::unique_ptr<rocksdb::DB>(raw), read_only, std::move(options), lock_fd));
}

Catalog::Catalog(std::string dir, std::unique_ptr<rocksdb::DB> db, bool read_only, CatalogOptions options,
                 int lock_fd)
    : dir_(std::move(dir)),
      db_(std::move(db)),
      read_only_(read_only),
      options_(std::move(options)),
      lock_fd_(lock_fd),
      out_of_space_(read_only && !options_.read_only) {}

Catalog::~Catalog() {
  {
    std::unique_lock lock(db_mu_);
    TsanGuard guard(tsan_mu_);
    if (db_) db_->Close().PermitUncheckedError();
    db_.reset();
  }
  if (lock_fd_ >= 0) ::close(lock_fd_);  // releases the flock
}

Status Catalog::error(const rocksdb::Status& s, const std::string& what) const {
  if (is_no_space(s)) {
    return {StatusCode::kResourceExhausted, "catalog " + what + " in " + dir_ +
                                                ": no space left on the file system; NVMe writes resume once "
                                                "space is freed (" + s.ToString() + ")"};
  }
  return {StatusCode::kIoError, "catalog " + what + " in " + dir_ + ": " + s.ToString()};
}

void Catalog::resume_if_room() {
  std::unique_lock attempt(resume_mu_, std::try_to_lock);
  if (!attempt.owns_lock() || !out_of_space()) return;  // another writer is at it, or it is done
  uint64_t memtable_bytes = 0;
  bool read_only = false;
  {
    std::shared_lock lock(db_mu_);
    TsanGuard guard(tsan_mu_);
    read_only = read_only_;
    if (!read_only) db_->GetIntProperty("rocksdb.cur-size-all-mem-tables", &memtable_bytes);
  }
  // A resume flushes the memtables: wait until they fit, so a still-full disk costs a statvfs
  // per write and not a failing flush.
  const uint64_t free_bytes = free_bytes_of(dir_);
  if (free_bytes < options_.resume_headroom_bytes + memtable_bytes) return;
  rocksdb::Status s;
  if (read_only) {
    rocksdb::DB* raw = nullptr;
    {
      TsanGuard guard(tsan_mu_);
      s = rocksdb::DB::Open(db_options_for(dir_, options_), dir_, &raw);
    }
    if (s.ok()) {
      std::unique_ptr<rocksdb::DB> old;
      {
        std::unique_lock lock(db_mu_);
        TsanGuard guard(tsan_mu_);
        old = std::move(db_);
        db_.reset(raw);
        read_only_ = false;
        old->Close().PermitUncheckedError();
      }
    }
  } else {
    std::shared_lock lock(db_mu_);
    TsanGuard guard(tsan_mu_);
    s = db_->Resume();
  }
  if (!s.ok()) {
    spdlog::debug("kvtier catalog {}: resume with {} bytes free failed: {}", dir_, free_bytes, s.ToString());
    return;
  }
  out_of_space_.store(false, std::memory_order_relaxed);
  resumes_.fetch_add(1, std::memory_order_relaxed);
  spdlog::info("kvtier catalog {}: writing again ({} bytes free)", dir_, free_bytes);
}

Status Catalog::checked_write(const std::string& what, const std::function<rocksdb::Status(rocksdb::DB&)>& op) {
  if (out_of_space()) resume_if_room();
  rocksdb::Status s;
  {
    std::shared_lock lock(db_mu_);
    if (options_.read_only) {
      return {StatusCode::kInvalidArgument, "catalog " + what + " in " + dir_ + ": opened read-only"};
    }
    if (read_only_) {
      return {StatusCode::kResourceExhausted,
              "catalog " + what + " in " + dir_ +
                  ": opened read-only because the file system was full; NVMe writes resume once space is freed"};
    }
    TsanGuard guard(tsan_mu_);
    s = op(*db_);
  }
  if (s.ok()) return Status::ok();
  Status st = error(s, what);
  if (st.code() == StatusCode::kResourceExhausted && !out_of_space_.exchange(true)) {
    spdlog::warn("kvtier catalog {}: out of space, NVMe writes fail until space is freed: {}", dir_, s.ToString());
  }
  return st;
}

Status Catalog::write(std::string_view key, std::string_view value) {
  return checked_write("put", [&](rocksdb::DB& db) {
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return db.Put(wo, rocksdb::Slice(key.data(), key.size()), rocksdb::Slice(value.data(), value.size()));
  });
}

Status Catalog::put(const CatalogEntry& entry) {
  return write(record_key(kBlockPrefix, entry.key), encode_entry(entry));
}

Status Catalog::put_batch(std::span<const CatalogEntry> entries) {
  if (entries.empty()) return Status::ok();
  rocksdb::WriteBatch batch;
  for (const CatalogEntry& e : entries) {
    const std::string key = record_key(kBlockPrefix, e.key), value = encode_entry(e);
    rocksdb::Status s = batch.Put(rocksdb::Slice(key), rocksdb::Slice(value));
    if (!s.ok()) return error(s, "batch put");
  }
  return checked_write("batch put of " + std::to_string(entries.size()) + " entries", [&](rocksdb::DB& db) {
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return db.Write(wo, &batch);
  });
}

Status Catalog::remove(const BlockKey& key) {
  return checked_write("delete " + key.to_hex(), [&](rocksdb::DB& db) {
    rocksdb::WriteOptions wo;
    wo.sync = options_.sync;
    return db.Delete(wo, record_key(kBlockPrefix, key));
  });
}

Result<CatalogEntry> Catalog::get(const BlockKey& key) const {
  std::string value;
  std::shared_lock lock(db_mu_);
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), record_key(kBlockPrefix, key), &value);
  if (s.IsNotFound()) return not_found("catalog has no block " + key.to_hex());
  if (!s.ok()) return error(s, "get " + key.to_hex());
  return decode_entry(value);
}

Status Catalog::for_each(const std::function<void(const CatalogEntry&)>& fn,
                         std::vector<BlockKey>* bad) const {
  std::shared_lock lock(db_mu_);
  TsanGuard guard(tsan_mu_);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix(1, kBlockPrefix);
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    if (it->key().size() != 17) continue;
    Result<CatalogEntry> e = decode_entry(std::string_view(it->value().data(), it->value().size()));
    const BlockKey key = key_from_record(std::string_view(it->key().data(), it->key().size()));
    if (!e.is_ok() || e->key != key) {
      if (bad != nullptr) bad->push_back(key);
      continue;
    }
    fn(*e);
  }
  if (!it->status().ok()) return error(it->status(), "scan");
  return Status::ok();
}

Status Catalog::put_namespace(const NamespaceRecord& record) {
  const std::string key = record_key(kNamespacePrefix, record.root), value = encode_namespace(record);
  {
    std::string stored;
    std::shared_lock lock(db_mu_);
    TsanGuard guard(tsan_mu_);
    if (db_->Get(rocksdb::ReadOptions(), key, &stored).ok() && stored == value) return Status::ok();
  }
  return write(key, value);
}

Status Catalog::for_each_namespace(const std::function<void(const NamespaceRecord&)>& fn) const {
  std::shared_lock lock(db_mu_);
  TsanGuard guard(tsan_mu_);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix(1, kNamespacePrefix);
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    Result<NamespaceRecord> r =
        decode_namespace(std::string_view(it->value().data(), it->value().size()));
    if (!r.is_ok()) return r.status();
    fn(*r);
  }
  if (!it->status().ok()) return error(it->status(), "scan namespaces");
  return Status::ok();
}

Status Catalog::put_meta(std::string_view name, std::string_view value) {
  return write(std::string(1, kMetaPrefix) + std::string(name), value);
}

Result<std::string> Catalog::get_meta(std::string_view name) const {
  std::string value;
  std::shared_lock lock(db_mu_);
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s =
      db_->Get(rocksdb::ReadOptions(), std::string(1, kMetaPrefix) + std::string(name), &value);
  if (s.IsNotFound()) return not_found("catalog has no meta " + std::string(name));
  if (!s.ok()) return error(s, "get meta");
  return value;
}

}  // namespace kvtier
