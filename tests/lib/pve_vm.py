# SPDX-License-Identifier: BSD-3-Clause
"""Test fixture: a Proxmox VE VM on the real Proxmox VE QEMU (pve-qemu,
tests/lib/qemus.py), started the way Proxmox VE starts it, for tests of
programs that use its backup access API (backup-access-setup/teardown).

    with PveVm(size, devices=("drive-scsi0",), style="blockdev") as vm:
        vm.add_fleecing()                 # what vzdump does first
        program_under_test(vm.qmp_path)   # QMP socket of its own
        check(vm.leftovers() == {}, ...)  # nothing behind

qemu-system-x86_64 of the pve build (TCG, q35, no OS, -nodefaults
-display none), with two QMP sockets: qmp_path for the program under test
and one for the fixture (vm.qmp).  (pve-qemu's qemu-storage-daemon
cannot do backup access: its backup state is never initialised.)  Each
device is a virtio-blk disk on an empty qcow2 image, named like Proxmox
VE's drives ("drive-scsi0": qdev id "scsi0"), in one of the styles of
Proxmox VE:

    "blockdev"  VE 9: -blockdev file node "file-ID", qcow2 node
                "drive-ID" (discard=unmap) under the device;
    "throttle"  VE 9 with a throttle group: file node "e-ID", qcow2 node
                "f-ID", throttle node "drive-ID" on top (the backup access
                API looks through it: the bitmap goes on "f-ID");
    "drive"     VE 8: -drive id=drive-ID (a BlockBackend of that name over
                an auto-named "#blockN" node).

add_fleecing() attaches fleecing images the way vzdump does: a qcow2
image of the same size as node "DEVICE-fleecing" (blockdev-add, discard
unmap), or with fleecing_style="drive" the VE 8 way (HMP drive_add,
if=none, id=DEVICE-fleecing).  The guest writes through HMP qemu-io on the
device's backend (its qdev path), so its writes go through whatever
filter backup access puts above the disk; the fixture keeps a model of
what each disk holds.

At the end (context manager) QEMU is told to quit and must exit 0: an
abort at quit (pve-qemu asserts in bdrv_close_all when a node is left
behind) fails the test with QuitError, saying whether QEMU aborted,
crashed, exited non-zero, had died before, or did not quit.  Everything
the fixture started is stopped and removed, also when the test fails.
Use /usr/bin/python3.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

import qemus
from qemu_fixture import QMP, QMPError, Started, check_build, wait_for

__all__ = ["PveVm", "QuitError", "STYLES"]

STYLES = ("blockdev", "throttle", "drive")
FLEECING_STYLES = ("blockdev", "drive")
CHUNK = 16 << 20                        # the largest HMP qemu-io write


class QuitError(Exception):
    """QEMU did not exit 0 when told to quit."""


def qdev_id(device):
    """Proxmox VE's qdev id of a drive: "drive-scsi0" -> "scsi0"."""
    return device[len("drive-"):] if device.startswith("drive-") else device


