#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Random-order, randomly sized, unaligned reads through the filter over
several connections, against real qemu-storage-daemon while the guest
writes: every byte read is the snapshot's, every trim that reaches QEMU is
cluster-aligned, QEMU is alive at the end, and the fleecing image has
shrunk back to (near) its empty size.  Once with 64 KiB clusters, once
with a 2 MiB-cluster fleecing image and backupaccess-cluster=2M (there
the 64 KiB-granular bitmap leaves clusters partly clean)."""
import os
import queue
import random
import sys
import tempfile
import threading

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import (Nbdkit, check, dirty_regions, filtered, random_writes,
                     trims_in_log)
from qemu_fixture import Fleecing

SIZE = 64 << 20
CONNECTIONS = 4


def split_randomly(rng, regions):
    pieces = []
    for start, end in regions:
        while start < end:
            n = min(end - start, rng.randrange(1, 300 << 10))
            pieces.append((start, n))
            start += n
    rng.shuffle(pieces)
    return pieces


def reader(uri, work, expected, errors):
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
        while True:
            try:
                off, n = work.get_nowait()
            except queue.Empty:
                break
            if bytes(h.pread(n, off)) != expected[off:off + n]:
                errors.append("wrong data at %d+%d" % (off, n))
        h.shutdown()
    except nbd.Error as e:
        errors.append(str(e))


def one_run(tmp, fleece_cluster, seed):
    rng = random.Random(seed)
    with Fleecing(SIZE, fleece_cluster=fleece_cluster) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
        random_writes(f, rng, 60)
        expected = f.disk_read(0, SIZE)
        f.snapshot(bitmap=True)
        empty = f.fleece_size()
        dirty = dirty_regions(f.snap_uri(), "frozen")
        # The guest overwrites dirty areas: copy-before-write fills the
        # fleecing image.
        for start, end in dirty:
            f.guest_write(start, rng.randbytes(min(end - start, 1 << 20)))
        grown = f.fleece_size()

        log = os.path.join(tmp, "log-%d.txt" % fleece_cluster)
        work = queue.Queue()
        for p in split_randomly(rng, dirty):
            work.put(p)
        errors = []
        with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                                   "export=snap"],
                                  "backupaccess-bitmap=frozen",
                                  "backupaccess-cluster=%d" % fleece_cluster,
                                  log_below=log)) as nk:
            threads = [threading.Thread(target=reader,
                                        args=(nk.uri(), work, expected,
                                              errors))
                       for _ in range(CONNECTIONS)]
            for t in threads:
                t.start()
            random_writes(f, rng, 30)            # during the reads
            for t in threads:
                t.join(120)
        summary = nk.log()
        check(not errors, "reads failed: %s" % errors[:5])
        check(f.alive(), "qemu-storage-daemon died:\n" + f.qsd_log())
        trims = trims_in_log(log)
        check(trims, "no trim reached QEMU")
        for off, n in trims:
            check(off % fleece_cluster == 0 and
                  (n % fleece_cluster == 0 or off + n == SIZE),
                  "unaligned trim %d+%d reached QEMU" % (off, n))
        # Every cluster with a dirty byte was trimmed.
        want = set()
        for start, end in dirty:
            want.update(range(start // fleece_cluster,
                              (end - 1) // fleece_cluster + 1))
        got = set()
        for off, n in trims:
            got.update(range(off // fleece_cluster,
                             (off + n - 1) // fleece_cluster + 1))
        check(got == want, "trimmed clusters %d != dirty clusters %d"
              % (len(got), len(want)))
        final = f.fleece_size()
        print("cluster %d: %d dirty regions, %d trims, fleecing image "
              "%d -> %d -> %d bytes" % (fleece_cluster, len(dirty),
                                        len(trims), empty, grown, final))
        check(grown > empty + (4 << 20),
              "the guest writes did not fill the fleecing image")
        # Data clusters are all freed; what stays is qcow2 metadata: the
        # L2 table the first copy allocated (one cluster).
        bound = empty + fleece_cluster + (256 << 10)
        check(final <= bound, "the fleecing image did not shrink back: "
              "%d > %d" % (final, bound))
        check(" 0 requests refused" in summary, summary)
        f.release()


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    one_run(tmp, 64 << 10, 7)
    one_run(tmp, 2 << 20, 8)
print("ok")
