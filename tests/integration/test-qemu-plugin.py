#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""The snapshotaccess plugin against real qemu-storage-daemon: reads are
byte-identical under parallel load from several client connections (and
multi-conn is offered), also one larger than QEMU's 32 MiB limit;
unaligned trims are refused before they reach QEMU while aligned ones,
and a tail ending at the end of the disk, are forwarded; QEMU's refusal
arrives as EPERM with a clear message, and a refused read does not keep
its pool connection (a test that would hang fails instead); and when
QEMU goes away mid-read every request fails promptly while nbdkit keeps
running."""
import errno
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import PLUGIN, Nbdkit, check, run, within
from qemu_fixture import Fleecing
import qemus

SIZE = (64 << 20) + 4096            # the last cluster is 4 KiB long
rng = random.Random(3)


def expect_error(h, fn, errnum):
    try:
        fn(h)
    except nbd.Error as e:
        check(e.errnum == errnum, "expected %s, got %s"
              % (errno.errorcode[errnum], e))
        return
    check(False, "expected %s, the request succeeded"
          % errno.errorcode[errnum])


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     Fleecing(SIZE) as f:
    f.guest_write(0, os.urandom(SIZE))
    expected = f.disk_read(0, SIZE)
    f.snapshot(bitmap=False)
    with Nbdkit(tmp, [PLUGIN, "socket=" + f.nbd_path, "export=snap",
                      "connections=3"], "plugin") as nk:
        info = run(["nbdinfo", nk.uri()]).stdout
        check("can_multi_conn: true" in info, info)

        # Parallel random reads from several client connections.
        errors = []

        def reader(seed):
            r = random.Random(seed)
            h = nbd.NBD()
            h.connect_uri(nk.uri())
            for _ in range(300):
                n = r.randrange(1, 1 << 20)
                off = r.randrange(0, SIZE - n)
                if bytes(h.pread(n, off)) != expected[off:off + n]:
                    errors.append((off, n))
            h.shutdown()
        threads = [threading.Thread(target=reader, args=(s,))
                   for s in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        check(not errors, "wrong data at %s" % errors[:5])
        out = os.path.join(tmp, "copy.raw")
        run(["nbdcopy", "--connections=4", nk.uri(), out])
        with open(out, "rb") as fp:
            check(fp.read() == expected, "nbdcopy through the plugin "
                  "differs from the snapshot")

        h = nbd.NBD()
        h.connect_uri(nk.uri())
        # More than QEMU's 32 MiB in one request: split upstream.
        check(bytes(h.pread(40 << 20, 4096)) ==
              expected[4096:4096 + (40 << 20)], "a 40 MiB read differs")
        # Unaligned trims never reach QEMU (it would abort).
        expect_error(h, lambda h: h.trim(4096, 0), errno.EINVAL)
        expect_error(h, lambda h: h.trim(65536, 4096), errno.EINVAL)
        check(f.alive(), "qemu-storage-daemon died")
        # Aligned ones do: the data is gone, and QEMU's refusal is EPERM.
        h.trim(65536, 65536)
        # More refusals than pool connections: each gives its one back.
        for _ in range(5):
            within(60, "a refused read", lambda: expect_error(
                h, lambda h: h.pread(512, 65536), errno.EPERM))
        h.trim(4096, 64 << 20)                   # the tail cluster
        if qemus.current().at_least(9, 1):
            # QEMU 9.1 and later round a discard inward to whole
            # clusters, at the end of the disk too: the short last
            # cluster is never discarded and stays readable.
            check(bytes(h.pread(512, 64 << 20)) ==
                  expected[64 << 20:(64 << 20) + 512], "read of the tail")
        else:
            expect_error(h, lambda h: h.pread(512, 64 << 20), errno.EPERM)
        check(f.alive(), "qemu-storage-daemon died")
        check(bytes(h.pread(4096, 0)) == expected[:4096], "read at 0")

        # QEMU goes away in the middle of a copy.
        p = subprocess.Popen(["nbdcopy", "--connections=4", nk.uri(),
                              "null:"], stderr=subprocess.PIPE)
        time.sleep(0.05)
        f.proc.send_signal(signal.SIGKILL)
        f.proc.wait()
        try:
            _, err = p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            check(False, "nbdcopy hung after QEMU died")
        t0 = time.monotonic()
        # Every pooled connection, and each again once it is dead.
        for _ in range(7):
            expect_error(h, lambda h: h.pread(4096, 0), errno.EIO)
        check(time.monotonic() - t0 < 10, "a read hung after QEMU died")
        h.shutdown()
        check(nk.proc.poll() is None, "nbdkit exited when QEMU died")
    log = nk.log()
    check("not aligned to the cluster size" in log, log)
    check("QEMU refused it" in log, log)
print("ok")
