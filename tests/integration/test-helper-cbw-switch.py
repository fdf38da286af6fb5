#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""backupaccess-helper's upstream back end switches a guest device to a
copy-before-write node of its own (on-cbw-error=break-snapshot), with the
VM paused for the switch, and back at teardown.  qemu-system-x86_64 (q35,
TCG, running, no guest OS) with two virtio-blk disks (one in an
iothread) and a node that no device uses.

- QEMU before 10.0 aborts serving a disk in an iothread over NBD (7.2
  when the first client disconnects): setup refuses such a disk there,
  and changes nothing; on 10.0 and later it is backed up with the rest;

- setup (incremental) while the VM runs: it says how long it paused the
  VM, the VM runs again, each disk's device has the helper's
  copy-before-write node as its drive and no backup job runs; the node
  without a device gets a blockdev-backup job instead (and says why);
  nbdkit is not told to discard clean clusters for the switched disks;
  every export reads to the end; teardown puts every device back on its
  node and leaves nothing;
- setup of a VM its user paused leaves it paused;
- the helper SIGKILLed at every state save and every QMP wait of setup
  (strace): teardown --failure resumes the VM where setup left it paused
  (checked to have happened), puts the devices back, leaves nothing, and
  the bitmap is as before;
- QEMU quits during an incremental and starts again: teardown (on the
  new QEMU) leaves the bitmap with the backup's changes and the write
  made during it;
- a device whose node has another writer (a writable NBD export, the
  device with share-rw): the switch fails, setup says why and rolls back,
  and the VM runs again."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, check, nbdinfo_map, run, run_helper  # noqa
from fault_fixture import read_regions  # noqa: E402
from qemu_fixture import QMP, check_build, stop_process, wait_for  # noqa
import qemus  # noqa: E402

SIZE = 8 << 20
DISKS = ("disk0", "disk1")
SPARE = "spare"                 # a node no device uses
SHARED = "disk2"                # share-rw, another writer added later
BITMAP = "backup"


