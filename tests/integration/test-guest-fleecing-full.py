#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""A full fleecing store never fails a real guest's writes: the backup
fails instead, and the next incremental is complete.

The guest (tests/lib/guest.py, a Linux guest writing ext4 on a virtio-blk
disk under TCG) writes all the time.  The helper's upstream back end
switches the disk's device to a copy-before-write node with
on-cbw-error=break-snapshot, pausing the VM for the switch by itself:

1. a full backup (nbdcopy), taken while the guest's file system is
   frozen, equals the disk at that moment;
2. an incremental with its fleecing image on a 1 MiB tmpfs, through
   `backupaccess-helper run`: the guest's overwrites fill the tmpfs, QEMU
   breaks the snapshot (its export refuses a dirty cluster it served
   before), the backup's reads fail with the filter's "the snapshot is
   broken", and run tears down with failure; meanwhile the guest goes
   on writing, without an I/O error (console, BLOCK_IO_ERROR events) and
   without QEMU stopping the VM;
3. the next incremental, read into a qcow2 overlay of the full backup,
   equals the disk at its snapshot: nothing written during the failed
   backup was lost from the bitmap.

Prints how long each setup paused the VM."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
import guest  # noqa: E402
import qemus  # noqa: E402
from harness import HELPER, check, run, run_helper  # noqa: E402
from fault_fixture import mounts  # noqa: E402

# The guest-backup test's pieces: waiting for the guest, the incremental
# copy into an overlay, qemu-img compare.
_spec = importlib.util.spec_from_file_location(
    "guest_backup", os.path.join(HERE, "test-guest-backup.py"))
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)

SIZE = 64 << 20
BITMAP = "backup"
# The backup of test 2, run by the helper: the dirty regions from QEMU's
# export (its bitmap), a wait (at most 120 s) until QEMU refuses a read
# of a dirty cluster (the snapshot is broken), then the dirty regions
# read through the filter.  Exit 0: all read; 2: the snapshot never
# broke; 3: a read failed (printed).  (The filter's extents would fail
# too once the snapshot is broken, but with QEMU's EPERM.)
READER = r"""
import json, os, sys, time, nbd
dev = json.loads(os.environ["BACKUPACCESS_JSON"])["devices"][0]
ctx = "qemu:dirty-bitmap:" + dev["bitmap-name"]
q = nbd.NBD()
q.add_meta_context(ctx)
q.connect_uri("nbd+unix:///%s?socket=%s" % (dev["export"], dev["nbd-path"]))
dirty = []
def cb(meta, off, entries, err):
    for i in range(0, len(entries), 2):
        if meta == ctx and entries[i + 1] & 1:
            dirty.append((off, entries[i]))
        off += entries[i]
q.block_status(q.get_size(), 0, cb)
end = time.monotonic() + 120
while True:
    try:
        q.pread(512, dirty[0][0])
    except nbd.Error as e:
        print("QEMU: %s" % e, flush=True)
        break
    if time.monotonic() > end:
        sys.exit(2)
    time.sleep(0.2)
st = os.statvfs(sys.argv[1])
print("fleecing store: %d KiB free" % (st.f_bavail * st.f_frsize // 1024))
h = nbd.NBD()
h.connect_uri(os.environ["BACKUPACCESS_URI_0"])
try:
    for o, n in dirty:
        for p in range(o, o + n, 1 << 20):
            h.pread(min(1 << 20, o + n - p), p)
except nbd.Error as e:
    print("backup read: %s" % e, flush=True)
    sys.exit(3)
"""


def pause_ms(stderr):
    m = re.search(r"the VM was paused for ([0-9.]+) ms", stderr)
    check(m is not None, "setup did not pause the VM: %s" % stderr)
    return float(m.group(1))


def no_guest_errors(g):
    """The guest saw no I/O error and QEMU never stopped the VM."""
    with open(g.console, errors="replace") as f:
        console = f.read()
    bad = [l for l in console.splitlines()
           if re.search(r"I/O error|EXT4-fs error|Buffer I/O|"
                        r"blk_update_request", l)]
    check(not bad, "the guest saw I/O errors: %s" % bad[:5])
    status = g.qmp.cmd("query-status")["status"]
    events = [e["event"] for e in g.qmp.events
              if e["event"] == "BLOCK_IO_ERROR"]
    check(status == "running" and "BLOCK_IO_ERROR" not in events,
          "QEMU: %s, events %s" % (status, events))


