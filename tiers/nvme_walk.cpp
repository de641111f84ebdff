// kvtier export's reader (tiers/nvme_walk.h).
#include "tiers/nvme_walk.h"

#include <algorithm>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "tiers/slot_files.h"

namespace kvtier {

Result<NvmeWalkReport> walk_nvme_tier(const std::string& path, const NvmeWalkOptions& options) {
  auto tier = open_offline_tier(path, /*writable=*/false);
  if (!tier) return tier.status();
  const auto& catalog = tier->catalog;
  const SlotFiles& files = tier->files;

  std::vector<NamespaceRecord> records;
  KVTIER_RETURN_IF_ERROR(catalog->for_each_namespace([&](const NamespaceRecord& r) { records.push_back(r); }));
  std::sort(records.begin(), records.end(), [](const NamespaceRecord& a, const NamespaceRecord& b) {
    return std::tie(a.model_id, a.tenant, a.adapter_id, a.revision, a.root) <
           std::tie(b.model_id, b.tenant, b.adapter_id, b.revision, b.root);
  });
  std::vector<CatalogEntry> entries;
  KVTIER_RETURN_IF_ERROR(catalog->for_each([&](const CatalogEntry& e) { entries.push_back(e); }));
  // Children of each block, and of each root (block 0's parent, or ns_root in older records).
  std::unordered_map<BlockKey, std::vector<uint32_t>> children;
  for (uint32_t i = 0; i < entries.size(); ++i) {
    const CatalogEntry& e = entries[i];
    children[e.block_index == 0 && e.parent.is_zero() ? e.ns_root : e.parent].push_back(i);
  }
  for (auto& [parent, kids] : children) {
    std::sort(kids.begin(), kids.end(), [&](uint32_t a, uint32_t b) {
      return std::tie(entries[a].tokens, entries[a].key) < std::tie(entries[b].tokens, entries[b].key);
    });
  }

  NvmeWalkReport report;
  std::vector<std::byte> header_buf, payload;
  uint64_t scratch = 0;
  std::vector<uint8_t> seen(entries.size(), 0);
  // A subtree left out counts every block in it.
  auto subtree_size = [&](uint32_t top) {
    uint64_t n = 0;
    std::vector<uint32_t> todo{top};
    while (!todo.empty()) {
      const uint32_t i = todo.back();
      todo.pop_back();
      if (seen[i]) continue;
      seen[i] = 1;
      ++n;
      if (auto it = children.find(entries[i].key); it != children.end()) {
        todo.insert(todo.end(), it->second.begin(), it->second.end());
      }
    }
    return n;
  };
  for (const NamespaceRecord& ns : records) {
    auto top = children.find(ns.root);
    if (options.want_namespace && !options.want_namespace(ns)) {
      if (top != children.end()) {
        for (uint32_t i : top->second) subtree_size(i);  // not unreachable: left out on purpose
      }
      continue;
    }
    ++report.namespaces;
    if (top == children.end()) continue;
    std::vector<uint32_t> stack(top->second.rbegin(), top->second.rend());
    while (!stack.empty()) {
      const uint32_t i = stack.back();
      stack.pop_back();
      if (seen[i]) continue;
      const CatalogEntry& e = entries[i];
      if (options.want_block && !options.want_block(ns, e)) {
        subtree_size(i);
        continue;
      }
      // The checks fsck makes (tiers/nvme_check.h): the slot's header names this block and
      // agrees with its entry, and the payload matches its checksum.
      bool ok = files.in_range(e.slot);
      if (ok) {
        auto header = files.read_header(e.slot, header_buf, scratch);
        ok = header && header_mismatch(*header, e, tier->geometry).empty();
        if (ok) {
          payload.resize(e.payload_bytes);
          KVTIER_RETURN_IF_ERROR(files.read(e.slot, header->header_bytes, payload));
          ok = verify_payload(header->info, payload).is_ok();
        }
      }
      if (!ok) {
        report.corrupt += subtree_size(i);
        continue;
      }
      seen[i] = 1;
      KVTIER_RETURN_IF_ERROR(options.emit(ns, e, payload));
      ++report.blocks;
      report.bytes += e.payload_bytes;
      if (auto it = children.find(e.key); it != children.end()) {
        stack.insert(stack.end(), it->second.rbegin(), it->second.rend());
      }
    }
  }
  for (uint8_t s : seen) report.unreachable += s == 0;
  return report;
}

}  // namespace kvtier
