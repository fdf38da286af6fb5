#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""backupaccess-mount against a real qemu-storage-daemon (copy-before-write
+ fleecing + snapshot-access), the guest writing meanwhile:

- a full backup read with O_DIRECT in 4 MiB requests is byte-identical
  to the disk at the snapshot, discards behind itself (the fleecing
  image shrinks), and then nothing is left to read;
- an incremental one, through nbdkit's log filter so that every request
  reaching QEMU is seen: FILE.dirty and SEEK_DATA/SEEK_HOLE give the
  dirty regions; reads outside them are refused (EPERM) and never reach
  QEMU, with the range in the log; the regions read byte-identical, in
  pieces of at most 256K; holes punched in odd, unaligned pieces
  (fallocate PUNCH_HOLE|KEEP_SIZE, as Proxmox VE's deallocate) count as
  read; every trim QEMU gets is whole 64K clusters of dirty data, and
  together they are exactly the dirty regions; what was read or punched
  is refused afterwards; the fleecing image shrinks;
- a punch over a whole cluster and part of the next trims only the
  whole one: the rest of the next still reads;
- the file is not cached: a buffered re-read of what was read is
  refused too;
- writes, truncation and other fallocate modes are refused;
- --readonly: no trim at all, the file cannot be opened for writing, and
  data can be read twice."""
import errno
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Nbdkit, check, dirty_regions, requests_in_log
from mount_fixture import (FALLOC_FL_KEEP_SIZE, Mount, punch, read_direct,
                           read_error, wait_until)
from qemu_fixture import Fleecing

SIZE = 64 << 20
CLUSTER = 64 << 10
MiB = 1 << 20
rng = random.Random(2024)


def status(path):
    with open(path) as f:
        return json.load(f)


def union(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def full_backup(tmp):
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        snap = f.disk_read(0, SIZE)
        f.snapshot(bitmap=False)
        st = os.path.join(tmp, "full.status.json")
        with Mount(tmp, ["--socket", f.nbd_path, "--export", "snap",
                         "--status", st], "full") as m:
            path = m.file()
            with open(path + ".dirty") as d:
                check(d.read() == "0 %d\n" % SIZE, "full: .dirty")
            check(os.stat(path).st_size == SIZE, "full: size")
            # The guest overwrites what the backup has not read yet:
            # copy-before-write copies the old data out.
            base = f.fleece_size()
            for off in (8 * MiB, 40 * MiB):
                f.guest_write(off, rng.randbytes(MiB))
            grown = f.fleece_size()
            check(grown >= base + 2 * MiB, "full: fleecing image %d -> %d"
                  % (base, grown))
            got = read_direct(path, 0, SIZE)
            check(got == snap, "full: the file differs from the disk at "
                  "the snapshot")
            wait_until(lambda: status(st)["bytes-left"] == 0, "bytes-left 0")
            wait_until(lambda: f.fleece_size() <= grown - 2 * MiB + CLUSTER,
                       "full: the fleecing image frees the copied data "
                       "(%d -> %d)" % (grown, f.fleece_size()))
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            try:
                os.lseek(fd, 0, os.SEEK_DATA)
                check(False, "full: SEEK_DATA found data after it was read")
            except OSError as e:
                check(e.errno == errno.ENXIO, "full: SEEK_DATA: %s" % e)
            finally:
                os.close(fd)
            check(read_error(path, 4 * MiB, 4096) == "EPERM",
                  "full: re-read not refused")
            check(m.unmount() == 0, "full: exit status: " + m.log())
        out = m.log()
        check("summary: %d bytes read in" % SIZE in out and
              "0 of %d readable bytes left" % SIZE in out, out)
        check("was already read and discarded" in out, out)
        check(f.alive(), "qemu-storage-daemon died")


# The dirty regions of the incremental (64K granularity): a large one
# read in 4 MiB requests, one punched out in odd pieces, one half read
# and half punched, a small one, and one at the end of the disk.
REGIONS = [(1 * MiB, 10 * MiB), (16 * MiB + 192 * 1024, 17 * MiB + 512 * 1024),
           (24 * MiB, 24 * MiB + 512 * 1024), (40 * MiB, 40 * MiB + CLUSTER),
           (SIZE - 128 * 1024, SIZE)]


def incremental_seek(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        pos, found = 0, []
        while True:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                check(e.errno == errno.ENXIO, "SEEK_DATA %d: %s" % (pos, e))
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, pos))
        return found
    finally:
        os.close(fd)


def incremental(tmp):
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
        for s, e in REGIONS:
            f.guest_write(s, rng.randbytes(e - s))
        snap = f.disk_read(0, SIZE)
        f.snapshot(bitmap=True)
        check(dirty_regions(f.snap_uri(), "frozen") == REGIONS,
              "bitmap %s" % dirty_regions(f.snap_uri(), "frozen"))
        log = os.path.join(tmp, "qemu-requests.log")
        st = os.path.join(tmp, "incr.status.json")
        with Nbdkit(tmp, ["--filter=log", "nbd", "socket=" + f.nbd_path,
                          "export=snap", "logfile=" + log], "proxy") as nk, \
             Mount(tmp, ["--socket", nk.sock, "--bitmap", "frozen",
                         "--bitmap-socket", f.nbd_path, "--bitmap-export",
                         "snap", "--status", st], "incr") as m:
            incremental_mounted(f, m, snap, st)
            check(m.unmount() == 0, "incremental: exit status: " + m.log())
        out = m.log()
        total = sum(e - s for s, e in REGIONS)
        check("0 of %d readable bytes left" % total in out, out)
        incremental_requests(log)
        check(f.alive(), "qemu-storage-daemon died")


def incremental_mounted(f, m, snap, st):
    path = m.file()
    with open(path + ".dirty") as d:
        check(d.read() == "".join("%d %d\n" % (s, e - s) for s, e in REGIONS),
              "incremental: .dirty")
    check(incremental_seek(path) == REGIONS, "SEEK_DATA/SEEK_HOLE: %s"
          % incremental_seek(path))
    # Refused, and never sent to QEMU.
    check(read_error(path, 0, 4096) == "EPERM", "clean read not refused")
    check(read_error(path, MiB - 4096, 8192) == "EPERM",
          "a read across a region's start not refused")
    # The guest overwrites dirty data not read yet.
    base = f.fleece_size()
    for s, _ in REGIONS[:2]:
        f.guest_write(s + CLUSTER, rng.randbytes(CLUSTER))
    grown = f.fleece_size()
    check(grown >= base + 2 * CLUSTER, "incremental: fleecing image %d -> "
          "%d" % (base, grown))
    # 1: read in 4 MiB requests.
    s, e = REGIONS[0]
    check(read_direct(path, s, e - s) == snap[s:e], "region 1 differs")
    # 2: punched out in odd pieces, never a whole cluster at once.
    s, e = REGIONS[1]
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        pos = s
        while pos < e:
            n = min(100000, e - pos)
            check(punch(fd, pos, n) == 0, "punch %d+%d" % (pos, n))
            pos += n
        # 3: the first half read, the rest punched (unaligned).
        s3, e3 = REGIONS[2]
        half = (e3 - s3) // 2 + 4096
        check(read_direct(path, s3, half, chunk=half) == snap[s3:s3 + half],
              "region 3 differs")
        check(punch(fd, s3 + half, e3 - s3 - half) == 0, "punch region 3")
        # Another mode than punching a hole is not ours to do.
        r = punch(fd, 0, 4096, FALLOC_FL_KEEP_SIZE)
        check(r in ("EOPNOTSUPP", "ENOTSUP"),
              "fallocate without PUNCH_HOLE: %s" % r)
    finally:
        os.close(fd)
    # 4: a buffered read (no O_DIRECT): the kernel keeps no copy, so
    # once read the cluster is gone for it too.
    s, e = REGIONS[3]
    fd = os.open(path, os.O_RDONLY)
    try:
        check(os.pread(fd, e - s, s) == snap[s:e], "region 4 differs")

        # The mount counts a read as done once its reply reached the
        # kernel, which can be just after the reader has it: a re-read
        # in between is served (the right bytes, from QEMU).  From the
        # page cache it would be served for ever.
        def reread_refused():
            try:
                check(os.pread(fd, 4096, s) == snap[s:s + 4096],
                      "a buffered re-read differs")
                return False
            except OSError as err:
                check(err.errno == errno.EPERM, "buffered re-read: %s" % err)
                return True
        wait_until(reread_refused, "a buffered re-read refused (page cache?)",
                   timeout=10)
    finally:
        os.close(fd)
    # 5: a punch over one cluster and a part of the next (96K of the
    # last 128K): only the whole cluster goes; the rest of the second
    # still reads.
    s, e = REGIONS[4]
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        check(punch(fd, s, 96 * 1024) == 0, "punch the last region's start")
    finally:
        os.close(fd)
    check(read_direct(path, s + 96 * 1024, e - s - 96 * 1024) ==
          snap[s + 96 * 1024:e], "the rest of a partly punched cluster")
    # What was read or punched is gone.
    for off in (REGIONS[0][0], REGIONS[1][0] + 4096, REGIONS[2][1] - 4096):
        check(read_error(path, off, 4096) == "EPERM",
              "re-read at %d not refused" % off)
    check(incremental_seek(path) == [], "data left after everything was "
          "read or punched: %s" % incremental_seek(path))
    wait_until(lambda: status(st)["bytes-left"] == 0 and
               status(st)["requests-refused"] >= 5, "the status file")
    # Both copied clusters are freed (qcow2's new metadata stays, and
    # may grow by a few KiB).
    wait_until(lambda: f.fleece_size() <= grown - 2 * CLUSTER + CLUSTER // 2,
               "incremental: the fleecing image frees the copied data "
               "(%d -> %d)" % (grown, f.fleece_size()))
    refused_writes(path)
    out = m.log()
    check("read [0, +4096) refused: [0, 4096) is outside the dirty regions"
          in out, out)
    check("the read mixes clean and dirty bytes" in out, out)


def refused_writes(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * 4096, REGIONS[0][0])
        check(False, "a write succeeded")
    except OSError as e:
        check(e.errno == errno.EPERM, "write: %s" % e)
    try:
        os.ftruncate(fd, SIZE // 2)
        check(False, "truncate succeeded")
    except OSError as e:
        check(e.errno == errno.EPERM, "truncate: %s" % e)
    finally:
        os.close(fd)
    check(os.stat(path).st_size == SIZE, "the size changed")
    try:
        os.close(os.open(path + ".dirty", os.O_WRONLY))
        check(False, ".dirty opened for writing")
    except OSError as e:
        check(e.errno == errno.EACCES, ".dirty for writing: %s" % e)


def incremental_requests(log):
    """What reached QEMU: reads only inside the dirty regions, in pieces
    of at most 256K; trims of whole clusters, exactly the regions."""
    reads = requests_in_log(log, "Read")
    check(reads, "no read reached QEMU")
    for off, n in reads:
        check(n <= 256 << 10, "a read of %d bytes reached QEMU" % n)
        check(any(s <= off and off + n <= e for s, e in REGIONS),
              "a read outside the dirty regions reached QEMU: %d+%d"
              % (off, n))
    trims = requests_in_log(log, "Trim")
    for off, n in trims:
        check(off % CLUSTER == 0 and (n % CLUSTER == 0 or off + n == SIZE),
              "an unaligned trim reached QEMU: %d+%d" % (off, n))
    got = union((off, off + n) for off, n in trims)
    check(got == REGIONS, "trimmed %s, dirty %s" % (got, REGIONS))


def readonly(tmp):
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        snap = f.disk_read(0, 8 * MiB)
        f.snapshot(bitmap=False)
        log = os.path.join(tmp, "readonly-requests.log")
        with Nbdkit(tmp, ["--filter=log", "nbd", "socket=" + f.nbd_path,
                          "export=snap", "logfile=" + log], "ro") as nk, \
             Mount(tmp, ["--socket", nk.sock, "--readonly"], "ro") as m:
            path = m.file()
            check(os.stat(path).st_mode & 0o777 == 0o400, "readonly: mode")
            try:
                os.close(os.open(path, os.O_RDWR))
                check(False, "readonly: opened for writing")
            except OSError as e:
                check(e.errno == errno.EROFS, "readonly: %s" % e)
            for _ in range(2):
                check(read_direct(path, 0, 8 * MiB) == snap,
                      "readonly: differs")
            check(m.unmount() == 0, "readonly: exit: " + m.log())
        check(requests_in_log(log, "Trim") == [], "readonly: trims sent")
        check("0 bytes discarded in 0 trims" in m.log(), m.log())


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    full_backup(tmp)
    incremental(tmp)
    readonly(tmp)
print("ok")
