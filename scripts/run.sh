#!/usr/bin/env bash
# The main job: set up, build, and run kvtier's demo (simulated users sharing prompts) and the
# prefix-index benchmark. Works on a fresh Debian 12 machine as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset default >/dev/null
cmake --build --preset default
echo
./build/default/tools/kvtier info
echo
./build/default/tools/kvtier demo
echo
./build/default/bench/prefix_index/kvtier_bench_index "${KVTIER_BENCH_REPEATS:-11}"
