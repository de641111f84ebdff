// Repeat-and-summarise helpers shared by the benchmark programs: median and spread of repeats.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace kvtier::bench {

struct Summary {
  double median = 0, min = 0, max = 0;
};

inline Summary summarize(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  if (v.empty()) return {};
  return {v[v.size() / 2], v.front(), v.back()};
}

/// Runs `fn` `repeats` times and returns seconds per run.
template <typename Fn>
std::vector<double> time_runs(int repeats, Fn&& fn) {
  std::vector<double> out;
  for (int r = 0; r < repeats; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    auto t1 = std::chrono::steady_clock::now();
    out.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  return out;
}

/// Keeps the optimiser from deleting work whose result is otherwise unused.
template <typename T>
inline void do_not_optimize(const T& value) {
  asm volatile("" : : "r,m"(value) : "memory");
}

}  // namespace kvtier::bench
