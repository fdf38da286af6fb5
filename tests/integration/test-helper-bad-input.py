#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""backupaccess-helper given bad input, or hitting errors half-way: a
clear message, a non-zero exit, and nothing left behind (no run
directory, QEMU export, node, job, frozen bitmap, nbdkit or mount), with
the bitmap unchanged.  Errors after QEMU was changed roll back what was
done."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import TOP, check
from qsd_vm import QsdVm

HELPER = os.path.join(TOP, "helper", "backupaccess-helper")
DEV = "drive-scsi0"


def helper(*args, env=None):
    return subprocess.run([HELPER] + list(args), capture_output=True,
                          text=True, timeout=120, env=env)


def fails(r, message):
    check(r.returncode != 0, "exit 0 for: %s" % r.args)
    check(message in r.stderr, "expected %r in: %s" % (message, r.stderr))


def clean(vm, rd, bitmaps):
    check(not os.path.exists(rd), "the run directory was left behind")
    check(all(e["id"].startswith("guest") for e in vm.exports()),
          "exports left: %s" % vm.exports())
    check(not [n for n in vm.node_names()
               if n.startswith("ba-") or n.endswith("snapshot-access")],
          "nodes left: %s" % vm.node_names())
    check(vm.block_jobs() == [], "jobs left: %s" % vm.block_jobs())
    now = {k: v["count"] for k, v in vm.bitmaps().items()}
    check(now == bitmaps, "bitmaps changed: %s != %s" % (now, bitmaps))
    out = subprocess.run(["pgrep", "-f", rd], capture_output=True, text=True)
    check(out.stdout.strip() == "", "processes left: %s" % out.stdout)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    rd = os.path.join(tmp, "run")
    up = ["--backend", "upstream", "--fleecing-dir", tmp]

    # --version prints the package's one version (debian/changelog).
    with open(os.path.join(TOP, "debian", "changelog")) as f:
        version = f.readline().split("(")[1].split(")")[0]
    r = helper("--version")
    check(r.returncode == 0 and r.stdout == "backupaccess-helper %s\n"
          % version, "--version: %r %r" % (r.stdout, r.stderr))

    # No QMP socket; a socket that is not QMP.
    fails(helper("setup", "--qmp", tmp + "/none", "--run-dir", rd,
                 "--device", DEV), "cannot connect to QMP socket")
    notqmp = os.path.join(tmp, "not-qmp.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(notqmp)
    srv.listen(1)

    def answer():
        c, _ = srv.accept()
        c.sendall(b"SSH-2.0-OpenSSH\n")
        c.recv(100)
        c.close()
    threading.Thread(target=answer, daemon=True).start()
    fails(helper("setup", "--qmp", notqmp, "--run-dir", rd, "--device", DEV),
          "not a QMP socket")
    check(not os.path.exists(rd), "run dir created")
    # bytes/s * 8 for nbdkit's rate filter must not overflow.
    fails(helper("serve", "--run-dir", rd, "--nbd-path", notqmp, "--device",
                 DEV, "--bandwidth-limit", "9223372036854775807"),
          "--bandwidth-limit: too large")

    # A damaged state file: a message and exit 1, never an abort in json-c.
    os.mkdir(rd, 0o700)
    for text, message in (('{"devices": {}}', '"devices" is not an array'),
                          ('{"devices": [1]}', '"devices" item 0 is not'),
                          ('[]', 'not a JSON object')):
        with open(os.path.join(rd, "state.json"), "w") as f:
            f.write(text)
        for cmd in (["status"], ["teardown", "--failure"]):
            r = helper(*cmd, "--run-dir", rd)
            fails(r, "not a valid state file: " + message)
            check(r.returncode == 1, "exit %d: %s" % (r.returncode, r.stderr))
    os.unlink(os.path.join(rd, "state.json"))
    os.rmdir(rd)
    # A run directory that is not there is not made.
    for cmd in (["status"], ["mount"]):
        fails(helper(*cmd, "--run-dir", rd), "has no backup access")
        check(not os.path.exists(rd), "%s made the run directory" % cmd[0])

    with QsdVm(size=8 << 20, devices=(DEV,)) as vm:
        vm.qmp.cmd("block-dirty-bitmap-add", node=DEV, name="backup")
        vm.guest_write(0, b"\x11" * 65536)
        bitmaps = {k: v["count"] for k, v in vm.bitmaps().items()}
        q = ["--qmp", vm.qmp_path, "--run-dir", rd, *up]

        for name in ("../x", "a/b", "", "x" * 200):
            fails(helper("setup", *q, "--device", name), "device '%s'" % name)
        fails(helper("setup", *q, "--device", DEV, "--bitmap", "../b"),
              "bitmap '../b'")
        fails(helper("setup", *q, "--device", "nosuch"),
              "device nosuch: no such block node")
        fails(helper("setup", *q, "--device", DEV, "--bitmap-mode", "some"),
              "--bitmap-mode some")
        fails(helper("setup", *q, "--device", DEV, "--backend", "x"),
              "--backend x")
        fails(helper("teardown", "--run-dir", rd), "--success or --failure")
        fails(helper("frobnicate"), "unknown command")
        clean(vm, rd, bitmaps)

        # A second setup while one is active.
        check(helper("setup", *q, "--device", DEV, "--bitmap",
                     "backup").returncode == 0, "setup")
        fails(helper("setup", *q, "--device", DEV, "--bitmap", "backup"),
              "already holds a backup access")
        check(helper("teardown", "--run-dir", rd, "--failure").returncode == 0,
              "teardown")
        clean(vm, rd, bitmaps)

        # nbdkit missing: run rolls back the setup it made (which needs
        # qemu-img only).
        os.mkdir(os.path.join(tmp, "bin"))
        os.symlink(shutil.which("qemu-img"),
                   os.path.join(tmp, "bin", "qemu-img"))
        env = dict(os.environ, PATH=os.path.join(tmp, "bin"))
        r = helper("run", *q, "--device", DEV, "--bitmap", "backup", "--",
                   "true", env=env)
        fails(r, "cannot run nbdkit")
        check("undoing what was set up" in r.stderr, r.stderr)
        clean(vm, rd, bitmaps)

        # The mount program missing: mount fails at once; teardown
        # cleans up.
        check(helper("setup", *q, "--device", DEV, "--bitmap",
                     "backup").returncode == 0, "setup")
        env = dict(os.environ, BACKUPACCESS_MOUNT=os.path.join(tmp, "none"))
        fails(helper("mount", "--run-dir", rd, env=env),
              "cannot run %s" % os.path.join(tmp, "none"))
        check(helper("teardown", "--run-dir", rd, "--failure").returncode == 0,
              "teardown")
        clean(vm, rd, bitmaps)

    # A QMP error after QEMU was changed: another NBD server is running,
    # so nbd-server-start fails once copy-before-write is in place.  The
    # helper undoes everything, and the bitmap keeps its changes.
    with QsdVm(size=8 << 20, devices=(DEV,), guest_nbd=True) as vm:
        vm.qmp.cmd("block-dirty-bitmap-add", node=DEV, name="backup")
        vm.guest_write(0, b"\x22" * 65536)
        bitmaps = {k: v["count"] for k, v in vm.bitmaps().items()}
        r = helper("setup", "--qmp", vm.qmp_path, "--run-dir", rd, *up,
                   "--device", DEV, "--bitmap", "backup")
        fails(r, "QMP nbd-server-start")
        check("undoing what was set up" in r.stderr, r.stderr)
        check(not [f for f in os.listdir(tmp) if "fleecing" in f],
              "fleecing image left: %s" % os.listdir(tmp))
        clean(vm, rd, bitmaps)
print("ok")
