// Prometheus text exposition helpers shared by the metrics registry (metrics.cpp) and the tier
// metrics a Store renders (store.cpp), which sit in different libraries.
#pragma once

#include <string>
#include <string_view>

namespace kvtier {

/// A label value as the text format wants it inside double quotes: \, " and newline escaped.
inline std::string escape_label_value(std::string_view v) {
  std::string out;
  out.reserve(v.size());
  for (char c : v) {
    if (c == '\\') out += "\\\\";
    else if (c == '"') out += "\\\"";
    else if (c == '\n') out += "\\n";
    else out += c;
  }
  return out;
}

}  // namespace kvtier
