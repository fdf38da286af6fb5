#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: all
"""A full and an incremental backup of a real Linux guest's ext4 disk
with backupaccess-helper, while the guest writes to it.

The guest (tests/lib/guest.py: Debian's kernel and a busybox initramfs in
qemu-system-x86_64 under TCG) writes, overwrites, appends to, renames and
deletes files, syncs and runs fstrim, all the time.  The QEMU is
$BACKUPACCESS_QEMU (default 7.2) from tests/lib/qemus.py: on upstream
builds the helper's upstream back end (it makes the fleecing image), on
Proxmox VE's its Proxmox back end (the fleecing node DEVICE-fleecing is
attached first, as vzdump does).

Each backup is taken as vzdump takes one: the guest's file system is
frozen (sync + fsfreeze), the VM paused, the helper's setup run, the VM
resumed and the file system thawed.  While the VM is paused the disk image
is copied: the reference, the disk exactly at the snapshot.  The guest
then writes (and trims) on while the backup is read through the helper:
the full with nbdcopy, as the README says; the incremental with a small
libnbd reader that copies every readable extent into a qcow2 overlay of
the full (the README's nbdcopy recipe needs backupaccess-clean=zero, which
the helper does not set).  Checked: each backup equals its reference
(qemu-img compare), e2fsck -fn finds the restored file systems clean, the
fleecing image grew while the guest wrote and is small at the end, the
helper's teardown leaves nothing in QEMU (nodes, exports, NBD server,
jobs, bitmaps but the live one), and the guest is still writing."""
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import guest  # noqa: E402
import qemus  # noqa: E402
from harness import HELPER, check, run, run_helper  # noqa: E402
from qemu_fixture import QMPError  # noqa: E402

import nbd  # noqa: E402

SIZE = 128 << 20
BITMAP = "backup"
# What is left in the fleecing image at the end: qcow2's metadata, and
# clusters whose discard is still in the filter's batch.
FLEECE_END_MAX = 1 << 20


def skip(why):
    if qemus.require_all():
        print("FAIL: %s" % why)
        sys.exit(1)
    print(why)
    sys.exit(77)


def wait_progress(g, since, key, more, timeout=60):
    """Until the guest's counter key has grown by more since since."""
    end = time.monotonic() + timeout
    while True:
        s = g.status()
        if s[key] >= since[key] + more:
            return s
        check(time.monotonic() < end, "the guest's %s stayed at %s "
              "(wanted +%d in %ds)" % (key, s[key], more, timeout))
        time.sleep(0.2)


def check_alive(g):
    if not g.alive():
        g.proc.wait()
        check(False, "QEMU died (exit %s): %s" % (g.proc.returncode,
                                                  g.qemu_log()[-2000:]))


def qemu_state(qmp):
    """What the helper could leave behind in QEMU."""
    nodes = qmp.cmd("query-named-block-nodes", flat=True)
    return {
        "nodes": sorted(n["node-name"] for n in nodes),
        "bitmaps": sorted((n["node-name"], b["name"]) for n in nodes
                          for b in n.get("dirty-bitmaps", [])
                          if "name" in b),
        "exports": qmp.cmd("query-block-exports"),
        "jobs": qmp.cmd("query-jobs"),
    }


def check_nothing_left(g, before):
    now = qemu_state(g.qmp)
    want = dict(before, bitmaps=[(g.disks[0].node, BITMAP)])
    check(now == want, "left in QEMU after teardown: %s, expected %s"
          % (now, want))
    try:
        g.qmp.cmd("nbd-server-stop")
        check(False, "QEMU's NBD server was still running after teardown")
    except QMPError as e:
        check("not running" in str(e), "nbd-server-stop: %s" % e)


