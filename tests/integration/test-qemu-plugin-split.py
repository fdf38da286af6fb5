#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""The snapshotaccess plugin's reads in pieces, against real
qemu-storage-daemon:

- a 4 MiB and a 40 MiB client read arrive at QEMU as pieces of the
  request size (256K by default, request-size=64K too), cut on piece
  boundaries, covering the read exactly once, spread over several pool
  connections, and the data is byte-identical (what QEMU was asked is
  read from libnbd's debug log, LIBNBD_DEBUG=1);
- one piece refused by QEMU (its cluster trimmed): the whole read fails
  with EPERM and a message naming that piece, and the rest of the range
  still reads; under the filter, a read that QEMU refuses in part
  discards nothing (no trim reaches the plugin: nbdkit's log filter
  below ours);
- pieces in flight when QEMU dies: QEMU is stopped (SIGSTOP), a 4 MiB
  read is sent, its pieces wait unread in QEMU's sockets (ss shows them
  queued on several connections at once), QEMU is killed: the read fails
  with EIO within bounded time, nbdkit keeps running and every later
  read fails with EIO too."""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import (PLUGIN, Nbdkit, check, filtered, requests_in_log,
                     trims_in_log, within)
from qemu_fixture import Fleecing, wait_for

SIZE = 64 << 20
K, M = 1 << 10, 1 << 20
PIECE_RE = re.compile(r"nbd(\d+): nbd_aio_pread: enter: buf=\S+ "
                      r"count=(\d+) offset=(\d+)")


def pieces(log):
    """[(connection, offset, count)] of every read the plugin sent."""
    return [(int(c), int(o), int(n)) for c, n, o in PIECE_RE.findall(log)]


def check_split(asked, offset, count, piece, what):
    """The pieces of one read: exactly [offset, offset + count), in
    pieces of at most piece bytes, each but the first starting on a
    piece boundary; returns the connections used."""
    spans = sorted((o, n) for _, o, n in asked)
    pos = offset
    for i, (o, n) in enumerate(spans):
        check(o == pos, "%s: pieces %s do not cover the read in order"
              % (what, spans[:8]))
        check(0 < n <= piece, "%s: a piece of %d bytes" % (what, n))
        check(i == 0 or o % piece == 0, "%s: piece at %d is not on a %d "
              "boundary" % (what, o, piece))
        pos = o + n
    check(pos == offset + count, "%s: the pieces end at %d, not %d"
          % (what, pos, offset + count))
    return {c for c, _, _ in asked}


def read_logged(nk, h, count, offset, expected, what):
    """Reads through the plugin; returns the pieces QEMU was asked for
    by this read."""
    before = len(pieces(nk.log()))
    check(bytes(h.pread(count, offset)) == expected[offset:offset + count],
          "%s differs from the snapshot" % what)
    return pieces(nk.log())[before:]


def expect_error(fn, errnum, what):
    try:
        fn()
    except nbd.Error as e:
        check(e.errnum == errnum, "%s: expected %s, got %s"
              % (what, errno.errorcode[errnum], e))
        return
    check(False, "%s: expected %s, it succeeded"
          % (what, errno.errorcode[errnum]))


def plugin_args(f, *extra):
    return [PLUGIN, "socket=" + f.nbd_path, "export=snap"] + list(extra)


def debug_nbdkit(tmp, args, name):
    """nbdkit with libnbd's debug log: every request to QEMU."""
    os.environ["LIBNBD_DEBUG"] = "1"
    try:
        nk = Nbdkit(tmp, args, name)
        nk.start()
    finally:
        del os.environ["LIBNBD_DEBUG"]
    return nk


def split_reads(tmp, f, expected):
    for extra, piece in (((), 256 * K), (("request-size=64K",), 64 * K)):
        nk = debug_nbdkit(tmp, plugin_args(f, *extra), "split")
        try:
            h = nbd.NBD()
            h.connect_uri(nk.uri())
            asked = read_logged(nk, h, 4 * M, 8 * M, expected, "4 MiB read")
            conns = check_split(asked, 8 * M, 4 * M, piece, "4 MiB read")
            check(len(asked) == 4 * M // piece, "4 MiB read: %d pieces"
                  % len(asked))
            check(len(conns) > 1, "4 MiB read: all pieces on connection %s"
                  % conns)
            asked = read_logged(nk, h, 40 * M, 4096, expected,
                                "40 MiB read")
            check_split(asked, 4096, 40 * M, piece, "40 MiB read")
            check(len(asked) == 40 * M // piece + 1, "40 MiB read: %d "
                  "pieces" % len(asked))
            h.shutdown()
        finally:
            nk.stop()
        print("split: %s pieces ok" % (extra or ("default",)))


