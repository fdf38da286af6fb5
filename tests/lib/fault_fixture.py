# SPDX-License-Identifier: BSD-3-Clause
"""Fault-injection fixture: a plain upstream qemu-storage-daemon playing a
VM for backupaccess-helper's upstream back end, that can be killed and
restarted on the same disk; and the checks every fault test makes
afterwards.

UpstreamVm
    One qcow2 disk node (DEVICE, discard: unmap) in qemu-storage-daemon,
    written by "the guest" through a FUSE export (a file), with two QMP
    monitors: helper_qmp for the helper under test (QEMU's own socket, no
    proxy: what a user of upstream QEMU has) and one of the fixture's own.
    kill(sig) ends the daemon (SIGKILL: a crash, which leaves its socket
    files behind; SIGTERM: a clean exit that saves persistent bitmaps);
    start() again brings it back on the same disk.

no_leftovers(vm, run_dir, fleecing_dir)
    Nothing of the helper's is left: no run directory, no QEMU export
    but the guest's, no block node "ba-*", no block job, no nbdkit or
    backupaccess-mount process and no mount under the run directory, no
    fleecing image.

Backup chains (helper_backup, chain_equals): a backup through the helper
applied onto a copy of the previous one, compared with the guest disk as
it was when the backup was set up.

PausedReader: a backup client in a process of its own that stops at a
known point, so that a fault lands in the middle of a backup;
kill_mount_mid_read: a device's backupaccess-mount killed that way.

Use /usr/bin/python3.
"""
import json
import os
import shutil
import signal
import subprocess
import tempfile

import nbd

from harness import HELPER, check, dirty_regions, run_helper
import qemus
from qemu_fixture import QMP, Started, check_build, start_qsd, stop_process

DEVICE = "drive0"


def mounts():
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f]


def lazy_unmount(path):
    if path in mounts():
        for cmd in (["fusermount3", "-u", "-z", path], ["umount", "-l", path]):
            if subprocess.run(cmd, capture_output=True,
                              timeout=30).returncode == 0:
                return


