#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""make bench, the built-in copy: a full backup of a raw disk (page cache
warm) straight from qemu-storage-daemon's snapshot-access export, by
backupaccess-copy and by nbdcopy, at the same request size and into the
same destination: a new qcow2 image (through qemu-nbd, which each starts
itself) and a raw file, both flushed at the end (nbdcopy --flush: a
backup is on stable storage when it is done).  On every QEMU of
tests/lib/qemus.py that has a qemu-storage-daemon (7.2 and 10.0.2), one
process per build.

Fair by construction, as bench-qemu.py (whose helpers this uses): a
fresh qemu-storage-daemon for every copy, the paths measured in rounds
with their order rotated, medians within this run; the share is the
median of the per-round ratios nbdcopy/backupaccess-copy (over 100%:
the built-in copy is faster).  CPU seconds per GiB: QEMU's from /proc,
the copier's from wait4 (with its qemu-nbd, which it waits for).  The
goal: the built-in copy at 95% of nbdcopy or more.

Knobs (environment): BENCH_ROUNDS (5), BENCH_QEMU_SIZE_MIB (1024),
BENCH_QEMUS ("7.2,10.0.2"), BENCH_COPY_REQUEST_SIZE ("256K"),
BENCH_COPY_DIR (where the images are written; default /dev/shm, a
tmpfs, so that the copiers and not the disk are measured),
BENCH_COPY_DESTS ("qcow2,raw"), BENCH_COPY_VARIANTS (extra rows of
backupaccess-copy options, rows separated by ";")."""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from qemu_fixture import Fleecing  # noqa: E402
import qemus  # noqa: E402

_spec = importlib.util.spec_from_file_location(
    "bench_qemu", os.path.join(HERE, "bench-qemu.py"))
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)

COPY = os.path.join(TOP, "copy", "backupaccess-copy")
MiB = 1 << 20
SIZE = bq.SIZE
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
REQUEST = os.environ.get("BENCH_COPY_REQUEST_SIZE", "256K")
DESTS = os.environ.get("BENCH_COPY_DESTS", "qcow2,raw").split(",")
OUT_DIR = os.environ.get("BENCH_COPY_DIR") or (
    "/dev/shm" if os.path.isdir("/dev/shm") else None)
NBDCOPY = "nbdcopy from QEMU"
BUILTIN = "backupaccess-copy"
PATHS = [(NBDCOPY, None), (BUILTIN, [])]
for v in filter(None, (v.strip() for v in
                       os.environ.get("BENCH_COPY_VARIANTS", "").split(";"))):
    PATHS.append((BUILTIN + " " + v, v.split()))


def command(name, extra, f, out, dest):
    """The commands of one copy (all timed: what each copier needs)."""
    size = str(bq.size_bytes(REQUEST))
    if name == NBDCOPY:
        argv = ["nbdcopy", "--flush", "--request-size=" + size,
                f.snap_uri()]
        if dest == "qcow2":
            return [["qemu-img", "create", "-q", "-f", "qcow2", out,
                     str(SIZE)], argv + ["--", "[", "qemu-nbd", "-f",
                                         "qcow2", out, "]"]]
        return [["truncate", "-s", str(SIZE), out], argv + [out]]
    return [[COPY, "--socket", f.nbd_path, "--export", "snap",
             "--request-size", size] + extra + [out]]


def measure(tmp, image, name, extra, dest):
    """One copy from a fresh qemu-storage-daemon: (seconds, QEMU's CPU
    seconds, the copier's)."""
    out = os.path.join(tmp, "out." + dest)
    with Fleecing(SIZE, image=image) as f:
        f.snapshot(bitmap=False)
        q0 = bq.proc_cpu(f.proc.pid)
        t0 = time.monotonic()
        cpu = 0.0
        for argv in command(name, extra, f, out, dest):
            p = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)
            _pid, status, ru = os.wait4(p.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise RuntimeError("%s failed: %s" % (argv[0],
                                                      p.stderr.read()))
            p.stderr.close()
            cpu += ru.ru_utime + ru.ru_stime
        secs = time.monotonic() - t0
        qemu = bq.proc_cpu(f.proc.pid) - q0
    os.unlink(out)
    return secs, qemu, cpu


def run_rounds(tmp, image):
    res, loads = {}, []
    for r in range(ROUNDS):
        loads.append(bq.loadavg())
        for i, dest in enumerate(DESTS):
            k = (r + i) % len(PATHS)
            for name, extra in PATHS[k:] + PATHS[:k]:
                res.setdefault((name, dest), []).append(
                    measure(tmp, image, name, extra, dest))
    return res, loads


def tables(q, res, loads):
    gib = SIZE / (1 << 30)
    bq.print_run_header(q, ROUNDS, loads)
    print("| destination | path | time | share of nbdcopy | per-round "
          "shares | CPU s/GiB: QEMU | copier | total | goal (95%) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dest in DESTS:
        base = res[(NBDCOPY, dest)]
        for name, _ in PATHS:
            runs = res[(name, dest)]
            ratios = [b[0] / p[0] for b, p in zip(base, runs)]
            share = statistics.median(ratios)
            cpu = [statistics.median(r[i] for r in runs) / gib
                   for i in (1, 2)]
            print("| %s | %s | %.3f s | %s | %s | %.2f | %.2f | %.2f | %s |"
                  % (dest, name, statistics.median(t for t, _, _ in runs),
                     bq.pct(share), " ".join(bq.pct(x) for x in ratios),
                     cpu[0], cpu[1], sum(cpu), "-" if name == NBDCOPY
                     else "met" if share >= 0.95 else "NOT met"))
    print()


def measure_one_qemu(image):
    q = qemus.current()
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.",
                                     dir=OUT_DIR) as tmp:
        res, loads = run_rounds(tmp, image)
    tables(q, res, loads)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        measure_one_qemu(sys.argv[2])
        return
    print("The built-in copy against nbdcopy straight from QEMU: a full "
          "backup of a %d MiB raw disk (page cache warm), --request-size=%s, "
          "into %s in %s, flushed; a fresh qemu-storage-daemon for every "
          "copy, %d interleaved rounds; %s, %s"
          % (SIZE // MiB, REQUEST, " and ".join(
              "a new qcow2 image" if d == "qcow2" else "a raw file"
              for d in DESTS), OUT_DIR or "/tmp", ROUNDS,
             bq.version(["nbdcopy"]).replace("nbdcopy", "libnbd"),
             bq.version(["qemu-nbd"])))
    print()
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as tmp:
        bq.measure_per_qemu(__file__, bq.random_image(tmp, SIZE))


if __name__ == "__main__":
    main()
