#!/usr/bin/env bash
# The main job: set up, build, and run kvtier's demos — simulated users sharing prompts, first on
# the prefix index, then with real KV bytes moving across host, (emulated) HBM and NVMe and a
# restart — followed by the index and transfer benchmarks. Works on a fresh Debian 12 machine as root.
# KVTIER_DATA_DIR (default /var/tmp/kvtier-demo) holds the demo's NVMe tier and the benchmark file.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cmake --preset default >/dev/null
cmake --build --preset default
DATA_DIR=${KVTIER_DATA_DIR:-/var/tmp/kvtier-demo}
mkdir -p "$DATA_DIR"
echo
./build/default/tools/kvtier info
echo
./build/default/tools/kvtier demo
echo
./build/default/tools/kvtier tier-demo --dir "$DATA_DIR/tiers"
echo
./build/default/bench/prefix_index/kvtier_bench_index "${KVTIER_BENCH_REPEATS:-11}"
echo
./build/default/bench/transfer/kvtier_bench_transfer "${KVTIER_BENCH_REPEATS:-5}" "$DATA_DIR"
