#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""make demo: backups of a running disk as users take them, with
backupaccess-helper against a real qemu-storage-daemon (upstream QEMU
7.2, the helper's upstream back end) while a simulated guest keeps
writing to the disk:

1. a full and an incremental backup served by nbdkit with the
   backupaccess filter and the snapshotaccess plugin, read by nbdcopy
   (the incremental into a qcow2 overlay of the full, with --clean zero);
2. the same two with the one-command built-in copy, run --copy-into.

Each chain is checked with qemu-img compare against the disk as it was
when its backup was set up.  Everything lives in a temporary directory
that is removed at the end.  The VM is tests/lib/fault_fixture.py's
UpstreamVm: one qcow2 disk node in qemu-storage-daemon, written by "the
guest" through a FUSE export."""
import os
import random
import shlex
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from fault_fixture import UpstreamVm  # noqa: E402
import qemus  # noqa: E402

SIZE = int(os.environ.get("DEMO_SIZE_MIB", "256")) << 20
MiB = 1 << 20


def say(*a):
    print(*a, flush=True)


class Guest(threading.Thread):
    """Writes 64 KiB of random data at a random place every 10 ms (about
    6 MiB/s), until stopped; held (between two writes) while a backup is
    being set up."""

    def __init__(self, vm):
        super().__init__(daemon=True)
        self.vm, self.writes = vm, 0
        self.rng = random.Random(2026)
        self.go = threading.Event()
        self.idle = threading.Event()
        self.done = False

    def run(self):
        while not self.done:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            self.idle.clear()
            n = 64 << 10
            self.vm.guest_write(self.rng.randrange(0, SIZE - n) & ~511,
                                self.rng.randbytes(n))
            self.writes += 1
            time.sleep(0.01)

    def hold(self):
        self.go.clear()
        self.idle.wait()

    def release(self):
        self.idle.clear()
        self.go.set()


class Peak(threading.Thread):
    """The largest the fleecing images got."""

    def __init__(self, d):
        super().__init__(daemon=True)
        self.d, self.peak, self.done = d, 0, threading.Event()

    def run(self):
        while not self.done.is_set():
            total = 0
            for f in os.listdir(self.d):
                try:
                    total += os.stat(os.path.join(self.d, f)).st_blocks * 512
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            self.done.wait(0.05)


def backup(vm, guest, tmp, argv, reference):
    """Runs the helper while the guest writes: the reference is read
    while the guest is held, before the helper sets the backup up (its
    QEMU NBD socket appears once it is set up); then the guest goes on.
    Returns (seconds, guest writes, fleecing peak, the helper's
    messages)."""
    rd = os.path.join(tmp, "run")
    guest.hold()
    with open(reference, "wb") as f:
        f.write(vm.disk_read())
    w0 = guest.writes
    peak = Peak(os.path.join(tmp, "fleece"))
    peak.start()
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PATH=os.path.join(TOP, "helper")
                                  + ":" + os.environ["PATH"]))
    while not os.path.exists(os.path.join(rd, "qemu-nbd.sock")) and \
            p.poll() is None:
        time.sleep(0.01)
    guest.release()
    err = p.communicate(timeout=300)[1]
    secs = time.monotonic() - t0
    peak.done.set()
    peak.join()
    if p.returncode != 0:
        sys.exit("demo: the backup failed:\n" + err)
    return secs, guest.writes - w0, peak.peak, err


def compare(image, fmt, reference):
    subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw",
                    image, reference], check=True, timeout=300)


def show(argv, tmp):
    """The command, with the paths relative to the demo's directory."""
    cmd = " ".join(shlex.quote(a) for a in argv).replace(tmp + "/", "")
    say("   $ " + " \\\n       ".join(textwrap.wrap(
        cmd, 70, break_long_words=False, break_on_hyphens=False)))


