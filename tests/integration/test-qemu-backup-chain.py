#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""A full and an incremental backup of a disk in real qemu-storage-daemon,
read through the filter over nbdkit's nbd plugin while the guest keeps
writing: both equal the disk at their snapshot time, byte for byte, and
the incremental's dirty regions are the bitmap's, and a read across a
clean/dirty boundary is refused, saying why (clean=zero: zeroes for the
clean part would be copied over the previous backup)."""
import errno
import os
import random
import subprocess
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import (Nbdkit, check, dirty_regions, filtered, nbdinfo_map,
                     random_writes, run)
from qemu_fixture import Fleecing

SIZE = 64 << 20
rng = random.Random(1234)


def copy_while_guest_writes(fleecing, cmd):
    """Runs cmd; the guest writes until it has finished."""
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    writes = 0
    try:
        while p.poll() is None and writes < 200:
            random_writes(fleecing, rng, 1)
            writes += 1
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check(p.returncode == 0, "%s failed: %s" % (cmd[0], err))
    return writes


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     Fleecing(SIZE) as f:
    f.guest_write(0, rng.randbytes(SIZE))

    # --- full backup -------------------------------------------------
    at_full = f.disk_read(0, SIZE)
    f.snapshot(bitmap=False)
    random_writes(f, rng, 10)                    # before the copy
    full = os.path.join(tmp, "full.raw")
    with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                               "export=snap"]), "full") as nk:
        n = copy_while_guest_writes(
            f, ["nbdcopy", "--connections=2", nk.uri(), full])
    print("full backup: %d guest writes during the copy" % n)
    with open(full, "rb") as fp:
        check(fp.read() == at_full, "the full backup differs from the disk "
              "at snapshot time")
    check(f.alive(), "qemu-storage-daemon died")
    f.release(success=True)

    # --- incremental backup ------------------------------------------
    random_writes(f, rng, 20)
    # The guest zeroes data that the full backup holds: the incremental
    # must carry those zeroes, not skip them.
    f.guest_write(20 << 20, bytes(1 << 20))
    at_inc = f.disk_read(0, SIZE)
    f.snapshot(bitmap=True)
    bitmap = dirty_regions(f.snap_uri(), "frozen")
    check(bitmap, "the frozen bitmap is empty")
    random_writes(f, rng, 5)                     # before the copy
    overlay = os.path.join(tmp, "incremental.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "raw",
         overlay])
    with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                               "export=snap"],
                              "backupaccess-bitmap=frozen",
                              "backupaccess-clean=zero"), "inc") as nk:
        # The extents say exactly what to back up.
        extents = nbdinfo_map(nk.uri())
        data = []
        for off, length, typ in extents:
            check(typ in (0, 3), "unexpected extent type %d at %d" % (typ, off))
            if typ == 0:
                if data and data[-1][1] == off:
                    data[-1] = (data[-1][0], off + length)
                else:
                    data.append((off, off + length))
        check(data == bitmap, "extents %s != bitmap %s" % (data, bitmap))
        # A read across a clean/dirty boundary is refused: what a copy
        # read there would go over the previous backup.  Nothing of it
        # is consumed: the dirty part reads right afterwards.
        edge = next(s for s, e in bitmap
                    if s >= 8192 and all(e2 != s for _, e2 in bitmap))
        h = nbd.NBD()
        h.connect_uri(nk.uri())
        try:
            h.pread(16384, edge - 8192)
            check(False, "a read across the clean/dirty boundary at %d "
                  "was answered" % edge)
        except nbd.Error as e:
            check(e.errnum == errno.EPERM, "a read across the clean/dirty "
                  "boundary at %d: %s" % (edge, e))
        check(bytes(h.pread(8192, edge)) == at_inc[edge:edge + 8192],
              "the dirty part of the refused read, read alone, differs")
        h.shutdown()
        # Clean regions are zero extents: --destination-is-zero leaves
        # the previous backup there.  nbdcopy reads whole requests across
        # extent boundaries: requests of the bitmap's granularity keep
        # clean and dirty bytes apart, and --sparse=0 makes it write
        # dirty zeroes instead of skipping them.
        n = copy_while_guest_writes(
            f, ["nbdcopy", "--destination-is-zero", "--sparse=0",
                "--request-size=65536", nk.uri(),
                "--",
                "[", "qemu-nbd", "-f", "qcow2", overlay, "]"])
    log = nk.log()
    print("incremental backup: %d dirty regions, %d guest writes during the "
          "copy" % (len(bitmap), n))
    flat = os.path.join(tmp, "flat.raw")
    run(["qemu-img", "convert", "-O", "raw", overlay, flat])
    with open(flat, "rb") as fp:
        got = fp.read()
    bad = [i for i in range(0, SIZE, 4096)
           if got[i:i + 4096] != at_inc[i:i + 4096]]
    check(not bad, "full + incremental differs from the disk at the "
          "incremental's snapshot time in %d blocks of 4 KiB, first at %s"
          % (len(bad), bad[:1]))
    errors = [line for line in log.splitlines() if "error:" in line]
    check(" 1 requests refused" in log and len(errors) == 1 and
          "the read mixes clean and dirty bytes" in errors[0],
          "the filter logged other errors or refusals than the read "
          "across the boundary: " + log)
    check(f.alive(), "qemu-storage-daemon died")
    f.release(success=True)
print("ok")
