#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""backupaccess-discard-lag: a client whose connection dropped right after
a read reconnects and reads the last SIZE bytes again, byte-identical;
older data is refused (EPERM, already discarded) and was trimmed once,
aligned; the lagging clusters were never trimmed.  Without a lag the
last read is refused at once."""
import os
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Nbdkit, check, filtered, trims_in_log

SIZE = 16 << 20
C = 65536
LAG = 1 << 20
READ = 256 << 10
READ_UP_TO = 8 << 20


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def refused(h, off, n):
    try:
        h.pread(n, off)
    except nbd.Error as e:
        check(e.errno == "EPERM", "read %d+%d: %s, expected EPERM"
              % (off, n, e))
        return True
    return False


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    img = os.path.join(tmp, "disk.img")
    data = os.urandom(SIZE)
    for lag in ("1M", None):
        with open(img, "wb") as f:      # trims punch holes in it
            f.write(data)
        log = os.path.join(tmp, "log-%s.txt" % lag)
        extra = ["backupaccess-trim-batch=0"]
        if lag:
            extra.append("backupaccess-discard-lag=" + lag)
        with Nbdkit(tmp, filtered(["file", img], *extra, log_below=log),
                    "lag") as nk:
            h = connect(nk.uri())
            for off in range(0, READ_UP_TO, READ):
                check(h.pread(READ, off) == data[off:off + READ],
                      "first read at %d differs" % off)
            # The connection drops without a goodbye.
            h.shutdown()
            del h
            h = connect(nk.uri())
            last = READ_UP_TO - READ
            if lag:
                again = h.pread(LAG, READ_UP_TO - LAG)
                check(again == data[READ_UP_TO - LAG:READ_UP_TO],
                      "the lagging megabyte differs on the second read")
                check(refused(h, READ_UP_TO - LAG - C, C),
                      "a cluster before the lag was readable again")
            else:
                check(refused(h, last, READ),
                      "without a lag the last read was readable again")
            # Reading on past the end of the first connection works.
            check(h.pread(READ, READ_UP_TO)
                  == data[READ_UP_TO:READ_UP_TO + READ], "read on differs")
            h.shutdown()
        trimmed = set()
        for off, n in trims_in_log(log):
            check(off % C == 0 and n % C == 0, "unaligned trim %d+%d"
                  % (off, n))
            for c in range(off // C, (off + n) // C):
                check(c not in trimmed, "cluster %d trimmed twice" % c)
                trimmed.add(c)
        read_clusters = set(range((READ_UP_TO + READ) // C))
        check(trimmed <= read_clusters, "an unread cluster was trimmed")
        kept = read_clusters - trimmed
        if lag:
            check(len(kept) * C == LAG,
                  "%d bytes kept back, expected %d" % (len(kept) * C, LAG))
            check(max(kept) == max(read_clusters),
                  "the newest clusters were not the ones kept")
        else:
            check(not kept, "%d read clusters were never trimmed" % len(kept))
        print("lag %s: %d clusters trimmed, %d kept" % (lag, len(trimmed),
                                                        len(kept)))
print("ok")