def processes_under(path):
    """(pid, argv) of every process whose command line mentions path."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(path.encode() in a for a in argv):
            out.append((int(pid), [a.decode(errors="replace")
                                   for a in argv if a]))
    return out


class UpstreamVm(Started):
    def __init__(self, size, tmpdir=None, device=DEVICE):
        self.size = size
        self.device = device
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="backupaccess-vm.")
        os.makedirs(self.tmp, exist_ok=True)
        self.disk = os.path.join(self.tmp, "disk.qcow2")
        self.helper_qmp = os.path.join(self.tmp, "vm.qmp")
        self.own_qmp = os.path.join(self.tmp, "fixture.qmp")
        self.guest_file = os.path.join(self.tmp, "guest.img")
        self.proc = None
        self.qmp = None
        self.fd = None
        self.log = None
        self.starts = 0
        self.run_dirs = []

    def start(self):
        if not os.path.exists(self.disk):
            subprocess.run([qemus.current().img, "create", "-q", "-f", "qcow2",
                            self.disk, str(self.size)], check=True,
                           timeout=60)
        for p in (self.helper_qmp, self.own_qmp):
            if os.path.exists(p):
                os.unlink(p)
        self.starts += 1
        self.log = open(os.path.join(self.tmp, "qsd.%d.log" % self.starts),
                        "w")
        self.proc = start_qsd([self.helper_qmp, self.own_qmp], self.log)
        self.qmp = QMP(self.own_qmp)
        check_build(self.qmp)
        self.qmp.cmd("blockdev-add", **{
            "driver": "qcow2", "node-name": self.device, "discard": "unmap",
            "file": {"driver": "file", "filename": self.disk,
                     "discard": "unmap"}})
        open(self.guest_file, "a").close()
        self.qmp.cmd("block-export-add", type="fuse", id="guest",
                     **{"node-name": self.device},
                     mountpoint=self.guest_file, writable=True)
        self.fd = os.open(self.guest_file, os.O_RDWR)

    def _down(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:             # the daemon is gone
                pass
            self.fd = None
        if self.qmp is not None:
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None

    def kill(self, sig=signal.SIGKILL):
        """Ends the daemon with sig and waits for it (a clean exit saves
        the persistent bitmaps); a dead FUSE mount is unmounted."""
        self._down()
        self.proc.send_signal(sig)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self.proc = None
        self.log.close()
        self.log = None
        lazy_unmount(self.guest_file)

    def run_dir(self, path):
        """A run directory for the helper, torn down (--failure) when the
        fixture stops if a failing test left it behind."""
        self.run_dirs.append(path)
        return path

    def _clean_run_dirs(self):
        for rd in self.run_dirs:
            if os.path.exists(rd) and self.alive():
                try:
                    subprocess.run([HELPER, "teardown", "--run-dir", rd,
                                    "--failure"], capture_output=True,
                                   timeout=120)
                except subprocess.TimeoutExpired:
                    pass
            for pid, _ in processes_under(rd + "/"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            for m in mounts():
                if m.startswith(rd + "/"):
                    lazy_unmount(m)

    def stop(self):
        self._clean_run_dirs()
        if self.fd is not None and self.qmp is not None:
            try:
                self.qmp.sock.settimeout(10)
                self.qmp.cmd("block-export-del", id="guest")
            except Exception:
                pass
        self._down()
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        lazy_unmount(self.guest_file)
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def qsd_log(self):
        with open(os.path.join(self.tmp, "qsd.%d.log" % self.starts)) as f:
            return f.read()

    # --- the guest ------------------------------------------------------

    def guest_write(self, offset, data):
        """A guest write (through copy-before-write while a backup is
        set up), flushed."""
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:done + (8 << 20)],
                              offset + done)
        os.fsync(self.fd)

    def disk_read(self, offset=0, count=None):
        """What the guest sees now."""
        count = self.size - offset if count is None else count
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while len(out) < count:
            b = os.pread(self.fd, min(count - len(out), 8 << 20),
                         offset + len(out))
            if not b:
                raise OSError("short read at %d" % (offset + len(out)))
            out += b
        return bytes(out)

    def random_writes(self, rng, n, max_len=200 << 10):
        writes = []
        for _ in range(n):
            length = rng.randrange(1, max_len)
            off = rng.randrange(0, self.size - length)
            self.guest_write(off, rng.randbytes(length))
            writes.append((off, length))
        return writes

    # --- QMP queries ----------------------------------------------------

    def nodes(self):
        return {n["node-name"]: n for n in
                self.qmp.cmd("query-named-block-nodes", flat=True)}

    def bitmaps(self):
        node = self.nodes()[self.device]
        return {b["name"]: b for b in node.get("dirty-bitmaps") or []
                if "name" in b}

    def block_jobs(self):
        return self.qmp.cmd("query-block-jobs")

    def exports(self):
        return self.qmp.cmd("query-block-exports")


def no_leftovers(vm, rd, fleecing_dir, what="after teardown"):
    """Everything the helper made is gone (QEMU checks only while the
    daemon runs)."""
    def ok(cond, msg):
        check(cond, "%s: %s" % (what, msg))
    left = [m for m in mounts() if m.startswith(rd)]
    ok(not left, "mounts left: %s" % left)
    ok(not os.path.exists(rd), "the run directory is still there: %s"
       % (os.listdir(rd) if os.path.isdir(rd) else rd))
    procs = processes_under(rd + "/")
    ok(not procs, "processes left: %s" % procs)
    fl = [f for f in os.listdir(fleecing_dir) if "fleecing" in f]
    ok(not fl, "fleecing images left: %s" % fl)
    if vm.alive():
        ex = [e["id"] for e in vm.exports() if e["id"] != "guest"]
        ok(not ex, "QEMU exports left: %s" % ex)
        nodes = [n for n in vm.nodes() if n.startswith("ba-")]
        ok(not nodes, "block nodes left: %s" % nodes)
        ok(vm.block_jobs() == [], "block jobs left: %s" % vm.block_jobs())
        frozen = [b for b in vm.bitmaps() if b.startswith("ba-")]
        ok(not frozen, "frozen bitmaps left: %s" % frozen)


class HelperSetup:
    """The JSON of `backupaccess-helper setup` + `serve` for one device."""

    def __init__(self, vm, rd, fleecing_dir, bitmap="backup"):
        self.rd = rd
        self.common = ["--run-dir", rd]
        r = run_helper("setup", "--qmp", vm.helper_qmp, "--run-dir", rd,
                       "--backend", "upstream", "--device", vm.device,
                       "--fleecing-dir", fleecing_dir, "--bitmap", bitmap)
        self.setup_stderr = r.stderr
        self.dev = json.loads(r.stdout)["devices"][0]
        self.mode = self.dev["bitmap-mode"]
        served = json.loads(run_helper("serve", "--run-dir", rd).stdout)
        self.uri = served["devices"][0]["uri"]
        self.status_file = os.path.join(rd, vm.device + ".status.json")

    def qemu_uri(self):
        return "nbd+unix:///%s?socket=%s" % (self.dev["export"],
                                             self.dev["nbd-path"])

    def regions(self, size):
        """What this backup holds: the frozen bitmap's dirty regions, or
        the whole disk for a full backup."""
        if self.mode == "reuse":
            return dirty_regions(self.qemu_uri(), self.dev["bitmap-name"])
        return [(0, size)]

    def nbdkit_pid(self):
        with open(os.path.join(self.rd, "%s.nbdkit.pid"
                               % self.dev["device"])) as f:
            return int(f.read())

    def teardown(self, success, ok=True):
        return run_helper("teardown", "--run-dir", self.rd,
                          "--success" if success else "--failure", ok=ok)


def read_regions(uri, regions, out_path, chunk=4 << 20):
    """Reads regions through uri into the image out_path (in place)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        with open(out_path, "r+b") as out:
            for s, e in regions:
                pos = s
                while pos < e:
                    n = min(chunk, e - pos)
                    out.seek(pos)
                    out.write(h.pread(n, pos))
                    pos += n
    finally:
        h.shutdown()


