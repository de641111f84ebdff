// NvmeWalk: kvtier export's reader of a data dir no kvtierd holds. Every namespace's blocks in
// depth-first order — a parent before its children, siblings by their tokens — each with its
// payload read and verified against its slot header's checksum, so an archive can be written in
// one pass and imported in one pass with a stack of one prompt's tokens.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "kvtier/status.h"
#include "tiers/catalog.h"

namespace kvtier {

struct NvmeWalkOptions {
  /// Called for each namespace before its blocks; false skips it (default: every namespace).
  std::function<bool(const NamespaceRecord&)> want_namespace;
  /// Called for each block before its payload is read; false skips it and every block below it
  /// (default: every block).
  std::function<bool(const NamespaceRecord&, const CatalogEntry&)> want_block;
  /// The block and its verified payload (valid during the call). An error stops the walk.
  std::function<Status(const NamespaceRecord&, const CatalogEntry&, std::span<const std::byte> payload)> emit;
};

struct NvmeWalkReport {
  uint64_t namespaces = 0;   // namespaces walked
  uint64_t blocks = 0;       // blocks emitted
  uint64_t bytes = 0;        // their payload bytes
  uint64_t corrupt = 0;      // blocks whose slot or payload failed its check, and the blocks below them
  uint64_t unreachable = 0;  // blocks whose parent is not stored, or whose namespace has no record
};

/// Walks the NVMe tier in `dir` (a kvtierd data dir or the tier directory), its catalog opened
/// read-only. kUnavailable when a live kvtierd holds it, kNotFound when it holds no tier.
Result<NvmeWalkReport> walk_nvme_tier(const std::string& dir, const NvmeWalkOptions& options);

}  // namespace kvtier
