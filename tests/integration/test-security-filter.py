#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""The filter on its own, as an operator runs it, facing a hostile local
user and hostile NBD clients:
- backupaccess-status=FILE in a shared (sticky, world-writable) directory,
  under nbdkit's umask 022: the file is mode 0600, and symlinks planted
  at the names it writes through do not make it overwrite another file;
- requests a client may send with libnbd's checks switched off (past the
  end, offset + count wrapping around 2^64, zero length, huge trims and
  block status) are refused or harmless: nbdkit stays up, the counters
  do not move, and a good read still works."""
import json
import os
import stat
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import FILTER, Nbdkit, check, filtered

SIZE = 1 << 20

os.umask(0o022)


def wait_for(pred, what, timeout=30):
    end = time.monotonic() + timeout
    while not pred():
        check(time.monotonic() < end, "timed out waiting for " + what)
        time.sleep(0.05)


def status_of(path):
    with open(path) as f:
        return json.load(f)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    shared = os.path.join(tmp, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o1777)
    status = os.path.join(shared, "status.json")
    victim = os.path.join(tmp, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    # What an attacker would plant: the name the filter used to write
    # through (status.json.tmp), and the status file itself.
    os.symlink(victim, status + ".tmp")
    os.symlink(victim, status)

    args = filtered(["memory", str(SIZE)], "backupaccess-status=" + status,
                    "backupaccess-cluster=64K")
    with Nbdkit(tmp, args) as srv:
        def victim_text():
            with open(victim) as f:
                return f.read()
        wait_for(lambda: not os.path.islink(status) or
                 victim_text() != "precious\n", "the status file")
        check(victim_text() == "precious\n", "the status write went "
              "through a planted symlink")
        h = nbd.NBD()
        h.set_strict_mode(0)            # send what a hostile client would
        h.connect_uri(srv.uri())

        st = os.lstat(status)
        check(stat.S_ISREG(st.st_mode), "status is not a regular file")
        check(stat.S_IMODE(st.st_mode) == 0o600, "status file mode %o"
              % stat.S_IMODE(st.st_mode))
        check(status_of(status)["bytes-read"] == 0, "counters at start")

        def refused(what, fn):
            try:
                fn()
            except nbd.Error:
                return
            check(False, "%s was accepted" % what)

        refused("a read past the end",
                lambda: h.pread(4096, SIZE - 1024))
        refused("a read at 2^64 - 512",
                lambda: h.pread(4096, (1 << 64) - 512))
        refused("a trim wrapping around 2^64",
                lambda: h.trim(1 << 20, (1 << 64) - 4096))
        refused("a trim of 4 GiB - 1",
                lambda: h.trim((1 << 32) - 1, 0))
        refused("block status past the end",
                lambda: h.block_status((1 << 32) - 1, SIZE,
                                       lambda *a: 0))
        refused("a write", lambda: h.pwrite(b"x" * 512, 0))
        refused("a write of zeroes", lambda: h.zero(512, 0))
        refused("a read of 64 MiB + 1",
                lambda: h.pread((64 << 20) + 1, 0))
        # Zero-length requests are harmless whatever nbdkit makes of them.
        for fn in (lambda: h.pread(0, 0), lambda: h.trim(0, 4096)):
            try:
                fn()
            except nbd.Error:
                pass
        # Still serving; nothing counted, nothing discarded.
        check(h.pread(4096, 0) == b"\0" * 4096, "a good read failed")
        h.shutdown()
        wait_for(lambda: status_of(status)["bytes-read"] == 4096,
                 "the counters of the good read")
        s = status_of(status)
        check(s["bytes-discarded"] == 0, "discarded: %s" % s)
        check(srv.proc.poll() is None, "nbdkit died")
    check(sorted(os.listdir(shared)) == ["status.json", "status.json.tmp"],
          "temporary status files left: %s" % os.listdir(shared))
    with open(victim) as f:
        check(f.read() == "precious\n", "the victim file was overwritten")
print("ok")
