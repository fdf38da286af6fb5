#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# A disk over 4 GiB (sparse file, file plugin, no map): offsets past
# 2^32 and a discard longer than one NBD trim can carry.
#  - Clusters 0 and 65536 (at 4 GiB) are read all but one byte each; one
#    client trim of just under 4 GiB then completes clusters 0 to 65536,
#    4 GiB + 64 KiB in one range: it must reach the plugin as several
#    trims, each under 4 GiB, each aligned, covering it exactly once.
#  - Refusal messages carry offsets past 2^32; the tail cluster of the
#    disk is trimmed up to its end; the summary adds up.
. "$(dirname "$0")/functions.sh"

size=$((5 * 1073741824 + 12345))
truncate -s $size "$tmp/snap.img"
start_filter_unbatched --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log"
"$PY" - "$sock" "$tmp/plugin.log" "$nbdkit_log" $size <<'EOF'
import sys
import itlib
from itlib import check
sock, plugin_log, nbdkit_log, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
C, G4 = 65536, 1 << 32
def main():
    h = itlib.connect(sock)
    log = itlib.Log(plugin_log)
    h.pread(C - 1, 0)                     # cluster 0 but its last byte
    h.pread(C - 1, G4 + 1)                # cluster 65536 but its first byte
    check(log.refresh().trims() == [], "trims before any cluster was complete")
    h.trim(G4 + 1 - (C - 1), C - 1)       # [65535, 4G + 1): < 4 GiB
    trims = log.refresh().trims()
    itlib.check_trims(trims, [(0, G4 + C)], size, C, "after the long client trim")
    check(len(trims) >= 2 and all(n < G4 for _, n in trims),
          "trims of 4 GiB or more, or one trim only: %s" % trims)
    what = "read [%d, +1)" % G4
    itlib.expect_error(lambda: h.pread(1, G4), "EPERM", what)
    itlib.expect_message(nbdkit_log, "backupaccess: %s refused: [%d, %d) was "
                         "already read and discarded" % (what, G4, G4 + 1))
    # The tail: [5 GiB, end) is 12345 bytes, one short cluster.
    tail = size - 12345
    check(h.pread(12345, tail) == bytes(12345), "tail not zero")
    itlib.check_trims(log.refresh().trims(), [(0, G4 + C), (tail, size)],
                      size, C, "after the tail")
    check(log.trims()[-1] == (tail, 12345), "tail trim: %s" % (log.trims()[-1],))
    h.shutdown()
    print("   %d trims: %s" % (len(log.trims()), log.trims()))
itlib.run(main)
EOF
stop_nbdkit
summary_line "$nbdkit_log" |
  grep -qF "143415 bytes read in 3 reads, $((4294967296 + 65536 + 12345)) bytes discarded in" ||
  fail "summary: $(summary_line "$nbdkit_log")"
