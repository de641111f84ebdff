#!/usr/bin/env bash
# Runs kvtier's GPU work on a machine that has a GPU and its driver but none of kvtier's build
# dependencies, from the bundle scripts/gpu_bundle.sh made: the default test suite (every CUDA
# path live: pinned arena, HBM arena, CUDA copy engine), the kernel check against the CPU
# references and PyTorch SDPA (scripts/gpu_check.sh), then the transfer and service benchmarks.
# Each stage's log lands in $OUT (default /tmp/kvtier-gpu); a summary table is printed last.
#
#   usage: scripts/gpu_device.sh [stage...]
#          stages: tests kernels transfer service (the default: all four), sanitize (the kernel
#          checks under compute-sanitizer's memcheck and racecheck), profile (Nsight Compute on
#          the first benchmarked decode: its kernel and its split merge)
#   env:   KVTIER_BENCH_REPEATS (default 5), KVTIER_GPU_JOBS (ctest jobs, default 8)
# Exit status: non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export OUT=${OUT:-/tmp/kvtier-gpu}
mkdir -p "$OUT"
stages=("$@")
((${#stages[@]})) || stages=(tests kernels transfer service)

# Unpack: the build tree goes where the CTest files expect it (the path it was built at, made a
# link to this checkout when it differs), and only the libraries this machine lacks are put on
# the loader path, so that its own Python and PyTorch keep their own.
if [[ -e build/default/build.ninja ]]; then
  echo "build/default is a real build here: this script is for the GPU machine (it replaces it)"; exit 2
fi
rm -rf .gpu/unpacked build/default
mkdir -p .gpu/unpacked build
tar -xzf .gpu/bundle.tar.gz -C .gpu/unpacked || { echo "no bundle: run scripts/gpu_bundle.sh first"; exit 2; }
mv .gpu/unpacked/build build/default
built_at=$(cat .gpu/unpacked/source_dir)
if [[ $built_at != "$root" && ! -e $built_at ]]; then
  mkdir -p "$(dirname "$built_at")" && ln -s "$root" "$built_at"
fi
for lib in .gpu/unpacked/lib/*; do
  if ldconfig -p | grep -q "^[[:space:]]*$(basename "$lib") "; then rm "$lib"; fi
done
export LD_LIBRARY_PATH="$root/.gpu/unpacked/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "bundled libraries used: $(ls .gpu/unpacked/lib | tr '\n' ' ')"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
build/default/tools/kvtier info || true

declare -A result
run_stage() {  # name, seconds, command...: runs it under a time limit, logs to $OUT/name.log,
  local name=$1 limit=$2; shift 2     # records pass/FAIL and its duration
  local t0=$SECONDS
  echo "=== gpu stage ${name} ==="
  timeout "$limit" "$@" >"$OUT/${name}.log" 2>&1
  local rc=$?
  result[$name]="$([[ $rc -eq 0 ]] && echo pass || echo "FAIL (exit $rc)") in $((SECONDS - t0)) s"
  tail -n 25 "$OUT/${name}.log"
}
repeats=${KVTIER_BENCH_REPEATS:-5}
for s in "${stages[@]}"; do
  case $s in
    tests)    run_stage tests 240 ctest --test-dir build/default -j"${KVTIER_GPU_JOBS:-8}" --timeout 300 \
                --output-on-failure ;;
    kernels)  run_stage kernels 180 env KVTIER_NO_BUILD=1 bash scripts/gpu_check.sh ;;
    transfer) mkdir -p /var/tmp/kvtier-gpu-bench
              run_stage transfer 180 build/default/bench/transfer/kvtier_bench_transfer "$repeats" \
                /var/tmp/kvtier-gpu-bench ;;
    sanitize) run_stage sanitize 300 bash -c 'status=0
                for tool in memcheck racecheck; do
                  echo "--- compute-sanitizer --tool $tool (whole log: $OUT/sanitize_$tool.log)"
                  compute-sanitizer --tool "$tool" --error-exitcode 3 --print-limit 20 \
                    build/default/bench/kernels/kernels_gpu_check --checks-only >"$OUT/sanitize_$tool.log" 2>&1 ||
                    status=1
                  grep -E "FAIL|check\(s\) failed|SUMMARY" "$OUT/sanitize_$tool.log" | head -n 20
                done
                exit $status' ;;
    profile)  run_stage profile 240 ncu --clock-control none -k 'regex:decode_kernel|merge_splits' \
                --launch-skip 2 --launch-count 2 --section SpeedOfLight --section LaunchStats \
                --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
                --section SchedulerStats build/default/bench/kernels/kernels_gpu_check --bench-only --quick ;;
    service)  run_stage service 180 build/default/bench/service/kvtier_bench_service "$repeats" ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
echo
echo "=== gpu summary ==="
failed=0
for s in "${stages[@]}"; do
  echo "${s}: ${result[$s]}"
  [[ ${result[$s]} == pass* ]] || failed=1
done
exit $failed
