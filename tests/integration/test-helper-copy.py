#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""The backups of backupaccess-helper(1)'s EXAMPLES, run exactly as the
man page has them (read from backupaccess-helper.pod; only the paths,
the device name and, for the second pair, the bitmap name are this
test's), against a real Linux guest (tests/lib/guest.py) writing,
deleting and trimming on its ext4 disk all the while:

- "one command each": a full backup with run --copy-into, then an
  incremental with run --copy-into ...,backing=PREV;
- "with nbdcopy": the same through nbdkit and the filter, with
  --clean zero and nbdcopy's options for the incremental;

and between them, an incremental interrupted by SIGTERM (it fails, and
leaves neither its file nor FILE.part), one refused for having no
backing file, and the next incremental, on the last complete backup,
which must hold every change of both.

Each backup is taken as vzdump would: the guest's file system frozen and
the VM paused while the helper sets it up; the disk's image is copied
then, as the reference.  The copy program (or nbdcopy) is held at a gate
(a FIFO in front of it: BACKUPACCESS_COPY, or first in PATH) until the
VM runs again and the guest has written and trimmed more, so that the
guest writes during every backup.  Checked: each chain equals its
reference (qemu-img compare), e2fsck -fn finds it clean, the helper
leaves nothing in QEMU, and bad --copy-into input changes nothing.
"""
import importlib.util
import os
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import guest  # noqa: E402
import qemus  # noqa: E402
from harness import HELPER, TOP, check, run  # noqa: E402

COPY = os.path.join(TOP, "copy", "backupaccess-copy")
POD = os.path.join(TOP, "backupaccess-helper.pod")
SIZE = 128 << 20

# What the examples of test-guest-backup.py check, the same way.
_spec = importlib.util.spec_from_file_location(
    "guest_backup", os.path.join(os.path.dirname(__file__),
                                 "test-guest-backup.py"))
gb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gb)


def examples():
    """{subsection heading: [command]} of the man page's EXAMPLES: the
    verbatim paragraphs that start with backupaccess-helper run."""
    with open(POD) as f:
        text = f.read()
    section = text.split("\n=head1 EXAMPLES\n", 1)[1].split("\n=head1 ")[0]
    out = {}
    for part in section.split("\n=head2 ")[1:]:
        heading, body = part.split("\n", 1)
        out[heading] = ["\n".join(line[1:] for line in p.split("\n"))
                        for p in body.split("\n\n")
                        if p.startswith(" backupaccess-helper run")]
    return out


class Env:
    """The paths of the examples, and the gates in front of the copy
    programs."""

    def __init__(self, g, tmp):
        self.g, self.tmp = g, tmp
        self.rd = os.path.join(tmp, "run")
        self.backup = os.path.join(tmp, "backup")
        self.fleece = os.path.join(tmp, "fleece")
        self.gates = os.path.join(tmp, "gates")
        self.fifo = os.path.join(self.gates, "go")
        for d in (self.backup, self.fleece, self.gates):
            os.mkdir(d, 0o700)
        os.mkfifo(self.fifo)
        for name, real in (("backupaccess-copy", COPY),
                           ("nbdcopy", "/usr/bin/nbdcopy")):
            path = os.path.join(self.gates, name)
            with open(path, "w") as f:
                # --check runs at once; the copy waits at the FIFO.
                f.write('#!/bin/sh\ncase " $* " in *" --check "*) ;; *) '
                        'read go < %s ;; esac\nexec %s "$@"\n'
                        % (shlex.quote(self.fifo), shlex.quote(real)))
            os.chmod(path, stat.S_IRWXU)
        self.env = dict(os.environ, BACKUPACCESS_COPY=os.path.join(
            self.gates, "backupaccess-copy"), PATH=":".join(
                [os.path.dirname(HELPER), self.gates, os.environ["PATH"]]))

    def command(self, text, bitmap="backup", backup=None):
        for a, b in (("/run/vm-100/qmp.sock", self.g.qmp_path),
                     ("/run/backupaccess/vm-100", self.rd),
                     ("/var/tmp", self.fleece),
                     ("/backup/", (backup or self.backup) + "/"),
                     ("drive0", self.g.disks[0].device),
                     ("--bitmap backup", "--bitmap " + bitmap)):
            text = text.replace(a, b)
        return text

    def path(self, name, backup=None):
        """A backup file of the examples, as command() renames it."""
        return os.path.join(backup or self.backup,
                            name.replace("drive0", self.g.disks[0].device))


def open_gate(env, p, timeout=120):
    """Waits until the copy program is at the gate (the helper has set
    the backup up); returns the FIFO's write end, or None if the helper
    ended first."""
    end = time.monotonic() + timeout
    while True:
        try:
            return os.open(env.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        if p.poll() is not None:
            return None
        check(time.monotonic() < end, "the copy never started")
        time.sleep(0.05)


def backup(env, text, ref, name, signal_when=None, guest_writes=True):
    """Runs one example command as vzdump would take the backup; the
    reference is copied while the VM is paused, the copy goes on only
    once the guest has written and trimmed after the setup (unless its
    workload is stopped: not guest_writes).  Returns (exit status,
    stderr)."""
    g = env.g
    err = open(os.path.join(env.tmp, name + ".stderr"), "w+")
    at = g.freeze()
    g.qmp.cmd("stop")
    try:
        g.copy_disk(0, ref)
        p = subprocess.Popen(["sh", "-c", text], env=env.env, stdout=err,
                             stderr=subprocess.STDOUT)
        gate = open_gate(env, p)
    finally:
        g.qmp.cmd("cont")
        g.thaw()
    if gate is not None:
        if guest_writes:
            s = gb.wait_progress(g, at, "trims", 1)
            gb.wait_progress(g, s, "rounds", 5)
        os.write(gate, b"go\n")
        os.close(gate)
        if signal_when:
            signal_when(p)
    rc = p.wait(240)
    err.seek(0)
    out = err.read()
    err.close()
    print("%s: exit %d\n  %s" % (name, rc, out.strip().replace("\n",
                                                                "\n  ")))
    return rc, out


def child_of(pid):
    """The pid of pid's child (sh runs the helper as one)."""
    for d in os.listdir("/proc"):
        try:
            with open("/proc/%s/stat" % d) as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    return int(d)
        except (OSError, ValueError, IndexError):
            pass
    return None


def when_copying(part):
    """SIGTERM to the helper once the copy has made FILE.part."""
    def send(p):
        end = time.monotonic() + 60
        while not os.path.exists(part):
            check(p.poll() is None and time.monotonic() < end,
                  "the copy never made %s" % part)
            time.sleep(0.02)
        os.kill(child_of(p.pid), signal.SIGTERM)
    return send


def chain_ok(env, image, fmt, ref, before, bitmaps):
    gb.compare(image, fmt, ref)
    gb.e2fsck(image, fmt, env.tmp)
    now = gb.qemu_state(env.g.qmp)
    want = dict(before, bitmaps=sorted((env.g.disks[0].node, b)
                                       for b in bitmaps))
    check(now == want, "left in QEMU: %s, expected %s" % (now, want))
    check(not os.path.exists(env.rd), "the run directory is left")


def bad_input(env, cmds):
    """Refused before anything is set up: QEMU as it was."""
    before = gb.qemu_state(env.g.qmp)
    dev = env.g.disks[0].device
    exists = env.path("drive0-1.qcow2")
    two = sorted(os.path.basename(env.path(n)) for n in
                 ("drive0-1.qcow2", "drive0-2.qcow2"))
    base = env.command(cmds[0]).split("--copy-into")[0]
    cases = [
        (base + "--copy-into %s=%s" % (dev, exists), "exists already"),
        (base + "--copy-into %s=%s,backing=%s" % (
            dev, env.path("n.qcow2"), env.path("nosuch.qcow2")),
         "not a qcow2 image"),
        (base + "--copy-into %s=%s --device other" % (
            dev, env.path("n.qcow2")), "device other: no --copy-into"),
        (base + "--copy-into %s=%s -- true" % (dev, env.path("n.qcow2")),
         "takes no COMMAND"),
        (base + "--mount --copy-into %s=%s" % (dev, env.path("n.qcow2")),
         "are for nbdkit's clients"),
        (base + "--copy-into %s=%s,size=1" % (dev, env.path("n.qcow2")),
         "unknown or repeated 'size'"),
        (base + "--copy-into =%s" % env.path("n.qcow2"), "DEVICE=FILE"),
    ]
    ungated = dict(env.env, BACKUPACCESS_COPY=COPY)
    for text, want in cases:
        r = subprocess.run(["sh", "-c", text], env=ungated,
                           capture_output=True, text=True, timeout=120)
        check(r.returncode != 0 and want in r.stderr and
              "tearing down" not in r.stderr,
              "%s: exit %d, wanted %r and no setup: %s"
              % (text, r.returncode, want, r.stderr))
        check(gb.qemu_state(env.g.qmp) == before and
              not os.path.exists(env.rd), "%s changed something" % text)
        check(sorted(os.listdir(env.backup)) == two,
              "%s made files: %s" % (text, os.listdir(env.backup)))
    print("bad input: %d cases refused, nothing set up" % len(cases))


def main(q, tmp):
    ex = examples()
    builtin = ex["A full and then an incremental backup, one command each"]
    nbdcopy = ex["The same with nbdcopy, or another NBD client"]
    check(len(builtin) == 2 and len(nbdcopy) == 2, "the man page's "
          "examples: %s" % ex)
    with guest.Guest(q, tmp, sizes=(SIZE,), style="upstream") as g:
        env = Env(g, tmp)
        before = gb.qemu_state(g.qmp)
        gb.warm_up(q, g)
        ref = [os.path.join(tmp, "ref%d.raw" % i) for i in range(6)]

        # The man page's two commands.
        cmds = [env.command(c) for c in builtin]
        rc, _ = backup(env, cmds[0], ref[1], "full")
        check(rc == 0, "the full backup failed")
        chain_ok(env, env.path("drive0-1.qcow2"), "qcow2", ref[1], before,
                 ["backup"])
        rc, _ = backup(env, cmds[1], ref[2], "incremental")
        check(rc == 0, "the incremental backup failed")
        chain_ok(env, env.path("drive0-2.qcow2"), "qcow2", ref[2], before,
                 ["backup"])
        bad_input(env, cmds)

        # Interrupted, and refused without a backing file: both fail,
        # neither leaves a file, the bitmap keeps every change.  The
        # guest's workload stops, and a write of its own marks a region
        # that nothing writes again: only the bitmap can bring it into
        # the next incremental.
        g.stop_workload()
        mark = SIZE - (2 << 20)
        g.qmp.cmd("human-monitor-command", **{"command-line":
                  'qemu-io -d /machine/peripheral/%s/virtio-backend '
                  '"write -P 0x5a %d 1M"' % (g.disks[0].qdev, mark)})
        third = env.command(builtin[1].replace("drive0-2", "drive0-3")
                            .replace("drive0-1", "drive0-2"))
        part = env.path("drive0-3.qcow2.part")
        rc, out = backup(env, third + " --bandwidth-limit 64K", ref[0],
                         "interrupted", when_copying(part), False)
        check(rc != 0 and "interrupted by a signal" in out and
              "tearing down with failure" in out, "SIGTERM: %d" % rc)
        rc, out = backup(env, third.split(",backing=")[0], ref[0],
                         "no backing file", guest_writes=False)
        check(rc != 0 and "give it with --backing PREV" in out,
              "an incremental without PREV: %d" % rc)
        g.start_workload()
        check(sorted(os.listdir(env.backup)) == sorted(
            os.path.basename(env.path(n)) for n in
            ("drive0-1.qcow2", "drive0-2.qcow2")),
              "files left: %s" % os.listdir(env.backup))
        chain_ok(env, env.path("drive0-2.qcow2"), "qcow2", ref[2], before,
                 ["backup"])
        rc, _ = backup(env, third, ref[3], "next incremental")
        check(rc == 0, "the next incremental failed")
        with open(ref[3], "rb") as f:
            f.seek(mark)
            check(f.read(1 << 20) == b"\x5a" * (1 << 20),
                  "the marking write is not on the disk")
        chain_ok(env, env.path("drive0-3.qcow2"), "qcow2", ref[3], before,
                 ["backup"])

        # The nbdcopy pair, on a bitmap and in a directory of its own.
        other = os.path.join(tmp, "backup-nbdcopy")
        os.mkdir(other)
        cmds = [env.command(c, "nbdcopy", other) for c in nbdcopy]
        rc, _ = backup(env, cmds[0], ref[4], "nbdcopy full")
        check(rc == 0, "the nbdcopy full backup failed")
        chain_ok(env, env.path("drive0-1.raw", other), "raw", ref[4], before,
                 ["backup", "nbdcopy"])
        rc, _ = backup(env, cmds[1], ref[5], "nbdcopy incremental")
        check(rc == 0, "the nbdcopy incremental backup failed")
        chain_ok(env, env.path("drive0-2.qcow2", other), "qcow2", ref[5],
                 before, ["backup", "nbdcopy"])
        end = g.stop_workload()
        print("guest: %d rounds, %.1f MiB written, %d fstrims in all"
              % (end["rounds"], end["bytes"] / 2**20, end["trims"]))
        gb.check_alive(g)


if __name__ == "__main__":
    q = qemus.current()
    why = guest.missing()
    if why:
        gb.skip(why)
    for prog in (HELPER, COPY):
        if not os.access(prog, os.X_OK):
            gb.skip("%s is not built: run make" % prog)
    with tempfile.TemporaryDirectory(prefix="backupaccess-hcopy.") as tmp:
        try:
            main(q, tmp)
        finally:
            rd = os.path.join(tmp, "run")
            if os.path.exists(rd):
                subprocess.run([HELPER, "teardown", "--run-dir", rd,
                                "--failure"], capture_output=True,
                               timeout=180)
    print("ok")
