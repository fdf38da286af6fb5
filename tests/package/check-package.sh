#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make check-package: builds the Debian package in a clean clone of HEAD,
# installs it with apt-get, checks the installed files alone (nothing
# from the build tree: the filter and the plugin by name, the programs
# from PATH, every man page), removes it and checks that nothing is
# left.  Needs root; changes the system's packages while it runs.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d /tmp/backupaccess-package.XXXXXX)
pkgs="nbdkit-backupaccess pve-backupaccess-provider"
installed=
cleanup() {
  if [ -n "$installed" ]; then
    apt-get remove --purge -y -q $pkgs >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
fail() { echo "check-package: FAIL: $*" >&2; exit 1; }

git clone -q "$top" "$tmp/src"
(cd "$tmp/src" && dpkg-buildpackage -b -us -uc >"$tmp/build.log" 2>&1) ||
  { tail -n 30 "$tmp/build.log"; fail "dpkg-buildpackage failed"; }
debs=$(for p in $pkgs; do ls "$tmp"/${p}_*.deb; done)
echo "built" $(basename -a $debs)
deb=$(ls "$tmp"/nbdkit-backupaccess_*.deb)
dpkg -I "$deb" | grep -q "Depends: nbdkit (= $(dpkg-query -W -f='${Version}' nbdkit))" ||
  fail "the package does not depend on exactly the nbdkit it was built with"

installed=1
DEBIAN_FRONTEND=noninteractive apt-get install -y -q $debs >"$tmp/install.log" 2>&1 ||
  { cat "$tmp/install.log"; fail "apt-get install failed"; }
for p in $pkgs; do dpkg -L "$p"; done |
  while read -r f; do if [ -f "$f" ]; then echo "$f"; fi; done >"$tmp/files"

# From a directory with nothing of ours in it, with no build tree in
# the environment.
cd "$tmp"
unset BACKUPACCESS_FILTER BACKUPACCESS_PLUGIN
version=$(sed -n '1s/.*(\(.*\)).*/\1/p' "$top/debian/changelog")
nbdkit snapshotaccess --dump-plugin | grep -qx "version=$version" ||
  fail "nbdkit snapshotaccess --dump-plugin does not print version=$version"
# The filter over the plugin, both by name, reading nbdkit's memory
# plugin served on a unix socket in place of QEMU's export.
out=$(nbdkit -U - memory size=1M --run '
        nbdkit -U - --filter=backupaccess snapshotaccess socket="$unixsocket" \
          --run "nbdinfo --size \"\$uri\""') ||
  fail "nbdkit --filter=backupaccess snapshotaccess failed"
[ "$out" = 1048576 ] ||
  fail "the filter and the plugin by name served $out bytes, not 1048576"
command -v backupaccess-helper >/dev/null || fail "backupaccess-helper not in PATH"
backupaccess-helper --version | grep -q "$version" || fail "backupaccess-helper --version"
backupaccess-helper --help >/dev/null || fail "backupaccess-helper --help"
command -v backupaccess-copy >/dev/null || fail "backupaccess-copy not in PATH"
backupaccess-copy --version | grep -q "$version" || fail "backupaccess-copy --version"
command -v backupaccess-mount >/dev/null || fail "backupaccess-mount not in PATH"
backupaccess-mount --version | grep -q "$version" || fail "backupaccess-mount --version"
backupaccess-mount --help >/dev/null || fail "backupaccess-mount --help"
# The provider's modules load (libpve-storage-perl, which they plug
# into, exists only on Proxmox VE: compile-check the ones that stand
# alone, and find the storage plugin's file).
perl -e 'use PVE::BackupProvider::Plugin::BackupAccess::Archive; 1' ||
  fail "the provider's Perl modules do not load from the installed package"
[ -f /usr/share/perl5/PVE/Storage/Custom/BackupAccessPlugin.pm ] ||
  fail "the storage plugin is not where pve-storage loads it from"
for page in $(ls "$top"/*.pod | xargs -n1 basename | sed 's/\.pod$//'); do
  man -w "$page" >/dev/null 2>&1 || fail "man cannot find $page"
done
man -w 5 pve-backupaccess-provider >/dev/null 2>&1 ||
  fail "man cannot find pve-backupaccess-provider(5)"
echo "installed files work: filter and plugin by name, helper, copy and mount from PATH, $(ls "$top"/*.pod | wc -l) man pages"

apt-get remove --purge -y -q $pkgs >/dev/null
installed=
left=$(while read -r f; do if [ -e "$f" ]; then echo "$f"; fi; done <"$tmp/files")
[ -z "$left" ] || fail "left after removal: $left"
for p in $pkgs; do
  if dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q installed; then
    fail "$p is still installed"
  fi
done
echo "check-package: OK ($(wc -l <"$tmp/files") files installed and removed)"
