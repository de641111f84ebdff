#!/usr/bin/env bash
# Packs the default build into .gpu/bundle.tar.gz for a GPU machine that has the CUDA driver but
# none of kvtier's libraries (no RocksDB, liburing, spdlog...): the build tree without objects,
# its binaries stripped of debug info, and the shared libraries they load that are not part of
# glibc or the C++ runtime. scripts/gpu_device.sh unpacks and runs it there. x86-64 only, and the
# target's glibc must be at least this machine's (Debian 12: 2.36).
#
#   usage: scripts/gpu_bundle.sh          (from anywhere; builds the default preset first)
set -euo pipefail
cd "$(dirname "$0")/.."
cmake --preset default >/dev/null
cmake --build --preset default

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/build" "$stage/lib"
(cd build/default && find . -type f ! -name '*.o' ! -name '*.a' ! -path '*/CMakeFiles/*' \
   ! -name '.ninja*' ! -name build.ninja ! -path './_deps/*' -print0 | tar --null -cf - -T -) |
  tar -xf - -C "$stage/build"
is_elf() { [[ $(head -c4 "$1" | tail -c3) == ELF ]]; }
elves=()
while IFS= read -r -d '' f; do is_elf "$f" && elves+=("$f"); done < <(find "$stage/build" -type f -perm -u+x -print0)
strip --strip-debug "${elves[@]}"

# Every library the binaries load, except what any Linux with a C++ runtime has.
system='^(libc|libm|libdl|libpthread|librt|ld-linux-x86-64|libgcc_s|libstdc\+\+|linux-vdso)\.'
for f in "${elves[@]}"; do ldd "$f"; done |
  awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r name path; do
    [[ $name =~ $system ]] || cp -L "$path" "$stage/lib/$name"
  done

# The absolute build path the CTest files name, so the device side can recreate it.
echo "$PWD" >"$stage/source_dir"
mkdir -p .gpu
tar -czf .gpu/bundle.tar.gz -C "$stage" .
echo "gpu bundle: .gpu/bundle.tar.gz ($(du -h .gpu/bundle.tar.gz | cut -f1)), $(ls "$stage/lib" | wc -l) libraries"
