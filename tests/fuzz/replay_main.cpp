// Runs a libFuzzer target without libFuzzer, so the gcc presets (default, asan, tsan) exercise it
// on every test run: each seed file named on the command line (files, or directories of them),
// then a fixed number of deterministic mutations of the seeds — bit flips, truncations, bumped
// length fields, op swaps, appended bytes. The xorshift seed is fixed, so a failure replays.
//
// Usage: protocol_fuzz_replay <seed file or directory>...
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

constexpr int kMutations = 5000;

using Input = std::vector<uint8_t>;

struct Xorshift64 {
  uint64_t state;
  uint64_t next() {
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
  }
  size_t below(size_t n) { return n == 0 ? 0 : static_cast<size_t>(next() % n); }
};

bool read_file(const std::filesystem::path& path, std::vector<Input>& seeds) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  seeds.emplace_back(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

// Values that sit on the codec's edges: zero, one, limits ±1, all ones.
constexpr uint32_t kEdgeCounts[] = {0,         1,         2,          0xFF,       4096,
                                    4097,      1u << 16,  (1u << 16) + 1, 1u << 20, (1u << 21) + 1,
                                    0x7FFFFFFF, 0x80000000, 0xFFFFFFFF};

void mutate(Input& in, Xorshift64& rng) {
  switch (rng.below(5)) {
    case 0:  // flip one bit
      if (!in.empty()) in[rng.below(in.size())] ^= static_cast<uint8_t>(1u << rng.below(8));
      break;
    case 1:  // truncate
      in.resize(rng.below(in.size() + 1));
      break;
    case 2: {  // overwrite a u32 (a length field, often) with a nudge or an edge value
      if (in.size() < 4) break;
      size_t at = rng.below(in.size() - 3);
      uint32_t v = in[at] | in[at + 1] << 8 | in[at + 2] << 16 | uint32_t(in[at + 3]) << 24;
      switch (rng.below(3)) {
        case 0: v += 1; break;
        case 1: v -= 1; break;
        default: v = kEdgeCounts[rng.below(std::size(kEdgeCounts))]; break;
      }
      for (int i = 0; i < 4; ++i) in[at + i] = static_cast<uint8_t>(v >> (8 * i));
      break;
    }
    case 3:  // the same payload under another op (0 and 11 are unknown)
      if (in.size() >= 2) {
        in[0] = static_cast<uint8_t>(rng.below(12));
        in[1] = rng.below(8) == 0 ? 0x80 : 0;
      }
      break;
    default:  // trailing bytes
      for (size_t n = 1 + rng.below(4); n > 0; --n) in.push_back(static_cast<uint8_t>(rng.next()));
      break;
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<Input> seeds;
  for (int i = 1; i < argc; ++i) {
    std::filesystem::path arg(argv[i]);
    std::error_code ec;
    if (std::filesystem::is_directory(arg, ec)) {
      std::vector<std::filesystem::path> files;
      for (const auto& entry : std::filesystem::directory_iterator(arg, ec)) {
        if (entry.is_regular_file()) files.push_back(entry.path());
      }
      std::sort(files.begin(), files.end());  // directory order is not stable; the run must be
      for (const auto& f : files) read_file(f, seeds);
    } else if (!read_file(arg, seeds)) {
      std::fprintf(stderr, "protocol_fuzz_replay: cannot read %s\n", argv[i]);
      return 1;
    }
  }
  if (seeds.empty()) {
    std::fprintf(stderr, "protocol_fuzz_replay: no seed files (usage: %s <file or dir>...)\n",
                 argv[0]);
    return 1;
  }

  for (const Input& s : seeds) LLVMFuzzerTestOneInput(s.data(), s.size());
  Xorshift64 rng{0x9E3779B97F4A7C15ull};
  for (int i = 0; i < kMutations; ++i) {
    Input in = seeds[rng.below(seeds.size())];
    for (size_t edits = 1 + rng.below(3); edits > 0; --edits) mutate(in, rng);
    LLVMFuzzerTestOneInput(in.data(), in.size());
  }
  std::printf("protocol_fuzz_replay: %zu seeds and %d mutations, no failure\n", seeds.size(),
              kMutations);
  return 0;
}
