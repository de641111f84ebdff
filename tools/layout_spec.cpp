#include "tools/layout_spec.h"

#include <sstream>
#include <vector>

namespace kvtier {

Result<KvLayout> parse_layout_list(const std::string& spec, uint32_t block_tokens, const std::string& flag,
                                   const std::string& usage) {
  std::stringstream in(spec);
  std::string part;
  std::vector<std::string> parts;
  while (std::getline(in, part, ',')) parts.push_back(part);
  if (parts.size() != 4) return invalid_argument(flag + " is " + usage);
  auto dtype = parse_dtype(parts[3]);
  if (!dtype) return dtype.status();
  try {
    return KvLayout::standard(std::stoul(parts[0]), std::stoul(parts[1]), std::stoul(parts[2]), *dtype, block_tokens);
  } catch (const std::exception&) {
    return invalid_argument(flag + " numbers must be positive integers");
  }
}

}  // namespace kvtier