class FleecingWatch(threading.Thread):
    """Polls the helper's status (the fleecing image's allocated size,
    bytes left to read) every 0.2 s until stopped: the peak."""

    def __init__(self, g, rd):
        super().__init__()
        self.g = g
        self.rd = rd
        self.peak = 0
        self.done = threading.Event()
        self.error = None

    def run(self):
        while not self.done.is_set():
            r = run_helper("status", "--run-dir", self.rd, ok=False)
            if r.returncode != 0:
                self.error = r.stderr
                return
            d = json.loads(r.stdout)["devices"][0]
            self.peak = max(self.peak, d["fleecing-size"])
            self.done.wait(0.2)

    def stop(self):
        self.done.set()
        self.join()
        check_alive(self.g)
        check(self.error is None, "status: %s" % self.error)


class Backup:
    """One backup of the guest's disk 0 through the helper."""

    def __init__(self, g, tmp, name):
        self.g = g
        self.tmp = tmp
        self.name = name
        self.rd = os.path.join(tmp, "run")
        self.ref = os.path.join(tmp, name + "-reference.raw")
        self.disk = g.disks[0]
        self.fleece = os.path.join(tmp, name + "-fleecing.qcow2")

    def setup(self):
        """vzdump's order: freeze, (paused) setup, resume, thaw; the
        reference is copied while the VM is paused."""
        g = self.g
        args = ["setup", "--qmp", g.qmp_path, "--run-dir", self.rd,
                "--device", self.disk.device, "--bitmap", BITMAP]
        if g.style == "pve":
            self.attach_fleecing()
        else:
            args += ["--fleecing-dir", self.tmp]
        self.at_freeze = g.freeze()
        try:
            with g.paused():
                t0 = time.monotonic()
                g.copy_disk(0, self.ref)
                self.ref_seconds = time.monotonic() - t0
                t0 = time.monotonic()
                self.info = json.loads(run_helper(*args).stdout)
                self.setup_seconds = time.monotonic() - t0
        finally:
            g.thaw()
        self.served = json.loads(run_helper(
            "serve", "--run-dir", self.rd).stdout)["devices"][0]
        return self.info["devices"][0]

    def attach_fleecing(self):
        """As vzdump does before backup-access-setup: a qcow2 image of
        the disk's size, node DEVICE-fleecing, discards passed down."""
        run([self.g.qemu.img, "create", "-q", "-f", "qcow2", self.fleece,
             str(self.disk.size)])
        self.g.qmp.cmd("blockdev-add", **{
            "driver": "qcow2", "node-name": self.disk.device + "-fleecing",
            "discard": "unmap", "file": {"driver": "file", "discard": "unmap",
                                         "filename": self.fleece}})

    def guest_writes_meanwhile(self):
        """The guest writes and trims while the backup is open: wait for
        a few rounds and one fstrim of its own after the setup."""
        s = wait_progress(self.g, self.at_freeze, "trims", 1)
        return wait_progress(self.g, s, "rounds", 10)

    @contextlib.contextmanager
    def watching(self):
        """The fleecing image's size watched while the block runs."""
        self.watch = FleecingWatch(self.g, self.rd)
        self.watch.start()
        try:
            yield
        finally:
            self.watch.stop()

    def teardown(self, all_read):
        """Once the fleecing image has settled: the helper's teardown,
        and the fleecing node detached as vzdump does.  Returns what the
        helper said (the filter's summary)."""
        self.end = wait_fleecing_settled(self.rd, all_read)
        out = run_helper("teardown", "--run-dir", self.rd, "--success")
        self.after = self.g.status()
        check(not os.path.exists(self.rd), "the run directory is left")
        if self.g.style == "pve":
            self.g.qmp.cmd("blockdev-del",
                           **{"node-name": self.disk.device + "-fleecing"})
            os.unlink(self.fleece)
        return out.stderr


def wait_fleecing_settled(rd, all_read, timeout=30):
    """The helper's status once the fleecing image is small again (the
    filter sends its last discards within a second) and, with all_read,
    the filter's counters (written every second) say that nothing is
    left to read; or after timeout: the status at the end of the
    backup."""
    end = time.monotonic() + timeout
    while True:
        d = json.loads(run_helper("status", "--run-dir", rd).stdout)[
            "devices"][0]
        if (d["fleecing-size"] <= FLEECE_END_MAX and
                (d["bytes-left"] == 0 or not all_read)) or \
                time.monotonic() > end:
            return d
        time.sleep(0.3)


