# SPDX-License-Identifier: BSD-3-Clause
"""backupaccess-mount for the tests: Mount runs it in the foreground on a
directory of its own (its log in a file, -v), and ends it the way a user
does (fusermount3 -u, after which it must exit by itself); whatever went
wrong, the block leaves no process and no mount.  Also O_DIRECT reads
and fallocate through ctypes.  Use /usr/bin/python3."""
import ctypes
import errno
import mmap
import os
import subprocess
import time

from harness import TOP, check

MOUNT = os.path.join(TOP, "mount", "backupaccess-mount")
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long,
                            ctypes.c_long]


def wait_until(pred, what, timeout=30):
    """Polls pred until it holds, or fails the test after timeout s."""
    end = time.monotonic() + timeout
    while not pred():
        check(time.monotonic() < end, "timed out: " + what)
        time.sleep(0.1)


def mounted(path):
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == path for line in f)


class Mount:
    """backupaccess-mount ARGS DIR/NAME; file() is the disk."""

    def __init__(self, tmpdir, args, name="disk", verbose=True):
        self.dir = os.path.join(tmpdir, "mnt-" + name)
        self.name = name
        self.pidfile = os.path.join(tmpdir, name + ".mount.pid")
        self.logpath = os.path.join(tmpdir, name + ".mount.log")
        self.args = (["-v"] if verbose else []) + args
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        os.makedirs(self.dir, exist_ok=True)
        if os.path.exists(self.pidfile):
            os.unlink(self.pidfile)
        self.logf = open(self.logpath, "a")
        self.proc = subprocess.Popen(
            [MOUNT, "-f", "--pidfile", self.pidfile] + self.args +
            [os.path.join(self.dir, self.name)], stdout=self.logf,
            stderr=subprocess.STDOUT)
        end = time.monotonic() + 30
        while not os.path.exists(self.pidfile):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("backupaccess-mount did not start: "
                                   + self.log())
            time.sleep(0.05)

    def file(self):
        return os.path.join(self.dir, self.name)

    def unmount(self, timeout=30):
        """fusermount3 -u; returns the exit status of the mount, which must
        end within timeout."""
        r = subprocess.run(["fusermount3", "-u", self.dir],
                           capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, "fusermount3 -u: %s" % r.stderr)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            check(False, "backupaccess-mount still runs %d s after it was "
                  "unmounted" % timeout)

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.logf.close()
            self.proc = None
        if mounted(self.dir):
            subprocess.run(["fusermount3", "-u", "-z", self.dir],
                           capture_output=True, timeout=60)
        if os.path.isdir(self.dir):
            os.rmdir(self.dir)

    def log(self):
        with open(self.logpath) as f:
            return f.read()


def read_direct(path, off, n, chunk=4 << 20):
    """n bytes at off, read with O_DIRECT in requests of chunk bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    out = bytearray()
    try:
        while n > 0:
            k = min(chunk, n)
            got = os.preadv(fd, [memoryview(buf)[:k]], off)
            check(got == k, "short read at %d: %d of %d" % (off, got, k))
            out += buf[:k]
            off += k
            n -= k
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def read_error(path, off, n):
    """The errno name of a failed O_DIRECT read (None if it worked)."""
    try:
        read_direct(path, off, n, chunk=max(4096, n))
    except OSError as e:
        return errno.errorcode.get(e.errno)
    return None


def punch(fd, off, n, mode=FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE):
    """fallocate; returns 0 or the errno name."""
    if _libc.fallocate(fd, mode, off, n) == 0:
        return 0
    return errno.errorcode.get(ctypes.get_errno())
