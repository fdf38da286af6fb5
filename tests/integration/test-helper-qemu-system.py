#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""backupaccess-helper, upstream back end, against qemu-system-x86_64 (q35,
TCG, no guest OS, two virtio-blk disks with persistent dirty bitmaps); the
guest writes through HMP `qemu-io -d <qdev path>` during the backups.
Full, incremental (through the files of `mount`, straight on QEMU's
export without `serve`, read with O_DIRECT region by region, the
fleecing image shrinking as it goes, and not growing with guest writes
to clean areas), an incremental whose run fails, and the
next incremental: every restored chain equals the disk at its setup
time, and no write is missing from a later incremental."""
import json
import mmap
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import TOP, check, run
from qemu_fixture import QMP, check_build, wait_for
import qemus

HELPER = os.path.join(TOP, "helper", "backupaccess-helper")
SIZE = 16 << 20
DISKS = ("disk0", "disk1")
rng = random.Random(31)


def helper(*args):
    r = subprocess.run([HELPER] + list(args), capture_output=True, text=True,
                       timeout=180)
    check(r.returncode == 0, "backupaccess-helper %s failed (%d): %s"
          % (args[0], r.returncode, r.stderr))
    return json.loads(r.stdout) if r.stdout.strip() else None


class Vm:
    """qemu-system-x86_64 with virtio-blk disks; model holds what each
    disk contains, kept in step with every guest write."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.qmp_path = os.path.join(tmp, "qmp.sock")        # the helper's
        self.own_path = os.path.join(tmp, "qmp-test.sock")   # the test's
        self.model = {}
        self.lock = threading.Lock()
        q = qemus.current()
        args = [q.system] + q.args() + ["-machine", "q35,accel=tcg",
                "-nodefaults", "-display", "none", "-m", "64", "-S",
                "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
                "-qmp", "unix:%s,server=on,wait=off" % self.own_path]
        for i, d in enumerate(DISKS):
            img = os.path.join(tmp, d + ".qcow2")
            run([q.img, "create", "-q", "-f", "qcow2", img, str(SIZE)])
            run([q.io, "-f", "qcow2", "-c",
                 "write -P 0x%02x 0 %d" % (0x10 + i, SIZE), img])
            self.model[d] = bytearray([0x10 + i]) * SIZE
            args += ["-blockdev", "driver=file,filename=%s,node-name=%s-file"
                     % (img, d),
                     "-blockdev", "driver=qcow2,file=%s-file,node-name=%s,"
                     "discard=unmap" % (d, d),
                     "-device", "virtio-blk-pci,drive=%s,id=vblk%d" % (d, i)]
        self.log = open(os.path.join(tmp, "qemu.log"), "w")
        self.proc = subprocess.Popen(args, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: os.path.exists(self.own_path) or
                 self.proc.poll() is not None, "QEMU")
        check(self.proc.poll() is None, "qemu-system-x86_64 did not start")
        self.qmp = QMP(self.own_path)
        check_build(self.qmp)

    def write(self, disk, offset, length):
        """A guest write through the device, pattern byte from rng."""
        byte = rng.randrange(0x20, 0xff)
        i = DISKS.index(disk)
        with self.lock:
            out = self.qmp.cmd("human-monitor-command", **{
                "command-line":
                'qemu-io -d /machine/peripheral/vblk%d/virtio-backend '
                '"write -P 0x%02x %d %d"' % (i, byte, offset, length)})
            check("error" not in out.lower() and "fail" not in out.lower(),
                  "qemu-io: %s" % out)
            self.model[disk][offset:offset + length] = bytes([byte]) * length

    def random_writes(self, n):
        for _ in range(n):
            d = rng.choice(DISKS)
            length = rng.randrange(1, 64) * 512
            self.write(d, rng.randrange(0, (SIZE - length) // 512) * 512,
                       length)

    def stop(self):
        """Tells QEMU to quit; returns its exit status (an abort at quit
        is a failure too)."""
        try:
            self.qmp.cmd("quit")
            rc = self.proc.wait(20)
        except Exception:
            self.proc.kill()
            rc = "killed: %s" % self.proc.wait()
        self.qmp.close()
        self.log.close()
        return rc


def read_regions(uri, regions, into):
    import nbd
    h = nbd.NBD()
    h.connect_uri(uri)
    for off, n in regions:
        for o in range(off, off + n, 32 << 20):
            k = min(32 << 20, off + n - o)
            into[o:o + k] = h.pread(k, o)
    h.shutdown()


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    vm = Vm(tmp)
    rd = os.path.join(tmp, "run")
    setup = ["setup", "--qmp", vm.qmp_path, "--run-dir", rd,
             "--fleecing-dir", tmp, "--bitmap", "backup"] + sum(
                 (["--device", d] for d in DISKS), [])
    try:
        # --- full ------------------------------------------------------
        # The first setup creates the persistent bitmaps: a full backup.
        out = helper(*setup)
        check(out["backend"] == "upstream" and
              [d["bitmap-mode"] for d in out["devices"]] == ["new", "new"],
              "%s" % out)
        for d in DISKS:
            info = [b for b in vm.qmp.cmd("query-named-block-nodes",
                                           flat=True)
                    if b["node-name"] == d][0]["dirty-bitmaps"]
            check([b["persistent"] for b in info if b.get("name") == "backup"]
                  == [True], "the bitmap of %s is not persistent" % d)
        snap = {d: bytes(vm.model[d]) for d in DISKS}
        vm.random_writes(5)
        served = helper("serve", "--run-dir", rd)["devices"]
        restored = {}
        writer = threading.Thread(target=vm.random_writes, args=(20,))
        writer.start()
        for d in served:
            restored[d["device"]] = bytearray(SIZE)
            read_regions(d["uri"], [(0, SIZE)], restored[d["device"]])
        writer.join()
        for d in DISKS:
            check(restored[d] == snap[d], "full backup of %s differs" % d)
        helper("teardown", "--run-dir", rd, "--success")

        # --- incremental through the mount, O_DIRECT, no serve ----------
        vm.random_writes(10)
        out = helper(*setup)
        check([d["bitmap-mode"] for d in out["devices"]] == ["reuse"] * 2,
              "%s" % out)
        snap = {d: bytes(vm.model[d]) for d in DISKS}
        vm.random_writes(10)                    # copy-before-write fills
        mounts = helper("mount", "--run-dir", rd)["mounts"]
        base = sum(s["fleecing-size"] for s in
                   helper("status", "--run-dir", rd)["devices"])
        # The guest writes 1 MiB into a clean area of each disk: nothing
        # of it is copied (the helper's copy-before-write node has the
        # frozen bitmap: it copies only dirty clusters).
        for m in mounts:
            pos = 0
            for off, n in m["dirty-regions"] + [[SIZE, 0]]:
                if off - pos >= 1 << 20:
                    break
                pos = off + n
            check(pos + (1 << 20) <= SIZE, "no clean MiB in %s"
                  % m["dirty-regions"])
            vm.write(m["device"], pos, 1 << 20)
        # The guest overwrites dirty regions: copy-before-write copies
        # the old data into the fleecing images.
        for m in mounts:
            for off, n in m["dirty-regions"]:
                vm.write(m["device"], off, min(n, 64 << 10))
        status = helper("status", "--run-dir", rd)["devices"]
        grown = sum(s["fleecing-size"] for s in status)
        for m in mounts:
            fd = os.open(m["file"], os.O_RDONLY | os.O_DIRECT)
            try:
                for off, n in m["dirty-regions"]:
                    buf = mmap.mmap(-1, n)
                    check(os.preadv(fd, [buf], off) == n, "short read")
                    restored[m["device"]][off:off + n] = buf
            finally:
                os.close(fd)
        # The mount stays open: the counters (every second) and the
        # discards (batched, sent every second) must get there anyway.
        deadline = time.monotonic() + 30
        while True:
            status = helper("status", "--run-dir", rd)["devices"]
            after = sum(s["fleecing-size"] for s in status)
            done = all(s["bytes-left"] == 0 for s in status)
            if (done and after + (512 << 10) < grown and
                after <= base + (256 << 10)) or \
               time.monotonic() > deadline:
                break
            time.sleep(0.2)
        check(done, "%s" % status)
        check(after + (512 << 10) < grown,
              "the fleecing images did not shrink: %d -> %d" % (grown, after))
        check(after <= base + (256 << 10), "the fleecing images hold %d "
              "bytes more than before the guest wrote (clean clusters "
              "copied?)" % (after - base))
        for d in DISKS:
            check(restored[d] == snap[d], "full + incremental of %s differs"
                  % d)
        helper("teardown", "--run-dir", rd, "--success")

        # --- an incremental whose run fails -----------------------------
        vm.random_writes(10)
        r = subprocess.run([HELPER, "run"] + setup[1:] + [
            "--", "/usr/bin/python3", "-c",
            "import os, nbd; h = nbd.NBD(); "
            "h.connect_uri(os.environ['BACKUPACCESS_URI_0']); "
            "h.shutdown(); raise SystemExit(1)"],
            capture_output=True, text=True, timeout=180)
        check(r.returncode == 1 and "tearing down with failure" in r.stderr,
              r.stderr)
        vm.random_writes(10)

        # --- the next incremental covers all of it ----------------------
        helper(*setup)
        snap = {d: bytes(vm.model[d]) for d in DISKS}
        vm.random_writes(5)
        served = helper("serve", "--run-dir", rd)["devices"]
        mounts = helper("mount", "--run-dir", rd)["mounts"]
        for d, m in zip(served, mounts):
            read_regions(d["uri"], m["dirty-regions"], restored[d["device"]])
        for d in DISKS:
            check(restored[d] == snap[d], "the chain of %s misses a write "
                  "(after a failed incremental)" % d)
        helper("teardown", "--run-dir", rd, "--success")
        check(not os.path.exists(rd), "run dir left")
        check(vm.proc.poll() is None, "QEMU died")
    finally:
        if os.path.exists(rd):
            subprocess.run([HELPER, "teardown", "--run-dir", rd, "--failure"],
                           capture_output=True, timeout=180)
        rc = vm.stop()
    with open(os.path.join(tmp, "qemu.log")) as f:
        check(rc == 0, "QEMU did not exit 0 at quit (%s): %s" % (rc, f.read()))
print("ok")
