#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""make bench, the file-handle part: a full backup of a raw disk (page
cache warm) read as a file with `dd bs=4M iflag=direct`, as Proxmox VE's
file-handle backup providers read it, from qemu-storage-daemon's
snapshot-access export:

- nbdfuse straight on QEMU's export (what Proxmox VE's file-handle
  mechanism mounts);
- the same after `nbdinfo --map` of the export (a block status request,
  as Proxmox VE makes for an incremental backup's dirty regions): shows
  what QEMU's state alone is worth (see backupaccess-mount(1));
- backupaccess-mount straight on QEMU's export;
- the same reading QEMU in 1 MiB pieces (--request-size 1M), FUSE's
  request size, instead of 256K;
- backupaccess-mount through nbdkit with the backupaccess filter and
  the snapshotaccess plugin (what `backupaccess-helper mount` does after `serve`).

Fair by construction, as bench-qemu.py: a fresh qemu-storage-daemon for
every measurement, on every QEMU of tests/lib/qemus.py that has one (7.2
and 10.0.2), the paths in rounds with their order rotated, every figure
a median within this run; shares are medians of the per-round ratios
nbdfuse/path; CPU seconds per GiB per process (QEMU, nbdkit and the FUSE
server from /proc/PID/stat around the copy, dd from wait4).

Knobs (environment): BENCH_ROUNDS (3), BENCH_QEMU_SIZE_MIB (1024),
BENCH_QEMUS ("7.2,10.0.2"), BENCH_MOUNT_PATHS (indexes into PATHS)."""
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from harness import FILTER, PLUGIN, Nbdkit  # noqa: E402
from mount_fixture import MOUNT  # noqa: E402
from qemu_fixture import Fleecing  # noqa: E402
import qemus  # noqa: E402

# bench-qemu.py's helpers (CPU from /proc, load, versions, the image).
_spec = importlib.util.spec_from_file_location(
    "bench_qemu", os.path.join(TOP, "bench", "bench-qemu.py"))
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)

MiB = 1 << 20
SIZE = bq.SIZE
ROUNDS = bq.ROUNDS
QEMUS = bq.QEMUS
NBDFUSE = "nbdfuse straight on QEMU's export"
MOUNT_STRAIGHT = "backupaccess-mount straight on QEMU's export"
PATHS = [NBDFUSE,
         "nbdfuse, after nbdinfo --map",
         MOUNT_STRAIGHT,
         "backupaccess-mount --request-size 1M",
         "backupaccess-mount through nbdkit (plugin + filter)"]
if os.environ.get("BENCH_MOUNT_PATHS"):
    PATHS = [PATHS[int(i)] for i in os.environ["BENCH_MOUNT_PATHS"].split(",")]
WHO = ("qemu", "nbdkit", "fuse", "dd")


def wait_file(path, proc, what):
    end = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(what + " did not start")
        time.sleep(0.02)
    time.sleep(0.1)


def unmount(mnt, pid):
    """fusermount3 -u, then the server must go (nbdfuse 1.14 sometimes
    stays: stopped by its pid after 10 s)."""
    subprocess.run(["fusermount3", "-u", mnt], check=True)
    end = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < end:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        time.sleep(0.02)
    if os.path.exists("/proc/%d" % pid):
        os.kill(pid, 9)


def dd(path):
    """(seconds, dd's CPU seconds) of one dd bs=4M iflag=direct."""
    t0 = time.monotonic()
    p = subprocess.Popen(["dd", "if=" + path, "of=/dev/null", "bs=4M",
                          "iflag=direct", "status=none"])
    _pid, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("dd failed: %d" % status)
    return time.monotonic() - t0, ru.ru_utime + ru.ru_stime


def start_fuse(tmp, f, path, nk):
    """The FUSE server of a path, in the foreground: (process, its pid,
    the mount point)."""
    mnt = os.path.join(tmp, "mnt")
    os.makedirs(mnt, exist_ok=True)
    pidfile = os.path.join(tmp, "fuse.pid")
    if os.path.exists(pidfile):
        os.unlink(pidfile)
    if path.startswith("nbdfuse"):
        if "nbdinfo" in path:
            subprocess.run(["nbdinfo", "--map", f.snap_uri()], check=True,
                           stdout=subprocess.DEVNULL)
        proc = subprocess.Popen(["nbdfuse", "-P", pidfile, mnt + "/disk",
                                 f.snap_uri()], stderr=subprocess.DEVNULL)
    else:
        src = (["--socket", nk.sock, "--behind-filter"] if nk else
               ["--socket", f.nbd_path, "--export", "snap"])
        if "--request-size" in path:
            src += path.split()[1:]
        proc = subprocess.Popen([MOUNT, "-f", "--pidfile", pidfile] + src +
                                [mnt + "/disk"], stderr=subprocess.DEVNULL)
    wait_file(pidfile, proc, path)
    with open(pidfile) as fp:
        pid = int(fp.read())
    return proc, pid, mnt


def measure(tmp, image, path):
    """One dd from a fresh qemu-storage-daemon: (seconds, {who: CPU s})."""
    with Fleecing(SIZE, image=image) as f:
        f.snapshot(bitmap=False)
        nk = None
        if "nbdkit" in path:
            nk = Nbdkit(tmp, ["--filter=" + FILTER, PLUGIN,
                              "socket=" + f.nbd_path, "export=snap"],
                        "bench-mount")
            nk.start()
        try:
            proc, pid, mnt = start_fuse(tmp, f, path, nk)
            try:
                q0, m0 = bq.proc_cpu(f.proc.pid), bq.proc_cpu(pid)
                k0 = nk.cpu_seconds() if nk else 0.0
                secs, dd_cpu = dd(mnt + "/disk")
                cpu = {"qemu": bq.proc_cpu(f.proc.pid) - q0,
                       "fuse": bq.proc_cpu(pid) - m0,
                       "nbdkit": nk.cpu_seconds() - k0 if nk else 0.0,
                       "dd": dd_cpu}
            finally:
                unmount(mnt, pid)
                proc.wait(30)
        finally:
            if nk:
                nk.stop()
    return secs, cpu


def run_rounds(tmp, image):
    res, loads = {}, []
    for r in range(ROUNDS):
        loads.append(bq.loadavg())
        k = r % len(PATHS)
        for path in PATHS[k:] + PATHS[:k]:
            res.setdefault(path, []).append(measure(tmp, image, path))
    return res, loads


def tables(q, res, loads):
    gib = SIZE / (1 << 30)
    bq.print_run_header(q, ROUNDS, loads)
    print("| path | time | MiB/s | share of nbdfuse | per-round shares | "
          "CPU s/GiB: QEMU | nbdkit | FUSE server | dd | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = res.get(NBDFUSE)
    for path in PATHS:
        runs = res[path]
        t = statistics.median(s for s, _ in runs)
        cpu = [statistics.median(c[w] for _, c in runs) / gib for w in WHO]
        ratios = [b[0] / p[0] for b, p in zip(base, runs)] if base else []
        print("| %s | %.3f s | %.0f | %s | %s | %.2f | %s | %.2f | %.2f | "
              "%.2f |" % (
                  path, t, SIZE / MiB / t,
                  bq.pct(statistics.median(ratios)) if ratios else "-",
                  " ".join(bq.pct(x) for x in ratios), cpu[0],
                  "%.2f" % cpu[1] if "nbdkit" in path else "-", cpu[2],
                  cpu[3], sum(cpu)))
    print()
    mount = MOUNT_STRAIGHT
    if base and mount in res:
        ratios = [b[0] / p[0] for b, p in zip(base, res[mount])]
        m = statistics.median(ratios)
        print("QEMU %s: backupaccess-mount reads the file %.2fx as fast as "
              "nbdfuse straight on QEMU's export (median of the per-round "
              "ratios %s; goal: at least 1.5x): %s"
              % (q.label, m, " ".join("%.2f" % x for x in ratios),
                 "met" if m >= 1.5 else "NOT met"))
        print()


def header():
    with open("/proc/cpuinfo") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f
                   if line.startswith("model name"))
    print("The file-handle path, measured with make bench on %s: %s, %d "
          "cores, kernel %s; %s, libfuse %s; dd bs=4M iflag=direct of a "
          "%d MiB raw disk's full backup (page cache warm), a fresh "
          "qemu-storage-daemon for every copy, %d interleaved rounds"
          % (time.strftime("%Y-%m-%d %H:%M"), cpu, os.cpu_count(),
             os.uname().release,
             bq.version(["nbdfuse"]).replace("nbdfuse", "libnbd"),
             subprocess.run(["pkg-config", "--modversion", "fuse3"],
                            capture_output=True, text=True).stdout.strip(),
             SIZE // MiB, ROUNDS))
    print()


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        q = qemus.current()
        with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as t:
            res, loads = run_rounds(t, sys.argv[2])
        tables(q, res, loads)
        return
    header()
    with tempfile.TemporaryDirectory(prefix="backupaccess-bench.") as tmp:
        bq.measure_per_qemu(__file__, bq.random_image(tmp, SIZE))


if __name__ == "__main__":
    main()