class Vm:
    """qemu-system-x86_64, running, with the disks above."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.qmp_path = os.path.join(tmp, "qmp.sock")        # the helper's
        self.own = os.path.join(tmp, "qmp-test.sock")         # the test's
        q = qemus.current()
        self.args = [q.system] + q.args() + [
            "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none",
            "-m", "64", "-object", "iothread,id=io0",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-qmp", "unix:%s,server=on,wait=off" % self.own]
        for i, d in enumerate(DISKS + (SPARE, SHARED)):
            img = os.path.join(tmp, d + ".qcow2")
            run([q.img, "create", "-q", "-f", "qcow2", img, str(SIZE)])
            self.args += [
                "-blockdev", "driver=file,filename=%s,node-name=%s-file"
                % (img, d), "-blockdev", "driver=qcow2,file=%s-file,"
                "node-name=%s,discard=unmap" % (d, d)]
            if d == SPARE:
                continue
            opts = {"disk1": ",iothread=io0", SHARED: ",share-rw=on"}
            self.args += ["-device", "virtio-blk-pci,drive=%s,id=vblk%d%s"
                          % (d, i, opts.get(d, ""))]
        self.log = open(os.path.join(tmp, "qemu.log"), "w")
        self.start()
        self.roots0 = self.roots()

    def start(self):
        for p in (self.qmp_path, self.own):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen(self.args, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.own) or
                 self.proc.poll() is not None, "QEMU")
        self.qmp = QMP(self.own)
        check_build(self.qmp)

    def restart(self):
        """Quits (QEMU saves the persistent bitmaps) and starts again."""
        self.qmp.cmd("quit")
        rc = self.proc.wait(20)
        self.qmp.close()
        check(rc == 0, "QEMU exited %s at quit" % rc)
        self.start()

    def status(self):
        return self.qmp.cmd("query-status")["status"]

    def roots(self):
        """{qdev: the node its drive is}."""
        return {b["qdev"]: b["inserted"]["node-name"]
                for b in self.qmp.cmd("query-block") if b.get("qdev")}

    def state(self):
        """What the helper could leave behind, and the bitmaps."""
        nodes = self.qmp.cmd("query-named-block-nodes", flat=True)
        return {
            "nodes": sorted(n["node-name"] for n in nodes),
            "bitmaps": sorted((n["node-name"], b["name"], b["count"],
                               b["recording"]) for n in nodes
                              for b in n.get("dirty-bitmaps", [])
                              if "name" in b),
            "jobs": self.qmp.cmd("query-jobs"),
            "exports": self.qmp.cmd("query-block-exports"),
            "roots": self.roots(),
        }

    def write(self, disk, offset, length):
        i = (DISKS + (SPARE, SHARED)).index(disk)
        out = self.qmp.cmd("human-monitor-command", **{
            "command-line": 'qemu-io -d /machine/peripheral/vblk%d/'
            'virtio-backend "write -P 0x5a %d %d"' % (i, offset, length)})
        check("error" not in out.lower(), "qemu-io: %s" % out)

    def stop(self):
        try:
            self.qmp.cmd("quit")
            rc = self.proc.wait(20)
        except Exception:
            stop_process(self.proc)
            rc = "killed"
        self.qmp.close()
        self.log.close()
        return rc


def backed_up():
    """The disks setup takes on this QEMU."""
    return DISKS if qemus.current().at_least(10, 0) else DISKS[:1]


def setup_args(vm, rd, fl, devices):
    return ["setup", "--qmp", vm.qmp_path, "--run-dir", rd, "--backend",
            "upstream", "--fleecing-dir", fl, "--bitmap", BITMAP] + sum(
                (["--device", d] for d in devices), [])


def killed_at(args, syscall, n):
    """The helper, SIGKILLed on entering its nth syscall: True if it was
    (False: it finished first)."""
    r = subprocess.run(["strace", "-qq", "-o", "/dev/null", "-e",
                        "inject=%s:signal=KILL:when=%d" % (syscall, n),
                        HELPER] + args, capture_output=True, text=True,
                       timeout=180)
    return r.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)


def read_all(uri, scratch):
    """Reads everything the filter says is readable (not type 1)."""
    with open(scratch, "wb") as f:
        f.truncate(SIZE)
    read_regions(uri, [(o, o + n) for o, n, t in nbdinfo_map(uri)
                       if not t & 1], scratch)
    os.unlink(scratch)


def nothing_left(vm, rd, before, where):
    check(not os.path.exists(rd), "%s: the run directory is left" % where)
    now = vm.state()
    check(now == before, "%s: left in QEMU: %s, expected %s"
          % (where, now, before))
    check(vm.status() == "running", "%s: the VM is %s" % (where,
                                                          vm.status()))


def switched(vm, rd, fl):
    """A backup of both disks and the spare node while the VM runs."""
    r = run_helper(*setup_args(vm, rd, fl, backed_up() + (SPARE,)))
    check("the VM was paused for" in r.stderr and
          "node spare: no guest device has it as its drive" in r.stderr,
          r.stderr)
    pause = [l for l in r.stderr.splitlines() if "paused for" in l]
    check(vm.status() == "running", "the VM is %s after setup"
          % vm.status())
    with open(os.path.join(rd, "state.json")) as f:
        state = json.load(f)
    roots = vm.roots()
    jobs = [j["id"] for j in vm.qmp.cmd("query-jobs")]
    for d in state["devices"]:
        if d["device"] == SPARE:
            check(d.get("job") in jobs and "qdev" not in d, "%s" % d)
            continue
        check(roots[d["qdev"]] == d["cbw-node"] and d.get("cbw-bitmap") and
              "job" not in d, "%s: the device's drive is %s"
              % (d, roots[d["qdev"]]))
    check(len(jobs) == 1, "jobs: %s" % jobs)
    # The switched disks' copy-before-write has the frozen bitmap: no
    # discards of clean clusters; the spare node's has none.
    served = json.loads(run_helper("serve", "--run-dir", rd).stdout)
    for d in served["devices"]:
        read_all(d["uri"], os.path.join(vm.tmp, "read.raw"))
    for d in backed_up() + (SPARE,):
        with open("/proc/%d/cmdline" % int(open(os.path.join(
                rd, d + ".nbdkit.pid")).read())) as f:
            argv = f.read().split("\0")
        check(("backupaccess-discard-clean=true" in argv) == (d == SPARE),
              "%s: nbdkit %s" % (d, argv))
    run_helper("teardown", "--run-dir", rd, "--success")
    return pause[0]


def user_paused(vm, rd, fl):
    vm.qmp.cmd("stop")
    try:
        r = run_helper(*setup_args(vm, rd, fl, backed_up()))
        check("paused for" not in r.stderr and vm.status() == "paused",
              "setup resumed a VM its user paused (%s): %s"
              % (vm.status(), r.stderr))
        run_helper("teardown", "--run-dir", rd, "--failure")
        check(vm.status() == "paused", "teardown resumed a VM its user "
              "paused")
    finally:
        vm.qmp.cmd("cont")


def kills(vm, rd, fl, before):
    """setup killed at every step: returns {syscall: kill points} and
    how often the VM was left paused."""
    counts, left_paused = {}, 0
    for syscall in ("rename", "poll"):
        n = 0
        while True:
            n += 1
            was_killed = killed_at(setup_args(vm, rd, fl, backed_up()),
                                   syscall, n)
            left_paused += vm.status() == "paused"
            r = run_helper("teardown", "--run-dir", rd, "--failure",
                           ok=False)
            where = "setup killed at %s #%d" % (syscall, n)
            check(r.returncode == 0, "%s: teardown failed (%d): %s"
                  % (where, r.returncode, r.stderr))
            nothing_left(vm, rd, before, where)
            if not was_killed:
                break
            check(n < 200, "%s: more than 200 kill points?" % syscall)
        counts[syscall] = n - 1
    return counts, left_paused


def iothread_refused(vm, rd, fl, before):
    """QEMU before 10.0: a disk in an iothread is refused."""
    r = run_helper(*setup_args(vm, rd, fl, DISKS), ok=False)
    check(r.returncode == 1 and "device disk1: /machine/peripheral/vblk1/"
          "virtio-backend runs in iothread /objects/io0" in r.stderr and
          "undoing" not in r.stderr, r.stderr)
    nothing_left(vm, rd, before, "a disk in an iothread refused")
    return r.stderr.strip()


def restarted(vm, rd, fl):
    """QEMU quits during an incremental and starts again: teardown puts
    the backup's changes back, and the write made during it stays."""
    vm.write("disk0", 3 << 20, 64 << 10)
    count = bitmap_count(vm, "disk0")
    run_helper(*setup_args(vm, rd, fl, ("disk0",)))
    vm.write("disk0", 5 << 20, 64 << 10)
    vm.restart()
    r = run_helper("teardown", "--run-dir", rd, "--failure")
    after = bitmap_count(vm, "disk0")
    check(after == count + (64 << 10), "the bitmap has %d bytes after a "
          "restart, expected %d: %s" % (after, count + (64 << 10), r.stderr))
    check(vm.roots() == vm.roots0 and
          not [n for n in vm.state()["nodes"] if n.startswith("ba-")],
          "left after a restart: %s" % vm.state())


