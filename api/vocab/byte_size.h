// Byte sizes as people write them (config files, flags) and as logs show them: the one parser and
// the one formatter every layer uses.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "kvtier/status.h"

namespace kvtier {

/// "4096", "64GiB", "512 MiB", "1.5TiB", "10GB", "64G". Binary units (K, KiB, M, MiB, ... P,
/// PiB) are powers of 1024, decimal ones (KB, MB, GB, TB, PB) powers of 1000; case does not
/// matter; a trailing "B" alone means bytes. Fractions round down to whole bytes. kInvalidArgument
/// for negative, malformed or overflowing sizes.
Result<uint64_t> parse_bytes(std::string_view text);
/// "1.50 GiB", "512.00 MiB", "4096 B": for logs and errors.
std::string format_bytes(uint64_t bytes);

}  // namespace kvtier