def chain(vm, guest, tmp, name, steps):
    """steps: (title, helper arguments, the image, its format)."""
    rows = []
    for title, args, image, fmt in steps:
        say("== %s" % title)
        argv = ["backupaccess-helper", "run", "--qmp", vm.helper_qmp,
                "--run-dir", os.path.join(tmp, "run"),
                "--fleecing-dir", os.path.join(tmp, "fleece")] + args
        show(argv, tmp)
        ref = os.path.join(tmp, "reference.raw")
        secs, writes, peak, err = backup(vm, guest, tmp, argv, ref)
        for line in err.splitlines():
            if "summary:" in line or "complete:" in line:
                say("   " + line.split(": ", 1)[1].strip())
        compare(image, fmt, ref)
        say("   verified: %s equals the disk at the snapshot (%d guest "
            "writes during the backup)" % (os.path.basename(image), writes))
        rows.append((name, title.split(",")[0], secs, peak,
                     os.stat(image).st_blocks * 512))
        guest.release()
    return rows


def main():
    qemus.current()             # its programs first in PATH
    with tempfile.TemporaryDirectory(prefix="backupaccess-demo.") as tmp, \
            UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
        os.mkdir(os.path.join(tmp, "fleece"), 0o700)
        say("== qemu-storage-daemon (QEMU %s): a %d MiB disk %s of random "
            "data; a simulated guest writes 64 KiB at random places all "
            "the time" % (qemus.current().version(), SIZE // MiB, vm.device))
        vm.guest_write(0, os.urandom(SIZE))
        vm.guest_write(32 * MiB, bytes(16 * MiB))
        guest = Guest(vm)
        guest.start()
        guest.release()
        b = os.path.join(tmp, "nbdcopy")
        os.mkdir(b)
        dev = vm.device
        rows = chain(vm, guest, tmp, "nbdkit + nbdcopy", [
            ("full backup, nbdkit with the backupaccess filter and the "
             "snapshotaccess plugin, read by nbdcopy",
             ["--device", dev, "--bitmap", "nbdcopy-chain", "--", "sh",
              "-c", 'nbdcopy --flush "$BACKUPACCESS_URI_0" %s/full.raw' % b],
             os.path.join(b, "full.raw"), "raw"),
            ("incremental backup, the same way into a qcow2 overlay of the "
             "full one (--clean zero)",
             ["--device", dev, "--bitmap", "nbdcopy-chain", "--clean",
              "zero", "--", "sh", "-c",
              "qemu-img create -q -f qcow2 -b %s/full.raw -F raw "
              "%s/incr.qcow2 && nbdcopy --flush --destination-is-zero "
              "--sparse=0 --request-size=65536 \"$BACKUPACCESS_URI_0\" -- "
              "[ qemu-nbd -f qcow2 %s/incr.qcow2 ]" % (b, b, b)],
             os.path.join(b, "incr.qcow2"), "qcow2")])
        b = os.path.join(tmp, "copy")
        os.mkdir(b)
        rows += chain(vm, guest, tmp, "built-in copy", [
            ("full backup, one command: the built-in copy, straight from "
             "QEMU",
             ["--bitmap", "copy-chain", "--copy-into",
              "%s=%s/full.qcow2" % (dev, b)],
             os.path.join(b, "full.qcow2"), "qcow2"),
            ("incremental backup, one command, on top of the full one",
             ["--bitmap", "copy-chain", "--copy-into",
              "%s=%s/incr.qcow2,backing=%s/full.qcow2" % (dev, b, b)],
             os.path.join(b, "incr.qcow2"), "qcow2")])
        guest.done = True
        guest.release()
        guest.join()
        say("\n== summary (times include setup and teardown)")
        say("   %-17s %-20s %7s %9s %14s %10s" % (
            "way", "backup", "time", "MiB/s", "fleecing peak", "image"))
        for way, kind, secs, peak, size in rows:
            rate = "%.0f" % (SIZE / MiB / secs) if "full" in kind else "-"
            say("   %-17s %-20s %6.2fs %9s %10.1f MiB %6.1f MiB" % (
                way, kind, secs, rate, peak / MiB, size / MiB))
        say("demo: OK")


main()
