# SPDX-License-Identifier: BSD-3-Clause
"""Test fixture: the fleecing graph of a backup, on a real qemu-storage-daemon.

It builds what Proxmox VE's backup access API (and vzdump) build inside a
running VM's QEMU, with upstream QEMU and no guest:

    [guest export "guest"] -> [copy-before-write "cbw"] -> [disk "disk"]
                                        | target
    [export "snap"] -> [snapshot-access] ...> [fleecing image "fleece"]

"guest" plays the VM: writes through it trigger copy-before-write.
"snap" is the point-in-time view a backup reads, optionally with the
frozen dirty bitmap "frozen" (qemu:dirty-bitmap:frozen).

Use as a context manager: everything it started is stopped and removed on
exit, also when the test fails.  Call with /usr/bin/python3.

The QEMU programs are those of qemus.current(): the build named by
BACKUPACCESS_QEMU (tests/run-tests sets it), by default Debian's 7.2.
"""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import nbd

import qemus


class QMPError(Exception):
    pass


class QMP:
    def __init__(self, path, timeout=30):
        # QEMU binds its socket (the file appears) before it listens: a
        # connection in between is refused.  Retry, within the timeout.
        end = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
                break
            except ConnectionRefusedError:
                self.sock.close()
                if time.monotonic() > end:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self.events = []
        self.greeting = self._read()
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def cmd(self, command, /, **args):
        msg = {"execute": command}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise QMPError("%s: %s" % (command, r["error"]["desc"]))
            return r["return"]

    def close(self):
        self.file.close()
        self.sock.close()


def wait_for(pred, what, timeout=20):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise TimeoutError("timed out waiting for " + what)


def check_build(qmp):
    """The QEMU behind qmp is the build the test runs on (qemus.current()),
    by the version in its QMP greeting."""
    v = qmp.greeting["QMP"]["version"]["qemu"]
    got = "%d.%d.%d" % (v["major"], v["minor"], v["micro"])
    want = qemus.current()
    if want.version() != got:
        raise RuntimeError("QEMU %s was to run, but QEMU %s answers"
                           % (want.label, got))


def start_qsd(qmp_paths, log):
    """Starts qemu-storage-daemon (of qemus.current()) with a QMP monitor
    on each socket path, its output to the open file log; waits for the
    sockets."""
    q = qemus.current()
    if q.storage_daemon is None:
        raise RuntimeError("QEMU %s has no usable qemu-storage-daemon: use "
                           "qemu-system-x86_64 (tests/lib/pve_vm.py)"
                           % q.label)
    args = [q.storage_daemon]
    for i, path in enumerate(qmp_paths):
        args += ["--chardev", "socket,id=qmp%d,path=%s,server=on,wait=off"
                 % (i, path), "--monitor", "chardev=qmp%d" % i]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: all(os.path.exists(p) for p in qmp_paths) or
             proc.poll() is not None, "the QMP sockets")
    if proc.poll() is not None:
        raise RuntimeError("qemu-storage-daemon exited (see %s)" % log.name)
    return proc


def stop_process(proc, timeout=10):
    """SIGTERM, then SIGKILL if it does not go within timeout seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Started:
    """A context manager for fixtures with start() and stop(): stop() runs
    on exit, and also when start() fails half-way."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


