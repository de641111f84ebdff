// Key-addressed objects as chains of blocks (object_store.h).
#include "api/store/object_store.h"

#include <xxhash.h>

#include <algorithm>
#include <cstring>

#include "api/metrics/metrics.h"

namespace kvtier {

namespace {

uint64_t trailer_of(std::span<const std::byte> blocks) {
  uint64_t length = 0;
  std::memcpy(&length, blocks.data() + blocks.size() - kObjectTrailerBytes, kObjectTrailerBytes);
  return length;
}

constexpr std::string_view kGetsHelp = "Object gets (key-addressed objects), by result: hit (stored whole) or miss.";

}  // namespace

ObjectStore::ObjectStore(TierManager& tiers, const KeyChain& keys)
    : tiers_(tiers),
      keys_(keys),
      puts_(tiers.metrics().counter("kvtier_object_puts_total", "Objects stored by put (key-addressed objects).")),
      kept_(tiers.metrics().counter("kvtier_object_puts_kept_total",
                                    "Puts of a key stored whole already: what was there is kept.")),
      hits_(tiers.metrics().counter("kvtier_object_gets_total", kGetsHelp, {{"result", "hit"}})),
      misses_(tiers.metrics().counter("kvtier_object_gets_total", kGetsHelp, {{"result", "miss"}})),
      removed_(tiers.metrics().counter("kvtier_object_removes_total", "Objects erased by remove.")) {}

ObjectStore::~ObjectStore() = default;

Status ObjectStore::check_layout(const Namespace& ns) const {
  if (ns.block_tokens() < kObjectKeyTokens) {
    return invalid_argument("objects need blocks of at least " + std::to_string(kObjectKeyTokens) +
                            " tokens; this layout's have " + std::to_string(ns.block_tokens()));
  }
  return Status::ok();
}

std::vector<TokenId> ObjectStore::tokens(std::string_view key, uint64_t n, uint32_t block_tokens) const {
  const XXH128_hash_t h = XXH3_128bits(key.data(), key.size());
  const TokenId words[4] = {TokenId(h.low64), TokenId(h.low64 >> 32), TokenId(h.high64), TokenId(h.high64 >> 32)};
  std::vector<TokenId> out(n * block_tokens, 0);
  for (uint64_t i = 0; i < n; ++i) {
    TokenId* b = out.data() + i * block_tokens;
    b[0] = kObjectTag;
    std::copy(std::begin(words), std::end(words), b + 1);
    b[5] = TokenId(i);
    b[6] = i + 1 == n ? 1 : 0;
  }
  return out;
}

Result<ObjectStore::Chain> ObjectStore::chain(const Namespace& ns, std::string_view key) const {
  KVTIER_RETURN_IF_ERROR(check_layout(ns));
  KVTIER_RETURN_IF_ERROR(check_object_key(key));
  const uint32_t bt = ns.block_tokens();
  // Block i's tokens as a middle block and as the last: one pair of candidates per step.
  std::vector<TokenId> step = tokens(key, 1, bt);
  const PrefixIndex& index = tiers_.index();
  auto present = [&](const BlockKey& k) {
    auto where = index.get(k);
    return where && !where->damaged;
  };
  Chain out;
  BlockKey parent = ns.root;
  for (uint64_t i = 0; i < kMaxObjectBlocks; ++i) {
    step[5] = TokenId(i);
    step[6] = 1;
    const BlockKey last = keys_.block_key(parent, step);
    if (present(last)) {
      out.keys.push_back(last);
      out.whole = true;
      return out;
    }
    step[6] = 0;
    const BlockKey middle = keys_.block_key(parent, step);
    if (!present(middle)) return out;
    out.keys.push_back(middle);
    parent = middle;
  }
  return out;
}

Result<bool> ObjectStore::put(const Namespace& ns, std::string_view key, uint64_t length,
                              std::span<const std::byte> blocks, Priority priority) {
  auto found = chain(ns, key);
  if (!found) return found.status();
  const uint64_t bpb = ns.layout.bytes_per_block();
  const uint64_t n = object_blocks(length, bpb);
  if (n > kMaxObjectBlocks) {
    return invalid_argument("an object of " + std::to_string(length) + " bytes takes " + std::to_string(n) +
                            " blocks; at most " + std::to_string(kMaxObjectBlocks));
  }
  if (blocks.size() != n * bpb || trailer_of(blocks) != length) {
    return invalid_argument("an object of " + std::to_string(length) + " bytes is laid out as " + std::to_string(n) +
                            " blocks (" + std::to_string(n * bpb) + " bytes) ending in its length");
  }
  if (found->whole) {
    kept_.add();
    return false;
  }
  if (!found->keys.empty()) {  // an earlier copy's head, its tail evicted: stored afresh
    std::reverse(found->keys.begin(), found->keys.end());
    if (auto erased = tiers_.erase(found->keys); !erased) return erased.status();
  }
  auto saved = tiers_.save(ns, tokens(key, n, ns.block_tokens()), blocks, Tier::kHost, priority);
  if (!saved) return saved.status();
  puts_.add();
  return true;
}

Result<uint64_t> ObjectStore::get(const Namespace& ns, std::string_view key, std::span<std::byte> dst) {
  auto found = chain(ns, key);
  if (!found) return found.status();
  if (!found->whole) {
    misses_.add();
    return not_found("no object named by this key is stored whole");
  }
  const uint64_t bpb = ns.layout.bytes_per_block();
  const uint64_t need = found->keys.size() * bpb;
  // Straight into dst when its blocks fit there (kvtierd's window), else through scratch.
  std::vector<std::byte> scratch;
  std::span<std::byte> blocks = dst.first(std::min<uint64_t>(dst.size(), need));
  if (blocks.size() < need) {
    scratch.resize(need);
    blocks = scratch;
  }
  std::vector<std::byte*> dsts(found->keys.size());
  for (size_t i = 0; i < dsts.size(); ++i) dsts[i] = blocks.data() + i * bpb;
  const std::vector<Status> read = tiers_.read_blocks(found->keys, dsts);
  for (const Status& s : read) {
    if (s.is_ok()) continue;
    if (s.code() == StatusCode::kNotFound) misses_.add();  // evicted since the walk
    return s;
  }
  const uint64_t length = trailer_of(blocks);
  if (object_blocks(length, bpb) != found->keys.size()) {
    return Status(StatusCode::kChecksumMismatch, "the object's blocks end in a length (" + std::to_string(length) +
                                                     ") that does not fit them");
  }
  if (length > dst.size()) {
    return invalid_argument("the object is " + std::to_string(length) + " bytes; the buffer has " +
                            std::to_string(dst.size()));
  }
  if (!scratch.empty()) std::memcpy(dst.data(), scratch.data(), length);
  for (const BlockKey& k : found->keys) tiers_.index().touch(k).ignore();  // used: kept longer
  hits_.add();
  return length;
}

Result<size_t> ObjectStore::exists(const Namespace& ns, std::span<const std::string> keys) {
  size_t present = 0;
  for (const std::string& key : keys) {
    auto found = chain(ns, key);
    if (!found) return found.status();
    if (!found->whole) break;
    ++present;
  }
  return present;
}

Result<size_t> ObjectStore::remove(const Namespace& ns, std::string_view key) {
  auto found = chain(ns, key);
  if (!found) return found.status();
  std::reverse(found->keys.begin(), found->keys.end());  // leaf first
  auto erased = tiers_.erase(found->keys);
  if (!erased) return erased.status();
  if (*erased != 0) removed_.add();
  return *erased;
}

Result<size_t> ObjectStore::remove(const Namespace& ns, std::span<const std::string> keys) {
  size_t removed = 0;
  for (const std::string& key : keys) {
    auto erased = remove(ns, key);
    if (!erased) return erased.status();
    removed += *erased != 0;
  }
  return removed;
}

}  // namespace kvtier
