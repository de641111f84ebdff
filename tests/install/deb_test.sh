#!/usr/bin/env bash
# The Debian package as `apt install ./kvtier_<version>_amd64.deb` would unpack it: built with CPack
# into a temp dir, then its name, control fields, files and maintainer scripts checked, and its
# programs' libraries resolved from the unpacked tree. (Installing it for real changes the machine:
# see docs/install.md for that check by hand.)
# Usage: deb_test.sh BUILD_DIR VERSION   (ctest runs it as deb_package in the default preset)
set -euo pipefail
build=$(realpath "$1")
version=$2
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
fail() { echo "deb test: $*" >&2; exit 1; }

(cd "${build}" && cpack -G DEB -B "${work}/out" >"${work}/cpack.log" 2>&1) ||
  { cat "${work}/cpack.log"; fail "cpack -G DEB failed"; }
deb=${work}/out/kvtier_${version}_amd64.deb
[[ -f ${deb} ]] || fail "no ${deb##*/}; cpack made: $(ls "${work}/out")"

control=$(dpkg-deb -f "${deb}")
grep -q '^Package: kvtier$' <<<"${control}" || fail "package name is not kvtier"
depends=$(dpkg-deb -f "${deb}" Depends)
for need in adduser librocksdb liburing2 libspdlog libxxhash0; do
  grep -q "${need}" <<<"${depends}" || fail "Depends lacks ${need}: ${depends}"
done
if grep -qi cuda <<<"${depends}"; then fail "the package depends on the CUDA toolkit: ${depends}"; fi

contents=$(dpkg-deb -c "${deb}" | awk '{print $6}')
for f in ./usr/bin/kvtierd ./usr/bin/kvtier ./usr/lib/libkvtier_client.so.${version} \
         ./usr/include/kvtier/kvtier.h ./usr/lib/cmake/kvtier/kvtierConfig.cmake \
         ./usr/lib/pkgconfig/kvtier.pc ./usr/lib/systemd/system/kvtierd.service; do
  grep -qx -- "${f}" <<<"${contents}" || fail "the package lacks ${f}"
done

dpkg-deb -e "${deb}" "${work}/control"
for script in postinst prerm postrm; do
  [[ -x ${work}/control/${script} ]] || fail "no executable ${script}"
  sh -n "${work}/control/${script}" || fail "${script} is not valid sh"
done
grep -q 'adduser --system' "${work}/control/postinst" || fail "postinst does not add the kvtier user"

dpkg-deb -x "${deb}" "${work}/root"
unit=${work}/root/usr/lib/systemd/system/kvtierd.service
for line in 'User=kvtier' 'StateDirectory=kvtier' 'LimitMEMLOCK=infinity' 'ExecStart=.*/usr/bin/kvtierd --data-dir /var/lib/kvtier'; do
  grep -q -- "^${line}" "${unit}" || fail "kvtierd.service lacks ${line}"
done
if command -v systemd-analyze >/dev/null && [[ -d /run/systemd/system ]]; then
  systemd-analyze verify "${unit}" || fail "systemd-analyze rejects kvtierd.service"
fi
for bin in usr/bin/kvtierd usr/bin/kvtier; do
  if LD_LIBRARY_PATH=${work}/root/usr/lib ldd "${work}/root/${bin}" | grep 'not found'; then
    fail "${bin} needs a library no package provides (above)"
  fi
done
"${work}/root/usr/bin/kvtierd" --help >/dev/null || fail "the packaged kvtierd does not run"
echo "deb test: ${deb##*/} ($(du -h "${deb}" | cut -f1)) depends on: ${depends}"