def refused_piece(tmp, f, expected):
    with Nbdkit(tmp, plugin_args(f), "refuse") as nk:
        h = nbd.NBD()
        h.connect_uri(nk.uri())
        h.trim(64 * K, 2 * M + 64 * K)          # one cluster, aligned
        # More refused reads than connections: each gives its back.
        for _ in range(6):
            within(60, "a read with a refused piece", lambda: expect_error(
                lambda: h.pread(4 * M, 0), errno.EPERM,
                "a 4 MiB read with one refused piece"))
        check(re.search(r"read \[2097152, \+262144\): QEMU refused it",
                        nk.log()), "no message naming the refused piece: "
              + nk.log())
        # Nothing else of the range is gone.
        within(60, "the reads next to the refused cluster", lambda: check(
            bytes(h.pread(2 * M + 64 * K, 0)) == expected[:2 * M + 64 * K]
            and bytes(h.pread(2 * M - 128 * K, 2 * M + 128 * K)) ==
            expected[2 * M + 128 * K:4 * M],
            "the reads next to the refused cluster differ"))
        check(nk.proc.poll() is None and f.alive(), "a process died")
        h.shutdown()

    # Under the filter: QEMU refuses one piece of a read the filter let
    # through (trimmed behind its back): the read fails and nothing of
    # it is discarded.
    below = os.path.join(tmp, "below.log")
    g = nbd.NBD()
    g.set_export_name("snap")
    g.connect_unix(f.nbd_path)
    g.trim(64 * K, 12 * M + 64 * K)
    g.shutdown()
    with Nbdkit(tmp, filtered(plugin_args(f), log_below=below),
                "filtered") as nk:
        h = nbd.NBD()
        h.connect_uri(nk.uri())
        expect_error(lambda: h.pread(4 * M, 12 * M), errno.EIO,
                     "a filtered read QEMU refuses in part")
        h.shutdown()
    check(requests_in_log(below, "Read") == [(12 * M, 4 * M)],
          "the filter's read did not reach the plugin as one request: %s"
          % requests_in_log(below, "Read"))
    check(trims_in_log(below) == [], "a failed read discarded %s"
          % trims_in_log(below))
    print("refused piece ok")


def queued_in_qemu(pid, sock):
    """Bytes waiting unread in each of QEMU's NBD sockets."""
    out = subprocess.run(["ss", "-xpn"], capture_output=True, text=True,
                         check=True).stdout
    return [int(line.split()[2]) for line in out.splitlines()
            if sock in line and "pid=%d," % pid in line]


def qemu_dies(tmp, f):
    with Nbdkit(tmp, plugin_args(f), "dies") as nk:
        h = nbd.NBD()
        h.connect_uri(nk.uri())
        h.pread(4096, 0)                         # all connected and idle
        f.proc.send_signal(signal.SIGSTOP)
        try:
            buf = nbd.Buffer(4 * M)
            cookie = h.aio_pread(buf, 16 * M)
            wait_for(lambda: sum(1 for q in queued_in_qemu(
                f.proc.pid, f.nbd_path) if q > 0) >= 2,
                "the pieces queued on two of QEMU's connections")
        finally:
            f.proc.send_signal(signal.SIGKILL)
            f.proc.wait()
        end = time.monotonic() + 30
        while True:
            try:
                done = h.aio_command_completed(cookie)
            except nbd.Error as e:
                check(e.errnum == errno.EIO, "the read in flight failed "
                      "with %s, not EIO" % e)
                break
            check(not done, "the read in flight succeeded")
            check(time.monotonic() < end, "the read in flight hung")
            h.poll(1000)
        for _ in range(6):                       # each connection, dead
            within(30, "a read after QEMU died", lambda: expect_error(
                lambda: h.pread(4 * M, 0), errno.EIO,
                "a read after QEMU died"))
        check(nk.proc.poll() is None, "nbdkit exited when QEMU died")
        h.shutdown()
        check("the connection to QEMU is lost" in nk.log(), nk.log())
    print("QEMU died with pieces in flight ok")


rng = random.Random(7)
with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     Fleecing(SIZE) as f:
    f.guest_write(0, rng.randbytes(SIZE))
    expected = f.disk_read(0, SIZE)
    f.snapshot(bitmap=False)
    split_reads(tmp, f, expected)
    refused_piece(tmp, f, expected)
    qemu_dies(tmp, f)
print("ok")
