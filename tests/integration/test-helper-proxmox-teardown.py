#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""The way back, against the real Proxmox VE QEMU (tests/lib/pve_vm.py,
two VE 9 -blockdev disks): backup-access-teardown aborts QEMU while a
bitmap of the backup is still exported over NBD, so the exports must be
gone first on every path, and whatever happens the helper's cleanup
leaves nothing in QEMU (nodes, exports, bitmaps but the backup's own),
QEMU lives on, quits with status 0, and the next backup holds every
change.  Paths: a client still connected straight to QEMU's export; an
export of the backup's node that someone else added, on the helper's NBD
server or on another one (and of the disk with the backup's bitmap on
another one: the helper refuses to end the backup access until it is
gone); teardown from
another process while run's command runs (run then fails, and leaves
alone the next backup set up in its run directory meanwhile), and while
run is still setting up; the helper killed (SIGKILL) in the middle of run, and at any moment
of setup; nbdkit killed during run; SIGTERM to run.  And a QEMU that
answers late (the stand-in tests/lib/pve_fixture.py, a proxy in front of
the real QEMU that holds an answer back, modelling a command that takes
longer than the helper's QMP timeout): backup-access-setup,
block-export-del and backup-access-teardown each answered late: the
helper stops within its timeout with a clear message, keeps the state,
and a teardown once QEMU answers again cleans up."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, TOP, check, run_helper         # noqa: E402
from pve_fixture import FaultProxy                         # noqa: E402
from pve_vm import PveVm                                   # noqa: E402
from qemu_fixture import wait_for                          # noqa: E402

M = 1 << 20
DEVS = ("drive-scsi0", "drive-virtio1")
TARGET = "backup"
READER = os.path.join(TOP, "tests", "lib", "backup_reader.py")
# Reads until its nbdkit is gone, then fails.
WHILE_SERVED = ["sh", "-c", 'while nbdinfo --size "$BACKUPACCESS_URI_0" '
                '>/dev/null 2>&1; do sleep 0.1; done; exit 3']
rng = random.Random(5)
started = []                    # helpers run in the background


class Env:
    def __init__(self, vm, tmp):
        self.vm = vm
        self.tmp = tmp
        self.rd = os.path.join(tmp, "run")
        self.qmp = ["--qmp", vm.qmp_path, "--run-dir", self.rd]
        self.devs = sum((["--device", d] for d in DEVS), [])
        self.written = {d: [] for d in DEVS}    # since the last good backup

    def write(self, n=2, at=None):
        """n guest writes of 64K at random (or at offset at of the first
        disk)."""
        for _ in range(n):
            d = rng.choice(DEVS) if at is None else DEVS[0]
            off = at if at is not None else \
                rng.randrange(0, self.vm.sizes[d] - 65536)
            self.vm.guest_write(off, rng.randbytes(65536), d)
            self.written[d].append(off)

    def state(self):
        with open(os.path.join(self.rd, "state.json")) as f:
            return json.load(f)

    def clean(self, what):
        check(self.vm.alive(), "%s: QEMU died: %s" % (what,
                                                      self.vm.log()[-2000:]))
        check(not os.path.exists(self.rd), "%s: run directory left" % what)
        left = self.vm.leftovers(bitmaps=(TARGET,))
        check(left == {}, "%s: left in QEMU: %s" % (what, left))

    def teardown(self, what, **kw):
        r = run_helper("teardown", "--run-dir", self.rd, "--failure", **kw)
        self.clean(what)
        return r

    def next_backup_complete(self, what):
        """A backup with run: it holds every change since the last one
        that succeeded; and it succeeds."""
        out = os.path.join(self.tmp, "out")
        os.makedirs(out, exist_ok=True)
        run_helper("run", *self.qmp, *self.devs, "--bitmap", TARGET, "--",
                   READER, out)
        for d in DEVS:
            with open(os.path.join(out, d + ".regions.json")) as f:
                regions = json.load(f)
            for off in self.written[d]:
                check(any(o <= off and off + 65536 <= o + n
                          for o, n in regions), "%s: %s lost the change "
                      "at %d: %s" % (what, d, off, regions))
        self.written = {d: [] for d in DEVS}
        self.clean(what + ", next backup")

    def run_bg(self, cmd, qmp=None, **kw):
        p = subprocess.Popen(
            [HELPER, "run", "--qmp", qmp or self.vm.qmp_path, "--run-dir",
             self.rd, *self.devs, "--bitmap", TARGET, "--", *cmd],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            **kw)
        started.append(p)
        return p

    def served(self):
        """Waits until run serves every device."""
        def serving():
            try:
                devs = self.state()["devices"]
            except FileNotFoundError:
                return False
            return len(devs) == len(DEVS) and "uri" in devs[-1]
        wait_for(serving, "run to serve", 60)


def exports_in_the_way(e):
    # A client still connected straight to QEMU's export.
    e.write(1, at=0)
    run_helper("setup", *e.qmp, *e.devs, "--bitmap", TARGET)
    st = e.state()
    h = nbd.NBD()
    h.set_export_name(DEVS[0])
    h.connect_unix(st["nbd-path"])
    h.pread(4096, 0)
    e.teardown("a client connected to QEMU's export")
    try:
        h.pread(4096, 0)
        check(False, "the client still reads after the teardown")
    except nbd.Error:
        pass
    # Another export of the backup's node with its bitmap, in place of
    # the helper's (a bitmap is exported once at a time).
    run_helper("setup", *e.qmp, *e.devs, "--bitmap", TARGET)
    d = e.state()["devices"][0]
    e.vm.qmp.cmd("block-export-del", id=d["export"])
    wait_for(lambda: d["export"] not in [x["id"] for x in e.vm.exports()],
             "the export to go")
    e.vm.qmp.cmd("block-export-add", type="nbd", id="spy", name="spy",
                 **{"node-name": d["node"]},
                 bitmaps=[{"node": d["bitmap-node"],
                           "name": d["bitmap-name"]}])
    e.teardown("another export of the backup's node")
    # Another NBD server, not the helper's to stop, while the helper's
    # nbd-server-start fails (its answer comes late: the stand-in), and
    # meanwhile another program exports the backup's node of one disk and
    # the other disk itself, each with the backup's bitmap: the roll-back
    # removes the first export (of a node of the backup's), refuses to
    # end the backup access while the second keeps a bitmap busy (QEMU
    # would abort), and once that is gone teardown cleans up.
    other = os.path.join(e.tmp, "other-nbd.sock")
    e.vm.qmp.cmd("nbd-server-start", addr={"type": "unix",
                                           "data": {"path": other}})
    sock = os.path.join(e.tmp, "proxy.sock")
    with FaultProxy(e.vm.qmp_path, sock) as proxy:
        proxy.hold("nbd-server-start")
        p = subprocess.Popen([HELPER, "setup", "--qmp", sock, "--run-dir",
                              e.rd, *e.devs, "--bitmap", TARGET],
                             stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        started.append(p)
        proxy.wait_held()
        d0, d1 = e.state()["devices"]
        e.vm.qmp.cmd("block-export-add", type="nbd", id="node",
                     **{"node-name": d0["node"]},
                     bitmaps=[{"node": d0["bitmap-node"],
                               "name": d0["bitmap-name"]}])
        e.vm.qmp.cmd("block-export-add", type="nbd", id="disk",
                     **{"node-name": d1["bitmap-node"]},
                     bitmaps=[d1["bitmap-name"]])
        proxy.release()
        err = p.communicate(timeout=60)[1]
        check(p.returncode == 1 and "QMP nbd-server-start" in err and
              "bitmap 'backup' on node drive-virtio1 is still in use" in err
              and e.vm.alive() and os.path.exists(e.rd), err)
        check([x["id"] for x in e.vm.exports()] == ["disk"],
              "exports: %s" % e.vm.exports())
        e.vm.qmp.cmd("block-export-del", id="disk")
        e.vm.qmp.cmd("nbd-server-stop")
        e.teardown("the backup's nodes exported by another")
    e.next_backup_complete("exports in the way")


def teardown_elsewhere(e):
    """teardown from another process while run holds the backup."""
    env = dict(os.environ, BACKUPACCESS_QMP_TIMEOUT="5")
    e.write()
    p = e.run_bg(WHILE_SERVED)
    e.served()
    start = time.monotonic()
    e.teardown("teardown while run's command runs", env=env)
    check(time.monotonic() - start < 20, "teardown waited for run")
    err = p.communicate(timeout=60)[1]
    check(p.returncode == 3 and "torn down by another helper" in err,
          "run: %s" % err)
    e.clean("teardown while run's command runs, once run is done")
    e.next_backup_complete("teardown elsewhere")

    # A command that goes on and succeeds, and meanwhile the next backup
    # set up in the same run directory: run fails (the backup it served
    # was ended by another) and leaves the next one alone.
    flag = os.path.join(e.tmp, "go-on")
    e.write()
    p = e.run_bg(["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.1; done',
                  flag])
    e.served()
    e.teardown("teardown while run's command goes on", env=env)
    run_helper("setup", *e.qmp, *e.devs, "--bitmap", TARGET)
    exports = [d["export"] for d in e.state()["devices"]]
    open(flag, "w").close()
    err = p.communicate(timeout=60)[1]
    check(p.returncode == 1 and "torn down by another helper" in err,
          "run exited %d: %s" % (p.returncode, err))
    check(os.path.exists(os.path.join(e.rd, "state.json")) and
          set(exports) <= {x["id"] for x in e.vm.exports()},
          "run tore down the next backup: %s" % err)
    e.teardown("the next backup, after run")
    e.next_backup_complete("teardown elsewhere, command goes on")

    # ... and while run is still setting up (the first export answered
    # late): it waits for run, then undoes all of it.
    sock = os.path.join(e.tmp, "proxy.sock")
    e.write()
    with FaultProxy(e.vm.qmp_path, sock) as proxy:
        proxy.hold("block-export-add", seconds=4)
        p = e.run_bg(WHILE_SERVED, qmp=sock)
        proxy.wait_held()
        r = run_helper("teardown", "--run-dir", e.rd, "--failure", env=env)
        check("in use by another backupaccess-helper" in r.stderr, r.stderr)
        err = p.communicate(timeout=60)[1]
        check(p.returncode == 3 and "torn down by another helper" in err,
              "run: %s" % err)
    e.clean("teardown during run's setup")
    e.next_backup_complete("teardown during setup")


def kills(e):
    flag = os.path.join(e.tmp, "go-on")
    out = os.path.join(e.tmp, "out")
    os.makedirs(out, exist_ok=True)
    # The helper killed while run's command runs: the command ends too.
    e.write()
    p = e.run_bg([READER, out, "--hold", flag], start_new_session=True)
    e.served()
    e.write()
    p.kill()
    p.wait()
    wait_for(lambda: subprocess.run(["pgrep", "-f", flag],
                                    capture_output=True).returncode == 1,
             "run's command to end", 20)
    e.teardown("run killed")
    e.next_backup_complete("run killed")
    # nbdkit killed, and SIGTERM to run: teardown with failure.
    for what in ("nbdkit killed", "SIGTERM"):
        e.write()
        p = e.run_bg(WHILE_SERVED)
        e.served()
        e.write()
        if what == "SIGTERM":
            p.send_signal(signal.SIGTERM)
        else:
            os.kill(int(open(os.path.join(e.rd, DEVS[0] + ".nbdkit.pid"))
                        .read()), signal.SIGKILL)
        rc = p.wait(60)
        check(rc != 0 and "tearing down with failure" in p.stderr.read(),
              "%s: run exited %d" % (what, rc))
        e.clean(what)
        e.next_backup_complete(what)
    # setup killed at any moment.
    for delay in (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
        p = subprocess.Popen([HELPER, "setup", *e.qmp, *e.devs, "--bitmap",
                              TARGET], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        started.append(p)
        time.sleep(delay)
        p.kill()
        p.wait()
        e.teardown("setup killed after %.2f s" % delay)
    e.write()
    e.next_backup_complete("setup killed")


def late_answers(e):
    """QEMU answers late: the helper gives up within its timeout, keeps
    what it knows, and teardown cleans up once QEMU answers again."""
    sock = os.path.join(e.tmp, "proxy.sock")
    env = dict(os.environ, BACKUPACCESS_QMP_TIMEOUT="2")
    q = ["--qmp", sock, "--run-dir", e.rd]
    with FaultProxy(e.vm.qmp_path, sock) as proxy:
        e.write()
        proxy.hold("backup-access-setup")
        r = run_helper("setup", *q, *e.devs, "--bitmap", TARGET, env=env,
                       ok=False)
        check(r.returncode == 1 and "did not answer within 2 s" in r.stderr
              and "the teardown did not finish" in r.stderr and
              os.path.exists(e.rd), "setup answered late: %s" % r.stderr)
        proxy.release()
        e.teardown("setup answered late")
        # Answered a little late: the roll-back, on a new connection,
        # gets its answers and undoes it all.
        proxy.hold("backup-access-setup", seconds=3)
        r = run_helper("setup", *q, *e.devs, "--bitmap", TARGET, env=env,
                       ok=False)
        check(r.returncode == 1 and "did not answer within 2 s" in r.stderr
              and "undoing what was set up" in r.stderr, r.stderr)
        e.clean("setup answered a little late")
        for command in ("block-export-del", "backup-access-teardown"):
            run_helper("setup", *q, *e.devs, "--bitmap", TARGET)
            proxy.hold(command)
            r = run_helper("teardown", "--run-dir", e.rd, "--failure",
                           env=env, ok=False)
            check(r.returncode == 1 and "did not answer within 2 s" in
                  r.stderr and "run teardown again" in r.stderr,
                  "%s answered late: %s" % (command, r.stderr))
            proxy.release()
            e.teardown("%s answered late" % command)
    e.next_backup_complete("late answers")


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    rd = os.path.join(tmp, "run")
    try:
        with PveVm(devices={DEVS[0]: 8 * M, DEVS[1]: 8 * M},
                   tmpdir=os.path.join(tmp, "vm"), fleecing=True) as vm:
            vm.mark()
            e = Env(vm, tmp)
            e.write(4)
            e.next_backup_complete("the first backup")
            exports_in_the_way(e)
            teardown_elsewhere(e)
            kills(e)
            late_answers(e)
        check(vm.stopped_with is None, "quit: %s" % vm.stopped_with)
    finally:
        # Whatever failed: no helper, nbdkit or mount may outlive the test
        # (the reader that waits for a file ends with its helper).
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
        if os.path.exists(rd):
            subprocess.run([HELPER, "teardown", "--run-dir", rd, "--failure"],
                           capture_output=True, timeout=120)
print("ok")
