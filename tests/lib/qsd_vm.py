# SPDX-License-Identifier: BSD-3-Clause
"""Test fixture: a qemu-storage-daemon (upstream QEMU, qemus.current())
playing a VM for the helper's upstream back end: one qcow2 node per disk,
named like Proxmox VE's drives ("drive-scsi0"), the guest writing to each
through a FUSE export (a file), and a QMP socket for the program under
test (qmp_path) besides the fixture's own (vm.qmp).

    with QsdVm(size, devices=("drive-scsi0",)) as vm:
        vm.guest_write(0, data)
        program_under_test(vm.qmp_path)

Everything it started is stopped and removed at the end, also when a
test fails.  Use /usr/bin/python3 (the nbd module).
"""
import os
import shutil
import subprocess
import tempfile

import nbd

import qemus
from qemu_fixture import QMP, Started, start_qsd, stop_process

__all__ = ["QsdVm"]


class QsdVm(Started):
    """QsdVm(size=64 MiB, devices=("drive-scsi0",), *, tmpdir=None,
             guest_nbd=False, fleecing=False, fleecing_cluster=65536)

    devices: node names of the disks, all `size` bytes; or a dict
        {name: size}.  Each is an empty qcow2 (discard: unmap).
    The guest writes through a FUSE export of each disk node (export id
        "guest-<device>", a file in tmp): once copy-before-write is above
        a disk, these writes go through it, like a VM's.  No NBD server
        is started, so that the helper under test can start its own (QEMU
        allows one).  guest_nbd=True starts one on nbd_path with a
        writable export "guest" of the first device instead of its FUSE
        export (QEMU 7.2 refuses both on one node: "resize" permission);
        guest_write/disk_read then use it, and nbd-server-start fails for
        everyone else.
    fleecing=True: add_fleecing() for every device at start.

    Attributes: tmp, qmp_path (the program under test's QMP socket), qmp
    (the fixture's own connection), sizes, device (the first), nbd_path.

    Methods: connect(), guest_write(offset, data, device=None),
    disk_read(offset, count, device=None), guest_path(device=None),
    add_fleecing(device=None, cluster_size=None), del_fleecing(),
    fleecing_allocated(), bitmaps(device=None), nodes(), node_names(),
    block_jobs(), exports(), alive(), qsd_log(), stop().
    device=None means the first device; for add/del_fleecing all of them.
    """

    def __init__(self, size=64 << 20, devices=("drive-scsi0",), *,
                 tmpdir=None, guest_nbd=False, fleecing=False,
                 fleecing_cluster=65536):
        if isinstance(devices, dict):
            self.sizes = dict(devices)
        else:
            self.sizes = {d: size for d in devices}
        if not self.sizes:
            raise ValueError("no devices")
        self.device = next(iter(self.sizes))
        self.guest_nbd = guest_nbd
        self.fleecing_at_start = fleecing
        self.fleecing_cluster = fleecing_cluster
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="qsd-vm.")
        os.makedirs(self.tmp, exist_ok=True)
        self.qmp_path = os.path.join(self.tmp, "vm.qmp")
        self.own_qmp_path = os.path.join(self.tmp, "qsd-fixture.qmp")
        self.nbd_path = os.path.join(self.tmp, "guest-nbd.sock")
        self.proc = None
        self.log = None
        self.qmp = None
        self.fds = {}
        self.mounts = []
        self.fuse_exports = []
        self.nbd_guest = None

    # --- life cycle -----------------------------------------------------

    def start(self):
        qemus.current()
        for dev, size in self.sizes.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            self._disk(dev), str(size)], check=True,
                           timeout=60)
        self.log = open(os.path.join(self.tmp, "qsd.log"), "w")
        self.proc = start_qsd([self.qmp_path, self.own_qmp_path], self.log)
        self.qmp = QMP(self.own_qmp_path)
        for dev in self.sizes:
            self.qmp.cmd("blockdev-add", **{
                "driver": "qcow2", "node-name": dev, "discard": "unmap",
                "file": {"driver": "file", "filename": self._disk(dev)}})
            if self.guest_nbd and dev == self.device:
                continue
            mnt = self.guest_path(dev)
            open(mnt, "w").close()
            self.qmp.cmd("block-export-add", type="fuse", id="guest-" + dev,
                         **{"node-name": dev}, mountpoint=mnt,
                         writable=True)
            self.mounts.append(mnt)
            self.fuse_exports.append("guest-" + dev)
            self.fds[dev] = os.open(mnt, os.O_RDWR)
        if self.guest_nbd:
            self.qmp.cmd("nbd-server-start", addr={
                "type": "unix", "data": {"path": self.nbd_path}})
            self.qmp.cmd("block-export-add", type="nbd", id="guest",
                         **{"node-name": self.device}, name="guest",
                         writable=True)
            h = nbd.NBD()
            h.set_export_name("guest")
            h.connect_unix(self.nbd_path)
            self.nbd_guest = h
        if self.fleecing_at_start:
            self.add_fleecing()

    def stop(self):
        if self.nbd_guest is not None:
            try:
                self.nbd_guest.shutdown()
            except Exception:
                pass
            self.nbd_guest = None
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
        if self.qmp is not None:
            try:
                self.qmp.sock.settimeout(5)
                for export_id in self.fuse_exports:
                    try:
                        self.qmp.cmd("block-export-del", id=export_id)
                    except QMPError:
                        pass
            except Exception:
                pass
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        self._unmount_all()
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _unmount_all(self):
        """Lazy-unmounts whatever FUSE mount of ours is left (a daemon
        that died leaves a dead one behind)."""
        if not self.mounts:
            return
        try:
            with open("/proc/self/mounts") as f:
                mounted = {line.split()[1] for line in f}
        except OSError:
            mounted = set(self.mounts)
        for mnt in self.mounts:
            if mnt in mounted:
                for cmd in (["umount", "-l", mnt],
                            ["fusermount3", "-u", "-z", mnt],
                            ["fusermount", "-u", "-z", mnt]):
                    try:
                        if subprocess.run(cmd, capture_output=True,
                                          timeout=10).returncode == 0:
                            break
                    except (OSError, subprocess.SubprocessError):
                        pass
        self.mounts = []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def qsd_log(self):
        with open(os.path.join(self.tmp, "qsd.log")) as f:
            return f.read()

    def connect(self, timeout=30):
        """A QMP client (qemu_fixture.QMP) on the program-under-test
        socket.  One client at a time: close() it before the helper under
        test can talk."""
        return QMP(self.qmp_path, timeout)

    # --- disks and the guest ----------------------------------------------

    def _dev(self, device):
        return self.device if device is None else device

    def _disk(self, device):
        return os.path.join(self.tmp, "%s.qcow2" % device)

    def guest_path(self, device=None):
        return os.path.join(self.tmp, "guest-%s.img" % self._dev(device))

    def guest_write(self, offset, data, device=None):
        """Writes as the guest would (through the FUSE export: through
        copy-before-write while a backup is set up), then flushes."""
        if self._dev(device) not in self.fds:
            h = self.nbd_guest
            for i in range(0, len(data), 32 << 20):
                h.pwrite(data[i:i + (32 << 20)], offset + i)
            h.flush()
            return
        fd = self.fds[self._dev(device)]
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + (8 << 20)], offset + done)
        os.fsync(fd)

    def disk_read(self, offset, count, device=None):
        """What the guest sees now."""
        if self._dev(device) not in self.fds:
            h = self.nbd_guest
            return b"".join(bytes(h.pread(min(count - i, 32 << 20),
                                          offset + i))
                            for i in range(0, count, 32 << 20))
        fd = self.fds[self._dev(device)]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while len(out) < count:
            b = os.pread(fd, min(count - len(out), 8 << 20),
                         offset + len(out))
            if not b:
                raise OSError("short read at %d" % (offset + len(out)))
            out += b
        return bytes(out)

    def _devs(self, device):
        return list(self.sizes) if device is None else [device]

    def fleecing_path(self, device=None):
        return os.path.join(self.tmp, "%s-fleecing.qcow2" % self._dev(device))

    def add_fleecing(self, device=None, cluster_size=None):
        """Creates and blockdev-adds "<device>-fleecing" (qcow2, same size,
        discard: unmap), as vzdump does before backup-access-setup."""
        for dev in self._devs(device):
            path = self.fleecing_path(dev)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            "cluster_size=%d" % (cluster_size or
                                                 self.fleecing_cluster),
                            path, str(self.sizes[dev])], check=True,
                           timeout=60)
            self.qmp.cmd("blockdev-add", **{
                "driver": "qcow2", "node-name": dev + "-fleecing",
                "discard": "unmap",
                "file": {"driver": "file", "filename": path,
                         "discard": "unmap"}})

    def del_fleecing(self, device=None):
        for dev in self._devs(device):
            self.qmp.cmd("blockdev-del", **{"node-name": dev + "-fleecing"})
            os.unlink(self.fleecing_path(dev))

    def fleecing_allocated(self, device=None):
        """Bytes allocated in the fleecing image now."""
        return os.stat(self.fleecing_path(device)).st_blocks * 512

    def nodes(self):
        return {n["node-name"]: n for n in
                self.qmp.cmd("query-named-block-nodes", flat=True)}

    def node_names(self):
        return set(self.nodes())

    def bitmaps(self, device=None):
        node = self.nodes()[self._dev(device)]
        return {b["name"]: b for b in node.get("dirty-bitmaps") or []
                if "name" in b}

    def block_jobs(self):
        return self.qmp.cmd("query-block-jobs")

    def exports(self):
        return self.qmp.cmd("query-block-exports")
