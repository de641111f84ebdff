// kvtier export through kvtierd: a walk over a snapshot of the index's blocks in depth-first
// order — a parent right before its subtree, as the archive (python/kvtier/archive.py) keeps
// them — handed out a page at a time. The payloads are read apart (TierManager::read_blocks),
// so the exporter can leave blocks out (its --prompts) before any byte is read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "prefix_index/prefix_index.h"

namespace kvtier {

struct ExportedBlock {
  BlockKey root;  // its namespace's
  BlockKey key;
  BlockRecord record;
};

class IndexExport {
 public:
  /// Snapshots the keys of every block indexed under `roots`, in that order (every root, in key
  /// order, when empty); siblings by key.
  static IndexExport start(const PrefixIndex& index, std::span<const BlockKey> roots);

  /// Up to `max_blocks` more blocks, described as they are now. A block that left the index
  /// since the snapshot is skipped with its subtree (a parent never leaves before its
  /// children, so they are gone too) and counted in `gone`.
  std::vector<ExportedBlock> next(const PrefixIndex& index, size_t max_blocks, uint64_t& gone);

  bool done() const noexcept { return next_ == order_.size(); }
  size_t size() const noexcept { return order_.size(); }

 private:
  struct Item {
    BlockKey root;
    BlockKey key;
    uint32_t block_index;
  };
  std::vector<Item> order_;
  size_t next_ = 0;
};

/// A page of `next()` as kvtier export reads it (docs/operations.md): {"blocks": [{"root", "key",
/// "parent", "block_index", "priority", "tokens", "extras"}], "gone", "done", "total"} — keys and
/// extras in hex, total the snapshot's size.
std::string export_page_json(const IndexExport& walk, std::span<const ExportedBlock> blocks, uint64_t gone);

}  // namespace kvtier