class PveVm(Started):
    """A Proxmox VE VM on the real pve-qemu.

    PveVm(size=64 MiB, devices=("drive-scsi0",), style="blockdev", *,
          tmpdir=None, fleecing=False, fleecing_cluster=65536,
          fleecing_style="blockdev", memory=64)

    devices: drive names, all `size` bytes; or a dict {name: size}.
    fleecing=True: add_fleecing() for every device at start.

    Attributes: tmp, qmp_path (the program under test's QMP socket),
    own_qmp_path, qmp (the fixture's QMP connection), qemu (the build),
    sizes ({device: size}), device (the first), proc.

    Methods:
        connect()                          a QMP client on qmp_path
        hmp(command_line)                  HMP through the fixture's QMP
        guest_write(offset, data, device=None)   write as the guest
        guest_fill(offset, length, byte, device=None)
        disk(device=None)                  the model: what the disk holds
        disk_read(offset, count, device=None)   read back through the
                                           device (slow: for checks)
        add_fleecing(device=None, cluster_size=None, style=None)
        del_fleecing(device=None)
        fleecing_path(device=None), fleecing_allocated(device=None)
        bitmap_node(device=None)           where Proxmox puts its bitmap
        bitmaps(device=None)               {name: info} on bitmap_node
        nodes(), node_names(), exports(), block_jobs(), all_bitmaps()
        leftovers(bitmaps=())              what is there now that was not
                                           at start: {} when nothing
        mark()                             start counts from now
        alive(), log(), stop()
    device=None means the first device; for add/del_fleecing all of them.
    """

    def __init__(self, size=64 << 20, devices=("drive-scsi0",),
                 style="blockdev", *, tmpdir=None, fleecing=False,
                 fleecing_cluster=65536, fleecing_style="blockdev",
                 memory=64):
        if style not in STYLES:
            raise ValueError("style %r: one of %s" % (style, STYLES))
        if fleecing_style not in FLEECING_STYLES:
            raise ValueError("fleecing_style %r: one of %s"
                             % (fleecing_style, FLEECING_STYLES))
        if isinstance(devices, dict):
            self.sizes = dict(devices)
        else:
            self.sizes = {d: size for d in devices}
        if not self.sizes:
            raise ValueError("no devices")
        self.device = next(iter(self.sizes))
        self.style = style
        self.fleecing_at_start = fleecing
        self.fleecing_cluster = fleecing_cluster
        self.fleecing_style = fleecing_style
        self.memory = memory
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="pve-vm.")
        os.makedirs(self.tmp, exist_ok=True)
        self.qmp_path = os.path.join(self.tmp, "qmp.sock")
        self.own_qmp_path = os.path.join(self.tmp, "qmp-test.sock")
        self.log_path = os.path.join(self.tmp, "qemu.log")
        self.qemu = None
        self.proc = None
        self.logf = None
        self.qmp = None
        self.model = {}
        self.drive_nodes = {}
        self.fleecing = {}              # device -> style it was added in
        self.baseline = None
        self.stopped_with = None
        self.io_lock = threading.Lock()

    # --- life cycle -----------------------------------------------------

    def _disk(self, device):
        return os.path.join(self.tmp, "%s.qcow2" % device)

    def _device_args(self, device):
        i, disk = qdev_id(device), self._disk(device)
        dev = ["-device", "virtio-blk-pci,drive=%s,id=%s" % (device, i)]
        if self.style == "blockdev":
            return ["-blockdev", "driver=file,filename=%s,node-name=file-%s,"
                    "discard=unmap" % (disk, i),
                    "-blockdev", "driver=qcow2,file=file-%s,node-name=%s,"
                    "discard=unmap" % (i, device)] + dev
        if self.style == "throttle":
            return ["-object", "throttle-group,id=throttle-%s" % device,
                    "-blockdev", "driver=file,filename=%s,node-name=e-%s,"
                    "discard=unmap" % (disk, i),
                    "-blockdev", "driver=qcow2,file=e-%s,node-name=f-%s,"
                    "discard=unmap" % (i, i),
                    "-blockdev", "driver=throttle,throttle-group=throttle-%s,"
                    "file=f-%s,node-name=%s" % (device, i, device)] + dev
        return ["-drive", "file=%s,if=none,id=%s,format=qcow2,discard=on"
                % (disk, device)] + dev

    def start(self):
        self.qemu = qemus.current(pve=True)
        for dev, size in self.sizes.items():
            subprocess.run([self.qemu.img, "create", "-q", "-f", "qcow2",
                            self._disk(dev), str(size)], check=True,
                           timeout=60)
            self.model[dev] = bytearray(size)
        args = [self.qemu.system] + self.qemu.args() + [
            "-machine", "q35,accel=tcg", "-nodefaults", "-display", "none",
            "-m", str(self.memory), "-name", "pve-vm-fixture",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-qmp", "unix:%s,server=on,wait=off" % self.own_qmp_path]
        for dev in self.sizes:
            args += self._device_args(dev)
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(args, stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        wait_for(lambda: (os.path.exists(self.qmp_path) and
                          os.path.exists(self.own_qmp_path)) or
                 self.proc.poll() is not None, "QEMU's QMP sockets", 60)
        if self.proc.poll() is not None:
            raise RuntimeError("qemu-system-x86_64 exited at start (%s): %s"
                               % (self.proc.returncode, self.log()))
        self.qmp = QMP(self.own_qmp_path)
        check_build(self.qmp)
        # -drive: the auto-named qcow2 node of each BlockBackend (later
        # under copy-before-write).
        self.drive_nodes = {b["device"]: b["inserted"]["node-name"]
                            for b in self.qmp.cmd("query-block")
                            if "inserted" in b}
        self.baseline = self._state()
        if self.fleecing_at_start:
            self.add_fleecing()

    def stop(self):
        """Quits QEMU and cleans up; returns None, or what went wrong at
        quit (and keeps it in stopped_with)."""
        problem = None
        if self.proc is not None:
            problem = self._quit()
            self.proc = None
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.logf is not None:
            self.logf.close()
            self.logf = None
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.stopped_with = problem
        return problem

    def _quit(self):
        if self.proc.poll() is not None:
            return ("QEMU had exited before the end of the test (%s)%s"
                    % (self._status(self.proc.returncode), self._log_tail()))
        try:
            self.qmp.sock.settimeout(30)
            self.qmp.cmd("quit")
        except Exception:               # QEMU may close before it answers
            pass
        try:
            rc = self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return "QEMU did not quit within 60 s (killed)" + self._log_tail()
        if rc == 0:
            return None
        return "QEMU %s at quit%s" % (self._status(rc), self._log_tail())

    @staticmethod
    def _status(rc):
        if rc == -signal.SIGABRT:
            return "ABORTED (SIGABRT: an assertion?)"
        if rc < 0:
            return "crashed (%s)" % signal.Signals(-rc).name
        return "exited with status %d" % rc

    def _log_tail(self):
        try:
            if self.logf is not None:
                self.logf.flush()
            with open(self.log_path) as f:
                lines = f.read().strip().splitlines()[-10:]
        except OSError:
            return ""
        return (":\n    " + "\n    ".join(lines)) if lines else ""

    def __exit__(self, exc_type, exc, tb):
        problem = self.stop()
        if problem and exc_type is None:
            raise QuitError(problem)
        if problem:
            print("(and at the end: %s)" % problem, file=sys.stderr)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def connect(self, timeout=30):
        """A QMP client on the program-under-test socket (one at a time:
        close() it before the program under test connects)."""
        return QMP(self.qmp_path, timeout)

    def hmp(self, command_line):
        return self.qmp.cmd("human-monitor-command",
                            **{"command-line": command_line})

    # --- the guest ------------------------------------------------------

    def _dev(self, device):
        return self.device if device is None else device

    def _qemu_io(self, device, command):
        """HMP qemu-io on the device's backend (its qdev path: qemu-io -d
        takes no qdev id there).  HMP returns nothing: qemu-io prints its
        result (and its errors) on QEMU's stdout, the log, unbuffered;
        returns that output, or raises if it is not a whole success."""
        with self.io_lock:
            start = os.path.getsize(self.log_path)
            self.hmp('qemu-io -d /machine/peripheral/%s/virtio-backend "%s"'
                     % (qdev_id(self._dev(device)), command))
            done = re.compile(r"^(?:wrote|read) (\d+)/(\d+) bytes|failed",
                              re.M)
            out = ""
            wait_for(lambda: done.search(self._log_from(start)) or
                     not self.alive(), "qemu-io " + command, 10)
            out = self._log_from(start)
        m = re.search(r"^(?:wrote|read) (\d+)/(\d+) bytes", out, re.M)
        if "failed" in out or not m or m.group(1) != m.group(2):
            raise QMPError("qemu-io %s: %s" % (command, out.strip()[-500:]))
        return out

    def _log_from(self, start):
        with open(self.log_path, errors="replace") as f:
            f.seek(start)
            return f.read()

    def guest_write(self, offset, data, device=None):
        """Writes data at offset as the guest (through whatever is above
        the disk: copy-before-write during a backup access)."""
        dev = self._dev(device)
        src = os.path.join(self.tmp, "guest-write.bin")
        for i in range(0, len(data), CHUNK):
            piece = data[i:i + CHUNK]
            with open(src, "wb") as f:
                f.write(piece)
            self._qemu_io(dev, "write -s %s %d %d"
                          % (src, offset + i, len(piece)))
        os.unlink(src)
        self.model[dev][offset:offset + len(data)] = data

    def guest_fill(self, offset, length, byte, device=None):
        """Writes length bytes of value byte at offset, as the guest."""
        dev = self._dev(device)
        for i in range(0, length, CHUNK):
            n = min(CHUNK, length - i)
            self._qemu_io(dev, "write -P 0x%02x %d %d" % (byte, offset + i, n))
        self.model[dev][offset:offset + length] = bytes([byte]) * length

    def disk(self, device=None):
        """What the disk holds now (the model of every guest write)."""
        return bytes(self.model[self._dev(device)])

    def disk_read(self, offset, count, device=None):
        """Reads through the device (qemu-io read -v: slow, for checks of
        a few KiB)."""
        out = self._qemu_io(self._dev(device), "read -v %d %d"
                            % (offset, count))
        data = bytearray()
        for line in out.splitlines():
            m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ?){1,16})", line)
            if m:
                data += bytes.fromhex(m.group(1))
        if len(data) != count:
            raise QMPError("qemu-io read -v: %d bytes, not %d"
                           % (len(data), count))
        return bytes(data)

    # --- fleecing -------------------------------------------------------

    def _devs(self, device):
        return list(self.sizes) if device is None else [device]

    def fleecing_path(self, device=None):
        return os.path.join(self.tmp, "%s-fleecing.qcow2" % self._dev(device))

    def add_fleecing(self, device=None, cluster_size=None, style=None):
        """Creates a qcow2 image of the device's size and attaches it as
        "<device>-fleecing", as vzdump does before backup-access-setup:
        style "blockdev" (VE 9: blockdev-add, discard unmap) or "drive"
        (VE 8: HMP drive_add, if=none)."""
        style = style or self.fleecing_style
        if style not in FLEECING_STYLES:
            raise ValueError("fleecing style %r" % style)
        for dev in self._devs(device):
            path = self.fleecing_path(dev)
            subprocess.run([self.qemu.img, "create", "-q", "-f", "qcow2",
                            "-o", "cluster_size=%d" % (cluster_size or
                                                       self.fleecing_cluster),
                            path, str(self.sizes[dev])], check=True,
                           timeout=60)
            name = dev + "-fleecing"
            if style == "blockdev":
                self.qmp.cmd("blockdev-add", **{
                    "driver": "qcow2", "node-name": name, "discard": "unmap",
                    "file": {"driver": "file", "filename": path,
                             "discard": "unmap"}})
            else:
                out = self.hmp("drive_add auto file=%s,if=none,id=%s,"
                               "format=qcow2,discard=on" % (path, name))
                if out.strip() != "OK":
                    raise QMPError("drive_add %s: %s" % (name, out.strip()))
            self.fleecing[dev] = style

    def del_fleecing(self, device=None):
        """Detaches the fleecing images again and removes them."""
        for dev in self._devs(device):
            name = dev + "-fleecing"
            if self.fleecing.get(dev) == "drive":
                out = self.hmp("drive_del " + name)
                if out.strip():
                    raise QMPError("drive_del %s: %s" % (name, out.strip()))
            else:
                self.qmp.cmd("blockdev-del", **{"node-name": name})
            self.fleecing.pop(dev, None)
            os.unlink(self.fleecing_path(dev))

    def fleecing_allocated(self, device=None):
        """Bytes allocated in the fleecing image's file now."""
        return os.stat(self.fleecing_path(device)).st_blocks * 512

    # --- what is there --------------------------------------------------

    def nodes(self):
        return {n["node-name"]: n for n in
                self.qmp.cmd("query-named-block-nodes", flat=True)}

    def node_names(self):
        return set(self.nodes())

    def exports(self):
        return self.qmp.cmd("query-block-exports")

    def block_jobs(self):
        return self.qmp.cmd("query-block-jobs")

    def bitmap_node(self, device=None):
        """The node that holds a device's dirty bitmaps: the device's
        qcow2 node (under the throttle node; for -drive, the auto-named
        node its BlockBackend had at start)."""
        dev = self._dev(device)
        if self.style == "throttle":
            return "f-" + qdev_id(dev)
        if self.style == "drive":
            return self.drive_nodes[dev]
        return dev

    def bitmaps(self, device=None):
        """{name: query-named-block-nodes info} of the device's bitmaps."""
        node = self.nodes()[self.bitmap_node(device)]
        return {b["name"]: b for b in node.get("dirty-bitmaps") or []
                if "name" in b}

    def all_bitmaps(self):
        """{node: sorted bitmap names} of every node that has some."""
        out = {}
        for name, n in self.nodes().items():
            names = sorted(b.get("name", "") for b in
                           n.get("dirty-bitmaps") or [])
            if names:
                out[name] = names
        return out

    def _state(self):
        return {"nodes": self.node_names(),
                "exports": {e["id"] for e in self.exports()},
                "jobs": {j["device"] for j in self.block_jobs()},
                "bitmaps": {(n, b) for n, bs in self.all_bitmaps().items()
                            for b in bs}}

    def mark(self):
        """What is there now counts as there at start for leftovers():
        the fleecing images vzdump attaches, say."""
        self.baseline = self._state()

    def leftovers(self, bitmaps=()):
        """What is there now that was not right after start: {} when
        nothing.  bitmaps: names allowed to stay (a backup's bitmap for
        the next incremental)."""
        now, was = self._state(), self.baseline
        out = {}
        for key in ("nodes", "exports", "jobs"):
            extra = sorted(now[key] - was[key])
            if extra:
                out[key] = extra
        extra = sorted((n, b) for n, b in now["bitmaps"] - was["bitmaps"]
                       if b not in bitmaps)
        if extra:
            out["bitmaps"] = extra
        return out
