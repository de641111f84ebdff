// A KV layout written on a command line: "layers,kv_heads,head_dim,dtype" (`kvtier keys --layout`,
// `kvtier plan --layout`).
#pragma once

#include <cstdint>
#include <string>

#include "kvtier/kv_layout.h"
#include "kvtier/status.h"

namespace kvtier {

/// kInvalidArgument naming `flag` ("layout", "--layout") for anything but four comma-separated
/// fields (`usage` then says what is expected) or numbers that are not positive integers.
Result<KvLayout> parse_layout_list(const std::string& spec, uint32_t block_tokens, const std::string& flag,
                                   const std::string& usage);

}  // namespace kvtier