def copy_incremental(uri, overlay, size, progress):
    """Copies every readable extent of uri into the qcow2 overlay (through
    qemu-nbd): the filter reports what it will not serve (clean, or
    already read and discarded) as type 1, a hole that is not zero, and
    everything else is dirty and must be copied, zero extents too (a
    dirty region that reads as zeroes, e.g. trimmed by the guest, would
    otherwise keep the previous backup's data).  Half-way, it waits for
    the guest to write and trim more.  Returns (extents copied, bytes,
    bytes of them in zero extents)."""
    src = nbd.NBD()
    src.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    src.connect_uri(uri)
    dst = nbd.NBD()
    dst.connect_systemd_socket_activation(
        ["qemu-nbd", "-f", "qcow2", "--discard=unmap", overlay])
    extents = []

    def collect(meta, offset, entries, err):
        if meta != nbd.CONTEXT_BASE_ALLOCATION:
            return 0
        for i in range(0, len(entries), 2):
            extents.append((offset, entries[i], entries[i + 1]))
            offset += entries[i]
        return 0

    pos = 0
    while pos < size:
        n = len(extents)
        src.block_status(min(size - pos, 1 << 30), pos, collect)
        check(len(extents) > n, "no extents at %d" % pos)
        pos = extents[-1][0] + extents[-1][1]
    readable = [(o, n) for o, n, t in extents if t != 1]
    zero = sum(n for o, n, t in extents if t != 1 and t & nbd.STATE_ZERO)
    copied = 0
    for i, (off, n) in enumerate(readable):
        if i == len(readable) // 2:
            progress()
        for o in range(off, off + n, 4 << 20):
            k = min(4 << 20, off + n - o)
            dst.pwrite(src.pread(k, o), o)
            copied += k
    dst.flush()
    dst.shutdown()
    src.shutdown()
    return len(readable), copied, zero


def e2fsck(image, fmt, tmp):
    raw = image
    if fmt != "raw":
        raw = os.path.join(tmp, "e2fsck.raw")
        run(["qemu-img", "convert", "-f", fmt, "-O", "raw", image, raw])
    r = subprocess.run(["e2fsck", "-fn", raw], capture_output=True,
                       text=True, timeout=120)
    if raw != image:
        os.unlink(raw)
    # -n does not replay the journal: it only warns that it skips it.
    # A file system frozen at the snapshot has nothing in it to replay.
    check(r.returncode == 0 and "journal" not in r.stdout + r.stderr and
          "Fix?" not in r.stdout,
          "e2fsck -fn %s: exit %d\n%s%s"
          % (image, r.returncode, r.stdout, r.stderr))
    print("e2fsck -fn: " + r.stdout.strip().splitlines()[-1])


def compare(backup, fmt, ref):
    r = subprocess.run(["qemu-img", "compare", "-f", fmt, "-F", "raw",
                        backup, ref], capture_output=True, text=True,
                       timeout=120)
    check(r.returncode == 0, "%s differs from the disk at its snapshot: %s%s"
          % (backup, r.stdout, r.stderr))


def report(name, b, t_copy, copied):
    wrote = {k: b.after[k] - b.at_freeze[k] for k in b.at_freeze}
    print("%s: setup %.2f s (reference copy %.2f s), copy %.2f s of %.1f "
          "MiB; fleecing image peak %.1f MiB, at the end %.0f KiB; guest "
          "wrote %.1f MiB in %d rounds with %d fstrims meanwhile"
          % (name, b.setup_seconds, b.ref_seconds, t_copy, copied / 2**20,
             b.watch.peak / 2**20, b.end["fleecing-size"] / 1024,
             wrote["bytes"] / 2**20, wrote["rounds"], wrote["trims"]))


def warm_up(q, g):
    print("QEMU %s (%s), guest kernel %s booted in %.1f s"
          % (q.label, q.version(), g.kernel_release, g.boot_seconds))
    s0 = g.start_workload()
    s1 = wait_progress(g, s0, "trims", 2)
    t = time.monotonic()
    s2 = wait_progress(g, s1, "rounds", 50)
    t = time.monotonic() - t
    print("workload: %.1f MiB/s, %.0f rounds/s"
          % ((s2["bytes"] - s1["bytes"]) / t / 2**20,
             (s2["rounds"] - s1["rounds"]) / t))