def bitmap_count(vm, node):
    return [c for n, b, c, rec in vm.state()["bitmaps"]
            if n == node and b == BITMAP][0]


def other_writer(vm, rd, fl, before):
    sock = os.path.join(vm.tmp, "other.sock")
    vm.qmp.cmd("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": sock}})
    vm.qmp.cmd("block-export-add", type="nbd", id="other",
               **{"node-name": SHARED}, writable=True)
    try:
        # The writable export stays: the state to come back to.
        mine = dict(before, exports=vm.qmp.cmd("query-block-exports"))
        r = run_helper(*setup_args(vm, rd, fl, (SHARED,)), ok=False)
        check(r.returncode == 1 and "QMP qom-set" in r.stderr and
              "undoing what was set up" in r.stderr, r.stderr)
        nothing_left(vm, rd, mine, "setup with another writer")
        return [l for l in r.stderr.splitlines() if "qom-set" in l][0]
    finally:
        vm.qmp.cmd("block-export-del", id="other")
        vm.qmp.cmd("nbd-server-stop")


def main(tmp):
    vm = Vm(tmp)
    rd = os.path.join(tmp, "run")
    fl = os.path.join(tmp, "fleecing")
    os.mkdir(fl)
    try:
        # The first setup makes the bitmaps (a full backup).
        if backed_up() != DISKS:
            print(iothread_refused(vm, rd, fl, vm.state()))
        run_helper(*setup_args(vm, rd, fl, backed_up() + (SPARE, SHARED)))
        run_helper("teardown", "--run-dir", rd, "--success")
        for d in backed_up():
            vm.write(d, 1 << 20, 64 << 10)
        before = vm.state()
        print(switched(vm, rd, fl))
        # --success: the live bitmaps hold only what was written since.
        nothing_left(vm, rd, dict(before, bitmaps=[
            (n, b, 0, rec) for n, b, c, rec in before["bitmaps"]]),
            "after a backup")
        before = vm.state()
        user_paused(vm, rd, fl)
        nothing_left(vm, rd, before, "after a backup of a paused VM")
        for d in backed_up():
            vm.write(d, 2 << 20, 64 << 10)
        before = vm.state()
        counts, left_paused = kills(vm, rd, fl, before)
        print("setup killed at %s; the VM was left paused %d times, "
              "and resumed by teardown" % (counts, left_paused))
        check(left_paused > 0, "no kill left the VM paused: the pause "
              "was not exercised")
        restarted(vm, rd, fl)
        print(other_writer(vm, rd, fl, vm.state()))
    finally:
        if os.path.exists(rd):
            subprocess.run([HELPER, "teardown", "--run-dir", rd,
                            "--failure"], capture_output=True, timeout=180)
        rc = vm.stop()
    check(rc == 0, "QEMU did not exit 0 at quit (%s)" % rc)


if __name__ == "__main__":
    qemus.current()
    if shutil.which("strace") is None:
        print("SKIP: strace is not installed")
        sys.exit(77)
    with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
        main(tmp)
    print("ok")
