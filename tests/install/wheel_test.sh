#!/usr/bin/env bash
# `pip install .` as a user would run it from the repository root: scikit-build-core builds
# kvtier._native (Release, portable) into a wheel, which is installed into a fresh venv that has
# nothing else (no torch, no checkout on its path); there the package imports, reports the C++
# version, and round-trips KV bytes through an in-process Store and through a real kvtierd.
# Usage: wheel_test.sh BUILD_DIR SOURCE_DIR PYTHON VERSION
set -euo pipefail
build=$1 src=$2 python=$3 version=$4
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
fail() { echo "wheel test: $*" >&2; exit 1; }

# The build tree persists under BUILD_DIR, so a second run rebuilds only what changed.
"${python}" -m pip wheel "${src}" --no-build-isolation --no-deps -q -w "${work}/wheel" \
  --config-settings=build-dir="${build}/wheel-build" >"${work}/build.log" 2>&1 ||
  { tail -40 "${work}/build.log"; fail "pip wheel failed"; }
wheel=$(ls "${work}"/wheel/kvtier-"${version}"-*.whl) || fail "no kvtier-${version} wheel was built"
contents=$("${python}" -m zipfile -l "${wheel}")
for f in kvtier/__init__.py kvtier/hf.py kvtier/daemon.py kvtier/_native.pyi kvtier/py.typed kvtier/_native.cpython; do
  grep -q "${f}" <<<"${contents}" || fail "the wheel lacks ${f}"
done

/usr/bin/python3 -m venv "${work}/venv"
"${work}/venv/bin/pip" install -q --no-deps --disable-pip-version-check "${wheel}"
so=$(ls "${work}"/venv/lib/python3*/site-packages/kvtier/_native*.so)
! grep -q "libkvtier_client" <<<"$(ldd "${so}")" || fail "the module needs libkvtier_client.so at run time"
cd "${work}"
KVTIERD="${build}/tools/kvtierd" "${work}/venv/bin/python" - "${version}" "${work}/daemon" <<'PY'
import sys
import kvtier
from kvtier.daemon import Kvtierd

version, data_dir = sys.argv[1], sys.argv[2]
assert kvtier.__version__ == version, (kvtier.__version__, version)
assert "site-packages" in kvtier.__file__, kvtier.__file__
layout = kvtier.KvLayout.standard(2, 2, 8, "bf16", 4)
src = bytearray(range(256)) * 4
with kvtier.Store(layout, "1MiB") as s:
    ns = s.open_namespace("m")
    assert s.save(ns, list(range(8)), memoryview(src).cast("B", (2, 512))) == 2
    with s.lookup(ns, list(range(8))) as m:
        dst = bytearray(1024)
        s.load(m, memoryview(dst).cast("B", (2, 512))).wait()
        assert dst == src
with Kvtierd(data_dir, layout={"layers": 2, "kv_heads": 2, "head_dim": 8, "dtype": "bf16"}, block_tokens=4,
             host_bytes="1MiB", nvme_bytes="8MiB") as d, kvtier.Client(d.socket) as c:
    ns = c.open_namespace("m", revision="r1")
    assert c.save(ns, list(range(8)), memoryview(src).cast("B", (2, 512))) == 2
    with c.lookup(ns, list(range(8))) as m:
        dst = bytearray(1024)
        c.load(m, memoryview(dst).cast("B", (2, 512))).wait()
        assert dst == src
    try:
        c.open_namespace("m", tenant="nobody")
        raise AssertionError("an unknown tenant was not refused")
    except kvtier.PermissionDenied:
        pass
print("wheel test: the installed package round-trips KV in-process and through kvtierd")
PY
