#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Fault injection: copy-before-write fails during a backup (real
qemu-storage-daemon), in both of QEMU 7.2's ways of failing:

- on-cbw-error=break-snapshot (what Proxmox VE uses), the fleecing image
  over blkdebug failing every write: the guest overwrites a dirty region
  not yet read, its write succeeds, the snapshot breaks, and the backup
  fails loudly: the client's next read gets EIO and nbdkit's log says the
  snapshot is broken (filter over the snapshotaccess plugin);
- on-cbw-error=break-guest-write (what blockdev-backup gives the helper's
  upstream back end for a node without a guest device, such as this
  daemon's; QEMU's default), the fleecing image on a full
  filesystem (a 1 MiB tmpfs): the guest's writes fail (ENOSPC) instead,
  the disk is unchanged, and the backup reads the snapshot correctly.

Either way teardown runs with failure, and the next incremental holds
every change: its chain equals the guest disk byte for byte; the helper
leaves nothing behind."""
import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import (PLUGIN, Nbdkit, check, dirty_regions, filtered,
                     random_writes, run)
from qemu_fixture import Fleecing
from fault_fixture import (HelperSetup, PausedReader, UpstreamVm,
                           chain_equals, helper_backup, mounts, no_leftovers,
                           read_regions)

SIZE = 32 << 20
rng = random.Random(31)


def union(regions):
    out = []
    for s, e in sorted(regions):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def covered(inner, outer):
    return all(any(a <= s and e <= b for a, b in outer) for s, e in inner)


def gran_round(writes, gran=65536):
    return union((o - o % gran, -(-(o + n) // gran) * gran)
                 for o, n in writes)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    # --- break-snapshot: the backup fails loudly -----------------------
    with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd")) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        at_full = f.disk_read(0, SIZE)
        f.snapshot(bitmap=False)
        full = os.path.join(tmp, "full.raw")
        with Nbdkit(tmp, filtered([PLUGIN, "socket=" + f.nbd_path,
                                   "export=snap"]), "full") as nk:
            run(["nbdcopy", nk.uri(), full])
        with open(full, "rb") as fp:
            check(fp.read() == at_full, "the full backup differs")
        f.release(success=True)

        writes = random_writes(f, rng, 12)
        f.snapshot(bitmap=True, on_cbw_error="break-snapshot", fleece_file={
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 5}]})
        dirty = dirty_regions(f.snap_uri(), "frozen")
        check(covered(gran_round(writes), dirty), "bitmap %s" % dirty)
        total = sum(e - s for s, e in dirty)
        with Nbdkit(tmp, filtered([PLUGIN, "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen"),
                    "broken") as nk:
            reader = PausedReader(nk.uri(), dirty, total // 3, 65536)
            try:
                # The guest overwrites the last dirty region, not read yet:
                # copying its old data fails, the snapshot breaks; the
                # guest's write goes through.
                s, e = dirty[-1]
                during = (s, min(e - s, 65536))
                f.guest_write(during[0], rng.randbytes(during[1]))
                rc, out, err = reader.go()
            finally:
                reader.kill()
        log = nk.log()
        check(rc == 3 and "read error: EIO" in err,
              "the backup went on after the snapshot broke: %d %r %r"
              % (rc, out, err))
        check("the snapshot is broken" in log and "this backup must fail"
              in log, log)
        check(f.alive(), "qemu-storage-daemon died")
        print("break-snapshot: guest write ok; client: %s; nbdkit: %s"
              % (err.strip(), [l for l in log.splitlines()
                               if "this backup must fail" in l][0]))
        f.release(success=False)

        # The next incremental has every change, the failed one's too.
        at_inc = f.disk_read(0, SIZE)
        f.snapshot(bitmap=True)
        dirty2 = dirty_regions(f.snap_uri(), "frozen")
        check(covered(union(dirty + gran_round([during])), dirty2),
              "the bitmap lost changes: %s, had %s" % (dirty2, dirty))
        inc = os.path.join(tmp, "inc.raw")
        shutil.copyfile(full, inc)
        with Nbdkit(tmp, filtered([PLUGIN, "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen"),
                    "next") as nk:
            read_regions(nk.uri(), dirty2, inc)
        chain_equals(inc, at_inc, tmp, "incremental after a broken snapshot")
        f.release(success=True)

    # --- break-guest-write: the helper, fleecing storage full ---------
    fl = os.path.join(tmp, "small")
    os.mkdir(fl)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700",
                        "tmpfs", fl], capture_output=True, text=True)
    if r.returncode != 0:
        print("SKIP: break-guest-write part: cannot mount a tmpfs: %s"
              % r.stderr.strip())
        print("ok")
        sys.exit(0)
    try:
        with UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
            rd = vm.run_dir(os.path.join(tmp, "run"))
            vm.guest_write(0, rng.randbytes(SIZE))
            b0 = os.path.join(tmp, "b0.raw")
            helper_backup(vm, rd, fl, tmp, None, b0, "full", "new")
            vm.random_writes(rng, 40, max_len=256 << 10)
            at_setup = vm.disk_read()
            s = HelperSetup(vm, rd, fl)
            regions = s.regions(SIZE)
            third = len(regions) // 3
            img = os.path.join(tmp, "b1.raw")
            shutil.copyfile(b0, img)
            read_regions(s.uri, regions[:third], img)
            # The guest overwrites what is not read yet: the copies fill
            # the fleecing filesystem, and then the guest's writes fail.
            ok_writes, failed = [], []
            for b, e in regions[third:]:
                try:
                    vm.guest_write(b, rng.randbytes(min(e - b, 65536)))
                    ok_writes.append(b)
                except OSError as ex:
                    check(ex.errno in (errno.ENOSPC, errno.EIO),
                          "guest write: %s" % ex)
                    failed.append((b, errno.errorcode[ex.errno]))
            check(failed, "no guest write failed: is the tmpfs too big?")
            # The snapshot is intact: the backup reads it correctly.
            read_regions(s.uri, regions[third:], img)
            chain_equals(img, at_setup, tmp, "backup while guest writes "
                         "failed")
            s.teardown(False)
            no_leftovers(vm, rd, fl)
            print("break-guest-write (helper, fleecing filesystem full): "
                  "%d guest writes went through, %d failed (%s), the "
                  "backup read the snapshot correctly"
                  % (len(ok_writes), len(failed), failed[0][1]))
            b2 = os.path.join(tmp, "b2.raw")
            helper_backup(vm, rd, fl, tmp, b0, b2,
                          "incremental after the failed backup", "reuse")
            check(vm.alive(), "qemu-storage-daemon died")
    finally:
        if fl in mounts():
            subprocess.run(["umount", fl], timeout=60)
print("ok")