def chain_equals(image, frozen_bytes, tmp, what):
    """image (raw) equals frozen_bytes, checked with qemu-img compare."""
    ref = os.path.join(tmp, "frozen.raw")
    with open(ref, "wb") as f:
        f.write(frozen_bytes)
    r = subprocess.run([qemus.current().img, "compare", "-q", "-f", "raw",
                        "-F", "raw",
                        image, ref], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        r = subprocess.run([qemus.current().img, "compare", "-f", "raw",
                            "-F", "raw",
                            image, ref], capture_output=True, text=True,
                           timeout=120)
    os.unlink(ref)
    check(r.returncode == 0, "%s: the backup chain differs from the disk at "
          "snapshot time: %s" % (what, (r.stdout + r.stderr).strip()))


def helper_backup(vm, rd, fleecing_dir, tmp, base, out, what,
                  expect_mode=None, bitmap="backup"):
    """One complete backup through the helper (setup, serve, read what
    the bitmap names, teardown --success): out = base (a raw image, or
    None for none) + what was read.  Checks that out equals the disk at
    setup time.  The guest must be quiet while this runs, except that
    writes after setup are allowed (they are not in this backup).
    Returns the HelperSetup."""
    at_setup = vm.disk_read()
    s = HelperSetup(vm, rd, fleecing_dir, bitmap)
    if expect_mode:
        check(s.mode == expect_mode, "%s: bitmap-mode %s, expected %s (%s)"
              % (what, s.mode, expect_mode, s.setup_stderr))
    if base is None or s.mode != "reuse":
        with open(out, "wb") as f:
            f.truncate(vm.size)
    else:
        shutil.copyfile(base, out)
    read_regions(s.uri, s.regions(vm.size), out)
    s.teardown(True)
    no_leftovers(vm, rd, fleecing_dir)
    chain_equals(out, at_setup, tmp, what)
    return s


# A backup client in a process of its own, which stops half-way until
# told to go on (so that a fault lands in the middle of a backup, at a
# known point): prints "paused <bytes>" after pause_after bytes, waits for
# a line on stdin, then reads the rest.  A failed read ends it with
# status 3 and "read error: <errno> <message>" on stderr.  It reads an
# NBD URI, or a file (a FUSE mount) with O_DIRECT.
READER = r'''
import errno, json, mmap, os, sys, nbd
uri, regions, pause_after, chunk = (sys.argv[1], json.loads(sys.argv[2]),
                                    int(sys.argv[3]), int(sys.argv[4]))
if uri.startswith("/"):             # a file (a mount), read with O_DIRECT
    fd = os.open(uri, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    def pread(n, off):
        got = os.preadv(fd, [memoryview(buf)[:n]], off)
        if got != n:
            raise OSError(errno.EIO, "short read: %d of %d" % (got, n))
else:
    h = nbd.NBD()
    h.connect_uri(uri)
    pread = h.pread
done = 0
paused = False
try:
    for s, e in regions:
        pos = s
        while pos < e:
            if not paused and done >= pause_after:
                print("paused %d" % done, flush=True)
                sys.stdin.readline()
                paused = True
            n = min(chunk, e - pos)
            pread(n, pos)
            pos += n
            done += n
except nbd.Error as err:
    print("read error: %s %s" % (err.errno, err.string), file=sys.stderr)
    sys.exit(3)
except OSError as err:
    print("read error: %s %s" % (errno.errorcode.get(err.errno), err),
          file=sys.stderr)
    sys.exit(3)
print("done %d" % done, flush=True)
'''


class PausedReader:
    """READER in a subprocess: start() returns once it has paused."""

    def __init__(self, uri, regions, pause_after, chunk=1 << 20):
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", "-c", READER, uri,
             json.dumps([list(r) for r in regions]), str(pause_after),
             str(chunk)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("paused"):
            self.proc.kill()
            _, err = self.proc.communicate()
            check(False, "the reader did not pause: %r %s" % (line, err))
        self.read_before_pause = int(line.split()[1])

    def go(self, timeout=120):
        """Lets it go on; returns (exit status, stdout, stderr), within
        timeout seconds or the test fails (a hang)."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            check(False, "the reader hung for %d s after the fault" % timeout)
        return self.proc.returncode, out, err

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


def kill_mount_mid_read(vm, rd, mount, teardown):
    """Kills vm.device's backupaccess-mount (SIGKILL) a third of the way
    through a reader of its file (mount: an entry of `mount`'s JSON),
    while another process holds the file open: the reader fails
    (ENOTCONN, or ECONNABORTED for a request in flight).  teardown()
    then tears down (returning the helper's result), which must unmount
    lazily and leave no mount.  Returns (the reader's error, that
    result)."""
    regions = [(o, o + n) for o, n in mount["dirty-regions"]]
    reader = PausedReader(mount["file"], regions,
                          sum(e - b for b, e in regions) // 3, 65536)
    holder = os.open(mount["file"], os.O_RDONLY)
    try:
        with open(os.path.join(rd, vm.device + ".mount.pid")) as f:
            os.kill(int(f.read()), signal.SIGKILL)
        rc, _, err = reader.go()
        check(rc == 3 and ("ECONNABORTED" in err or "ENOTCONN" in err),
              "reader after the mount was killed: exit %d %r" % (rc, err))
        r = teardown()
        check("is busy (a process has the file open): unmounted lazily"
              in r.stderr, r.stderr)
    finally:
        reader.kill()
        try:
            os.close(holder)
        except OSError:
            pass                        # the connection is gone
    check(not [p for p in mounts() if p.startswith(rd)], "mount left")
    return err, r
