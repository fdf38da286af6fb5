#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""backupaccess-helper against upstream QEMU (a real qemu-storage-daemon,
a QMP socket of its own, --backend
upstream): a full then an incremental backup with setup / serve / status /
mount / teardown, byte-identical under guest writes; a write made after
setup is not in that backup but in the next; with 128 KiB fleecing
clusters every cluster read is discarded; `run` tears down with success
or failure by the command's exit status, and on SIGTERM (also one that
comes during setup); a failed backup loses no change from the bitmap; a
setup that fails half-way and a second teardown leave nothing behind,
and neither does a failing test."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, check, run, run_helper
from qsd_vm import QsdVm

SIZE = 32 << 20
DEV = "drive-scsi0"
rng = random.Random(17)


helper = run_helper


def regions_of(writes, gran):
    """The dirty regions writes leave in a bitmap of this granularity."""
    chunks = set()
    for off, n in writes:
        chunks.update(range(off // gran, (off + n - 1) // gran + 1))
    out = []
    for c in sorted(chunks):
        if out and out[-1][1] == c * gran:
            out[-1][1] += gran
        else:
            out.append([c * gran, (c + 1) * gran])
    return [[s, e - s] for s, e in out]


def write_some(vm, n):
    writes = []
    for _ in range(n):
        length = rng.randrange(1, 200 << 10)
        off = rng.randrange(0, SIZE - length)
        vm.guest_write(off, rng.randbytes(length))
        writes.append((off, length))
    return writes


def no_leftovers(vm, rd):
    check(not os.path.exists(rd), "the run directory is still there: %s"
          % (os.listdir(rd) if os.path.isdir(rd) else rd))
    check(vm.exports() == [] or all(e["id"].startswith("guest")
                                    for e in vm.exports()),
          "QEMU exports left: %s" % vm.exports())
    check(not [n for n in vm.node_names() if n.startswith("ba-")],
          "nodes left: %s" % vm.node_names())
    check(vm.block_jobs() == [], "jobs left: %s" % vm.block_jobs())


def main(tmp, vm):
    rd = os.path.join(tmp, "run")
    common = ["--qmp", vm.qmp_path, "--run-dir", rd, "--backend", "upstream",
              "--device", DEV, "--fleecing-dir", tmp]
    vm.guest_write(0, rng.randbytes(SIZE))

    # Bad input changes nothing.
    r = helper("setup", "--qmp", vm.qmp_path, "--run-dir", rd, "--backend",
               "upstream", "--device", "nosuch", "--fleecing-dir", tmp,
               ok=False)
    check(r.returncode == 1 and "no such block node" in r.stderr, r.stderr)
    r = helper("setup", *common[:-2], "--fleecing-dir", tmp + "/nope",
               ok=False)
    check("not a directory" in r.stderr, r.stderr)
    r = helper("setup", *common, "--bitmap", "a/b", ok=False)
    check(r.returncode == 1 and "only letters" in r.stderr, r.stderr)
    check(not os.path.exists(rd), "bad input created the run directory")

    # --- full backup: the bitmap does not exist yet ---------------------
    at_full = vm.disk_read(0, SIZE)
    out = json.loads(helper("setup", *common, "--bitmap", "backup").stdout)
    d = out["devices"][0]
    check(d["device"] == DEV and d["size"] == SIZE and
          d["bitmap-mode"] == "new" and d["bitmap-name"] is None and
          d["export"] == DEV and d["cluster-size"] == 65536 and
          d["nbd-path"].startswith(rd), "setup printed %s" % d)
    check(oct(os.stat(rd).st_mode & 0o777) == "0o700", "run dir mode")
    write_some(vm, 10)                          # after the snapshot
    out = json.loads(helper("serve", "--run-dir", rd).stdout)
    uri = out["devices"][0]["uri"]
    run(["nbdcopy", uri, os.path.join(tmp, "full.raw")])
    with open(os.path.join(tmp, "full.raw"), "rb") as f:
        check(f.read() == at_full, "full backup differs from the snapshot")
    time.sleep(1.2)                             # the counters' period
    st = json.loads(helper("status", "--run-dir", rd).stdout)["devices"][0]
    check(st["bytes-read"] == SIZE and st["bytes-left"] == 0 and
          st["bytes-discarded"] == SIZE and st["fleecing-size"] >= 0 and
          not st["snapshot-broken"], "status %s" % st)
    helper("teardown", "--run-dir", rd, "--success")
    no_leftovers(vm, rd)
    check(set(vm.bitmaps()) == {"backup"}, "bitmaps %s" % vm.bitmaps())
    r = helper("teardown", "--run-dir", rd, "--success")
    check("nothing to tear down" in r.stderr, r.stderr)

    # --- incremental, then a failed one, then again ----------------------
    vm.guest_write(0, b"\0")                    # reset: known writes only
    run_ok = None
    vm.qmp.cmd("block-dirty-bitmap-clear", node=DEV, name="backup")
    writes = write_some(vm, 6)
    gran = vm.bitmaps()["backup"]["granularity"]
    want = regions_of(writes, gran)
    at_inc = vm.disk_read(0, SIZE)
    # 128 KiB fleecing clusters: copy-before-write, the filter and the
    # plugin all work in 128 KiB clusters.
    out = json.loads(helper("setup", *common, "--bitmap", "backup",
                            "--cluster-size", "128K").stdout)
    check(out["devices"][0]["bitmap-mode"] == "reuse" and
          out["devices"][0]["cluster-size"] == 128 << 10, "%s" % out)
    # A write after setup is not in this backup (the frozen copy does
    # not record it), only in the next one: into a clean granule.
    pos = 0
    for o, n in want:
        if o - pos >= gran:
            break
        pos = o + n
    during = [(pos, 4096)]
    vm.guest_write(pos, b"\x77" * 4096)
    helper("serve", "--run-dir", rd)
    m = json.loads(helper("mount", "--run-dir", rd).stdout)["mounts"][0]
    check(m["dirty-regions"] == want, "dirty regions %s != %s"
          % (m["dirty-regions"], want))
    later = write_some(vm, 4)                   # during the backup
    fd = os.open(m["file"], os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap
        for off, n in m["dirty-regions"]:
            buf = mmap.mmap(-1, n)
            check(os.preadv(fd, [buf], off) == n, "short read")
            check(bytes(buf) == at_inc[off:off + n],
                  "virtual file differs at %d" % off)
        # Outside the dirty regions: refused by the filter.
        clean = 0 if want[0][0] > 0 else want[-1][0] + want[-1][1]
        try:
            buf = mmap.mmap(-1, 4096)
            os.preadv(fd, [buf], clean)
            check(False, "a read of a clean region succeeded")
        except OSError:
            pass
    finally:
        os.close(fd)
    # Every 128 KiB cluster with a dirty byte is discarded, no more, no
    # less (the counters are written every second).
    clusters = set()
    for off, n in want:
        clusters.update(range(off >> 17, ((off + n - 1) >> 17) + 1))
    deadline = time.monotonic() + 30
    while True:
        st = json.loads(helper("status", "--run-dir", rd).stdout)
        st = st["devices"][0]
        if st["bytes-discarded"] == len(clusters) << 17 or \
           time.monotonic() > deadline:
            break
        time.sleep(0.2)
    check(st["bytes-discarded"] == len(clusters) << 17 and
          st["bytes-left"] == 0, "discarded %d bytes, expected %d: %s"
          % (st["bytes-discarded"], len(clusters) << 17, st))
    # The backup "fails": every change must still be in the bitmap.
    helper("teardown", "--run-dir", rd, "--failure")
    no_leftovers(vm, rd)
    check(not os.path.ismount(m["file"]), "still mounted")

    # run: the command fails -> failure; the regions come back again,
    # plus the writes made during the failed backup.
    want2 = regions_of(writes + during + later, gran)
    script = ('import json, os, subprocess, sys\n'
              'j = json.loads(os.environ["BACKUPACCESS_JSON"])\n'
              'd = j["devices"][0]\n'
              'out = subprocess.run(["nbdinfo", "--map", d["uri"]],'
              ' capture_output=True, text=True, check=True).stdout\n'
              'print(out, file=sys.stderr)\n'
              'open(sys.argv[1], "w").write(json.dumps(j))\n'
              'sys.exit(int(sys.argv[2]))\n')
    r = subprocess.run([HELPER, "run", *common, "--bitmap", "backup", "--",
                        "/usr/bin/python3", "-c", script,
                        os.path.join(tmp, "env.json"), "3"],
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 3, "run exit %d: %s" % (r.returncode, r.stderr))
    check("tearing down with failure" in r.stderr, r.stderr)
    no_leftovers(vm, rd)
    got = [[o, n] for o, n, t in
           (map(int, l.split()[:3]) for l in r.stderr.splitlines()
            if l.strip() and l.split()[0].isdigit()) if t == 0]
    merged = []
    for o, n in got:
        if merged and merged[-1][0] + merged[-1][1] == o:
            merged[-1][1] += n
        else:
            merged.append([o, n])
    check(merged == want2, "after a failed backup the bitmap lost changes: "
          "%s != %s" % (merged, want2))

    # run: the command succeeds -> success; only later writes remain.
    r = subprocess.run([HELPER, "run", *common, "--bitmap", "backup", "--",
                        "/usr/bin/python3", "-c", script,
                        os.path.join(tmp, "env.json"), "0"],
                       capture_output=True, text=True, timeout=120)
    check(r.returncode == 0 and "tearing down with success" in r.stderr,
          r.stderr)
    no_leftovers(vm, rd)
    out = json.loads(helper("setup", *common, "--bitmap", "backup").stdout)
    check(out["devices"][0]["bitmap-mode"] == "reuse", "%s" % out)
    m = helper("serve", "--run-dir", rd)
    regions = json.loads(helper("mount", "--run-dir", rd).stdout)
    check(regions["mounts"][0]["dirty-regions"] == [], "writes after a "
          "successful backup: %s" % regions)
    helper("teardown", "--run-dir", rd, "--success")
    no_leftovers(vm, rd)

    # run, interrupted: SIGTERM tears down with failure, and the bitmap
    # still covers every change; in the middle of setup as well as while
    # the command runs.
    vm.guest_write(3 << 20, b"\x66" * 4096)
    count = vm.bitmaps()["backup"]["count"]
    check(count > 0, "no dirty bits before the interrupted run")
    running = os.path.join(tmp, "running")
    for when in ("setup", "the command"):
        if os.path.exists(running):
            os.unlink(running)
        p = subprocess.Popen([HELPER, "run", *common, "--bitmap", "backup",
                              "--", "sh", "-c", 'touch "$0"; exec sleep 60',
                              running], stderr=subprocess.PIPE, text=True)
        mark = os.path.join(rd, "state.json") if when == "setup" else running
        deadline = time.monotonic() + 60
        while not os.path.exists(mark):
            check(time.monotonic() < deadline and p.poll() is None,
                  "run did not start")
            time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        try:
            _, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            check(False, "SIGTERM during %s: run did not end" % when)
        check(p.returncode != 0 and "tearing down with failure" in err,
              "SIGTERM during %s: exit %d: %s" % (when, p.returncode, err))
        no_leftovers(vm, rd)
        check(vm.bitmaps()["backup"]["count"] >= count,
              "the interrupted run lost changes from the bitmap")

    # A full backup that fails must not leave a bitmap behind that the
    # next run would take as the base of an incremental.
    out = json.loads(helper("setup", *common, "--bitmap", "fresh").stdout)
    check(out["devices"][0]["bitmap-mode"] == "new", "%s" % out)
    helper("teardown", "--run-dir", rd, "--failure")
    no_leftovers(vm, rd)
    check("fresh" not in vm.bitmaps(), "a failed full backup left its "
          "bitmap: %s" % list(vm.bitmaps()))

    # QEMU busy with another QMP client: teardown keeps the state (and
    # everything in QEMU) and can be run again.
    helper("setup", *common, "--bitmap", "backup")
    other = vm.connect()
    r = helper("teardown", "--run-dir", rd, "--failure", ok=False)
    check(r.returncode == 1 and "try again" in r.stderr, r.stderr)
    check(os.path.exists(os.path.join(rd, "state.json")),
          "the state was dropped")
    other.close()
    helper("teardown", "--run-dir", rd, "--failure")
    no_leftovers(vm, rd)

    # The helper killed (SIGKILL) anywhere in setup: teardown undoes
    # it, and no change is lost from the bitmap.
    vm.guest_write(1 << 20, b"\x55" * 4096)
    before = json.dumps(vm.bitmaps()["backup"]["count"])
    for delay in (0.005, 0.01, 0.02, 0.03, 0.045, 0.06, 0.1):
        p = subprocess.Popen([HELPER, "setup", *common, "--bitmap", "backup"],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.kill()
        p.wait()
        helper("teardown", "--run-dir", rd, "--failure")
        no_leftovers(vm, rd)
        check(json.dumps(vm.bitmaps()["backup"]["count"]) == before,
              "killed after %.2f s: the bitmap changed" % delay)
        check(not [f for f in os.listdir(tmp) if "fleecing" in f],
              "fleecing images left: %s" % os.listdir(tmp))


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     QsdVm(size=SIZE, devices=(DEV,)) as vm:
    try:
        main(tmp, vm)
    finally:
        # Whatever failed: no mount or nbdkit may outlive the test.
        if os.path.exists(os.path.join(tmp, "run")):
            subprocess.run([HELPER, "teardown", "--run-dir",
                            os.path.join(tmp, "run"), "--failure"],
                           capture_output=True, timeout=120)
print("ok")
