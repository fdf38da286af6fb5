#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Fault injection: backupaccess-helper itself killed (SIGKILL) at every
step of setup, serve and mount, deterministically: strace injects the
SIGKILL at the Nth state save (rename(2): the step before is done, its
record not yet saved) and at the Nth wait for a QMP reply (poll(2): QEMU
got the command, the helper never saw the answer), for every N; and
`run` killed while its command runs.  (test-helper-upstream.py kills
setup at a few moments in time; this covers every step.)

After each kill `teardown --failure` must exit 0 and leave nothing: no
run directory, nbdkit, backupaccess-mount, mount, fleecing image, QEMU
export, block node, job or frozen bitmap (also an nbdkit and a mount in
the run directory that the state does not name); an incremental's
bitmap must be exactly as
before, a failed full backup's bitmap gone.  At the end, after all the
kills and guest writes in between, an incremental through the helper
holds every change: its chain equals the guest disk byte for byte."""
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, check, run_helper
from fault_fixture import (UpstreamVm, helper_backup, lazy_unmount, mounts,
                           no_leftovers)
from mount_fixture import MOUNT

SIZE = 16 << 20
rng = random.Random(4242)

if shutil.which("strace") is None:
    print("SKIP: strace is not installed")
    sys.exit(77)
probe = subprocess.run(["strace", "-qq", "-o", "/dev/null", "true"],
                       capture_output=True, text=True)
if probe.returncode != 0:
    print("SKIP: strace cannot trace here: %s" % probe.stderr.strip())
    sys.exit(77)


def killed_at(args, syscall, n):
    """Runs the helper, SIGKILLed on entering its nth syscall; returns
    True if it was killed (False: it had fewer and finished)."""
    r = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e",
                        "inject=%s:signal=KILL:when=%d" % (syscall, n),
                        HELPER] + args, capture_output=True, text=True,
                       timeout=180)
    return r.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
    rd = vm.run_dir(os.path.join(tmp, "run"))
    fl = os.path.join(tmp, "fleecing")
    os.mkdir(fl)
    vm.guest_write(0, rng.randbytes(SIZE))
    base = os.path.join(tmp, "b0.raw")
    helper_backup(vm, rd, fl, tmp, None, base, "the full backup", "new")

    def setup_args(bitmap):
        return ["setup", "--qmp", vm.helper_qmp, "--run-dir", rd,
                "--backend", "upstream", "--device", vm.device,
                "--fleecing-dir", fl, "--bitmap", bitmap]

    kills = {}
    plans = [
        # (what, prepare, command, bitmap, syscall)
        ("setup (incremental)", [], setup_args("backup"), "backup", "rename"),
        ("setup (incremental)", [], setup_args("backup"), "backup", "poll"),
        ("setup (full)", [], setup_args("fresh"), "fresh", "rename"),
        ("setup (full)", [], setup_args("fresh"), "fresh", "poll"),
        ("serve", [setup_args("backup")], ["serve", "--run-dir", rd],
         "backup", "rename"),
        # While nbdkit starts: waiting for it to fork, for its pidfile.
        ("serve", [setup_args("backup")], ["serve", "--run-dir", rd],
         "backup", "wait4"),
        ("serve", [setup_args("backup")], ["serve", "--run-dir", rd],
         "backup", "clock_nanosleep"),
        ("mount", [setup_args("backup"), ["serve", "--run-dir", rd]],
         ["mount", "--run-dir", rd], "backup", "rename"),
        ("mount", [setup_args("backup"), ["serve", "--run-dir", rd]],
         ["mount", "--run-dir", rd], "backup", "clock_nanosleep"),
        ("mount", [setup_args("backup"), ["serve", "--run-dir", rd]],
         ["mount", "--run-dir", rd], "backup", "poll"),
    ]
    for what, prepare, cmd, bitmap, syscall in plans:
        n = 0
        while True:
            n += 1
            if n % 4 == 0:
                vm.random_writes(rng, 2)          # between the kills
            before = vm.bitmaps().get(bitmap)
            for p in prepare:
                run_helper(*p)
            was_killed = killed_at(cmd, syscall, n)
            r = run_helper("teardown", "--run-dir", rd, "--failure",
                           ok=False)
            where = "%s killed at %s #%d" % (what, syscall, n)
            check(r.returncode == 0, "%s: teardown failed (%d): %s"
                  % (where, r.returncode, r.stderr))
            no_leftovers(vm, rd, fl, where)
            after = vm.bitmaps().get(bitmap)
            if before is None:
                check(after is None, "%s: a failed full backup left its "
                      "bitmap: %s" % (where, after))
            else:
                check(after is not None and after["count"] ==
                      before["count"] and after["recording"],
                      "%s: the bitmap changed: %s -> %s"
                      % (where, before, after))
            print(where, "killed" if was_killed else "finished", flush=True)
            if not was_killed:
                break
            kills[what + " at " + syscall] = n
            check(n < 100, "%s: more than 100 kill points?" % what)

    # run, killed while its command runs: the command goes too.
    vm.random_writes(rng, 3)
    before = vm.bitmaps()["backup"]["count"]
    p = subprocess.Popen([HELPER, "run", *setup_args("backup")[1:], "--mount",
                          "--", "sleep", "600"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 60
        child = None
        while child is None:
            check(time.monotonic() < end and p.poll() is None,
                  "run did not start its command")
            for pid in os.listdir("/proc"):
                try:
                    with open("/proc/%s/stat" % pid) as f:
                        st = f.read()
                except (OSError, ValueError):
                    continue
                if "(sleep)" in st and int(st.rsplit(")", 1)[1].split()[1]) \
                        == p.pid:
                    child = int(pid)
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    r = run_helper("teardown", "--run-dir", rd, "--failure")
    no_leftovers(vm, rd, fl)
    end = time.monotonic() + 30
    while os.path.exists("/proc/%d" % child) and \
            open("/proc/%d/stat" % child).read().rsplit(")", 1)[1].split()[0] \
            not in ("Z", "X"):
        check(time.monotonic() < end, "run's command outlived the helper")
        time.sleep(0.05)
    check(vm.bitmaps()["backup"]["count"] == before,
          "killed run: the bitmap changed")
    kills["run, while its command runs"] = 1

    # Whatever the state does not name but lives in the run directory
    # (as a helper killed while nbdkit or the mount started can leave):
    # teardown stops it.
    run_helper(*setup_args("backup"))
    stray = subprocess.Popen(["nbdkit", "-f", "-U",
                              os.path.join(rd, "stray.sock"), "memory",
                              "1M"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    stray_mount = None
    try:
        end = time.monotonic() + 30
        while not os.path.exists(os.path.join(rd, "stray.sock")):
            check(time.monotonic() < end and stray.poll() is None,
                  "the stray nbdkit did not start")
            time.sleep(0.05)
        # And a backupaccess-mount on it (its comm is cut to 15
        # characters: "backupaccess-mo").
        os.mkdir(os.path.join(rd, "stray.mnt"))
        stray_mount = subprocess.Popen(
            [MOUNT, "-f", "--socket", os.path.join(rd, "stray.sock"),
             os.path.join(rd, "stray.mnt", "disk")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while os.path.join(rd, "stray.mnt") not in mounts():
            check(time.monotonic() < end and stray_mount.poll() is None,
                  "the stray mount did not start")
            time.sleep(0.05)
        r = run_helper("teardown", "--run-dir", rd, "--failure")
        for p in (stray, stray_mount):
            check("stopping %d, left by a helper that was killed" % p.pid
                  in r.stderr, r.stderr)
        stray.wait(30)
        stray_mount.wait(30)
    finally:
        for p in (stray, stray_mount):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        lazy_unmount(os.path.join(rd, "stray.mnt"))
    no_leftovers(vm, rd, fl, "stray nbdkit and mount")

    # After all that, nothing is missing from the next incremental.
    vm.random_writes(rng, 4)
    helper_backup(vm, rd, fl, tmp, base, os.path.join(tmp, "b1.raw"),
                  "incremental after %d kills" % sum(kills.values()),
                  "reuse")
for k, v in kills.items():
    print("%s: killed at each of %d points" % (k, v))
print("ok: helper killed %d times, nothing left behind, no change lost"
      % sum(kills.values()))
