#!/usr/bin/env bash
# The whole test suite: set up, then build and run every test under three presets —
# default (optimised, CUDA sources compiled when nvcc is there), asan (AddressSanitizer + UBSan)
# and tsan (ThreadSanitizer). Fails when any test fails. Works on a fresh Debian 12 machine as root.
# KVTIER_TEST_PRESETS="default" runs a subset.
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
