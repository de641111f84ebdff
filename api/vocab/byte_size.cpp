#include "api/vocab/byte_size.h"

#include <algorithm>
#include <cctype>
#include <charconv>
#include <cstdio>
#include <iterator>
#include <limits>
#include <string>
#include <utility>

namespace kvtier {

Result<uint64_t> parse_bytes(std::string_view text) {
  const std::string original(text);
  auto bad = [&](const std::string& why) {
    return invalid_argument("size \"" + original + "\" " + why);
  };
  auto trim = [](std::string_view& s) {
    while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
    while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  };
  trim(text);
  if (text.empty()) return bad("is empty");
  if (text.front() == '-') return bad("is negative");
  if (text.front() == '+') text.remove_prefix(1);

  // Digits, an optional fraction, then a unit; kept in integers so "1.5TiB" is exact.
  size_t i = 0;
  unsigned __int128 whole = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    whole = whole * 10 + static_cast<unsigned>(text[i] - '0');
    if (whole > std::numeric_limits<uint64_t>::max()) return bad("is too large");
    ++i;
  }
  const size_t whole_digits = i;
  uint64_t frac = 0, frac_scale = 1;
  size_t frac_digits = 0;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      if (frac_digits < 18) {  // beyond 18 digits nothing changes a whole byte count
        frac = frac * 10 + static_cast<uint64_t>(text[i] - '0');
        frac_scale *= 10;
      }
      ++frac_digits;
      ++i;
    }
  }
  if (whole_digits == 0 && frac_digits == 0) return bad("does not start with a number");

  std::string_view unit = text.substr(i);
  trim(unit);
  std::string u;
  for (char ch : unit) u += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  static const std::pair<std::string_view, uint64_t> kUnits[] = {
      {"", 1},           {"b", 1},
      {"k", 1ull << 10}, {"kib", 1ull << 10}, {"kb", 1000ull},
      {"m", 1ull << 20}, {"mib", 1ull << 20}, {"mb", 1000ull * 1000},
      {"g", 1ull << 30}, {"gib", 1ull << 30}, {"gb", 1000ull * 1000 * 1000},
      {"t", 1ull << 40}, {"tib", 1ull << 40}, {"tb", 1000ull * 1000 * 1000 * 1000},
      {"p", 1ull << 50}, {"pib", 1ull << 50}, {"pb", 1000ull * 1000 * 1000 * 1000 * 1000},
  };
  const auto* it = std::find_if(std::begin(kUnits), std::end(kUnits),
                                [&](const auto& e) { return e.first == u; });
  if (it == std::end(kUnits)) {
    return bad("has an unknown unit \"" + std::string(unit) +
               "\" (use B, KiB, MiB, GiB, TiB, PiB, or KB, MB, GB, TB, PB)");
  }
  const unsigned __int128 bytes =
      whole * it->second + static_cast<unsigned __int128>(frac) * it->second / frac_scale;
  if (bytes > std::numeric_limits<uint64_t>::max()) return bad("is too large");
  return static_cast<uint64_t>(bytes);
}

std::string format_bytes(uint64_t bytes) {
  static constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  if (bytes < 1024) return std::to_string(bytes) + " B";
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 6) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.2f %s", v, kUnits[u]);
  return buf;
}

}  // namespace kvtier
