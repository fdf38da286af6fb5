#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""make bench, the QEMU part: nbdcopy of a full backup of a raw disk (page
cache warm) straight from qemu-storage-daemon's snapshot-access export
and through nbdkit (nbd plugin, nbd plugin + backupaccess filter,
snapshotaccess plugin, snapshotaccess plugin + filter), at nbdcopy's default
request size (256K), 1M and 4M, with 1 and 4 connections, on every QEMU
of tests/lib/qemus.py that has a qemu-storage-daemon (7.2 and 10.0.2).

Fair by construction: every measurement gets a fresh qemu-storage-daemon
(QEMU's cost depends on what it served before), the paths are measured
in rounds, their order rotated each round, and every figure is a median
within this run: shares are the median of the per-round ratios
direct/path, CPU seconds per GiB per process (QEMU and nbdkit from
/proc/PID/stat around the copy, nbdcopy from wait4).  The 1-minute load
average is given for each round.  Then an incremental backup and the
fleecing image's peak while a guest writes, on the system QEMU.

Knobs (environment): BENCH_ROUNDS (3), BENCH_QEMU_SIZE_MIB (1024),
BENCH_QEMUS (labels, "7.2,10.0.2"), BENCH_REQUEST_SIZES ("256K,1M,4M"),
BENCH_CONNECTIONS ("1,4"), BENCH_PATHS (indexes into PATHS, all),
BENCH_VARIANTS (extra plugin + filter rows, each a space-separated list
of plugin parameters, rows separated by ";", e.g. "request-size=128K;
request-size=512K request-depth=8"), BENCH_EXTRA=0 to skip the
incremental and fleecing tables."""
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from harness import FILTER, PLUGIN, Nbdkit, dirty_regions  # noqa: E402
from qemu_fixture import Fleecing  # noqa: E402
import qemus  # noqa: E402

MiB = 1 << 20
SIZE = int(os.environ.get("BENCH_QEMU_SIZE_MIB", "1024")) * MiB
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
QEMUS = os.environ.get("BENCH_QEMUS", "7.2,10.0.2").split(",")
REQUEST_SIZES = os.environ.get("BENCH_REQUEST_SIZES", "256K,1M,4M").split(",")
CONNECTIONS = [int(c) for c in
               os.environ.get("BENCH_CONNECTIONS", "1,4").split(",")]

FILTERED = ["--filter=" + FILTER]
PATHS = [
    ("direct from qemu-storage-daemon", None),
    ("nbdkit nbd plugin", ["nbd"]),
    ("nbd plugin + backupaccess filter", FILTERED + ["nbd"]),
    ("snapshotaccess plugin", [PLUGIN]),
    ("snapshotaccess plugin + filter", FILTERED + [PLUGIN]),
]
if os.environ.get("BENCH_PATHS"):
    PATHS = [PATHS[int(i)] for i in os.environ["BENCH_PATHS"].split(",")]
for v in filter(None, (v.strip() for v in
                       os.environ.get("BENCH_VARIANTS", "").split(";"))):
    PATHS.append(("plugin + filter, " + v, FILTERED + [PLUGIN] + v.split()))
DIRECT = PATHS[0][0]
WHO = ("qemu", "nbdkit", "client")


def proc_cpu(pid):
    """User + system CPU seconds a process has used so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def size_bytes(s):
    """"256K", "4M" -> bytes (nbdcopy 1.14 takes only numbers)."""
    return int(s.rstrip("KM")) << {"K": 10, "M": 20}.get(s[-1], 0)


def copy(uri, conns, request_size, extra=()):
    """(wall seconds, nbdcopy's CPU seconds) of one nbdcopy to null:."""
    t0 = time.monotonic()
    p = subprocess.Popen(["nbdcopy", "--connections=%d" % conns,
                          "--request-size=%d" % size_bytes(request_size)]
                         + list(extra) + [uri, "null:"])
    _pid, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("nbdcopy failed: %d" % status)
    return time.monotonic() - t0, ru.ru_utime + ru.ru_stime


def fresh_qemu(image):
    """A started Fleecing on image with its snapshot.  On a busy shared
    machine starting QEMU has failed now and then (no QMP greeting
    within the timeout, once an unexpected first reply): a start is
    tried up to three times, saying so (the copy itself never is)."""
    for attempt in (1, 2, 3):
        f = Fleecing(SIZE, image=image)
        try:
            f.start()
            f.snapshot(bitmap=False)
            return f
        except Exception as e:
            f.stop()
            if attempt == 3:
                raise
            print("bench: starting QEMU failed (%r), trying again" % e,
                  file=sys.stderr)


def measure(tmp, image, args, conns, request_size):
    """One copy from a fresh qemu-storage-daemon: (seconds, {who: CPU
    seconds})."""
    f = fresh_qemu(image)
    try:
        q0 = proc_cpu(f.proc.pid)
        if args is None:
            secs, client = copy(f.snap_uri(), conns, request_size)
            nbdkit = 0.0
        else:
            with Nbdkit(tmp, args + ["socket=" + f.nbd_path,
                                     "export=snap"], "bench") as nk:
                k0 = nk.cpu_seconds()
                secs, client = copy(nk.uri(), conns, request_size)
                nbdkit = nk.cpu_seconds() - k0
        cpu = {"qemu": proc_cpu(f.proc.pid) - q0, "nbdkit": nbdkit,
               "client": client}
    finally:
        f.stop()
    return secs, cpu


def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_rounds(tmp, image):
    """{(path, size, conns): [(seconds, cpu)] per round}, loads."""
    res, loads = {}, []
    configs = [(s, c) for s in REQUEST_SIZES for c in CONNECTIONS]
    for r in range(ROUNDS):
        loads.append(loadavg())
        for i, (size, conns) in enumerate(configs):
            k = (r + i) % len(PATHS)
            for name, args in PATHS[k:] + PATHS[:k]:
                res.setdefault((name, size, conns), []).append(
                    measure(tmp, image, args, conns, size))
    return res, loads


def pct(x):
    return "%.0f%%" % (100 * x)


def print_run_header(q, rounds, loads):
    """The line above a QEMU build's tables: its version, the rounds and
    the load average when each round started."""
    print("QEMU %s (%s), %d rounds, load average at round start: %s"
          % (q.label, q.version(), rounds,
             ", ".join("%.2f" % x for x in loads)))
    print()


def tables(q, res, loads):
    """Markdown: one table per request size, and the per-round ratios."""
    gib = SIZE / (1 << 30)
    print_run_header(q, ROUNDS, loads)
    for size in REQUEST_SIZES:
        print("nbdcopy --request-size=%s, QEMU %s:" % (size, q.label))
        print()
        print("| path | connections | time | share of direct | per-round "
              "shares | CPU s/GiB: QEMU | nbdkit | nbdcopy | total |")
        print("|---|---|---|---|---|---|---|---|---|")
        for conns in CONNECTIONS:
            direct = res[(DIRECT, size, conns)]
            for name, _ in PATHS:
                runs = res[(name, size, conns)]
                ratios = [d[0] / p[0] for d, p in zip(direct, runs)]
                cpu = [statistics.median(c[w] for _, c in runs) / gib
                       for w in WHO]
                print("| %s | %d | %.3f s | %s | %s | %.2f | %s | %.2f | "
                      "%.2f |" % (
                          name, conns,
                          statistics.median(t for t, _ in runs),
                          pct(statistics.median(ratios)),
                          " ".join(pct(x) for x in ratios), cpu[0],
                          "-" if name == DIRECT else "%.2f" % cpu[1],
                          cpu[2], sum(cpu)))
        print()


def goal(q, res):
    """The goals: plugin + filter at least as fast as direct with 1M and
    4M requests, and at least level with the nbd plugin (alone, and with
    the filter) at nbdcopy's default; the other cells for reference."""
    pf = "snapshotaccess plugin + filter"
    names = [n for n, _ in PATHS]
    goals = {DIRECT: ("1M", "4M"), "nbdkit nbd plugin": ("256K",),
             "nbd plugin + backupaccess filter": ("256K",)}
    print("QEMU %s: plugin + filter against the path named, median of the "
          "per-round ratios of the times (over 100%%: plugin + filter is "
          "faster)" % q.label)
    print()
    print("| against | request size | connections | median | per round "
          "| goal met |")
    print("|---|---|---|---|---|---|")
    for b, sizes in goals.items():
        if pf not in names or b not in names:
            continue
        for size in REQUEST_SIZES:
            for conns in CONNECTIONS:
                ratios = [o[0] / p[0] for o, p in
                          zip(res[(b, size, conns)], res[(pf, size, conns)])]
                m = statistics.median(ratios)
                met = ("-" if size not in sizes else
                       "yes" if m >= 1 else "no")
                print("| %s | %s | %d | %s | %s | %s |" % (
                    b, size, conns, pct(m),
                    " ".join(pct(x) for x in ratios), met))
    print()


def incremental(tmp):
    """An incremental backup of many small dirty regions, discard on."""
    rng = random.Random(11)
    size = 1 << 30
    rows = [("nbd plugin + backupaccess filter", FILTERED + ["nbd"]),
            ("snapshotaccess plugin + filter", FILTERED + [PLUGIN])]
    res = {}
    with Fleecing(size) as f:
        # The bitmap starts empty: only these writes are dirty.
        for _ in range(2000):
            f.guest_write(rng.randrange(0, size // 65536 - 2) * 65536,
                          os.urandom(rng.choice((4096, 65536, 131072))))
        f.snapshot(bitmap=True)
        n = len(dirty_regions(f.snap_uri(), "frozen"))
        f.release(success=False)            # keep the bitmap for the runs
        for _ in range(ROUNDS):
            for name, args in rows:
                for conns in (1, 4):
                    f.snapshot(bitmap=True)
                    try:
                        with Nbdkit(tmp, args + [
                                "socket=" + f.nbd_path, "export=snap",
                                "backupaccess-bitmap=frozen",
                                "backupaccess-clean=zero"], "incr") as nk:
                            # As into an overlay of the last backup:
                            # zero extents (clean) skipped, requests of
                            # the bitmap's granularity.
                            t, _ = copy(nk.uri(), conns, "64K",
                                        ["--destination-is-zero"])
                    finally:
                        f.release(success=False)
                    res.setdefault((name, conns), []).append(t)
    print("Incremental, QEMU %s: %d dirty regions of a 1 GiB qcow2 disk, "
          "backupaccess-clean=zero, nbdcopy --destination-is-zero "
          "--request-size=65536 (the bitmap's granularity), discard on, "
          "median of %d rounds" % (qemus.current().label, n, ROUNDS))
    print()
    print("| path | 1 connection | 4 connections |")
    print("|---|---|---|")
    for name, _ in rows:
        print("| %s | %.3f s | %.3f s |" % (
            name, statistics.median(res[(name, 1)]),
            statistics.median(res[(name, 4)])))
    print()


def fleecing_peak(tmp, discard):
    """Full backup while the guest writes 1 MiB at random offsets;
    returns the fleecing image's peak and final size."""
    rng = random.Random(5)
    size = 256 * MiB
    with Fleecing(size) as f:
        f.guest_write(0, os.urandom(size))
        f.snapshot(bitmap=False)
        peak = f.fleece_size()
        args = FILTERED + [PLUGIN, "socket=" + f.nbd_path, "export=snap",
                           "backupaccess-discard=%s" % discard]
        with Nbdkit(tmp, args, "peak") as nk:
            p = subprocess.Popen(["nbdcopy", "--connections=1",
                                  "--requests=1", nk.uri(), "null:"])
            for _ in range(64):
                f.guest_write(rng.randrange(0, size - MiB), os.urandom(MiB))
                peak = max(peak, f.fleece_size())
                if p.poll() is not None:
                    break
                time.sleep(0.01)
            p.wait()
            peak = max(peak, f.fleece_size())
        final = f.fleece_size()
    return peak, final


def version(cmd):
    return subprocess.run(cmd + ["--version"], capture_output=True,
                          text=True).stdout.split("\n")[0]


def header():
    with open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) >> 20
    print("Measured with make bench on %s: %s, %d cores, %d GiB, kernel %s; "
          "%s, %s; nbdcopy of a %d MiB raw disk (page cache warm) to null:, "
          "a fresh qemu-storage-daemon for every copy, %d interleaved rounds"
          % (time.strftime("%Y-%m-%d %H:%M"), cpu, os.cpu_count(), mem,
             platform.release(), version(["nbdkit"]),
             version(["nbdcopy"]).replace("nbdcopy", "libnbd"), SIZE // MiB,
             ROUNDS))
    print()


def measure_one_qemu(image):
    """The throughput tables on qemus.current() (BACKUPACCESS_QEMU)."""
    q = qemus.current()
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as tmp:
        res, loads = run_rounds(tmp, image)
    tables(q, res, loads)
    goal(q, res)


def random_image(tmp, size):
    """A raw disk of size bytes of random data in tmp (the page cache
    holds it: every path reads the same warm image)."""
    image = os.path.join(tmp, "disk.raw")
    with open(image, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
    return image


def measure_per_qemu(script, image):
    """Runs script --measure image once per QEMU build of QEMUS, each in a
    process of its own (qemus.current() is chosen once per process), and
    says which builds are missing."""
    for q in qemus.available(pve=False):
        if q.label not in QEMUS or q.storage_daemon is None:
            continue
        sys.stdout.flush()
        subprocess.run([sys.executable, os.path.abspath(script),
                        "--measure", image], check=True,
                       env=dict(os.environ, BACKUPACCESS_QEMU=q.label))
    for label, why in qemus.missing(pve=False):
        print("QEMU %s not measured: %s" % (label, why))


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        measure_one_qemu(sys.argv[2])
        return
    header()
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as tmp:
        image = random_image(tmp, SIZE)
        measure_per_qemu(__file__, image)
        if os.environ.get("BENCH_EXTRA", "1") == "0":
            return
        incremental(tmp)
        print("Fleecing image during a full backup (256 MiB) while the guest "
              "writes 64 x 1 MiB at random offsets, QEMU %s"
              % qemus.current().label)
        print()
        print("| discard | peak | at the end |")
        print("|---|---|---|")
        for discard in ("true", "false"):
            peak, final = fleecing_peak(tmp, discard)
            print("| %s | %.1f MiB | %.1f MiB |" % (discard, peak / MiB,
                                                    final / MiB))
        print()


if __name__ == "__main__":
    main()
