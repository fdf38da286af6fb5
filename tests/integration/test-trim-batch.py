#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""backupaccess-trim-batch: completed clusters are trimmed in batches (by
default, and with an explicit size), out of order completions merged;
every trim aligned, no cluster trimmed twice, every cluster trimmed by the
time the client has gone (also the short one at the end of the disk),
and fewer trims than reads.  With 0, one trim per completing read."""
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Nbdkit, check, filtered, run, trims_in_log

SIZE = (64 << 20) + 4096          # the last cluster is 4 KiB long
C = 65536

with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    for batch, most in ((None, 40), ("4M", 40), ("0", None)):
        img = os.path.join(tmp, "disk.img")
        data = os.urandom(SIZE)
        with open(img, "wb") as f:
            f.write(data)
        log = os.path.join(tmp, "log-%s.txt" % batch)
        extra = ["backupaccess-trim-batch=" + batch] if batch else []
        with Nbdkit(tmp, filtered(["file", img], *extra,
                                  log_below=log), "batch") as nk:
            out = os.path.join(tmp, "copy.raw")
            run(["nbdcopy", "--connections=4", nk.uri(), out])
        with open(out, "rb") as f:
            check(f.read() == data, "the copy differs")
        trims = trims_in_log(log)
        seen = set()
        for off, n in trims:
            check(off % C == 0 and (n % C == 0 or off + n == SIZE),
                  "unaligned trim %d+%d" % (off, n))
            for c in range(off // C, (off + n + C - 1) // C):
                check(c not in seen, "cluster %d trimmed twice" % c)
                seen.add(c)
        clusters = (SIZE + C - 1) // C
        check(len(seen) == clusters, "%d of %d clusters trimmed"
              % (len(seen), clusters))
        print("batch %s: %d trims" % (batch, len(trims)))
        if most is not None:
            check(len(trims) <= most, "%d trims: not batched" % len(trims))
        else:
            check(len(trims) >= SIZE // (256 << 10),
                  "%d trims without batching" % len(trims))
print("ok")
