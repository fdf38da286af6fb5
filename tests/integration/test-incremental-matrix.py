#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Full and incremental backups through the filter, against a real
qemu-storage-daemon while the guest writes, for every combination of
copy-before-write cluster {64K, 128K, 1M}, dirty bitmap granularity
{64K, 4M (Proxmox VE's)}, connector {the snapshotaccess plugin, nbdkit's
nbd plugin} and client {nbdcopy with the README's recipe, a plain libnbd
reader that copies the data extents}: each backup, and the chain of the
full and the incremental, is byte for byte the disk at its snapshot
(qemu-img compare).  Where the granularity is below nbdcopy's default
request size, nbdcopy without --request-size must either make a right
backup or fail: a backup is right or it fails loudly.

Run once per upstream QEMU build (tests/run-tests): by default QEMU 7.2
runs every combination and other builds one cluster and granularity
pair; BACKUPACCESS_FULL=1 runs every combination on each.  Each pair
runs in its own qemu-storage-daemon, two at a time.
"""
# qemu: upstream
import concurrent.futures
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
import qemus
from harness import FILTER, PLUGIN, Nbdkit, filtered
from qemu_fixture import Fleecing

K, M = 1 << 10, 1 << 20
SIZE = 32 * M
CLUSTERS = (64 * K, 128 * K, 1 * M)
GRANULARITIES = (64 * K, 4 * M)
CONNECTORS = ("plugin", "nbd")
CLIENTS = ("nbdcopy", "reader")
FULL = os.environ.get("BACKUPACCESS_FULL") == "1"
# The README's incremental recipe (nbdcopy's part of it).
RECIPE = ["nbdcopy", "--destination-is-zero", "--sparse=0",
          "--request-size=65536"]
CHUNK = 4 * M                   # the reader's largest read


class Failure(Exception):
    pass


def run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 180), **kw)


def nbdkit_args(f, connector, cluster, incremental):
    if connector == "plugin":
        plugin = [PLUGIN, "socket=" + f.nbd_path, "export=snap",
                  "cluster=%d" % cluster]
    else:
        plugin = ["nbd", "socket=" + f.nbd_path, "export=snap"]
    args = ["backupaccess-cluster=%d" % cluster]
    if incremental:
        args += ["backupaccess-bitmap=frozen", "backupaccess-clean=zero"]
    return filtered(plugin, *args)


def guest_writes(f, rng, n, max_len):
    """n writes of non-zero data at random offsets, some of them at the
    end of the disk."""
    for i in range(n):
        length = rng.randrange(1, max_len)
        if i % 5 == 4:
            offset = SIZE - length
        else:
            offset = rng.randrange(0, SIZE - length)
        f.guest_write(offset, bytes([rng.randrange(1, 256)]) * length)


def changes_between_backups(f, rng):
    """Small writes (dirty granules next to clean ones, in the same
    cluster), larger ones, and zeroes over data (dirty zeroes must be
    copied, not skipped)."""
    guest_writes(f, rng, 6, 64 * K)
    guest_writes(f, rng, 2, 1 * M)
    for _ in range(2):
        f.guest_write(rng.randrange(0, SIZE - 256 * K) & ~4095,
                      bytes(rng.randrange(4 * K, 256 * K)))


def nbdcopy_while_guest_writes(f, rng, cmd):
    """Runs cmd while the guest writes; returns (returncode, stderr,
    writes during the copy)."""
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    writes = 0
    try:
        while p.poll() is None and writes < 100:
            guest_writes(f, rng, 1, 256 * K)
            writes += 1
        _, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return p.returncode, err, writes


def extents(h):
    """[(offset, length, flags)] of base:allocation over the disk."""
    out, offset = [], 0
    while offset < SIZE:
        found = []

        def cb(context, off, entries, err):
            if context == nbd.CONTEXT_BASE_ALLOCATION:
                for i in range(0, len(entries), 2):
                    found.append((off, entries[i], entries[i + 1]))
                    off += entries[i]
            return 0
        h.block_status(min(SIZE - offset, 1 << 30), offset, cb)
        for off, length, flags in found:
            length = min(length, SIZE - off)
            out.append((off, length, flags))
            offset = off + length
    return out


def reader_copy(f, rng, uri, write):
    """A simple backup program: reads the extents, skips the ones that
    read as zeroes, reads the others and hands them to write(data,
    offset), while the guest writes after every read.  Returns the
    guest writes."""
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    writes = 0
    try:
        exts = extents(h)
        # Aligned requests of the preferred size never mix what is to be
        # copied with what is not (nbdcopy rounds its requests up to it).
        pref = h.get_block_size(nbd.SIZE_PREFERRED)
        for (off, length, flags), (noff, _, nflags) in zip(exts, exts[1:]):
            if (flags & nbd.STATE_ZERO) != (nflags & nbd.STATE_ZERO) and \
               noff % pref:
                raise Failure("the preferred block size %d does not divide "
                              "the extent boundary at %d" % (pref, noff))
        for off, length, flags in exts:
            if flags & nbd.STATE_ZERO:
                continue
            for pos in range(off, off + length, CHUNK):
                n = min(CHUNK, off + length - pos)
                write(h.pread(n, pos), pos)
                guest_writes(f, rng, 1, 256 * K)
                writes += 1
    finally:
        h.shutdown()
    return writes


def compare(image, fmt, reference):
    r = run(["qemu-img", "compare", "-f", fmt, "-F", "raw", image,
             reference])
    return r.returncode == 0, (r.stdout + r.stderr).strip()


class Pair:
    """One cluster and granularity pair in its own qemu-storage-daemon."""

    def __init__(self, q, cluster, gran, tmp, seed):
        self.q, self.cluster, self.gran = q, cluster, gran
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.results = []
        self.failures = []
        self.name = "QEMU %s, cluster %dK, granularity %dK" % (
            q.label, cluster // K, gran // K)

    def snapshot(self, f, incremental):
        """Freezes the disk; returns its bytes at the snapshot in a raw
        file."""
        ref = os.path.join(self.tmp, "ref.raw")
        with open(ref, "wb") as fp:
            fp.write(f.disk_read(0, SIZE))
        f.snapshot(bitmap=incremental)
        guest_writes(f, self.rng, 3, 256 * K)   # before the copy
        return ref

    def backup(self, f, connector, client, incremental, prev, nbdcopy=None):
        """One backup; returns (image, format, returncode, message)."""
        tag = "%s-%s-%s" % (connector, client,
                            "inc" if incremental else "full")
        if incremental:
            image, fmt = os.path.join(self.tmp, tag + ".qcow2"), "qcow2"
            r = run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", prev,
                     "-F", fmt_of(prev), image])
            if r.returncode != 0:
                raise Failure("qemu-img create: " + r.stderr)
        else:
            image, fmt = os.path.join(self.tmp, tag + ".raw"), "raw"
        with Nbdkit(self.tmp, nbdkit_args(f, connector, self.cluster,
                                          incremental), tag) as nk:
            if client == "nbdcopy":
                if incremental:
                    cmd = (nbdcopy or RECIPE) + [
                        nk.uri(), "--", "[", "qemu-nbd", "-f", "qcow2",
                        image, "]"]
                else:
                    cmd = ["nbdcopy", nk.uri(), image]
                rc, err, writes = nbdcopy_while_guest_writes(f, self.rng,
                                                             cmd)
            else:
                rc, err, writes = self.reader(f, nk.uri(), image,
                                              incremental)
        if rc != 0:
            err += "\nnbdkit's log:\n" + nk.log()[-3000:]
        return image, fmt, rc, err, writes

    def reader(self, f, uri, image, incremental):
        try:
            if incremental:
                sock = os.path.join(self.tmp, "overlay.sock")
                qn = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", sock,
                                       "-t", image])
                try:
                    out = wait_connect(sock, qn)
                    writes = reader_copy(
                        f, self.rng, uri,
                        lambda data, pos: out.pwrite(data, pos))
                    out.flush()
                    out.shutdown()
                finally:
                    qn.terminate()
                    qn.wait(20)
            else:
                with open(image, "wb") as fp:
                    fp.truncate(SIZE)
                    writes = reader_copy(
                        f, self.rng, uri,
                        lambda data, pos: os.pwrite(fp.fileno(), data, pos))
            return 0, "", writes
        except nbd.Error as e:
            return 1, "reader: %s" % e, 0

    def chain(self, f, connector, client):
        """A full backup, then an incremental one on top of it."""
        prev = None
        for incremental in (False, True):
            if incremental:
                changes_between_backups(f, self.rng)
            ref = self.snapshot(f, incremental)
            image, fmt, rc, err, writes = self.backup(
                f, connector, client, incremental, prev)
            what = "%s, %s over %s, %s" % (
                self.name, client, connector,
                "incremental" if incremental else "full")
            same, msg = compare(image, fmt, ref) if rc == 0 else (False, "")
            if not f.alive():
                raise Failure("%s: qemu-storage-daemon died" % what)
            f.release(success=same)
            if rc != 0:
                self.failures.append("%s: the copy failed (%d): %s"
                                     % (what, rc, err))
                return
            if not same:
                self.failures.append("%s: the backup differs from the disk "
                                     "at its snapshot: %s" % (what, msg))
                return
            self.results.append("%s: ok (%d guest writes during the copy)"
                                % (what, writes))
            prev = image

    def default_request_size(self, f):
        """nbdcopy's default request size (256K) is larger than a 64K
        granule: the copy must be right or fail."""
        full = os.path.join(self.tmp, "plain-full.raw")
        ref = self.snapshot(f, False)
        _, _, rc, err, _ = self.backup(f, "plugin", "nbdcopy", False, None)
        os.replace(os.path.join(self.tmp, "plugin-nbdcopy-full.raw"), full)
        if rc != 0 or not compare(full, "raw", ref)[0]:
            raise Failure("%s: full backup for the default request size "
                          "test failed: %s" % (self.name, err))
        f.release(success=True)
        changes_between_backups(f, self.rng)
        ref = self.snapshot(f, True)
        image, fmt, rc, err, _ = self.backup(
            f, "plugin", "nbdcopy", True, full,
            nbdcopy=["nbdcopy", "--destination-is-zero", "--sparse=0"])
        if rc == 0:
            same, msg = compare(image, fmt, ref)
            if not same:
                raise Failure("%s: nbdcopy with its default request size "
                              "made a wrong incremental backup without an "
                              "error: %s" % (self.name, msg))
            outcome = "right"
        else:
            check_refusal(err, self.name)
            outcome = "refused"
        f.release(success=rc == 0)
        self.results.append("%s: nbdcopy, default request size: %s"
                            % (self.name, outcome))

    def run(self):
        with Fleecing(SIZE, fleece_cluster=self.cluster, tmpdir=self.tmp,
                      granularity=self.gran) as f:
            f.guest_write(0, self.rng.randbytes(SIZE))
            for connector in CONNECTORS:
                for client in CLIENTS:
                    self.chain(f, connector, client)
            if self.gran < 256 * K:
                self.default_request_size(f)


def check_refusal(err, name):
    """A refused copy must say why: the filter's message is in nbdkit's
    log, which is on the copy's stderr here."""
    if "mixes clean and dirty bytes" not in err:
        raise Failure("%s: nbdcopy failed, but not because the filter "
                      "refused a mixed read: %s" % (name, err))


def fmt_of(path):
    return "qcow2" if path.endswith(".qcow2") else "raw"


def wait_connect(sock, proc):
    """A handle connected to qemu-nbd once it listens."""
    end = time.monotonic() + 20
    while True:
        h = nbd.NBD()
        try:
            h.connect_unix(sock)
            return h
        except nbd.Error:
            if proc.poll() is not None or time.monotonic() > end:
                raise
            time.sleep(0.05)


def pairs(q):
    out = []
    for cluster in CLUSTERS:
        for gran in GRANULARITIES:
            if FULL or q.label == "7.2" or (cluster, gran) == (128 * K,
                                                                64 * K):
                out.append((q, cluster, gran))
    return out


def main():
    todo = pairs(qemus.current(pve=False))
    lock = threading.Lock()
    failures = []
    with tempfile.TemporaryDirectory(prefix="backupaccess-matrix.") as tmp:
        def one(i, item):
            q, cluster, gran = item
            d = os.path.join(tmp, str(i))
            os.mkdir(d)
            p = Pair(q, cluster, gran, d, 1000 + i)
            try:
                p.run()
            except Failure as e:
                p.failures.append(str(e))
            with lock:
                failures.extend(p.failures)
                for line in p.results:
                    print(line, flush=True)
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            for fut in [ex.submit(one, i, item)
                        for i, item in enumerate(todo)]:
                fut.result()
    for msg in failures:
        print("FAIL:", msg, file=sys.stderr)
    if failures:
        sys.exit(1)
    print("ok: %d pairs" % len(todo))


main()
