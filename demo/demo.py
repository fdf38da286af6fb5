#!/usr/bin/python3
"""make demo: a full and an incremental backup of a disk served by a real
qemu-storage-daemon, read through nbdkit + the backupaccess filter while
a "guest" keeps writing, stored as qcow2 files and verified against the
disk as it was at each snapshot.  Everything lives in a temporary folder
that is removed at the end.

The QEMU side is the test fixture tests/lib/qemu_fixture.py: the graph
Proxmox VE builds for a backup (copy-before-write + fleecing image +
snapshot-access + a frozen dirty bitmap), on upstream QEMU 7.2."""
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from harness import Nbdkit, dirty_regions, filtered, random_writes, run
from qemu_fixture import Fleecing

SIZE = int(os.environ.get("DEMO_SIZE_MIB", "256")) << 20
MiB = 1 << 20
rng = random.Random(2026)


def say(*a):
    print(*a, flush=True)


class Watch:
    """Samples the fleecing image's size while a backup runs."""

    def __init__(self, f):
        self.f, self.peak, self.done = f, 0, threading.Event()
        self.t = threading.Thread(target=self.loop)

    def loop(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.f.fleece_size())
            self.done.wait(0.05)

    def __enter__(self):
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.t.join()


def backup(f, tmp, name, nbdkit_args, target, nbdcopy_args):
    """Copies through nbdkit + filter into a qcow2 file while the guest
    writes; returns (seconds, guest writes, fleecing peak, summary)."""
    with Nbdkit(tmp, filtered(["nbd", "socket=" + f.nbd_path,
                               "export=snap"], *nbdkit_args), name) as nk, \
         Watch(f) as w:
        t0 = time.monotonic()
        p = subprocess.Popen(["nbdcopy"] + nbdcopy_args + [
            nk.uri(), "--", "[", "qemu-nbd", "-f", "qcow2", target, "]"])
        writes = 0
        while p.poll() is None:
            random_writes(f, rng, 1)
            writes += 1
        secs = time.monotonic() - t0
        if p.returncode != 0:
            sys.exit("demo: nbdcopy failed")
    summary = [l for l in nk.log().splitlines() if "summary" in l]
    return secs, writes, w.peak, summary[-1].split("summary: ")[1]


def save(f, path):
    with open(path, "wb") as fp:
        fp.write(f.disk_read(0, SIZE))


def main():
    with tempfile.TemporaryDirectory(prefix="backupaccess-demo.") as tmp, \
         Fleecing(SIZE, tmpdir=os.path.join(tmp, "qemu")) as f:
        say("== qemu-storage-daemon: a %d MiB qcow2 disk of random data, "
            "with a dirty bitmap" % (SIZE // MiB))
        f.guest_write(0, os.urandom(SIZE))
        f.guest_write(32 * MiB, bytes(16 * MiB))   # a zeroed area

        say("== full backup through nbdkit + backupaccess filter, "
            "the guest writing meanwhile")
        save(f, os.path.join(tmp, "at-full.raw"))
        f.snapshot(bitmap=False)
        full = os.path.join(tmp, "full.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", full, str(SIZE)])
        secs, writes, peak, summary = backup(
            f, tmp, "full", [], full, ["--connections=4"])
        run(["qemu-img", "compare", "-q", full,
             os.path.join(tmp, "at-full.raw")])
        say("   verified: full.qcow2 equals the disk at the snapshot "
            "(%d guest writes during the copy)" % writes)
        f.release(success=True)
        full_stats = (secs, peak, summary)

        say("== 40 more guest writes, then an incremental backup of the "
            "dirty regions only")
        random_writes(f, rng, 40)
        save(f, os.path.join(tmp, "at-inc.raw"))
        f.snapshot(bitmap=True)
        dirty = sum(e - s for s, e in dirty_regions(f.snap_uri(), "frozen"))
        inc = os.path.join(tmp, "incremental.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full,
             "-F", "qcow2", inc])
        secs, writes, peak, summary = backup(
            f, tmp, "inc", ["backupaccess-bitmap=frozen",
                            "backupaccess-clean=zero"], inc,
            # Clean regions read as zero extents and are skipped; whole
            # requests of the bitmap granularity (64K here) with sparse
            # detection off copy dirty zeroes too (see the man page).
            ["--destination-is-zero", "--sparse=0", "--request-size=65536"])
        run(["qemu-img", "compare", "-q", inc,
             os.path.join(tmp, "at-inc.raw")])
        say("   verified: full.qcow2 + incremental.qcow2 equals the disk at "
            "the snapshot (%d guest writes during the copy)" % writes)
        f.release(success=True)

        def on_disk(p):
            return os.stat(p).st_blocks * 512 / MiB

        say("\n== summary")
        say("   full backup:        %4d MiB in %.2f s (%.0f MiB/s), "
            "full.qcow2 %.1f MiB, fleecing image peak %.1f MiB"
            % (SIZE // MiB, full_stats[0], SIZE / MiB / full_stats[0],
               on_disk(full), full_stats[1] / MiB))
        say("   incremental backup: %4.1f MiB dirty, in %.2f s, "
            "incremental.qcow2 %.1f MiB, fleecing image peak %.1f MiB"
            % (dirty / MiB, secs, on_disk(inc), peak / MiB))
        say("   filter, full:        " + full_stats[2])
        say("   filter, incremental: " + summary)
        say("demo: OK")


main()
