#!/usr/bin/python3
"""make bench, the QEMU part: nbdcopy of a full backup straight from
qemu-storage-daemon's snapshot-access export, through nbdkit's nbd
plugin, and through the nbd plugin + backupaccess filter; same run, same
image, rounds interleaved, medians, as shares of the direct path, with
the CPU time of each of the three processes (QEMU, nbdkit, nbdcopy) per
GiB.  On a machine with fewer cores than busy processes the copy is
CPU-bound, and the CPU-bound ceiling of a path is the direct path's CPU
over the path's total.  Then the fleecing image's peak while a guest
writes during a full backup, with discard on and off."""
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from harness import FILTER, PLUGIN, Nbdkit, dirty_regions
from qemu_fixture import Fleecing

SIZE = int(os.environ.get("BENCH_QEMU_SIZE_MIB", "1024")) << 20
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MiB = 1 << 20

PATHS = [
    ("direct from qemu-storage-daemon", None),
    ("nbdkit nbd plugin", ["nbd"]),
    ("nbdkit nbd plugin + backupaccess filter", ["--filter=" + FILTER, "nbd"]),
    ("backupaccess plugin", [PLUGIN]),
    ("backupaccess plugin + filter", ["--filter=" + FILTER, PLUGIN]),
    ("backupaccess plugin + filter, trim-batch=0",
     ["--filter=" + FILTER, PLUGIN, "backupaccess-trim-batch=0"]),
]


