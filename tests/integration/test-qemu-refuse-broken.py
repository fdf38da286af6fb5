#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Against real qemu-storage-daemon: reads of clean regions, and re-reads
of discarded ones, are refused by the filter (EPERM) and never reach QEMU;
the extents show the dirty regions as data and the rest as holes that are
not zero; and when copy-before-write fails (blkdebug write errors on the
fleecing image, on-cbw-error=break-snapshot) reads fail with EIO and an
error that says the snapshot is broken, and nothing more is discarded."""
import os
import random
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import (Nbdkit, check, dirty_regions, filtered, nbdinfo_map,
                     reads_in_log, trims_in_log)
from qemu_fixture import Fleecing

SIZE = 32 << 20
rng = random.Random(99)


def expect_error(h, errno_name, n, off):
    try:
        h.pread(n, off)
    except nbd.Error as e:
        check(e.errnum == getattr(__import__("errno"), errno_name),
              "read %d+%d: expected %s, got %s" % (off, n, errno_name, e))
        return
    check(False, "read %d+%d succeeded, expected %s" % (off, n, errno_name))


def prepare(f):
    f.guest_write(0, rng.randbytes(SIZE))
    f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
    for off in (1 << 20, 5 << 20, 9 << 20):
        f.guest_write(off, rng.randbytes(256 << 10))


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    # --- refusals and extents ------------------------------------------
    with Fleecing(SIZE) as f:
        prepare(f)
        f.snapshot(bitmap=True)
        dirty = dirty_regions(f.snap_uri(), "frozen")
        check(dirty == [(1 << 20, (1 << 20) + (256 << 10)),
                        (5 << 20, (5 << 20) + (256 << 10)),
                        (9 << 20, (9 << 20) + (256 << 10))],
              "unexpected bitmap %s" % dirty)
        log = os.path.join(tmp, "log1.txt")
        with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen",
                                  log_below=log), "refuse") as nk:
            extents = nbdinfo_map(nk.uri())
            want = [(0, 1 << 20, 1), (1 << 20, 256 << 10, 0),
                    ((1 << 20) + (256 << 10), (4 << 20) - (256 << 10), 1),
                    (5 << 20, 256 << 10, 0),
                    ((5 << 20) + (256 << 10), (4 << 20) - (256 << 10), 1),
                    (9 << 20, 256 << 10, 0),
                    ((9 << 20) + (256 << 10), SIZE - (9 << 20) - (256 << 10),
                     1)]
            check(extents == want, "extents %s != %s" % (extents, want))
            h = nbd.NBD()
            h.connect_uri(nk.uri())
            expect_error(h, "EPERM", 4096, 0)                  # clean
            expect_error(h, "EPERM", 8192, (1 << 20) - 4096)   # straddles
            # Dirty: readable.  All but the last byte first: its cluster
            # is complete, and trimmed, only once that byte is read too.
            h.pread((256 << 10) - 1, 1 << 20)
            try:
                h.pread(1, (1 << 20) + (256 << 10) - 1)
            except nbd.Error as e:
                check(False, "the last byte of a cluster: %s (its cluster "
                      "was trimmed one byte early?)" % e)
            expect_error(h, "EPERM", 512, 1 << 20)             # discarded
            h.shutdown()
        out = nk.log()
        check("[0, 4096) is outside the dirty regions" in out, out)
        check("was already read and discarded" in out, out)
        reads = reads_in_log(log)
        check(reads == [(1 << 20, (256 << 10) - 1),
                        ((1 << 20) + (256 << 10) - 1, 1)],
              "reads that reached QEMU: %s" % reads)
        # One trim, or two if the flusher ran between the reads.
        trims = trims_in_log(log)
        check(trims in ([(1 << 20, 256 << 10)],
                        [(1 << 20, 192 << 10), ((1 << 20) + (192 << 10),
                                                64 << 10)]),
              "trims: %s" % trims)
        check(f.alive(), "qemu-storage-daemon died")
        f.release()

    # --- a bitmap that is not exported; a bitmap with nothing dirty ------
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
        f.snapshot(bitmap=True)                  # nothing written since
        try:
            Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                                  "export=snap"],
                                 "backupaccess-bitmap=nosuch:bitmap"),
                   "nosuch").start()
            check(False, "nbdkit started with a bitmap QEMU does not offer")
        except RuntimeError as e:
            check("does not offer qemu:dirty-bitmap:nosuch:bitmap" in str(e),
                  str(e))
        with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen"),
                    "clean") as nk:
            check(nbdinfo_map(nk.uri()) == [(0, SIZE, 1)],
                  "a clean bitmap: %s" % nbdinfo_map(nk.uri()))
            h = nbd.NBD()
            h.connect_uri(nk.uri())
            expect_error(h, "EPERM", 4096, 0)
            expect_error(h, "EPERM", 512, SIZE - 512)
            h.shutdown()
        check(f.alive(), "qemu-storage-daemon died")

    # --- a broken snapshot ----------------------------------------------
    with Fleecing(SIZE) as f:
        prepare(f)
        f.snapshot(bitmap=True, fleece_file={
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 5}]})
        log = os.path.join(tmp, "log2.txt")
        # Unbatched, so that the first read's trim comes before the break.
        with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen",
                                  "backupaccess-trim-batch=0",
                                  log_below=log), "broken") as nk:
            h = nbd.NBD()
            h.connect_uri(nk.uri())
            h.pread(256 << 10, 1 << 20)              # before the failure
            trims_before = trims_in_log(log)
            # The guest overwrites a dirty region: copying the old data
            # to the fleecing image fails, the snapshot breaks.
            f.guest_write(5 << 20, rng.randbytes(64 << 10))
            expect_error(h, "EIO", 4096, (9 << 20) + 4096)
            expect_error(h, "EIO", 4096, 9 << 20)
            h.shutdown()
        out = nk.log()
        check("the snapshot is broken" in out, out)
        check(trims_in_log(log) == trims_before,
              "trims after the failure: %s" % trims_in_log(log))
        check(" 0 bytes discarded" not in out and
              "262144 bytes discarded" in out, out)
        # The second read never reached QEMU: the filter knew.
        check(len(reads_in_log(log)) == 2, "reads: %s" % reads_in_log(log))
        check(f.alive(), "qemu-storage-daemon died")
print("ok")
