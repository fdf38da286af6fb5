#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""backupaccess-copy against a real qemu-storage-daemon (the fleecing
graph of tests/lib/qemu_fixture.py), while the guest writes:

- a full backup into a new qcow2 image and into a sparse raw file, an
  incremental one into a qcow2 overlay of the full (dirty data, dirty
  zeroes written over data, a region the guest zeroed, the disk's last
  bytes on a size that is no multiple of the cluster), and a full one
  into an overlay (every byte written, zeroes too): each chain equals the
  disk at its snapshot (qemu-img compare), the overlay holds nothing
  outside the dirty regions, QEMU discarded what was copied (the
  fleecing image is small at the end) or nothing with --discard=false;
- failures: the snapshot breaks half-way (copy-before-write into a
  fleecing image that fails every write), QEMU killed half-way, the
  destination's file system full (half-way, and at the first write: what
  was read but not written is not discarded), SIGTERM: each exits 1 with
  its reason,
  and neither OUTPUT nor OUTPUT.part is left; a copy killed outright
  leaves OUTPUT.part, which the next copy replaces, and one still
  running keeps it;
- bad input: a clear message, exit status 1 or 2, nothing made;
- --help, --version, --progress, --bandwidth-limit (a lower bound on the
  time: the limit is a behaviour, not a speed)."""
import json
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
from harness import TOP, check, dirty_regions, run  # noqa: E402
from qemu_fixture import Fleecing  # noqa: E402
import qemus  # noqa: E402

COPY = os.path.join(TOP, "copy", "backupaccess-copy")
K, M = 1 << 10, 1 << 20
SIZE = 32 * M + 12 * K           # no multiple of the 64K cluster
rng = random.Random(41)


def copy(f, out, *args, ok=True, timeout=120):
    """backupaccess-copy of f's export "snap" into out; with ok it must
    succeed.  Returns (process, status JSON or None)."""
    status = out + ".status.json"
    r = subprocess.run([COPY, "--socket", f.nbd_path, "--export", "snap",
                        "--status", status] + list(args) + [out],
                       capture_output=True, text=True, timeout=timeout)
    st = None
    if os.path.exists(status):
        with open(status) as fp:
            st = json.load(fp)
        os.unlink(status)
    if ok:
        check(r.returncode == 0, "backupaccess-copy %s failed (%d): %s"
              % (" ".join(args), r.returncode, r.stderr))
        check(st["complete"] and st["bytes-done"] == st["bytes-total"],
              "status: %s" % st)
    print("  " + r.stderr.strip().replace("\n", "\n  "))
    return r, st


def compare(image, ref):
    r = subprocess.run(["qemu-img", "compare", "-F", "raw", image, ref],
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 0, "%s differs from the disk at its snapshot: %s%s"
          % (image, r.stdout, r.stderr))


def no_output(out, what):
    check(not os.path.exists(out), "%s: %s was left" % (what, out))
    check(not os.path.exists(out + ".part"),
          "%s: %s.part was left" % (what, out))


def reference(f, path):
    with open(path, "wb") as fp:
        fp.write(f.disk_read(0, SIZE))


class Writer(threading.Thread):
    """The guest writing at random while a backup runs (through
    copy-before-write once the snapshot is taken)."""

    def __init__(self, f):
        super().__init__()
        self.f, self.n, self.done = f, 0, threading.Event()

    def run(self):
        r = random.Random(7)
        while not self.done.is_set():
            n = r.randrange(1, 256) * 512
            self.f.guest_write(r.randrange(0, SIZE - n), r.randbytes(n))
            self.n += 1

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.join()


def overlay_extents(image):
    """[(start, end)] that the top image itself holds, merged."""
    out = run(["qemu-img", "map", "--output=json", image]).stdout
    merged = []
    for e in json.loads(out):
        if e["depth"] != 0 or not (e["data"] or e["zero"]):
            continue
        s, n = e["start"], e["length"]
        if merged and merged[-1][1] == s:
            merged[-1] = (merged[-1][0], s + n)
        else:
            merged.append((s, s + n))
    return merged


def inside(ranges, regions):
    return all(any(a <= s and e <= b for a, b in regions) for s, e in ranges)


def full_and_incremental(tmp):
    """The chain: full (qcow2, and raw), incremental, full into an
    overlay."""
    with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd")) as f:
        f.guest_write(0, rng.randbytes(20 * M))     # the rest: holes
        f.guest_write(4 * M, bytes(2 * M))          # zeroes written
        reference(f, os.path.join(tmp, "at-full.raw"))
        f.snapshot(bitmap=False)
        full = os.path.join(tmp, "full.qcow2")
        with Writer(f) as w:
            _, st = copy(f, full, "--progress")
        compare(full, os.path.join(tmp, "at-full.raw"))
        check(st["bytes-read"] < SIZE and st["bytes-skipped"] > 2 * M,
              "the holes were read or written: %s" % st)
        check(st["bytes-discarded"] >= 18 * M, "little discarded: %s" % st)
        check(f.fleece_size() < 2 * M, "the fleecing image is %d bytes at "
              "the end" % f.fleece_size())
        print("full: %d guest writes meanwhile; fleecing image %d KiB at the "
              "end" % (w.n, f.fleece_size() >> 10))
        f.release(success=True)

        # Data, zeroes over data, a zeroed region, the last bytes.
        f.guest_write(1 * M + 512, rng.randbytes(3 * M))
        f.guest_write(10 * M, bytes(1 * M))
        f.guest().zero(14 * M, 2 * M)             # count, offset
        f.guest_write(SIZE - 5000, rng.randbytes(5000))
        reference(f, os.path.join(tmp, "at-inc.raw"))
        f.snapshot(bitmap=True)
        dirty = dirty_regions(f.snap_uri(), "frozen")
        inc = os.path.join(tmp, "inc.qcow2")
        with Writer(f):
            _, st = copy(f, inc, "--bitmap", "frozen", "--backing", full)
        compare(inc, os.path.join(tmp, "at-inc.raw"))
        check(st["kind"] == "incremental" and st["bytes-zeroes"] >= 2 * M and
              st["bytes-skipped"] == 0, "status: %s" % st)
        check(st["bytes-total"] == sum(e - s for s, e in dirty),
              "not the dirty regions: %s" % st)
        check(inside(overlay_extents(inc), dirty), "the overlay holds more "
              "than the dirty regions %s: %s" % (dirty, overlay_extents(inc)))
        f.release(success=True)

        # No bitmap, a backing file: every byte, zeroes written too.
        f.guest_write(6 * M, rng.randbytes(64 * K))
        reference(f, os.path.join(tmp, "at-over.raw"))
        f.snapshot(bitmap=False)
        over = os.path.join(tmp, "full-over.qcow2")
        _, st = copy(f, over, "--backing", inc, "--discard=false",
                     "--format", "qcow2")
        compare(over, os.path.join(tmp, "at-over.raw"))
        check(st["bytes-skipped"] == 0 and st["bytes-discarded"] == 0,
              "status: %s" % st)
        check(overlay_extents(over) == [(0, SIZE)], "the overlay of a full "
              "backup does not cover the disk: %s" % overlay_extents(over))
        raw = os.path.join(tmp, "full.raw")
        _, st = copy(f, raw, "--connections=1", "--requests=1",
                     "--request-size=64K")
        compare(raw, os.path.join(tmp, "at-over.raw"))
        check(os.stat(raw).st_blocks * 512 < 24 * M, "the raw file is not "
              "sparse: %d blocks" % os.stat(raw).st_blocks)
        f.release(success=True)
    return full


def running_copy(f, out, *args):
    """A copy slowed down by the bandwidth limit, and its status path."""
    status = out + ".status.json"
    p = subprocess.Popen([COPY, "--socket", f.nbd_path, "--export", "snap",
                          "--status", status, "--bandwidth-limit", "2M",
                          "--progress"] + list(args) + [out],
                         stderr=subprocess.PIPE, text=True)
    # Once it reports progress, OUTPUT.part is there and reads go on.
    lines = [p.stderr.readline()]
    while "%" not in lines[-1] and lines[-1] and len(lines) < 5:
        lines.append(p.stderr.readline())
    check("%" in lines[-1], "no progress from the copy: %r" % lines)
    return p, status


def finish(p, status, want, what, out):
    err = p.stderr.read()
    rc = p.wait(60)
    check(rc == 1 and want in err, "%s: exit %d, wanted 1 and %r: %s"
          % (what, rc, want, err))
    no_output(out, what)
    with open(status) as fp:
        st = json.load(fp)
    os.unlink(status)
    check(not st["complete"] and st["bytes-discarded"] <= st["bytes-done"],
          "%s: %s" % (what, st))
    print("%s: %s" % (what, err.strip().splitlines()[-1]))
    return st


def broken_snapshot(tmp):
    """Copy-before-write fails half-way: the copy fails, says why."""
    with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd-broken")) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.snapshot(bitmap=True, on_cbw_error="break-snapshot", fleece_file={
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 5}]})
        dirty = dirty_regions(f.snap_uri(), "frozen")
        check(dirty == [(0, SIZE)], "a new bitmap is all dirty: %s" % dirty)
        out = os.path.join(tmp, "broken.qcow2")
        p, status = running_copy(f, out, "--bitmap", "frozen")
        # Its last megabyte, not read for seconds at 2M/s.
        f.guest_write(SIZE - M, rng.randbytes(M))
        st = finish(p, status, "the snapshot is broken", "broken snapshot",
                    out)
        check(st["broken"] and 0 < st["bytes-done"] < SIZE, "%s" % st)
        check(f.alive(), "qemu-storage-daemon died")


def qemu_gone_and_signals(tmp):
    with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd-gone")) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.snapshot(bitmap=False)
        # A previous raw backup whose first bytes (the guest's) look like
        # a qcow2 image naming a host file: it stays raw.
        forged = os.path.join(tmp, "forged.raw")
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", "/etc/hostname",
             "-F", "raw", forged, str(SIZE)])
        out = os.path.join(tmp, "on-forged.qcow2")
        copy(f, out, "--backing", forged, "--discard=false")
        info = json.loads(run(["qemu-img", "info", "--output=json",
                               out]).stdout)
        check(info.get("backing-filename-format") == "raw",
              "a raw PREV was probed: %s" % info)
        os.unlink(out)
        out = os.path.join(tmp, "term.qcow2")
        p, status = running_copy(f, out)
        p.send_signal(signal.SIGTERM)
        finish(p, status, "interrupted", "SIGTERM", out)

        # Killed outright: OUTPUT.part stays, and the next copy replaces
        # it; one that is running keeps its own.  (A new snapshot: what
        # the last copy discarded cannot be read again.)
        f.release(success=False)
        f.snapshot(bitmap=False)
        out = os.path.join(tmp, "killed.raw")
        p, status = running_copy(f, out, "--discard=false")
        p.kill()
        p.wait()
        check(os.path.exists(out + ".part") and not os.path.exists(out),
              "a killed copy: %s" % os.listdir(tmp))
        p2, status2 = running_copy(f, out, "--discard=false")
        r = subprocess.run([COPY, "--socket", f.nbd_path, "--export", "snap",
                            out], capture_output=True, text=True, timeout=60)
        check(r.returncode == 1 and "another copy is writing" in r.stderr,
              "a second copy to the same OUTPUT: %d %s"
              % (r.returncode, r.stderr))
        p2.send_signal(signal.SIGTERM)
        finish(p2, status2, "interrupted", "the copy after a killed one", out)

        out = os.path.join(tmp, "gone.qcow2")
        p, status = running_copy(f, out)
        f.proc.kill()
        f.proc.wait()
        finish(p, status, "connection to QEMU is lost", "QEMU killed", out)


def readable(f, offset, count):
    """Whether QEMU still lets [offset, +count) be read (not discarded)."""
    h = nbd.NBD()
    h.set_export_name("snap")
    h.connect_unix(f.nbd_path)
    try:
        h.pread(count, offset)
        return True
    except nbd.Error:
        return False
    finally:
        h.shutdown()


def first_write_fails(tmp, tiny):
    """The first write of all fails (a 128K file system, one request at a
    time, every discard sent at once): the copy read it, but QEMU must
    still hold it."""
    with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd-tiny")) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.snapshot(bitmap=False)
        out = os.path.join(tiny, "full.raw")
        r, st = copy(f, out, "--connections=1", "--requests=1",
                     "--trim-batch=0", "--no-extents", ok=False)
        check(r.returncode == 1 and "No space left" in r.stderr,
              "the first write fails: %d %s" % (r.returncode, r.stderr))
        no_output(out, "the first write fails")
        check(st["bytes-done"] == 0 and st["bytes-discarded"] == 0 and
              readable(f, 0, 256 * K), "read but not written, and "
              "discarded all the same: %s" % st)


def destination_full(tmp):
    """OUTPUT on a file system that fills up: the copy fails, and QEMU
    still holds what was not written."""
    small = os.path.join(tmp, "small")
    tiny = os.path.join(tmp, "tiny")
    os.mkdir(small)
    os.mkdir(tiny)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700",
                        "tmpfs", small], capture_output=True, text=True)
    if r.returncode != 0:
        print("destination full: SKIPPED, no tmpfs: %s" % r.stderr.strip())
        return
    try:
        run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700", "tmpfs",
             tiny])
        first_write_fails(tmp, tiny)
        with Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd-full")) as f:
            f.guest_write(0, rng.randbytes(SIZE))
            f.snapshot(bitmap=False)
            out = os.path.join(small, "full.raw")
            r, st = copy(f, out, "--connections=1", ok=False)
            check(r.returncode == 1 and "No space left" in r.stderr,
                  "a full destination: %d %s" % (r.returncode, r.stderr))
            no_output(out, "destination full")
            check(st["bytes-discarded"] <= st["bytes-done"] < SIZE,
                  "discarded what was not written: %s" % st)
            # What was not written is still there to read.
            check(readable(f, SIZE - 64 * K - 12 * K, 64 * K),
                  "the end of the disk was discarded")
    finally:
        for d in (tiny, small):
            subprocess.run(["umount", d], capture_output=True)


def bad_input(tmp, full):
    """Each a clear message, and nothing made."""
    with Fleecing(4 * M, tmpdir=os.path.join(tmp, "qsd-bad")) as f:
        f.guest_write(0, rng.randbytes(1 * M))
        with open(os.path.join(tmp, "at-bad.raw"), "wb") as fp:
            fp.write(f.disk_read(0, 4 * M))
        f.snapshot(bitmap=True)
        out = os.path.join(tmp, "bad.qcow2")
        exists = os.path.join(tmp, "exists.qcow2")
        open(exists, "w").close()
        src = ["--socket", f.nbd_path, "--export", "snap"]
        cases = [
            ([out], 1, "give QEMU's export"),
            (src, 2, "give one OUTPUT"),
            (src + ["--bitmap", "frozen", out], 1,
             "give it with --backing PREV"),
            (src + ["--bitmap", "nosuch", out], 1,
             "does not offer qemu:dirty-bitmap:nosuch"),
            (["--socket", f.nbd_path, "--export", "nosuch", out], 1,
             "cannot connect"),
            (src + ["--bitmap", "frozen", "--backing", full, out], 1,
             "an incremental backup builds on a previous backup of the "
             "same disk"),
            (src + ["--backing", os.path.join(tmp, "nosuch.qcow2"), out], 1,
             "not a qcow2 image"),
            (src + ["--backing", os.path.join(tmp, "at-full.raw"),
                    "--backing-format", "qcow2", out], 1,
             "not a qcow2 image"),
            (src + ["--backing", os.path.join(tmp, "prev"), out], 1,
             "give its format with --backing-format"),
            (src + ["--backing", full, os.path.join(tmp, "bad.raw")], 1,
             "--backing needs a qcow2 OUTPUT"),
            (src + [os.path.join(tmp, "bad.img")], 1,
             "give its format with --format"),
            (src + [exists], 1, "exists already"),
            (src + [os.path.join(tmp, "nodir", "x.qcow2")], 1,
             "no such directory"),
            (src + ["--cluster", "3000", out], 1, "a power of two"),
            (src + ["--request-size", "100M", out], 1, "a power of two"),
            (src + ["--connections", "0", out], 1, "from 1 to"),
            (src + ["--requests", "1000", out], 1, "from 1 to"),
            (src + ["--bandwidth-limit", "0", out], 1, "more than 0"),
            (src + ["--discard=maybe", out], 1, "true or false"),
            (src + ["--format", "vmdk", out], 1, "qcow2 or raw"),
            (src + ["--uri", f.snap_uri(), out], 1, "or --uri URI"),
            (src + ["--backing-format", "raw", out], 1,
             "--backing-format without --backing"),
            (src + ["--no-such-option", out], 2, "Usage"),
        ]
        before = sorted(os.listdir(tmp))
        for args, rc, want in cases:
            r = subprocess.run([COPY] + args, capture_output=True, text=True,
                               timeout=60)
            check(r.returncode == rc and want in r.stderr,
                  "%s: exit %d, wanted %d and %r: %s"
                  % (args, r.returncode, rc, want, r.stderr))
            check(sorted(os.listdir(tmp)) == before, "%s made %s" % (
                args, set(os.listdir(tmp)) - set(before)))
        print("bad input: %d cases refused, nothing made" % len(cases))
        # A URI as well as a socket; the bandwidth limit as a lower bound
        # on the time (1 MiB at 512K/s: the first 256K go at once).
        prev = os.path.join(tmp, "zero.raw")
        with open(prev, "wb") as fp:
            fp.truncate(4 * M)
        t0 = time.monotonic()
        run([COPY, "--uri", f.snap_uri(), "--bitmap", "frozen", "--backing",
             prev, "--bandwidth-limit", "512K", out])
        secs = time.monotonic() - t0
        check(secs >= 1.4, "1 MiB at 512K/s took %.2f s" % secs)
        compare(out, os.path.join(tmp, "at-bad.raw"))
        print("bandwidth limit: 1 MiB at 512K/s in %.2f s" % secs)
        os.unlink(out)
        os.unlink(exists)
        for a in ("--help", "--version"):
            r = run([COPY, a])
            check(("Usage" in r.stdout) if a == "--help" else
                  r.stdout.startswith("backupaccess-copy "), r.stdout)


def main():
    q = qemus.current()
    print("QEMU %s (%s)" % (q.label, q.version()))
    if not os.access(COPY, os.X_OK):
        print("%s is not built: run make" % COPY)
        sys.exit(77)
    with tempfile.TemporaryDirectory(prefix="backupaccess-copy.") as tmp:
        full = full_and_incremental(tmp)
        bad_input(tmp, full)
        broken_snapshot(tmp)
        qemu_gone_and_signals(tmp)
        destination_full(tmp)
    print("ok")


main()
