#!/usr/bin/env bash
# The installed tree as an engine sees it: `cmake --install` into a temp prefix, then a C program
# built with `pkg-config kvtier` and a C++ program built with find_package(kvtier) (shared and
# static), all against that prefix and never the build tree, each run against the installed
# kvtierd: save, lookup, load, bytes identical. Also: the shared library exports only the public
# API and needs none of RocksDB, liburing, absl or the daemon's libraries.
# Usage: install_test.sh BUILD_DIR SOURCE_DIR   (ctest runs it as install_tree in the default preset)
set -euo pipefail
build=$(realpath "$1")
src=$(realpath "$2")
work=$(mktemp -d)
pid=
cleanup() {
  if [[ -n ${pid} ]]; then kill -KILL "${pid}" 2>/dev/null || true; fi
  rm -rf "${work}"
}
trap cleanup EXIT
fail() { echo "install test: $*" >&2; exit 1; }

prefix=${work}/prefix
cmake --install "${build}" --prefix "${prefix}" >"${work}/install.log"
for f in include/kvtier/kvtier.h include/kvtier/client.h include/kvtier/kv_store.h \
         lib/libkvtier_client.so lib/libkvtier_client.so.0 lib/libkvtier_client.a \
         lib/cmake/kvtier/kvtierConfig.cmake lib/cmake/kvtier/kvtierConfigVersion.cmake \
         lib/pkgconfig/kvtier.pc bin/kvtierd bin/kvtier; do
  [[ -e ${prefix}/${f} ]] || fail "cmake --install did not install ${f}"
done

so=${prefix}/lib/libkvtier_client.so.0
grep -q 'SONAME.*\[libkvtier_client\.so\.0\]' <<<"$(readelf -d "${so}")" || fail "soname is not libkvtier_client.so.0"
if readelf -d "${so}" | grep NEEDED | grep -E 'rocksdb|uring|absl|toml|httplib|cudart'; then
  fail "libkvtier_client.so needs a library the thin client must not link (above)"
fi
# Every exported symbol belongs to the public API: kvtier_* (C), kvtier:: (C++) and its vtables and
# typeinfo; none of the internals, spdlog, fmt or the CUDA runtime.
leaked=$(nm -D -C --defined-only "${so}" | cut -d' ' -f3- |
         grep -vE '^(kvtier_|kvtier::|vtable for kvtier::|typeinfo for kvtier::|typeinfo name for kvtier::|KVTIER_[0-9]+$)' || true)
[[ -z ${leaked} ]] || fail "libkvtier_client.so exports symbols outside the public API:
$(head -20 <<<"${leaked}")"
exported=$(nm -D --defined-only "${so}" | wc -l)

# The C program: pkg-config only.
export PKG_CONFIG_PATH=${prefix}/lib/pkgconfig
libdir=$(pkg-config --variable=libdir kvtier)
[[ $(realpath "${libdir}") == "${prefix}/lib" ]] || fail "kvtier.pc's libdir ${libdir} is not the install prefix's"
# shellcheck disable=SC2046
cc -std=c11 -Wall -Wextra -Werror -o "${work}/c_consumer" "${src}/tests/install/consumer.c" \
   "${src}/tests/api/client/capi_smoke.c" \
   $(pkg-config --cflags --libs kvtier) -Wl,-rpath,"${libdir}"
# grep reads a captured copy: `ldd | grep -q` fails under pipefail whenever grep exits first (SIGPIPE).
grep -q "libkvtier_client.so.0 => ${prefix}/lib/" <<<"$(ldd "${work}/c_consumer")" ||
  fail "the C program does not load libkvtier_client from the install prefix: $(ldd "${work}/c_consumer" | grep kvtier)"

# The C++ programs: find_package(kvtier) with only the install prefix on CMAKE_PREFIX_PATH.
for kind in shared static; do
  static=OFF; [[ ${kind} == static ]] && static=ON
  cmake -S "${src}/tests/install" -B "${work}/cxx-${kind}" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="${prefix}" -DKVTIER_STATIC=${static} -Dkvtier_DIR="${prefix}/lib/cmake/kvtier" \
        >"${work}/cxx-${kind}.log" 2>&1 || { cat "${work}/cxx-${kind}.log"; fail "find_package(kvtier) (${kind}) failed"; }
  cmake --build "${work}/cxx-${kind}" >>"${work}/cxx-${kind}.log" 2>&1 ||
    { cat "${work}/cxx-${kind}.log"; fail "building the C++ program (${kind}) failed"; }
done
grep -q "libkvtier_client.so.0 => ${prefix}/lib/" <<<"$(ldd "${work}/cxx-shared/kvtier_cxx_consumer")" ||
  fail "the C++ program does not load libkvtier_client from the install prefix"
if grep -q libkvtier_client <<<"$(ldd "${work}/cxx-static/kvtier_cxx_consumer")"; then
  fail "the static C++ program still loads libkvtier_client.so"
fi

# The installed daemon, on a small layout; --ready-fd says when it serves (no polling).
data=${work}/data
mkfifo "${work}/ready"
"${prefix}/bin/kvtierd" --data-dir "${data}" --socket "${work}/kvtierd.sock" --metrics off \
  --host-bytes 64MiB --nvme-bytes 64MiB --layers 4 --kv-heads 2 --head-dim 64 --log-level warn \
  --ready-fd 3 3>"${work}/ready" 2>"${work}/kvtierd.log" &
pid=$!
read -r line <"${work}/ready" || true
[[ ${line:-} == ready ]] || { cat "${work}/kvtierd.log"; fail "the installed kvtierd did not start"; }

"${work}/c_consumer" "${work}/kvtierd.sock"
"${work}/cxx-shared/kvtier_cxx_consumer" "${work}/kvtierd.sock"
"${work}/cxx-static/kvtier_cxx_consumer" "${work}/kvtierd.sock"
# The C++ programs share one namespace and prompt: the second found it saved by the first.

kill -TERM "${pid}"
status=0
wait "${pid}" || status=$?
pid=
[[ ${status} -eq 0 ]] || { cat "${work}/kvtierd.log"; fail "kvtierd exited ${status} on SIGTERM"; }
echo "install test: ${exported} exported symbols, all public API; C (pkg-config) and C++ (find_package, shared and static) programs restored identical bytes through the installed kvtierd"
