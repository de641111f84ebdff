#include "tiers/catalog.h"

#include <bit>
#include <cstring>

#include <rocksdb/db.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

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

Status rocks_error(const rocksdb::Status& s, const std::string& what) {
  return {StatusCode::kIoError, "catalog " + what + ": " + s.ToString()};
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
  // A record without a tenant keeps version 1, which a kvtierd from before tier shares reads too.
  const uint8_t version = r.tenant.empty() ? 1 : kNamespaceRecordVersion;
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
  return w.take();
}

Result<NamespaceRecord> Catalog::decode_namespace(std::string_view value) {
  Reader r(value);
  NamespaceRecord rec;
  uint8_t version = 0, kind = 0, dtype = 0;
  if (!r.get(version)) return undecodable("empty namespace record");
  if (version != 1 && version != kNamespaceRecordVersion) {
    return invalid_argument("catalog namespace record version " + std::to_string(version));
  }
  // Version 1 (before tenant shares) has no tenant: its blocks count under no tenant.
  if (!r.get_key(rec.root) || !r.get(kind) || !r.get(rec.layout.num_layers) ||
      !r.get(rec.layout.num_kv_heads) || !r.get(rec.layout.head_dim) || !r.get(dtype) ||
      !r.get(rec.layout.block_tokens) || !r.get_bytes(rec.model_id) ||
      (version >= 2 && !r.get_bytes(rec.tenant)) || !r.done()) {
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

Result<std::unique_ptr<Catalog>> Catalog::open(const std::string& dir, CatalogOptions options) {
  rocksdb::Options db_options;
  db_options.create_if_missing = options.create;
  db_options.paranoid_checks = true;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = rocksdb::DB::Open(db_options, dir, &raw);
  if (!s.ok()) return rocks_error(s, "open " + dir);
  return std::unique_ptr<Catalog>(new Catalog(std::unique_ptr<rocksdb::DB>(raw), options));
}

Catalog::Catalog(std::unique_ptr<rocksdb::DB> db, CatalogOptions options)
    : db_(std::move(db)), options_(options) {}

Catalog::~Catalog() {
  TsanGuard guard(tsan_mu_);
  if (db_) db_->Close().PermitUncheckedError();
}

Status Catalog::write(std::string_view key, std::string_view value) {
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s = db_->Put(wo, rocksdb::Slice(key.data(), key.size()),
                               rocksdb::Slice(value.data(), value.size()));
  if (!s.ok()) return rocks_error(s, "put");
  return Status::ok();
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
    if (!s.ok()) return rocks_error(s, "batch put");
  }
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s = db_->Write(wo, &batch);
  if (!s.ok()) return rocks_error(s, "batch put of " + std::to_string(entries.size()) + " entries");
  return Status::ok();
}

Status Catalog::remove(const BlockKey& key) {
  rocksdb::WriteOptions wo;
  wo.sync = options_.sync;
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s = db_->Delete(wo, record_key(kBlockPrefix, key));
  if (!s.ok()) return rocks_error(s, "delete " + key.to_hex());
  return Status::ok();
}

Result<CatalogEntry> Catalog::get(const BlockKey& key) const {
  std::string value;
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s = db_->Get(rocksdb::ReadOptions(), record_key(kBlockPrefix, key), &value);
  if (s.IsNotFound()) return not_found("catalog has no block " + key.to_hex());
  if (!s.ok()) return rocks_error(s, "get " + key.to_hex());
  return decode_entry(value);
}

Status Catalog::for_each(const std::function<void(const CatalogEntry&)>& fn,
                         std::vector<BlockKey>* bad) const {
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
  if (!it->status().ok()) return rocks_error(it->status(), "scan");
  return Status::ok();
}

Status Catalog::put_namespace(const NamespaceRecord& record) {
  return write(record_key(kNamespacePrefix, record.root), encode_namespace(record));
}

Status Catalog::for_each_namespace(const std::function<void(const NamespaceRecord&)>& fn) const {
  TsanGuard guard(tsan_mu_);
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  const std::string prefix(1, kNamespacePrefix);
  for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
    Result<NamespaceRecord> r =
        decode_namespace(std::string_view(it->value().data(), it->value().size()));
    if (!r.is_ok()) return r.status();
    fn(*r);
  }
  if (!it->status().ok()) return rocks_error(it->status(), "scan namespaces");
  return Status::ok();
}

Status Catalog::put_meta(std::string_view name, std::string_view value) {
  return write(std::string(1, kMetaPrefix) + std::string(name), value);
}

Result<std::string> Catalog::get_meta(std::string_view name) const {
  std::string value;
  TsanGuard guard(tsan_mu_);
  rocksdb::Status s =
      db_->Get(rocksdb::ReadOptions(), std::string(1, kMetaPrefix) + std::string(name), &value);
  if (s.IsNotFound()) return not_found("catalog has no meta " + std::string(name));
  if (!s.ok()) return rocks_error(s, "get meta");
  return value;
}

}  // namespace kvtier
