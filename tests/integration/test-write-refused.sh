#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Writes and write-zeroes are refused with EPERM, inside and outside the
# dirty regions, with a message naming the request; none reaches the
# plugin; the disk is unchanged; refused writes consume nothing (the
# regions can still be read afterwards).  The export is writable only
# so that trims are offered: trim yes, cache and fast zero no.
. "$(dirname "$0")/functions.sh"

size=$((2 * 1048576))
make_disk "$tmp/src.img" $size 6
printf '4096 200000\n1048576 65536\n' > "$tmp/dirty.map"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
  backupaccess-map="$tmp/dirty.map"
"$PY" - "$sock" "$tmp/src.img" "$tmp/plugin.log" "$nbdkit_log" <<'EOF'
import sys
import nbd
import itlib
from itlib import check, expect_error, expect_message

sock, src, plugin_log, nbdkit_log = sys.argv[1:5]
def main():
    disk = itlib.read_file(src)
    h = itlib.connect(sock)
    check(not h.is_read_only(), "export is read-only: trims could not be sent")
    check(h.can_trim(), "trim not offered")
    check(not h.can_cache(), "cache offered (it would read clean areas)")
    check(not h.can_fast_zero(), "fast zero offered")
    buf = b"\xab" * 8192
    for off in (4096, 100000, 0, 500000, 1048576, len(disk) - 8192):
        what = "write [%d, +8192)" % off
        expect_error(lambda: h.pwrite(buf, off), "EPERM", what)
        expect_message(nbdkit_log, "backupaccess: %s refused: a backup view is "
                       "read-only" % what)
        what = "zero [%d, +8192)" % off
        expect_error(lambda: h.zero(8192, off), "EPERM", what)
        expect_message(nbdkit_log, "backupaccess: write zeroes [%d, +8192) "
                       "refused: a backup view is read-only" % off)
        expect_error(lambda: h.zero(8192, off, nbd.CMD_FLAG_NO_HOLE), "EPERM",
                     what + " NO_HOLE")
    h.flush()
    # Nothing was consumed: the dirty regions read in full.
    for s, n in ((4096, 200000), (1048576, 65536)):
        check(h.pread(n, s) == disk[s:s + n], "read [%d, +%d): wrong data" % (s, n))
    h.shutdown()
    log = itlib.Log(plugin_log)
    for kind in ("Write", "Zero"):
        check(not log.starts(kind), "%s reached the plugin: %r" % (kind, log.starts(kind)))
    check(len(log.ranges("Read")) == 2, "reads: %s" % log.ranges("Read"))
    print("   18 writes and zeroes refused, none reached the plugin")
itlib.run(main)
EOF
stop_nbdkit
# The trims of the two fully read regions' clusters change the served
# file; what was never trimmed must be byte for byte the source.
"$PY" - "$tmp/src.img" "$tmp/snap.img" <<'EOF'
import sys
import itlib
src, snap = itlib.read_file(sys.argv[1]), itlib.read_file(sys.argv[2])
trimmed = [(0, 262144), (1048576, 1114112)]
def main():
    for s, e in itlib.complement(trimmed, len(src)):
        itlib.check(src[s:e] == snap[s:e], "the disk changed in [%d, %d)" % (s, e))
itlib.run(main)
EOF
summary_line "$nbdkit_log" | grep -qF '265536 bytes read in 2 reads, 327680 bytes discarded in 2 trims' ||
  fail "summary: $(summary_line "$nbdkit_log")"
