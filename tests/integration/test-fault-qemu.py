#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Fault injection: qemu-storage-daemon goes away in the middle of a backup
made with backupaccess-helper (upstream back end, persistent bitmap on a
qcow2 disk), while a client is half-way through reading it and the guest
has written meanwhile.  Four ways: killed (SIGKILL) or shut down cleanly
(SIGTERM, which saves persistent bitmaps), during an incremental or a full
backup.  Each time: the client fails with a clear error within bounded
time, `teardown --failure` cleans up everything local (processes, mounts,
run directory, fleecing image), exits 1 and says what the next backup will
be; and after QEMU is started again on the same disk, the next backup
through the helper misses no change: after a clean shutdown it is an
incremental that adds the unfinished backup's changes back; after a kill
(bitmap inconsistent) or an unfinished full backup it is a full one, said
so on stderr.  The backup chain equals the guest disk byte for byte."""
import os
import random
import signal
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import check
from fault_fixture import (HelperSetup, PausedReader, UpstreamVm,
                           helper_backup, no_leftovers)

SIZE = 32 << 20
rng = random.Random(55)


def fault_mid_backup(vm, rd, fl, sig, bitmap="backup"):
    """Sets up a backup, reads a quarter of it, lets the guest write,
    then ends QEMU with sig; the client must fail, teardown must clean
    up locally and explain.  Returns teardown's stderr."""
    vm.random_writes(rng, 8)
    s = HelperSetup(vm, rd, fl, bitmap)
    regions = s.regions(SIZE)
    total = sum(e - b for b, e in regions)
    reader = PausedReader(s.uri, regions, total // 4)
    try:
        vm.random_writes(rng, 4)                # during the backup
        nbdkit_pid = s.nbdkit_pid()
        vm.kill(sig)
        rc, out, err = reader.go()
    finally:
        reader.kill()
    check(rc == 3 and "read error: EIO" in err,
          "the client after QEMU went away: exit %d, %r %r" % (rc, out, err))
    check(os.path.exists("/proc/%d" % nbdkit_pid),
          "nbdkit exited when QEMU went away")
    r = s.teardown(False, ok=False)
    check(r.returncode == 1 and "QEMU is gone" in r.stderr,
          "teardown with QEMU gone: exit %d: %s" % (r.returncode, r.stderr))
    no_leftovers(vm, rd, fl)
    check(not os.path.exists("/proc/%d" % nbdkit_pid) or
          open("/proc/%d/stat" % nbdkit_pid).read().split()[2] == "Z",
          "nbdkit still runs after teardown")
    r2 = s.teardown(False)
    check("nothing to tear down" in r2.stderr, r2.stderr)
    vm.start()
    print("%s, %s backup: client: %s; teardown: %s"
          % (signal.Signals(sig).name, s.mode, err.strip(),
             r.stderr.strip().replace("\n", " | ")))
    return s, r.stderr


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
    rd = vm.run_dir(os.path.join(tmp, "run"))
    fl = os.path.join(tmp, "fleecing")
    os.mkdir(fl)
    img = lambda n: os.path.join(tmp, "backup%d.raw" % n)
    vm.guest_write(0, rng.randbytes(SIZE))
    helper_backup(vm, rd, fl, tmp, None, img(0), "first full", "new")
    # Started again, QEMU loads the bitmap from the image (and marks it
    # in use there: a kill from now on leaves it inconsistent).
    vm.kill(signal.SIGTERM)
    vm.start()
    check(vm.bitmaps()["backup"]["persistent"], "bitmap not persistent")

    # --- clean shutdown during an incremental -------------------------
    s, err = fault_mid_backup(vm, rd, fl, signal.SIGTERM)
    check(s.mode == "reuse", "not an incremental: %s" % s.mode)
    check("if QEMU shut down cleanly, it saved the changes" in err, err)
    frozen = [b for b in vm.bitmaps() if b.startswith("ba-")]
    check(frozen and all(b.endswith("-frozen") for b in frozen),
          "QEMU did not keep the frozen changes: %s" % list(vm.bitmaps()))
    s = helper_backup(vm, rd, fl, tmp, img(0), img(1),
                      "incremental after a clean shutdown", "reuse")
    check("adding the changes of 1 unfinished backup" in s.setup_stderr,
          s.setup_stderr)

    # --- killed during an incremental ---------------------------------
    s, err = fault_mid_backup(vm, rd, fl, signal.SIGKILL)
    check(s.mode == "reuse", "not an incremental: %s" % s.mode)
    check("if it was killed, bitmap 'backup' is inconsistent and the next "
          "setup makes a full backup" in err, err)
    check(vm.bitmaps()["backup"].get("inconsistent"),
          "the bitmap survived a kill: %s" % vm.bitmaps())
    s = helper_backup(vm, rd, fl, tmp, img(1), img(2),
                      "backup after a kill", "new")
    check("bitmap 'backup' is inconsistent" in s.setup_stderr and
          "this backup is a full one" in s.setup_stderr, s.setup_stderr)
    vm.random_writes(rng, 6)
    helper_backup(vm, rd, fl, tmp, img(2), img(3),
                  "incremental after the full", "reuse")

    # --- clean shutdown during a full backup --------------------------
    s, err = fault_mid_backup(vm, rd, fl, signal.SIGTERM, "other")
    check(s.mode == "new", "not a full backup: %s" % s.mode)
    check("this full backup did not finish" in err, err)
    # QEMU saved the bitmap, which records only writes since the
    # unfinished full backup began: the next backup must be full.
    check("other" in vm.bitmaps(), "bitmaps: %s" % list(vm.bitmaps()))
    s = helper_backup(vm, rd, fl, tmp, img(3), img(4),
                      "backup after an unfinished full one", "new",
                      bitmap="other")
    check("full backup that never finished" in s.setup_stderr,
          s.setup_stderr)

    # --- killed during a full backup ----------------------------------
    s, err = fault_mid_backup(vm, rd, fl, signal.SIGKILL, "third")
    check(s.mode == "new", "not a full backup: %s" % s.mode)
    helper_backup(vm, rd, fl, tmp, img(4), img(5),
                  "backup after a killed full one", "new", bitmap="third")
    vm.random_writes(rng, 6)
    helper_backup(vm, rd, fl, tmp, img(5), img(6),
                  "incremental after that", "reuse", bitmap="third")
    check(vm.alive(), "qemu-storage-daemon died")
print("ok: 4 QEMU faults mid-backup, no change lost")
