#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""What backupaccess-helper leaves on disk is the caller's alone: under a
permissive umask (022) the run directory, its state, logs, pidfiles,
status files, nbdkit's sockets and the fleecing images are owned by the
caller and closed to group and others, with the mount straight on
QEMU's export and after serve; the mount has no allow_other and
another user cannot open its files; COMMAND in `run` gets the
caller's umask back.  A run directory (or fleecing directory) below a
directory another user can change (theirs, or writable by others and
not sticky, also reached through a symlink) is refused before anything
is done; below sticky /tmp-like directories it is accepted.  A run
directory named with URI syntax ("r un&tls=require#%41") still gives
a working URI.  state.json is never read or written through a symlink.
teardown never stops an nbdkit that is not the one it started (a
reused pid), and never follows a device name out of the run directory."""
import json
import os
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Nbdkit, check, run_helper
from qsd_vm import QsdVm

DEV = "drive-scsi0"
NOBODY = 65534

os.umask(0o022)


def private(path, what):
    st = os.lstat(path)
    check(st.st_uid == os.geteuid(), "%s %s is owned by uid %d"
          % (what, path, st.st_uid))
    check(st.st_mode & 0o077 == 0, "%s %s has mode %o"
          % (what, path, stat.S_IMODE(st.st_mode)))


def files_are_private(rd, fl, common, served):
    try:
        run_helper("setup", *common)
        if served:
            run_helper("serve", "--run-dir", rd)
        mounts = json.loads(run_helper("mount", "--run-dir", rd).stdout)
        vfile = mounts["mounts"][0]["file"]
        mnt = os.path.dirname(vfile)
        status = os.path.join(rd, DEV + ".status.json")
        wait_for(lambda: os.path.exists(status), "the status file")

        private(rd, "run directory")
        check(stat.S_IMODE(os.stat(rd).st_mode) == 0o700, "run dir mode")
        names = sorted(os.listdir(rd))
        want = ["state.json", DEV + ".status.json", DEV + ".mount.pid",
                DEV + ".mount.log", DEV + ".mnt"]
        if served:
            want += [DEV + ".sock", DEV + ".nbdkit.pid", DEV + ".nbdkit.log"]
        for w in want:
            check(w in names, "%s missing from %s" % (w, names))
        for name in names:
            if name == "qemu-nbd.sock":
                continue        # QEMU's: protected by the directory
            if name.endswith(".mnt"):
                continue        # the FUSE mount: below
            private(os.path.join(rd, name), "run directory entry")
        fleecing = os.listdir(fl)
        check(len(fleecing) == 1, "fleecing images: %s" % fleecing)
        private(os.path.join(fl, fleecing[0]), "fleecing image")

        # The mount: no allow_other, and closed to another user (the
        # file and its .dirty file).
        with open("/proc/self/mountinfo") as f:
            lines = [l for l in f if (" %s " % mnt) in l]
        check(len(lines) == 1, "mount of %s not found" % mnt)
        check("allow_other" not in lines[0], "mounted with allow_other: %s"
              % lines[0])
        for path in (vfile, vfile + ".dirty"):
            r = subprocess.run(
                [sys.executable, "-c", "import os,sys; os.open(sys.argv[1], "
                 "os.O_RDONLY)", path], user=NOBODY, group=NOBODY,
                capture_output=True, text=True, timeout=60)
            check(r.returncode != 0 and "PermissionError" in r.stderr,
                  "another user could open %s: %s" % (path, r.stderr))
    finally:
        run_helper("teardown", "--run-dir", rd, "--failure", ok=False)
    check(not os.path.exists(rd), "run directory left")


def wait_for(pred, what, timeout=30):
    end = time.monotonic() + timeout
    while not pred():
        check(time.monotonic() < end, "timed out waiting for " + what)
        time.sleep(0.05)


def refused(rd, where, fleecing=None):
    r = run_helper("setup", "--qmp", "/nonexistent/qmp", "--run-dir", rd,
                   "--device", DEV, *(["--backend", "upstream",
                                       "--fleecing-dir", fleecing]
                                      if fleecing else []), ok=False)
    check(r.returncode == 1 and where in r.stderr and
          ("can be changed by another user" in r.stderr or
           "not writable by others" in r.stderr),
          "%s was accepted: %s" % (fleecing or rd, r.stderr))
    check(not os.path.exists(rd), "%s was created" % rd)


def accepted(rd, fleecing=None):
    r = run_helper("setup", "--qmp", "/nonexistent/qmp", "--run-dir", rd,
                   "--device", DEV, *(["--backend", "upstream",
                                       "--fleecing-dir", fleecing]
                                      if fleecing else []), ok=False)
    check("cannot connect to QMP socket" in r.stderr,
          "%s was refused: %s" % (fleecing or rd, r.stderr))


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    def d(name, mode, uid=0):
        p = os.path.join(tmp, name)
        os.mkdir(p)
        os.chmod(p, mode)
        os.chown(p, uid, uid)
        return p
    open_ = d("open", 0o777)                    # anyone may rename in it
    theirs = d("theirs", 0o755, NOBODY)
    sticky = d("sticky", 0o1777)
    safe = d("safe", 0o700)
    deep = os.path.join(theirs, "sub")
    os.mkdir(deep, 0o700)                       # ours, in theirs
    os.symlink(open_, os.path.join(safe, "to-open"))
    os.symlink(safe, os.path.join(tmp, "to-safe"))

    refused(os.path.join(open_, "run"), open_)
    refused(os.path.join(theirs, "run"), theirs)
    refused(os.path.join(deep, "run"), theirs)
    refused(os.path.join(safe, "to-open", "run"), open_)
    refused(os.path.join(safe, "run"), "--fleecing-dir", fleecing=open_)
    refused(os.path.join(safe, "run"), "--fleecing-dir", fleecing=theirs)
    accepted(os.path.join(sticky, "run"))
    accepted(os.path.join(tmp, "to-safe", "run"), fleecing=sticky)

    # state.json is never read, nor its temporary file written, through
    # a symlink (in a run directory only its owner can write to).
    elsewhere = os.path.join(tmp, "elsewhere.json")
    with open(elsewhere, "w") as f:
        json.dump({"backend": "serve", "devices": []}, f)
    links = d("links", 0o700)
    os.symlink(elsewhere, os.path.join(links, "state.json"))
    r = run_helper("status", "--run-dir", links, ok=False)
    check(r.returncode == 1 and "state.json: Too many levels of symbolic "
          "links" in r.stderr, "state.json read through a symlink: %s"
          % r.stderr)
    os.unlink(os.path.join(links, "state.json"))
    os.symlink(elsewhere, os.path.join(links, "state.json.tmp"))
    with Nbdkit(tmp, ["memory", "1M"], name="export") as export:
        try:
            r = run_helper("serve", "--run-dir", links, "--nbd-path",
                           export.sock, "--device", DEV, ok=False)
        finally:
            # Had serve gone on, its nbdkit would outlive the test.
            started = os.path.join(links, DEV + ".nbdkit.pid")
            if os.path.exists(started):
                with open(started) as f:
                    os.kill(int(f.read()), 15)
    check(r.returncode == 1 and "state.json: Too many levels of symbolic "
          "links" in r.stderr, "state.json.tmp written through a symlink: "
          "%s" % r.stderr)
    with open(elsewhere) as f:
        check(json.load(f)["devices"] == [], "the symlink's target changed")

    # A pidfile whose pid now belongs to another nbdkit (pids are
    # reused): teardown must not stop it.
    stale = d("stale", 0o700)
    with Nbdkit(tmp, ["memory", "1M"], name="unrelated") as other:
        pidfile = os.path.join(stale, DEV + ".nbdkit.pid")
        with open(pidfile, "w") as f:
            f.write("%d\n" % other.proc.pid)
        with open(os.path.join(stale, "state.json"), "w") as f:
            json.dump({"backend": "serve", "devices": [
                {"device": DEV, "export": DEV, "pidfile": pidfile}]}, f)
        r = run_helper("teardown", "--run-dir", stale, "--failure", ok=False)
        check(r.returncode == 0, "teardown: %s" % r.stderr)
        check(other.proc.poll() is None, "teardown stopped an nbdkit that "
              "was not its own")

    # A device name in the state file that would lead out of the run
    # directory (teardown removes DIR/DEVICE.nbdkit.log): refused.
    outer = d("outer", 0o700)
    bad = os.path.join(outer, "run")
    os.mkdir(bad, 0o700)
    victim = os.path.join(outer, "victim.nbdkit.log")
    open(victim, "w").close()
    with open(os.path.join(bad, "state.json"), "w") as f:
        json.dump({"backend": "serve", "devices": [{"device": "../victim"}]},
                  f)
    for cmd in (["status"], ["teardown", "--failure"]):
        r = run_helper(cmd[0], "--run-dir", bad, *cmd[1:], ok=False)
        check(r.returncode == 1 and "device in the state file" in r.stderr,
              "%s: %s" % (cmd[0], r.stderr))
    check(os.path.exists(victim), "teardown removed a file outside the run "
          "directory")

with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     QsdVm(size=8 << 20, devices=(DEV,)) as vm:
    rd = os.path.join(tmp, "run")
    fl = os.path.join(tmp, "fleece")
    os.mkdir(fl, 0o700)
    common = ["--qmp", vm.qmp_path, "--run-dir", rd, "--backend", "upstream",
              "--device", DEV, "--fleecing-dir", fl, "--bitmap", "backup"]
    # Mounted after serve (through nbdkit), and straight on QEMU's
    # export (the mount's own status file, no nbdkit).
    for served in (True, False):
        files_are_private(rd, fl, common, served)

    # run: COMMAND gets the caller's umask back.
    out = os.path.join(tmp, "umask")
    run_helper("run", *common, "--", "sh", "-c", 'umask > "$0"', out)
    with open(out) as f:
        check(f.read().strip() == "0022", "COMMAND's umask is not the "
              "caller's")

    # A run directory whose name has URI syntax in it: the URI still
    # names the socket, and nothing else.
    odd = os.path.join(tmp, "r un&tls=require#%41")
    args = [a if a != rd else odd for a in common]
    try:
        run_helper("setup", *args)
        uri = json.loads(run_helper("serve", "--run-dir", odd).stdout)[
            "devices"][0]["uri"]
        r = subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                           text=True, timeout=60)
        check(r.returncode == 0 and r.stdout.strip() == str(8 << 20),
              "%s: %s" % (uri, r.stderr))
    finally:
        run_helper("teardown", "--run-dir", odd, "--failure", ok=False)
    check(not os.path.exists(odd), "run directory left")
print("ok")
