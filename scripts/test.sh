#!/usr/bin/env bash
# The whole test suite: set up, then build and run every test under three presets —
# default (optimised, CUDA sources compiled when nvcc is there), asan (AddressSanitizer + UBSan)
# and tsan (ThreadSanitizer). Fails when any test fails. Works on a fresh Debian 12 machine as root.
# The default preset's ctests include the Python package's pytest files (python/tests/test_*.py, one
# ctest each, named python/test_*) and `pip install .` into a bare venv (python/wheel).
# KVTIER_TEST_PRESETS="default" runs a subset. Then a bounded libFuzzer run (fuzz preset, clang).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
for preset in ${KVTIER_TEST_PRESETS:-default asan tsan}; do
  echo "=== kvtier tests: preset ${preset} ==="
  cmake --preset "${preset}" >/dev/null
  cmake --build --preset "${preset}"
  ctest --preset "${preset}"
done
echo "=== kvtier tests: all presets passed ==="

# A real kvtierd SIGKILLed under a prefix-sharing workload, 100 times in write-back mode and 20 in
# write-through: after every restart each block the NVMe catalog held must be indexed again, and
# every restored byte is checked (tools/demo_service.cpp run_crash_loop). About half a minute.
if [[ " ${KVTIER_TEST_PRESETS:-default asan tsan} " == *" default "* ]]; then
  echo "=== kvtier crash loop: SIGKILL kvtierd under load ==="
  crash_dir=$(mktemp -d)
  build/default/tools/kvtier crash-loop --cycles "${KVTIER_CRASH_CYCLES:-100}" --dir "${crash_dir}/write-back"
  build/default/tools/kvtier crash-loop --cycles 20 --write-through --seed 2 --dir "${crash_dir}/write-through"
  rm -rf "${crash_dir}"
fi

# A bounded libFuzzer run of the wire codec (clang, ASan + UBSan) on a copy of the seed corpus.
# A crash fails the script and leaves its input in build/fuzz/artifacts/ (replay it by passing the
# file to the same binary). KVTIER_FUZZ_SECONDS sets the budget (default 30); 0 skips the run.
fuzz_seconds=${KVTIER_FUZZ_SECONDS:-30}
if ((fuzz_seconds > 0)); then
  echo "=== kvtier fuzz: protocol for ${fuzz_seconds}s ==="
  cmake --preset fuzz >/dev/null
  cmake --build --preset fuzz --target kvtier_fuzz_protocol
  fuzz_corpus=$(mktemp -d)
  trap 'rm -rf "${fuzz_corpus}"' EXIT
  cp build/fuzz/tests/fuzz/protocol_corpus/* "${fuzz_corpus}/"
  mkdir -p build/fuzz/artifacts
  if ! build/fuzz/tests/fuzz/kvtier_fuzz_protocol -max_total_time="${fuzz_seconds}" -timeout=10 \
      -print_final_stats=1 -artifact_prefix=build/fuzz/artifacts/ "${fuzz_corpus}" \
      >build/fuzz/protocol_fuzz.log 2>&1; then
    tail -n 60 build/fuzz/protocol_fuzz.log
    echo "=== kvtier fuzz: protocol FAILED; input in build/fuzz/artifacts/, log build/fuzz/protocol_fuzz.log ==="
    exit 1
  fi
  grep -E '^(Done|stat::average_exec_per_sec)' build/fuzz/protocol_fuzz.log || true
  echo "=== kvtier fuzz: no crash in ${fuzz_seconds}s ==="
fi
