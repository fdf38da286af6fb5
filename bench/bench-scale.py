#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""make bench, the scale part: a 16 TiB export (QEMU's null-co driver)
with 1,000,000 scattered dirty extents in its bitmap.  Measures the time
from starting nbdkit (backupaccess filter with backupaccess-bitmap over
the snapshotaccess plugin) to the first byte served, and nbdkit's resident
memory then."""
import os
import subprocess
import sys
import tempfile
import time

import nbd

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from harness import FILTER, PLUGIN
from qemu_fixture import QMP, wait_for

SIZE = 16 << 40
EXTENTS = int(os.environ.get("BENCH_SCALE_EXTENTS", "1000000"))
STRIDE = SIZE // EXTENTS // 65536 * 65536


def main():
    with tempfile.TemporaryDirectory(prefix="backupaccess-scale.") as tmp:
        qmp_path = os.path.join(tmp, "qmp.sock")
        nbd_path = os.path.join(tmp, "nbd.sock")
        qsd = subprocess.Popen(["qemu-storage-daemon", "--chardev",
                                "socket,id=qmp,path=%s,server=on,wait=off"
                                % qmp_path, "--monitor", "chardev=qmp"])
        nk = None
        try:
            wait_for(lambda: os.path.exists(qmp_path), "QMP")
            qmp = QMP(qmp_path)
            qmp.cmd("blockdev-add", driver="null-co", size=SIZE,
                    **{"node-name": "disk", "read-zeroes": True})
            qmp.cmd("block-dirty-bitmap-add", node="disk", name="b",
                    granularity=65536)
            qmp.cmd("nbd-server-start",
                    addr={"type": "unix", "data": {"path": nbd_path}})
            qmp.cmd("block-export-add", type="nbd", id="w", name="w",
                    writable=True, **{"node-name": "disk"})
            # The guest writes 512 bytes every STRIDE bytes.
            h = nbd.NBD()
            h.set_export_name("w")
            h.connect_unix(nbd_path)
            buf = nbd.Buffer(512)
            t0 = time.monotonic()
            for i in range(EXTENTS):
                while h.aio_in_flight() >= 64:
                    h.poll(-1)
                h.aio_pwrite(buf, i * STRIDE + (i % 7) * 4096)
            while h.aio_in_flight() > 0:
                h.poll(-1)
            h.shutdown()
            setup = time.monotonic() - t0
            qmp.cmd("block-export-add", type="nbd", id="r", name="r",
                    writable=True, **{"node-name": "disk"},
                    bitmaps=[{"node": "disk", "name": "b"}])

            sock = os.path.join(tmp, "nbdkit.sock")
            t0 = time.monotonic()
            nk = subprocess.Popen(["nbdkit", "-f", "-U", sock,
                                   "--filter=" + FILTER, PLUGIN,
                                   "socket=" + nbd_path, "export=r",
                                   "backupaccess-bitmap=b"])
            wait_for(lambda: os.path.exists(sock) or nk.poll() is not None,
                     "nbdkit", timeout=300)
            c = nbd.NBD()
            c.connect_unix(sock)
            c.pread(512, 0)                  # the first dirty byte
            first = time.monotonic() - t0
            with open("/proc/%d/status" % nk.pid) as f:
                rss = [l for l in f if l.startswith("VmRSS")][0].split()[1]
            c.shutdown()
            print("16 TiB export, %d dirty extents (written in %.1f s): "
                  "nbdkit start to first byte %.2f s (target < 3 s), "
                  "nbdkit resident memory %.1f MiB (target < 64 MiB)"
                  % (EXTENTS, setup, first, int(rss) / 1024))
        finally:
            if nk is not None:
                nk.terminate()
                nk.wait()
            qsd.terminate()
            qsd.wait()


main()