class Fleecing(Started):
    """A disk of `size` bytes in qemu-storage-daemon, with a live dirty
    bitmap "live".  Write to it with guest_write(); then snapshot()
    builds the fleecing graph and exports "snap".

    fleece_cluster: the fleecing image's cluster size (copy-before-write
    then uses the larger of it and 64 KiB).  granularity: the dirty
    bitmaps' (live and frozen), in bytes; None: QEMU's default (64 KiB
    on this qcow2 disk).  Proxmox VE's bitmaps have 4 MiB.
    """

    def __init__(self, size, fleece_cluster=65536, tmpdir=None,
                 granularity=None, image=None):
        """image: an existing raw image of size bytes to use as the disk
        (kept; its dirty bitmap is then not persistent) instead of a new
        qcow2 one."""
        self.size = size
        self.image = image
        self.fleece_cluster = fleece_cluster
        self.granularity = granularity
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="backupaccess-qemu.")
        os.makedirs(self.tmp, exist_ok=True)
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        self.fleece = os.path.join(self.tmp, "fleece.qcow2")
        self.qmp_path = os.path.join(self.tmp, "qmp.sock")
        self.nbd_path = os.path.join(self.tmp, "nbd.sock")
        self.proc = None
        self.qmp = None
        self._guest = None

    # --- life cycle -----------------------------------------------------

    def start(self):
        if self.image is None:
            subprocess.run([qemus.current().img, "create", "-q", "-f",
                            "qcow2", self.disk, str(self.size)], check=True)
            disk = {"driver": "qcow2", "discard": "unmap",
                    "file": {"driver": "file", "filename": self.disk}}
        else:
            disk = {"driver": "raw",
                    "file": {"driver": "file", "filename": self.image}}
        self.log = open(os.path.join(self.tmp, "qsd.log"), "w")
        self.proc = start_qsd([self.qmp_path], self.log)
        self.qmp = QMP(self.qmp_path)
        check_build(self.qmp)
        self.qmp.cmd("blockdev-add", **disk, **{"node-name": "disk"})
        self.qmp.cmd("block-dirty-bitmap-add", node="disk", name="live",
                     persistent=self.image is None, **self._granularity())
        self.qmp.cmd("nbd-server-start",
                     addr={"type": "unix", "data": {"path": self.nbd_path}})
        # Before the snapshot the guest writes to the disk node itself.
        self.qmp.cmd("block-export-add", type="nbd", id="guest",
                     **{"node-name": "disk"}, name="guest", writable=True)

    def stop(self):
        if self._guest is not None:
            try:
                self._guest.shutdown()
            except Exception:
                pass
            self._guest = None
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def qsd_log(self):
        with open(os.path.join(self.tmp, "qsd.log")) as f:
            return f.read()

    def _granularity(self):
        return {} if self.granularity is None else {
            "granularity": self.granularity}

    # --- the guest ------------------------------------------------------

    def guest(self):
        if self._guest is None:
            h = nbd.NBD()
            h.set_export_name("guest")
            h.connect_unix(self.nbd_path)
            self._guest = h
        return self._guest

    def guest_write(self, offset, data):
        h = self.guest()
        for i in range(0, len(data), 32 << 20):
            h.pwrite(data[i:i + (32 << 20)], offset + i)
        h.flush()

    def disk_read(self, offset, count):
        """What the guest sees now."""
        h = self.guest()
        return b"".join(bytes(h.pread(min(count - i, 32 << 20), offset + i))
                        for i in range(0, count, 32 << 20))

    def _del_export(self, export_id):
        if self._guest is not None and export_id == "guest":
            self._guest.shutdown()
            self._guest = None
        self.qmp.cmd("block-export-del", id=export_id)
        wait_for(lambda: all(e["id"] != export_id for e in
                             self.qmp.cmd("query-block-exports")),
                 "export %s to go" % export_id)

    # --- the snapshot ---------------------------------------------------

    def snapshot(self, bitmap=True, on_cbw_error="break-snapshot",
                 fleece_file=None):
        """Freeze the bitmap and build copy-before-write + snapshot-access.
        bitmap=True: an incremental backup: only the frozen bitmap's dirty
        regions are readable, and it is exported as qemu:dirty-bitmap:frozen.
        bitmap=False: a full backup (the live bitmap still restarts).
        fleece_file: a blockdev dict to put under the fleecing qcow2
        instead of the plain file (e.g. blkdebug, for fault injection).
        """
        self._del_export("guest")
        self.qmp.cmd("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": "frozen",
                      **self._granularity()}},
            {"type": "block-dirty-bitmap-merge",
             "data": {"node": "disk", "target": "frozen",
                      "bitmaps": ["live"]}},
            {"type": "block-dirty-bitmap-clear",
             "data": {"node": "disk", "name": "live"}},
            {"type": "block-dirty-bitmap-disable",
             "data": {"node": "disk", "name": "frozen"}}])
        subprocess.run([qemus.current().img, "create", "-q", "-f", "qcow2",
                        "-o", "cluster_size=%d" % self.fleece_cluster,
                        self.fleece, str(self.size)], check=True)
        file_node = {"driver": "file", "filename": self.fleece}
        if fleece_file is not None:
            file_node = dict(fleece_file, image=file_node)
        self.qmp.cmd("blockdev-add", **{
            "driver": "qcow2", "node-name": "fleece", "discard": "unmap",
            "file": file_node})
        cbw = {"driver": "copy-before-write", "node-name": "cbw",
               "file": "disk", "target": "fleece",
               "on-cbw-error": on_cbw_error, "cbw-timeout": 4}
        if bitmap:
            cbw["bitmap"] = {"node": "disk", "name": "frozen"}
        self.qmp.cmd("blockdev-add", **cbw)
        self.qmp.cmd("blockdev-add", **{
            "driver": "snapshot-access", "node-name": "snap",
            "file": "cbw", "discard": "unmap"})
        export = {"type": "nbd", "id": "snap", "node-name": "snap",
                  "name": "snap", "writable": True}
        if bitmap:
            export["bitmaps"] = [{"node": "disk", "name": "frozen"}]
        self.qmp.cmd("block-export-add", **export)
        # From now on the guest writes through copy-before-write.
        self.qmp.cmd("block-export-add", type="nbd", id="guest",
                     **{"node-name": "cbw"}, name="guest", writable=True)

    def snap_uri(self):
        return "nbd+unix:///snap?socket=" + self.nbd_path

    def fleece_size(self):
        """Bytes allocated in the fleecing image now."""
        out = subprocess.run([qemus.current().img, "info", "-U",
                              "--output=json",
                              self.fleece], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)["actual-size"]

    def release(self, success=True):
        """Tear the snapshot down again: exports first, then the nodes.
        On failure the frozen bitmap is merged back into the live one, so
        that the next incremental backup still covers every change.
        """
        self._del_export("snap")
        self._del_export("guest")
        for node in ("snap", "cbw", "fleece"):
            self.qmp.cmd("blockdev-del", **{"node-name": node})
        if not success:
            self.qmp.cmd("block-dirty-bitmap-merge", node="disk",
                         target="live", bitmaps=["frozen"])
        self.qmp.cmd("block-dirty-bitmap-remove", node="disk", name="frozen")
        self.qmp.cmd("block-export-add", type="nbd", id="guest",
                     **{"node-name": "disk"}, name="guest", writable=True)