def frozen_setup(g, tmp, name, mode):
    """setup while the guest's file system is frozen (nothing writes),
    the disk copied meanwhile to the reference NAME-reference.raw: the
    helper pauses the VM itself.  The backup must be of that mode; it is
    served.  Returns (the reference, the URI, the pause in ms)."""
    ref = os.path.join(tmp, name + "-reference.raw")
    rd = os.path.join(tmp, "run")
    g.freeze()
    try:
        g.copy_disk(0, ref)
        r = run_helper("setup", "--qmp", g.qmp_path, "--run-dir", rd,
                       "--device", g.disks[0].device, "--bitmap", BITMAP,
                       "--fleecing-dir", tmp)
    finally:
        g.thaw()
    dev = json.loads(r.stdout)["devices"][0]
    check(dev["bitmap-mode"] == mode, "%s" % dev)
    uri = json.loads(run_helper("serve", "--run-dir", rd).stdout)[
        "devices"][0]["uri"]
    return ref, uri, pause_ms(r.stderr)


def full_backup(g, tmp):
    ref, uri, ms = frozen_setup(g, tmp, "full", "new")
    gb.wait_progress(g, g.status(), "rounds", 5)
    full = os.path.join(tmp, "full.raw")
    run(["nbdcopy", uri, full])
    run_helper("teardown", "--run-dir", os.path.join(tmp, "run"),
               "--success")
    gb.compare(full, "raw", ref)
    print("full backup: equals the disk at its snapshot; setup paused "
          "the VM for %.1f ms" % ms)
    return full, ms


def broken_backup(g, tmp):
    small = os.path.join(tmp, "small")
    os.mkdir(small)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700",
                        "tmpfs", small], capture_output=True, text=True)
    if r.returncode != 0:
        gb.skip("cannot mount a tmpfs: %s" % r.stderr.strip())
    try:
        before = g.status()
        r = subprocess.run(
            [HELPER, "run", "--qmp", g.qmp_path, "--run-dir",
             os.path.join(tmp, "run"), "--device", g.disks[0].device,
             "--bitmap", BITMAP, "--fleecing-dir", small, "--",
             "/usr/bin/python3", "-c", READER, small],
            capture_output=True, text=True, timeout=240)
    finally:
        if small in mounts():
            subprocess.run(["umount", small], timeout=60)
    out = r.stdout + r.stderr
    check(r.returncode == 3 and "QEMU: " in r.stdout and
          "backup read: " in r.stdout and
          "tearing down with failure" in r.stderr and
          "the snapshot is broken" in r.stderr,
          "the backup did not fail as a broken snapshot (exit %d): %s"
          % (r.returncode, out))
    print("\n".join(l for l in out.splitlines()
                    if re.search("QEMU: |backup read|store|paused for|"
                                 "tearing down|snapshot is broken", l)))
    # The guest went on, and goes on.
    after = gb.wait_progress(g, g.status(), "rounds", 5)
    no_guest_errors(g)
    print("meanwhile the guest wrote %.1f MiB in %d rounds, without an "
          "error" % ((after["bytes"] - before["bytes"]) / 2**20,
                     after["rounds"] - before["rounds"]))
    return pause_ms(r.stderr)


def next_incremental(g, tmp, full):
    ref, uri, ms = frozen_setup(g, tmp, "incr", "reuse")
    overlay = os.path.join(tmp, "incr.qcow2")
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", full, "-F", "raw",
         overlay])
    n, copied, _ = gb.copy_incremental(
        uri, overlay, SIZE, lambda: gb.wait_progress(g, g.status(),
                                                     "rounds", 3))
    run_helper("teardown", "--run-dir", os.path.join(tmp, "run"),
               "--success")
    gb.compare(overlay, "qcow2", ref)
    print("next incremental: %d extents, %.1f MiB, full + incremental "
          "equals the disk at its snapshot; setup paused the VM for "
          "%.1f ms" % (n, copied / 2**20, ms))
    return ms


def main(q, tmp):
    with guest.Guest(q, tmp, sizes=(SIZE,)) as g:
        try:
            print("QEMU %s, guest booted in %.1f s"
                  % (q.version(), g.boot_seconds))
            s = g.start_workload()
            gb.wait_progress(g, s, "rounds", 10)
            full, p1 = full_backup(g, tmp)
            p2 = broken_backup(g, tmp)
            p3 = next_incremental(g, tmp, full)
            no_guest_errors(g)
            gb.check_alive(g)
            print("pauses: %s ms" % ", ".join("%.1f" % p
                                              for p in (p1, p2, p3)))
            g.stop_workload()
        finally:
            rd = os.path.join(tmp, "run")
            if os.path.exists(rd):
                subprocess.run([HELPER, "teardown", "--run-dir", rd,
                                "--failure"], capture_output=True,
                               timeout=180)


if __name__ == "__main__":
    q = qemus.current()
    why = guest.missing()
    if why:
        gb.skip(why)
    if not os.access(HELPER, os.X_OK):
        gb.skip("%s is not built: run make" % HELPER)
    with tempfile.TemporaryDirectory(prefix="backupaccess-guest.") as tmp:
        main(q, tmp)
    print("ok")
