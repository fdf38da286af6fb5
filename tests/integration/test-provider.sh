#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
# The Proxmox VE backup provider (provider/): its prove tests, which
# drive it as vzdump and qemu-server do, against the real Proxmox VE QEMU
# (tests/lib/qemus.py finds it; BACKUPACCESS_QEMU may name the build to
# use, and only a Proxmox VE one will do).
set -eu
top=${TOP:-$(cd "$(dirname "$0")/../.." && pwd)}
cd "$top"
for f in nbdkit-backupaccess-filter.so nbdkit-snapshotaccess-plugin.so copy/backupaccess-copy \
         helper/backupaccess-helper; do
  [ -e "$f" ] || { echo "$f is not built: run make"; exit 77; }
done
command -v prove >/dev/null || { echo "prove (perl) is not installed"; exit 77; }
pve=$(TOP=$top /usr/bin/python3 - <<'PY'
import os, sys
sys.path.insert(0, os.path.join(os.environ["TOP"], "tests", "lib"))
import qemus
want = os.environ.get("BACKUPACCESS_QEMU")
found = [q for q in qemus.available(pve=True) if want in (None, "", q.label)]
if found:
    q = found[0]
    print("ok", q.bindir, ":".join(q.firmware))
elif want and want not in [q.label for q in qemus.available(pve=True)] and \
        want not in [l for l, _ in qemus.missing(pve=True)]:
    print("skip the provider's tests need the Proxmox VE QEMU, not %s" % want)
else:
    print("skip " + "; ".join(why for _, why in qemus.missing(pve=True)))
PY
)
case $pve in
  ok\ *) ;;
  *) echo "${pve#skip }"; exit 77 ;;
esac
set -- $pve
BACKUPACCESS_PVE_QEMU_BIN=$2
BACKUPACCESS_PVE_QEMU_FIRMWARE=$3
export BACKUPACCESS_PVE_QEMU_BIN BACKUPACCESS_PVE_QEMU_FIRMWARE TOP=$top
exec prove -v -I provider/lib -I provider/t/stand-in -I provider/t/lib provider/t