def proc_cpu(pid):
    """User + system CPU seconds a process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def copy_seconds(uri, conns, target="null:"):
    """(wall seconds, nbdcopy CPU seconds) of one nbdcopy."""
    t0 = time.monotonic()
    p = subprocess.Popen(["nbdcopy", "--connections=%d" % conns, uri, target])
    _pid, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError("nbdcopy failed: %d" % p.returncode)
    return time.monotonic() - t0, ru.ru_utime + ru.ru_stime


def measure(f, tmp, args, conns, extra=(), bitmap=False, cpu=None):
    """Seconds of one copy from a fresh snapshot; with a dict cpu, also
    the CPU seconds of "qemu", "nbdkit" and "client" in it."""
    f.snapshot(bitmap=bitmap)
    try:
        q0 = proc_cpu(f.proc.pid)
        if args is None:
            secs, client = copy_seconds(f.snap_uri(), conns)
            nbdkit = 0
        else:
            with Nbdkit(tmp, args + ["socket=" + f.nbd_path, "export=snap"]
                        + list(extra), "bench") as nk:
                secs, client = copy_seconds(nk.uri(), conns)
                nbdkit = nk.cpu_seconds()
        if cpu is not None:
            cpu.update(qemu=proc_cpu(f.proc.pid) - q0, nbdkit=nbdkit,
                       client=client)
        return secs
    finally:
        # An incremental run gives its bitmap back for the next one.
        f.release(success=not bitmap)


def incremental(f, tmp):
    """An incremental backup of many small dirty regions, discard on."""
    rng = random.Random(11)
    for _ in range(2000):
        f.guest_write(rng.randrange(0, SIZE // 65536 - 2) * 65536,
                      os.urandom(rng.choice((4096, 65536, 131072))))
    f.snapshot(bitmap=True)
    n = len(dirty_regions(f.snap_uri(), "frozen"))
    f.release(success=False)            # keep the bitmap for the runs
    rows = [("nbdkit nbd plugin + backupaccess filter",
             ["--filter=" + FILTER, "nbd"]),
            ("backupaccess plugin + filter", ["--filter=" + FILTER, PLUGIN])]
    res = {}
    for _ in range(ROUNDS):
        for name, args in rows:
            for conns in (1, 4):
                t = measure(f, tmp, args, conns, bitmap=True, extra=[
                    "backupaccess-bitmap=frozen", "backupaccess-clean=zero"])
                res.setdefault((name, conns), []).append(t)
    print("Incremental: %d dirty regions, nbdcopy --destination-is-zero "
          "semantics (clean regions read as zero), discard on" % n)
    print("| path | 1 connection | 4 connections |")
    print("|---|---|---|")
    for name, _ in rows:
        print("| %s | %.3f s | %.3f s |" % (
            name, statistics.median(res[(name, 1)]),
            statistics.median(res[(name, 4)])))
    print()


def fleecing_peak(f, tmp, discard):
    """Full backup while the guest writes 1 MiB at random offsets, paced
    so that both runs see the same writes; returns the peak size."""
    rng = random.Random(5)
    f.snapshot(bitmap=False)
    peak = f.fleece_size()
    args = ["--filter=" + FILTER, "nbd", "socket=" + f.nbd_path,
            "export=snap", "backupaccess-discard=%s" % discard]
    try:
        with Nbdkit(tmp, args, "peak") as nk:
            # rate filter-free pacing: copy with one connection and write
            # a fixed number of times, spread over the copy.
            p = subprocess.Popen(["nbdcopy", "--connections=1",
                                  "--requests=1", nk.uri(), "null:"])
            for _ in range(64):
                off = rng.randrange(0, SIZE - MiB)
                f.guest_write(off, os.urandom(MiB))
                peak = max(peak, f.fleece_size())
                if p.poll() is not None:
                    break
                time.sleep(0.01)
            p.wait()
            peak = max(peak, f.fleece_size())
            final = f.fleece_size()
    finally:
        f.release()
    return peak, final


WMEM = "/proc/sys/net/core/wmem_default"


def throughput_table(f, tmp, note):
    """The main table: every path, 1 and 4 connections, CPU per GiB."""
    times, cpu = {}, {}
    for conns in (1, 4):
        for _ in range(ROUNDS):
            for name, args in PATHS:
                c = {}
                t = measure(f, tmp, args, conns, cpu=c)
                times.setdefault((name, conns), []).append(t)
                for k, v in c.items():
                    cpu.setdefault((name, conns, k), []).append(v)
    gib = SIZE / (1 << 30)

    def cpu_per_gib(name, who):
        return statistics.median(cpu[(name, 4, who)]) / gib

    print("nbdcopy of a %d MiB snapshot-access export (qcow2, page cache "
          "warm) to null:, median of %d interleaved rounds; CPU seconds per "
          "GiB with 4 connections; %s" % (SIZE // MiB, ROUNDS, note))
    print("| path | 1 connection | share of direct | 4 connections "
          "| share of direct | CPU s/GiB: QEMU | nbdkit | nbdcopy "
          "| CPU-bound ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    direct = PATHS[0][0]
    direct_cpu = sum(cpu_per_gib(direct, w) for w in ("qemu", "client"))
    for name, _ in PATHS:
        row = "| %s |" % name
        for conns in (1, 4):
            t = statistics.median(times[(name, conns)])
            d = statistics.median(times[(direct, conns)])
            row += " %.3f s | %.0f%% |" % (t, 100 * d / t)
        per = [cpu_per_gib(name, w) for w in ("qemu", "nbdkit", "client")]
        row += " %.2f | %.2f | %.2f | %.0f%% |" % (
            per[0], per[1], per[2], 100 * direct_cpu / sum(per))
        print(row)
    print()


def with_socket_buffers(size, fn):
    """Runs fn with new sockets' send buffers at size bytes (a sysctl of
    the machine, so as root only), and puts the old value back."""
    with open(WMEM) as fp:
        old = fp.read().strip()
    try:
        with open(WMEM, "w") as fp:
            fp.write(str(size))
        fn()
    finally:
        with open(WMEM, "w") as fp:
            fp.write(old)


def main():
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as tmp, \
         Fleecing(SIZE, tmpdir=os.path.join(tmp, "qemu")) as f:
        f.guest_write(0, os.urandom(SIZE))
        with open(WMEM) as fp:
            wmem = int(fp.read())
        throughput_table(f, tmp, "socket send buffers %d KiB (%s)"
                         % (wmem // 1024, WMEM))
        # A 256 KiB read does not fit in the default buffer: every hop
        # then sleeps and wakes once more per request.
        if os.geteuid() == 0 and wmem < MiB:
            with_socket_buffers(MiB, lambda: throughput_table(
                f, tmp, "socket send buffers 1024 KiB (sysctl "
                "net.core.wmem_default=1048576 during this table only)"))
        incremental(f, tmp)
        print()
        print("Fleecing image during a full backup while the guest writes "
              "64 x 1 MiB at random offsets")
        print("| discard | peak | at the end |")
        print("|---|---|---|")
        for discard in ("true", "false"):
            peak, final = fleecing_peak(f, tmp, discard)
            print("| %s | %.1f MiB | %.1f MiB |" % (discard, peak / MiB,
                                                    final / MiB))


main()
