#!/usr/bin/env bash
# GPU check for the kernels layer (issue 5): builds with the default preset, runs every CUDA
# kernel against its CPU reference with poisoned outputs, compares with PyTorch SDPA when torch is
# importable (optional: pip install torch may not be possible on the GPU machine; the comparison
# is then skipped and says so), and prints the benchmark table last.
#
#   usage: scripts/gpu_check.sh [--quick]      (from the repository root)
#   env:   BUILD_DIR (default build/default), KVTIER_TEST_SEED to replay a random run,
#          KVTIER_NO_BUILD=1 to use the binaries already in BUILD_DIR (scripts/gpu_device.sh)
# Exit status: 0 when every check passed or no GPU is present ("skipped"), non-zero otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build/default}

if [[ ${KVTIER_NO_BUILD:-0} != 1 ]]; then
  cmake --preset default -B "$BUILD_DIR" >/dev/null
  cmake --build "$BUILD_DIR" -j"$(nproc)" --target kernels_gpu_check kernels_tests
fi
"$BUILD_DIR"/tests/kernels/kernels_tests

CHECK="$BUILD_DIR/bench/kernels/kernels_gpu_check"
if [[ ! -x "$CHECK" ]]; then
  echo "kernels_gpu_check was not built (no nvcc?) -- GPU check skipped"
  exit 0
fi
DUMP=$(mktemp -d)
trap 'rm -rf "$DUMP"' EXIT
status=0
"$CHECK" --dump "$DUMP" "$@" | tee "$DUMP/check.txt" || status=$?
if grep -q -- "-- skipped" "$DUMP/check.txt"; then
  exit 0
fi
echo
torch_status=0
python3 bench/kernels/torch_sdpa_check.py "$DUMP" || torch_status=$?
# The tables last: ours, then the SDPA timing comparison when torch ran.
echo
sed -n '/^benchmarks/,$p' "$DUMP/check.txt"
if [[ -f "$DUMP/torch_table.txt" ]]; then
  echo
  cat "$DUMP/torch_table.txt"
fi
if [[ $status -ne 0 || $torch_status -ne 0 ]]; then
  echo "GPU check FAILED (kernels_gpu_check exit $status, torch comparison exit $torch_status)"
  exit 1
fi
echo "GPU check passed"
