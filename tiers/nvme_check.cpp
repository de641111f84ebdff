// kvtier fsck's engine (tiers/nvme_check.h): the catalog is read first, then each slot's header
// once and each claimed payload once, in slot order, through one buffer (constant memory beyond
// the catalog's entries).
#include "tiers/nvme_check.h"

#include <algorithm>
#include <map>
#include <unordered_map>
#include <unordered_set>

#include "tiers/block_header.h"
#include "tiers/catalog.h"
#include "tiers/slot_files.h"
#include "tiers/storage_device.h"

namespace kvtier {

Result<NvmeCheckReport> check_nvme_tier(const std::string& path, const NvmeCheckOptions& options) {
  auto tier = open_offline_tier(path, options.repair);
  if (!tier) return tier.status();
  const auto& catalog = tier->catalog;
  const SlotGeometry& geometry = tier->geometry;
  SlotFiles& files = tier->files;

  NvmeCheckReport report;
  report.dir = tier->dir;
  auto layout_name = catalog->get_meta("layout");
  report.layout = layout_name ? *layout_name : "(not named: written before kvtier named layouts)";
  report.slot_bytes = geometry.slot_bytes;
  report.files = geometry.files;
  report.slots = files.count();

  std::unordered_set<BlockKey> roots;
  KVTIER_RETURN_IF_ERROR(catalog->for_each_namespace([&](const NamespaceRecord& r) { roots.insert(r.root); }));
  report.namespaces = roots.size();
  std::vector<CatalogEntry> entries;
  std::vector<BlockKey> undecodable;
  KVTIER_RETURN_IF_ERROR(catalog->for_each([&](const CatalogEntry& e) { entries.push_back(e); }, &undecodable));
  report.entries = entries.size() + undecodable.size();

  std::vector<BlockKey> to_remove;             // catalog entries repair deletes
  std::unordered_set<SlotId> to_wipe;          // slot headers repair zeroes
  auto problem = [&](const char* kind, uint64_t& count, const BlockKey& key, SlotId slot, std::string detail) {
    ++count;
    if (report.problems.size() < options.max_listed) {
      report.problems.push_back({kind, key, slot, std::move(detail), false});
    }
  };
  for (const BlockKey& key : undecodable) {
    problem("undecodable_entry", report.undecodable_entries, key, kNoSlot, "the catalog value does not decode");
    to_remove.push_back(key);
  }

  // Which entries claim each slot, and what the check reads.
  std::map<SlotId, std::vector<size_t>> claims;
  uint64_t total = report.slots * kIoAlignment;
  for (size_t i = 0; i < entries.size(); ++i) {
    const CatalogEntry& e = entries[i];
    if (!files.in_range(e.slot)) {
      problem("bad_slot", report.bad_slots, e.key, e.slot,
              "slot " + std::to_string(e.slot) + " is out of range (" + std::to_string(report.slots) + " slots)");
      to_remove.push_back(e.key);
      continue;
    }
    claims[e.slot].push_back(i);
    total += e.payload_bytes;
  }
  auto progress = [&] {
    if (options.progress) options.progress(report.bytes_read, std::max(total, report.bytes_read));
  };

  std::vector<bool> good(entries.size(), false);
  std::vector<std::byte> header_buf, payload;
  std::vector<bool> claimed(report.slots, false);
  for (const auto& [slot, who] : claims) claimed[slot] = true;
  for (SlotId s = 0; s < report.slots; ++s) {
    if (!files.in_range(s)) continue;
    auto header = files.read_header(s, header_buf, report.bytes_read);
    if (!claimed[s]) {
      if (header) {
        problem("slot_without_entry", report.slots_without_entry, header->info.key, s,
                "holds block " + header->info.key.to_hex() + " (index " + std::to_string(header->info.block_index) +
                    "), which no catalog entry names");
        to_wipe.insert(s);
      }
      if (s % 256 == 0) progress();
      continue;
    }
    for (size_t i : claims[s]) {
      const CatalogEntry& e = entries[i];
      std::string why = header ? header_mismatch(*header, e, geometry)
                               : "its header does not decode: " + std::string(header.status().message());
      if (why.empty()) {
        payload.resize(e.payload_bytes);
        if (Status st = files.read(s, header->header_bytes, payload); !st) return st;
        report.bytes_read += e.payload_bytes;
        if (Status st = verify_payload(header->info, payload); !st) why = "payload: " + std::string(st.message());
      }
      if (why.empty()) {
        good[i] = true;
      } else {
        problem("bad_slot", report.bad_slots, e.key, s, std::move(why));
        to_remove.push_back(e.key);
        if (header && header->info.key == e.key) to_wipe.insert(s);
      }
    }
    progress();
  }

  // Chains: a block is reachable when its parent is a good block, back to block 0.
  std::vector<CatalogEntry> good_entries;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (good[i]) good_entries.push_back(entries[i]);
  }
  const auto root_of = chain_roots(good_entries);
  for (const CatalogEntry& e : good_entries) {
    auto it = root_of.find(e.key);
    if (it == root_of.end()) {
      problem("broken_chain", report.broken_chains, e.key, e.slot,
              "block " + std::to_string(e.block_index) + " of its prefix, whose parent " + e.parent.to_hex() +
                  " is not stored (or was bad)");
    } else if (!roots.contains(it->second)) {
      problem("no_namespace", report.no_namespace, e.key, e.slot,
              "its prefix starts at root " + it->second.to_hex() + ", which has no namespace record");
    } else {
      ++report.good_blocks;
      report.good_bytes += e.payload_bytes;
      continue;
    }
    to_remove.push_back(e.key);
    to_wipe.insert(e.slot);
  }
  progress();

  if (options.repair) {
    // The catalog entry first, then the slot (a crash between them leaves a slot without an entry,
    // which is free already), as NvmeTier::erase orders them.
    for (const BlockKey& key : to_remove) KVTIER_RETURN_IF_ERROR(catalog->remove(key));
    for (SlotId s : to_wipe) KVTIER_RETURN_IF_ERROR(files.wipe_header(s));
    KVTIER_RETURN_IF_ERROR(files.sync());
    std::unordered_set<BlockKey> removed(to_remove.begin(), to_remove.end());
    for (NvmeCheckProblem& p : report.problems) {
      p.repaired = p.kind == "slot_without_entry" ? to_wipe.contains(p.slot) : removed.contains(p.key);
    }
    report.repaired = removed.size() + report.slots_without_entry;
  }
  return report;
}

}  // namespace kvtier
