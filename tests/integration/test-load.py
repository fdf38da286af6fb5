#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Load test: several client processes, each with its own NBD connection,
send thousands of random requests to the filter over the backupaccess
plugin over qemu-storage-daemon (fleecing image, frozen dirty bitmap)
while the guest keeps writing, then read whatever is left.

Requests: reads of random, unaligned sizes and offsets, inside the dirty
regions and outside them, re-reads of what is gone, and (some clients)
client trims.  The disk is cut into 1 MiB stripes dealt out to the
clients, so that each can predict every answer from its own requests:
a read is refused (EPERM) exactly when it touches a clean byte or a
cluster whose dirty bytes have all been read or trimmed; every other read
succeeds and returns the frozen point-in-time copy.

Checked at the end: no error but the predicted refusals (the filter's own
count agrees), every byte read equals the snapshot, QEMU alive, nothing
readable left, the fleecing image back to (near) its empty size, nbdkit's
RSS flat: back within 16 MiB of where it started once the clients have
gone (nbdkit keeps a buffer per worker thread, as large as the largest
request served, for the life of a connection: during the run RSS may
rise by that much and no more), no trim errors.  The figures are printed (requests, refusals, RSS samples,
fleecing peak and end).

Bounded: each client stops at REQUESTS requests or after DEADLINE
seconds, whichever comes first (the count actually done is printed)."""
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))

SIZE = 128 << 20
CLUSTER = 65536
STRIPE = 1 << 20
CLIENTS = 4
REQUESTS = int(os.environ.get("LOAD_REQUESTS", "8000"))
DEADLINE = 150                  # seconds for the random phase
RSS_SLACK = 16 << 20
MAX_REQUEST = 1 << 20           # the largest read a client sends


# --- the client (this file run with "client ...") -----------------------

def merge(ranges):
    out = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def client(uri, index, seed, dirty_path, frozen_path, trims, out_path):
    rng = random.Random(seed)
    with open(dirty_path) as f:
        dirty = [tuple(r) for r in json.load(f)]
    frozen_f = open(frozen_path, "rb")
    frozen = mmap.mmap(frozen_f.fileno(), 0, prot=mmap.PROT_READ)
    mine = [s for s in range(0, SIZE, STRIPE)
            if (s // STRIPE) % CLIENTS == index]
    # Per cluster of my stripes: its dirty bytes (relative), what I have
    # consumed of them, and whether it is discarded.
    dirty_of = {}
    for s, e in dirty:
        c = s - s % CLUSTER
        while c < e:
            if (c // STRIPE) % CLIENTS == index:
                d = dirty_of.setdefault(c, [])
                d.append((max(s, c) - c, min(e, c + CLUSTER) - c))
            c += CLUSTER
    consumed = {}
    discarded = set()
    mydirty = merge([(c + a, c + b) for c, ds in dirty_of.items()
                     for a, b in ds])

    def in_dirty(s, e):
        for a, b in mydirty:                # short list per client
            if a <= s and e <= b:
                return True
        return False

    def clusters(s, e):
        return range(s - s % CLUSTER, e, CLUSTER)

    def readable(s, e):
        return in_dirty(s, e) and not any(c in discarded
                                          for c in clusters(s, e))

    def consume(s, e):
        for c in clusters(s, e):
            if c not in dirty_of or c in discarded:
                continue
            got = consumed.setdefault(c, [])
            got.append((max(s, c) - c, min(e, c + CLUSTER) - c))
            got[:] = merge(got)
            ds = dirty_of[c]
            if all(any(a <= x and y <= b for a, b in got) for x, y in ds):
                discarded.add(c)
                del consumed[c]

    st = {"requests": 0, "reads_ok": 0, "bytes_read": 0,
          "refused_clean": 0, "refused_gone": 0, "trims": 0,
          "errors": [], "sweep_bytes": 0}
    h = nbd.NBD()
    h.connect_uri(uri)

    def do_read(s, e, sweep=False):
        want_ok = readable(s, e)
        try:
            data = h.pread(e - s, s)
        except nbd.Error as err:
            if want_ok or err.errno != "EPERM":
                st["errors"].append("read [%d, %d): %s (expected %s)"
                                    % (s, e, err,
                                       "success" if want_ok else "EPERM"))
                return
            if in_dirty(s, e):
                st["refused_gone"] += 1
            else:
                st["refused_clean"] += 1
            return
        if not want_ok:
            st["errors"].append("read [%d, %d) succeeded, expected EPERM"
                                % (s, e))
            return
        if data != frozen[s:e]:
            st["errors"].append("read [%d, %d): wrong data" % (s, e))
        st["reads_ok"] += 1
        st["bytes_read"] += e - s
        if sweep:
            st["sweep_bytes"] += e - s
        consume(s, e)

    def size():
        r = rng.random()
        if r < 0.7:
            return rng.randrange(1, 16 << 10)
        if r < 0.95:
            return rng.randrange(16 << 10, 128 << 10)
        return rng.randrange(128 << 10, MAX_REQUEST)

    opened = sorted(dirty_of)           # clusters not discarded (lazily)
    gone = []
    end_time = time.monotonic() + DEADLINE
    while st["requests"] < REQUESTS and time.monotonic() < end_time:
        st["requests"] += 1
        r = rng.random()
        while opened and opened[-1] in discarded:
            gone.append(opened.pop())
        if opened and r < 0.55:
            # New data: in a dirty run of a cluster not yet discarded,
            # maybe running on past it.
            i = rng.randrange(len(opened))
            c = opened[i]
            if c in discarded:
                opened[i] = opened[-1]
                opened.pop()
                gone.append(c)
                continue
            a, b = rng.choice(dirty_of[c])
            s = c + rng.randrange(a, b)
        elif gone and r < 0.7:
            # Again: in a cluster already discarded.
            c = rng.choice(gone)
            a, b = rng.choice(dirty_of[c])
            s = c + rng.randrange(a, b)
        else:
            # Anywhere in my stripes: mostly clean.
            s = rng.choice(mine) + rng.randrange(0, STRIPE)
        e = min(s + size(), s - s % STRIPE + STRIPE)
        if trims and rng.random() < 0.1:
            try:
                h.trim(e - s, s)
                st["trims"] += 1
                consume(s, e)
            except nbd.Error as err:
                st["errors"].append("trim [%d, %d): %s" % (s, e, err))
            continue
        do_read(s, e)
        if len(st["errors"]) > 20:
            break
    # Then whatever is left, cluster by cluster in random order, each
    # dirty run in one or two pieces.
    left = [c for c in dirty_of if c not in discarded]
    rng.shuffle(left)
    for c in left:
        for a, b in dirty_of[c]:
            cut = rng.randrange(a + 1, b + 1)
            for s, e in ((c + a, c + cut), (c + cut, c + b)):
                if e > s:
                    do_read(s, e, sweep=True)
    st["left"] = sum(1 for c in dirty_of if c not in discarded)
    h.shutdown()
    with open(out_path, "w") as f:
        json.dump(st, f)


if len(sys.argv) > 1 and sys.argv[1] == "client":
    client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5],
           sys.argv[6], sys.argv[7] == "1", sys.argv[8])
    sys.exit(0)


# --- the test ---------------------------------------------------------

from harness import PLUGIN, Nbdkit, check, dirty_regions, filtered  # noqa
from itlib import summary                                            # noqa
from qemu_fixture import Fleecing                                    # noqa


def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


rng = random.Random(2024)
with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     Fleecing(SIZE, tmpdir=os.path.join(tmp, "qsd")) as f:
    f.guest_write(0, rng.randbytes(SIZE))
    f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
    # Dirty about half of the disk, in runs of 64 KiB to 2 MiB.
    for _ in range(90):
        n = rng.randrange(64 << 10, 2 << 20)
        off = rng.randrange(0, SIZE - n)
        f.guest_write(off, rng.randbytes(n))
    frozen_path = os.path.join(tmp, "frozen.raw")
    with open(frozen_path, "wb") as fp:
        fp.write(f.disk_read(0, SIZE))
    f.snapshot(bitmap=True)
    dirty = dirty_regions(f.snap_uri(), "frozen")
    dirty_path = os.path.join(tmp, "dirty.json")
    with open(dirty_path, "w") as fp:
        json.dump(dirty, fp)
    dirty_bytes = sum(e - s for s, e in dirty)
    fleece_empty = f.fleece_size()

    log = os.path.join(tmp, "nbdkit.log")
    with Nbdkit(tmp, filtered([PLUGIN, "socket=" + f.nbd_path,
                               "export=snap"],
                              "backupaccess-bitmap=frozen"), "load") as nk:
        pid = nk.proc.pid
        samples, fleece_samples = [], []
        stop = threading.Event()
        guest_writes = [0]

        def sampler():
            while not stop.is_set():
                samples.append((time.monotonic(), rss(pid)))
                fleece_samples.append(f.fleece_size())
                stop.wait(0.25)

        def guest():
            g = random.Random(7)
            while not stop.is_set():
                n = g.randrange(1, 256 << 10)
                off = g.randrange(0, SIZE - n)
                f.guest_write(off, g.randbytes(n))
                guest_writes[0] += 1
                stop.wait(0.02)

        threads = [threading.Thread(target=sampler),
                   threading.Thread(target=guest)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        procs = []
        try:
            for i in range(CLIENTS):
                out = os.path.join(tmp, "client%d.json" % i)
                procs.append((out, subprocess.Popen(
                    ["/usr/bin/python3", os.path.abspath(__file__), "client",
                     nk.uri(), str(i), str(100 + i), dirty_path, frozen_path,
                     "1" if i % 2 else "0", out])))
            for out, p in procs:
                p.wait(DEADLINE + 120)
        finally:
            for out, p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            stop.set()
            for t in threads:
                t.join(60)
        elapsed = time.monotonic() - t0
        # The clients have gone; nbdkit ends their threads (and frees
        # their buffers) as it notices.
        end = time.monotonic() + 20
        rss_end = rss(pid)
        while rss_end > samples[0][1] + RSS_SLACK and \
                time.monotonic() < end:
            time.sleep(0.1)
            rss_end = rss(pid)
        fleece_end = f.fleece_size()
        alive = f.alive()
    stats = []
    for out, p in procs:
        check(p.returncode == 0, "a client failed (exit %d)" % p.returncode)
        with open(out) as fp:
            stats.append(json.load(fp))
    errors = [e for s in stats for e in s["errors"]]
    check(not errors, "%d unexpected results, first: %s"
          % (len(errors), errors[:5]))
    check(alive, "qemu-storage-daemon died")
    summ = summary(nk.logpath)
    total = {k: sum(s[k] for s in stats)
             for k in ("requests", "reads_ok", "bytes_read", "refused_clean",
                       "refused_gone", "trims", "sweep_bytes", "left")}
    refusals = total["refused_clean"] + total["refused_gone"]
    check(summ["refused"] == refusals, "nbdkit refused %d requests, the "
          "clients expected %d" % (summ["refused"], refusals))
    check(summ["trim_errors"] == 0, "trim errors: %s" % summ)
    check(summ["readable_left"] == 0 and total["left"] == 0,
          "readable bytes left: %d (clients: %d clusters)"
          % (summ["readable_left"], total["left"]))
    with open(nk.logpath) as fp:
        untracked = fp.read().split("consumed bytes not tracked")[0] \
            .rsplit(",", 1)[1].split()[0]
    check(untracked == "0", "consumed bytes not tracked: %s" % untracked)
    # RSS.  nbdkit keeps, per worker thread (16 per connection), a read
    # buffer as large as the largest request it has served, until the
    # connection ends: during the run RSS may grow by that much.  After
    # the clients have gone it must be back near where it started: a
    # leak (in the filter, the plugin, per request) would stay.
    during = [(t - t0, r) for t, r in samples if t0 <= t <= t0 + elapsed]
    check(len(during) >= 8, "too few RSS samples: %s" % samples)
    quarter = elapsed / 4
    start_rss = samples[0][1]
    early = max(r for t, r in during if t <= quarter)
    peak = max(r for t, r in during)
    per_thread = CLIENTS * 16 * MAX_REQUEST
    # A memory checker's own bookkeeping (ASan's quarantine, valgrind)
    # inflates RSS: the bounds hold for the real thing only.
    sanitized = bool(os.environ.get("BACKUPACCESS_SAN"))
    check(sanitized or peak <= start_rss + per_thread + RSS_SLACK,
          "nbdkit's RSS during the run: %d KiB, more than the %d KiB of "
          "per-thread buffers above the start (%d KiB)"
          % (peak >> 10, per_thread >> 10, start_rss >> 10))
    check(sanitized or
          (rss_end <= start_rss + RSS_SLACK and rss_end <= early + RSS_SLACK),
          "nbdkit's RSS did not come back: %d KiB at the start, %d KiB in "
          "the first quarter, %d KiB at the end; samples: %s"
          % (start_rss >> 10, early >> 10, rss_end >> 10,
             [r >> 10 for t, r in samples]))
    fleece_peak = max(fleece_samples + [fleece_end])
    check(fleece_end <= fleece_empty + (1 << 20),
          "the fleecing image did not shrink back: %d bytes at the end, "
          "%d when empty" % (fleece_end, fleece_empty))
    print("load: %d clients, %d random requests (%d reads served, %d "
          "refused as predicted: %d clean, %d already discarded; %d client "
          "trims) + %d bytes swept at the end, in %.0f s; %d MiB read of %d "
          "MiB dirty; %d guest writes meanwhile; no error"
          % (CLIENTS, total["requests"], total["reads_ok"], refusals,
             total["refused_clean"], total["refused_gone"], total["trims"],
             total["sweep_bytes"], elapsed, total["bytes_read"] >> 20,
             dirty_bytes >> 20, guest_writes[0]))
    print("nbdkit RSS (KiB), every 0.25 s: %s; before %d, first quarter "
          "max %d, peak %d, after the clients %d"
          % (" ".join(str(r >> 10) for t, r in samples), start_rss >> 10,
             early >> 10, peak >> 10, rss_end >> 10))
    print("fleecing image: empty %d KiB, peak %d KiB, end %d KiB"
          % (fleece_empty >> 10, fleece_peak >> 10, fleece_end >> 10))
    print("filter summary: %s" % summ)
print("ok")
