// kvtier export's walk over kvtierd's index (api/store/index_export.h).
#include "api/store/index_export.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <unordered_map>
#include <unordered_set>

namespace kvtier {

IndexExport IndexExport::start(const PrefixIndex& index, std::span<const BlockKey> roots) {
  const std::unordered_set<BlockKey> wanted(roots.begin(), roots.end());
  std::vector<ChainLink> links;
  index.for_each_block([&](const ChainLink& l) {
    if (wanted.empty() || wanted.contains(l.root)) links.push_back(l);
  });
  // Children of each block, and of each root (block 0's parent in the index is its root).
  std::unordered_map<BlockKey, std::vector<uint32_t>> children;
  for (uint32_t i = 0; i < links.size(); ++i) children[links[i].parent].push_back(i);
  for (auto& [parent, kids] : children) {
    std::sort(kids.begin(), kids.end(), [&](uint32_t a, uint32_t b) { return links[a].key < links[b].key; });
  }
  std::vector<BlockKey> order_of_roots(roots.begin(), roots.end());
  if (order_of_roots.empty()) {
    std::unordered_set<BlockKey> seen;
    for (const ChainLink& l : links) {
      if (seen.insert(l.root).second) order_of_roots.push_back(l.root);
    }
    std::sort(order_of_roots.begin(), order_of_roots.end());
  }
  IndexExport walk;
  walk.order_.reserve(links.size());
  std::vector<uint32_t> stack;
  for (const BlockKey& root : order_of_roots) {
    auto top = children.find(root);
    if (top == children.end()) continue;
    stack.assign(top->second.rbegin(), top->second.rend());
    while (!stack.empty()) {
      const ChainLink& l = links[stack.back()];
      stack.pop_back();
      walk.order_.push_back({l.root, l.key, l.block_index});
      if (auto it = children.find(l.key); it != children.end()) stack.insert(stack.end(), it->second.rbegin(), it->second.rend());
    }
  }
  return walk;
}

std::vector<ExportedBlock> IndexExport::next(const PrefixIndex& index, size_t max_blocks, uint64_t& gone) {
  std::vector<ExportedBlock> out;
  while (next_ < order_.size() && out.size() < max_blocks) {
    const Item& item = order_[next_++];
    if (auto r = index.describe(item.key)) {
      out.push_back({item.root, item.key, std::move(*r)});
      continue;
    }
    // Depth first: its subtree is what follows it, deeper than it.
    ++gone;
    while (next_ < order_.size() && order_[next_].root == item.root && order_[next_].block_index > item.block_index) {
      ++next_;
      ++gone;
    }
  }
  return out;
}

std::string export_page_json(const IndexExport& walk, std::span<const ExportedBlock> blocks, uint64_t gone) {
  using nlohmann::json;
  json list = json::array();
  for (const ExportedBlock& b : blocks) {
    json extras = json::array();
    for (const BlockKey& x : b.record.extras) extras.push_back(x.to_hex());
    list.push_back({{"root", b.root.to_hex()},
                    {"key", b.key.to_hex()},
                    {"parent", b.record.parent.to_hex()},
                    {"block_index", b.record.block_index},
                    {"priority", priority_name(b.record.residency.priority)},
                    {"tokens", b.record.tokens},
                    {"extras", std::move(extras)}});
  }
  return json{{"blocks", std::move(list)}, {"gone", gone}, {"done", walk.done()}, {"total", walk.size()}}.dump();
}

}  // namespace kvtier
