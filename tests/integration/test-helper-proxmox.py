#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""backupaccess-helper against the real Proxmox VE QEMU (pve-qemu
10.0.2-4, tests/lib/pve_vm.py), with disks attached in each of Proxmox
VE's ways: VE 9 -blockdev (two disks, fleecing clusters of 64K and 128K),
VE 9 with a throttle node on top, and VE 8 -drive with its fleecing image
attached the VE 8 way, by HMP drive_add (a BlockBackend name, no node
name).  In each: a full backup (setup, serve, nbdcopy, status)
byte-identical to the disks at setup while the guest writes; an
incremental one whose dirty regions (mount) are exactly the clusters
written since, read as the disks were at setup; it fails (teardown
--failure), and the next one (run) still holds every change; after each
teardown nothing of the backup is left in QEMU (nodes, exports, bitmaps
but the backup's own).  On -blockdev also bitmap modes none and new, and
serve --nbd-path in front of exports vzdump made, with a copy-before-write
cluster of 4M.  And status once QEMU is gone.  QEMU quits with status 0
after each."""
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, TOP, check, run, run_helper    # noqa: E402
from pve_vm import PveVm                                   # noqa: E402
from qemu_fixture import wait_for                          # noqa: E402

TARGET = "backup"
GRAN = 4 << 20                          # Proxmox VE's bitmap granularity
M = 1 << 20
CLUSTER = {"drive-scsi0": 64 << 10, "drive-virtio1": 128 << 10}
STYLES = [("blockdev", {"drive-scsi0": 16 * M, "drive-virtio1": 8 * M}),
          ("throttle", {"drive-scsi0": 8 * M}),
          ("drive", {"drive-scsi0": 8 * M})]
READER = os.path.join(TOP, "tests", "lib", "backup_reader.py")
rng = random.Random(31)


def js(r):
    return json.loads(r.stdout)


def guest_writes(vm, n):
    """n random guest writes; {device: [(offset, length)]}."""
    done = {d: [] for d in vm.sizes}
    for _ in range(n):
        d = rng.choice(sorted(vm.sizes))
        length = rng.randrange(1, 80) * 1024
        off = rng.randrange(0, vm.sizes[d] - length)
        vm.guest_write(off, rng.randbytes(length), d)
        done[d].append((off, length))
    return done


def joined(*writes):
    return {d: sum((w[d] for w in writes), []) for d in writes[0]}


def clusters_of(writes):
    """[[start, length]] of the GRAN clusters writes touch, merged."""
    out = []
    for c in sorted({c for off, n in writes
                     for c in range(off // GRAN, (off + n - 1) // GRAN + 1)}):
        if out and out[-1][0] + out[-1][1] == c * GRAN:
            out[-1][1] += GRAN
        else:
            out.append([c * GRAN, GRAN])
    return out


def read_direct(path, off, n):
    """n bytes at off of a mounted file, with O_DIRECT (see mount)."""
    buf = mmap.mmap(-1, n)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        check(os.preadv(fd, [buf], off) == n, "short read of %s" % path)
    finally:
        os.close(fd)
    return bytes(buf)


class Backup:
    """One VM's backups through the helper."""

    def __init__(self, vm, tmp):
        self.vm = vm
        self.tmp = tmp
        self.rd = os.path.join(tmp, "run")
        self.devs = sum((["--device", d] for d in vm.sizes), [])
        self.qmp = ["--qmp", vm.qmp_path, "--run-dir", self.rd]

    def attach(self):
        """What vzdump does first: a fleecing image per disk."""
        for d in self.vm.sizes:
            self.vm.add_fleecing(d, cluster_size=CLUSTER[d])
        return {d: self.vm.disk(d) for d in self.vm.sizes}

    def clean(self, what, bitmaps=(TARGET,)):
        """After a teardown: no run directory, and in QEMU nothing but
        the fleecing images (detached then, as vzdump does) and the
        backup's bitmap."""
        check(not os.path.exists(self.rd), "%s: run directory left" % what)
        self.vm.del_fleecing()
        left = self.vm.leftovers(bitmaps=bitmaps)
        check(left == {}, "%s (%s): left in QEMU: %s"
              % (what, self.vm.style, left))

    def setup(self, *args):
        return js(run_helper("setup", *self.qmp, *self.devs, *args))

    def full(self):
        snap = self.attach()
        out = self.setup("--bitmap", TARGET)
        check(out["backend"] == "proxmox", "%s" % out)
        for d in out["devices"]:
            check(d["bitmap-mode"] == "new" and d["bitmap-name"] == TARGET and
                  d["cluster-size"] == max(64 << 10, CLUSTER[d["device"]]),
                  "%s: full backup: %s" % (self.vm.style, d))
        during = guest_writes(self.vm, 6)
        out = js(run_helper("serve", "--run-dir", self.rd))
        for d in out["devices"]:
            dst = os.path.join(self.tmp, d["device"] + ".raw")
            run(["nbdcopy", d["uri"], dst])
            with open(dst, "rb") as f:
                check(f.read() == snap[d["device"]], "%s: the full backup of "
                      "%s differs" % (self.vm.style, d["device"]))
            os.unlink(dst)
        # The filter writes its counters every second.
        status = {}

        def done():
            status.update(js(run_helper("status", "--run-dir", self.rd)))
            return all(s["bytes-read"] == self.vm.sizes[s["device"]]
                       for s in status["devices"])
        wait_for(done, "status to show every byte read", 10)
        check(status["qemu"] == "running" and
              all(s["fleecing-size"] > 0 for s in status["devices"]),
              "status: %s" % status)
        run_helper("teardown", "--run-dir", self.rd, "--success")
        self.clean("full backup")
        return during

    def incremental_fails(self, since):
        snap = self.attach()
        out = self.setup("--bitmap", TARGET)
        check([d["bitmap-mode"] for d in out["devices"]] ==
              ["reuse"] * len(self.vm.sizes), "%s" % out)
        during = guest_writes(self.vm, 4)
        run_helper("serve", "--run-dir", self.rd)
        mounts = js(run_helper("mount", "--run-dir", self.rd))["mounts"]
        for m in mounts:
            want = clusters_of(since[m["device"]])
            check(m["dirty-regions"] == want, "%s: dirty regions of %s: %s, "
                  "written %s" % (self.vm.style, m["device"],
                                  m["dirty-regions"], want))
            for off, n in want:
                check(read_direct(m["file"], off, n) ==
                      snap[m["device"]][off:off + n], "%s: %s at %d differs"
                      % (self.vm.style, m["device"], off))
        run_helper("teardown", "--run-dir", self.rd, "--failure")
        self.clean("failed incremental")
        return during

    def run_after_failure(self, lost_if_failed):
        """The next backup, with run: every change since the last good
        one is in it."""
        snap = self.attach()
        out = os.path.join(self.tmp, "out")
        os.makedirs(out, exist_ok=True)
        run_helper("run", *self.qmp, *self.devs, "--bitmap", TARGET, "--",
                   READER, out)
        for d in self.vm.sizes:
            with open(os.path.join(out, d + ".regions.json")) as f:
                regions = json.load(f)
            with open(os.path.join(out, d + ".raw"), "rb") as f:
                data = f.read()
            for off, n in clusters_of(lost_if_failed[d]):
                check(any(o <= off and off + n <= o + ln
                          for o, ln in regions), "%s: %s lost the change at "
                      "%d: %s" % (self.vm.style, d, off, regions))
            for off, n in regions:
                check(data[off:off + n] == snap[d][off:off + n],
                      "%s: run's backup of %s differs at %d"
                      % (self.vm.style, d, off))
        self.clean("run")

    def modes(self):
        """Bitmap modes none (another target id: the backup's bitmap stays)
        and new (a full backup whatever the bitmap holds)."""
        for args, mode in ((["--bitmap-mode", "none"], "none"),
                           (["--bitmap", TARGET, "--bitmap-mode", "new"],
                            "new")):
            snap = self.attach()
            out = self.setup(*args)
            check([d["bitmap-mode"] for d in out["devices"]] ==
                  [mode] * len(self.vm.sizes), "%s: %s" % (mode, out))
            served = js(run_helper("serve", "--run-dir", self.rd))
            d = served["devices"][0]
            dst = os.path.join(self.tmp, "mode.raw")
            run(["nbdcopy", d["uri"], dst])
            with open(dst, "rb") as f:
                check(f.read() == snap[d["device"]], "mode %s: differs" % mode)
            os.unlink(dst)
            run_helper("teardown", "--run-dir", self.rd, "--success")
            self.clean("bitmap mode " + mode)
            check(TARGET in self.vm.bitmaps(), "mode %s: the bitmap of "
                  "target %s went" % (mode, TARGET))

    def vzdump_exports(self):
        """serve --nbd-path in front of exports vzdump made, with the
        copy-before-write cluster of a fleecing image on Ceph (4M)."""
        dev = self.vm.device
        snap = self.attach()
        q = self.vm.connect()
        info = q.cmd("backup-access-setup", **{"target-id": TARGET, "devices": [
            {"device": d, "bitmap-mode": "use"} for d in self.vm.sizes]})
        sock = os.path.join(self.tmp, "vzdump-nbd.sock")
        q.cmd("nbd-server-start", addr={"type": "unix",
                                        "data": {"path": sock}})
        q.cmd("block-export-add", type="nbd", id=dev, name=dev, writable=True,
              **{"node-name": info[0]["node-name"]},
              bitmaps=[{"node": info[0]["bitmap-node-name"],
                        "name": info[0]["bitmap-name"]}])
        q.close()
        args = ["serve", "--run-dir", self.rd, "--nbd-path", sock,
                "--device", "%s:%s" % (dev, TARGET)]
        for bad in ("3M", "2048M"):
            r = run_helper(*args, "--cluster-size", bad, ok=False)
            check(r.returncode == 1 and "a power of two between 512 and 1G"
                  in r.stderr, "--cluster-size %s: %s" % (bad, r.stderr))
        out = js(run_helper(*args, "--cluster-size", "4M"))
        d = out["devices"][0]
        check(d["cluster-size"] == 4 * M and d["bitmap-mode"] == "reuse",
              "%s" % d)
        pid = int(open(os.path.join(self.rd, dev + ".nbdkit.pid")).read())
        cmdline = open("/proc/%d/cmdline" % pid).read().split("\0")
        check("cluster=%d" % (4 * M) in cmdline, "nbdkit: %s" % cmdline)
        subprocess.run([READER, self.tmp], check=True, timeout=60,
                       env=dict(os.environ, BACKUPACCESS_JSON=json.dumps(out)))
        with open(os.path.join(self.tmp, dev + ".regions.json")) as f:
            check(json.load(f) == [[0, GRAN]], "serve --nbd-path: regions")
        with open(os.path.join(self.tmp, dev + ".raw"), "rb") as f:
            check(f.read(GRAN) == snap[dev][:GRAN], "serve --nbd-path: the "
                  "dirty region differs")
        run_helper("teardown", "--run-dir", self.rd, "--success")
        q = self.vm.connect()
        q.cmd("block-export-del", id=dev)
        q.cmd("nbd-server-stop")
        q.cmd("backup-access-teardown", **{"target-id": TARGET,
                                            "success": False})
        q.close()
        self.clean("serve --nbd-path")


def cycle(style, sizes, tmp):
    with PveVm(devices=sizes, style=style, tmpdir=os.path.join(tmp, "vm"),
               fleecing_style="drive" if style == "drive" else "blockdev"
               ) as vm:
        b = Backup(vm, tmp)
        for d in sizes:
            vm.guest_write(0, rng.randbytes(sizes[d]), d)
        during_full = b.full()
        since = joined(during_full, guest_writes(vm, 4))
        during_failed = b.incremental_fails(since)
        more = guest_writes(vm, 3)
        b.run_after_failure(joined(since, during_failed, more))
        if style == "blockdev":
            b.modes()
            vm.guest_write(0, b"\x01" * 4096)
            b.vzdump_exports()
    check(vm.stopped_with is None, "%s: quit: %s" % (style, vm.stopped_with))


def qemu_gone(tmp):
    """status and teardown once QEMU is gone: the local counters, and
    what is local cleaned up."""
    vm = PveVm(8 * M, tmpdir=os.path.join(tmp, "vm"), fleecing=True)
    b = Backup(vm, tmp)
    with vm:
        vm.guest_write(0, rng.randbytes(8 * M))
        b.setup()
        d = js(run_helper("serve", "--run-dir", b.rd))["devices"][0]
        run(["nbdcopy", d["uri"], "null:"])
        wait_for(lambda: js(run_helper("status", "--run-dir", b.rd))[
            "devices"][0]["bytes-read"] == 8 * M, "the counters", 10)
        vm.proc.kill()
        vm.proc.wait()
        r = run_helper("status", "--run-dir", b.rd)
        st = js(r)
        check(st["qemu"] == "gone" and st["devices"][0]["bytes-read"] ==
              8 * M and "QEMU is gone" in r.stderr, "status: %s %s"
              % (st, r.stderr))
        r = run_helper("teardown", "--run-dir", b.rd, "--failure", ok=False)
        check(r.returncode == 1 and "QEMU is gone" in r.stderr and
              not os.path.exists(b.rd), "teardown: %s" % r.stderr)
        problem = vm.stop()
    check(problem and "before the end" in problem, "%s" % problem)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    try:
        for style, sizes in STYLES:
            cycle(style, sizes, os.path.join(tmp, style))
        qemu_gone(os.path.join(tmp, "gone"))
    finally:
        # Whatever failed: no mount or nbdkit may outlive the test.
        for sub in [s for s, _ in STYLES] + ["gone"]:
            rd = os.path.join(tmp, sub, "run")
            if os.path.exists(rd):
                subprocess.run([HELPER, "teardown", "--run-dir", rd,
                                "--failure"], capture_output=True, timeout=120)
print("ok")