def full_backup(g, tmp, before):
    """nbdcopy of the helper's URI, as the README says; returns the
    backup's path."""
    full = Backup(g, tmp, "full")
    dev = full.setup()
    check(dev["bitmap-mode"] == "new", "a first backup is full: %s" % dev)
    full_raw = os.path.join(tmp, "full.raw")
    with full.watching():
        full.guest_writes_meanwhile()
        t0 = time.monotonic()
        run(["nbdcopy", full.served["uri"], full_raw])
        t_full = time.monotonic() - t0
    summary = full.teardown(False)   # nbdcopy skips zero extents
    report("full", full, t_full, SIZE)
    print(summary.strip())
    compare(full_raw, "raw", full.ref)
    e2fsck(full_raw, "raw", tmp)
    check_nothing_left(g, before)
    check(full.watch.peak >= 1 << 20, "the fleecing image never grew "
          "(peak %d): copy-before-write not exercised" % full.watch.peak)
    check(full.end["fleecing-size"] <= FLEECE_END_MAX,
          "the fleecing image is not small at the end: %s" % full.end)
    return full_raw


def incremental_backup(g, tmp, before, full_raw):
    """The readable extents into a qcow2 overlay of the full one."""
    wait_progress(g, g.status(), "trims", 1)
    incr = Backup(g, tmp, "incr")
    dev = incr.setup()
    check(dev["bitmap-mode"] == "reuse", "an incremental: %s" % dev)
    overlay = os.path.join(tmp, "incr.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full_raw,
         "-F", "raw", overlay])
    with incr.watching():
        t0 = time.monotonic()
        n, copied, zero = copy_incremental(
            incr.served["uri"], overlay, SIZE,
            lambda: wait_progress(g, g.status(), "trims", 1))
        t_incr = time.monotonic() - t0
    summary = incr.teardown(True)
    report("incremental", incr, t_incr, copied)
    print("incremental: %d dirty extents, %.1f MiB of them reported as "
          "zero" % (n, zero / 2**20))
    print(summary.strip())
    compare(overlay, "qcow2", incr.ref)
    e2fsck(overlay, "qcow2", tmp)
    check_nothing_left(g, before)
    check(0 < copied < SIZE, "the incremental copied %d bytes" % copied)
    check(incr.end["bytes-left"] == 0, "the filter says dirty bytes were "
          "left unread: %s" % incr.end)
    check(incr.end["fleecing-size"] <= FLEECE_END_MAX,
          "the fleecing image is not small at the end: %s" % incr.end)


def main(q, tmp):
    style = "pve" if q.pve else "upstream"
    with guest.Guest(q, tmp, sizes=(SIZE,), style=style) as g:
        try:
            before = qemu_state(g.qmp)
            warm_up(q, g)
            full_raw = full_backup(g, tmp, before)
            incremental_backup(g, tmp, before, full_raw)
            # The guest goes on.
            wait_progress(g, g.status(), "rounds", 10)
            end = g.stop_workload()
            print("guest: %d rounds, %.1f MiB written, %d fstrims in all"
                  % (end["rounds"], end["bytes"] / 2**20, end["trims"]))
            check_alive(g)
        finally:
            # A failed test's backup, torn down while QEMU is there.
            rd = os.path.join(tmp, "run")
            if os.path.exists(rd):
                subprocess.run([HELPER, "teardown", "--run-dir", rd,
                                "--failure"], capture_output=True,
                               timeout=180)


if __name__ == "__main__":
    # Skips (or fails) when the build is not there; its programs and
    # modules come first in this process's environment.
    q = qemus.current()
    why = guest.missing()
    if why:
        skip(why)
    if not os.access(HELPER, os.X_OK):
        skip("%s is not built: run make" % HELPER)
    with tempfile.TemporaryDirectory(prefix="backupaccess-guest.") as tmp:
        main(q, tmp)
    print("ok")
