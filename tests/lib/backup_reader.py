#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""A backup program for `backupaccess-helper run`: reads every device in
BACKUPACCESS_JSON through its URI, only where the filter's extents say
there is data to back up (the dirty regions), and writes OUTDIR/DEVICE.raw
(those regions at their offsets, zeroes elsewhere) and
OUTDIR/DEVICE.regions.json ([[offset, length], ...]).

    backup_reader.py OUTDIR [--hold FILE]

--hold FILE: after reading, waits until FILE exists (the test then kills
or signals something), then exits 0.  Any read error: exit 1.
"""
import json
import os
import sys
import time

import nbd

PIECE = 1 << 20


def extents(h, size):
    """[(offset, length)] of the data extents (type 0: readable)."""
    out = []
    off = 0
    while off < size:
        got = []

        def cb(meta, start, entries, err):
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(entries)
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        if not got:
            raise RuntimeError("no extents at %d" % off)
        for i in range(0, len(got), 2):
            length, flags = got[i], got[i + 1]
            if flags & nbd.STATE_HOLE == 0:
                if out and out[-1][0] + out[-1][1] == off:
                    out[-1][1] += length
                else:
                    out.append([off, length])
            off += length
    return out


def main():
    outdir = sys.argv[1]
    hold = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--hold" \
        else None
    for d in json.loads(os.environ["BACKUPACCESS_JSON"])["devices"]:
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri(d["uri"])
        regions = extents(h, d["size"])
        with open(os.path.join(outdir, d["device"] + ".raw"), "wb") as f:
            f.truncate(d["size"])
            for start, length in regions:
                for o in range(start, start + length, PIECE):
                    f.seek(o)
                    f.write(h.pread(min(PIECE, start + length - o), o))
        h.shutdown()
        with open(os.path.join(outdir, d["device"] + ".regions.json"),
                  "w") as f:
            json.dump(regions, f)
    while hold and not os.path.exists(hold):
        time.sleep(0.05)


if __name__ == "__main__":
    main()
