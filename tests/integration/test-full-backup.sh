#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Full backup without a map: the whole disk is readable.
#  - nbdcopy from the filtered export (one connection) gives a copy equal
#    to the source; every cluster is trimmed exactly once, aligned, the
#    last one (shorter) ending at the end of the disk, each only after
#    all of its bytes were read; afterwards every read is refused.
#  - with backupaccess-discard=false no trim reaches the plugin and the
#    disk can be copied twice, both copies equal to the source.
. "$(dirname "$0")/functions.sh"

size=$((8 * 1048576 + 5000))     # the last 64K cluster is short
make_disk "$tmp/src.img" $size 2

note "discard on (default)"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log"
nbdcopy --connections=1 "$uri" "$tmp/copy.img"
cmp "$tmp/src.img" "$tmp/copy.img" || fail "the copy differs from the source"
"$PY" - "$tmp/plugin.log" $size "$sock" "$nbdkit_log" <<'EOF'
import sys
import itlib
log_path, size, sock, nbdkit_log = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
def main():
    log = itlib.Log(log_path)
    log.check_all_ok()
    whole = [(0, size)]
    itlib.check_trims(log.trims(), whole, size, 65536)
    log.check_trim_order(whole, 65536, size)
    itlib.check(itlib.merge((o, o + n) for o, n in log.ranges("Read")) == whole,
                "the reads that reached the plugin do not cover the disk")
    h = itlib.connect(sock)
    for off, cnt in ((0, 1), (size - 1, 1), (4096, 65536)):
        itlib.expect_error(lambda: h.pread(cnt, off), "EPERM", "re-read")
        itlib.expect_message(nbdkit_log, "backupaccess: read [%d, +%d) refused: "
            "[%d, %d) was already read and discarded" % (off, cnt, off, off + cnt))
    print("   copy verified, %d trims cover the disk" % len(log.trims()))
itlib.run(main)
EOF
stop_nbdkit
summary_line "$nbdkit_log" |
  grep -qF "$size bytes read in" || fail "summary: $(summary_line "$nbdkit_log")"
summary_line "$nbdkit_log" |
  grep -qF "$size bytes discarded in" || fail "summary: $(summary_line "$nbdkit_log")"
summary_line "$nbdkit_log" |
  grep -qF ", 0 of $size readable bytes left" || fail "summary: $(summary_line "$nbdkit_log")"

note "backupaccess-discard=false"
cp "$tmp/src.img" "$tmp/snap.img"
rm -f "$tmp/plugin.log" "$tmp/copy.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
  backupaccess-discard=false
for i in 1 2; do
  nbdcopy --connections=1 "$uri" "$tmp/copy$i.img"
  cmp "$tmp/src.img" "$tmp/copy$i.img" || fail "copy $i differs from the source"
done
stop_nbdkit
if grep -E ' Trim id=' "$tmp/plugin.log" >&2; then
  fail "trims reached the plugin with backupaccess-discard=false"
fi
grep -q ' Read id=' "$tmp/plugin.log" || fail "no reads in the log filter's log"
cmp "$tmp/src.img" "$tmp/snap.img" || fail "the served disk was changed"
summary_line "$nbdkit_log" |
  grep -qF "$((2 * size)) bytes read in" || fail "summary: $(summary_line "$nbdkit_log")"
summary_line "$nbdkit_log" |
  grep -qF " 0 bytes discarded in 0 trims, 0 trim errors, 0 requests refused, $size of $size readable bytes left" ||
  fail "summary: $(summary_line "$nbdkit_log")"
echo "   two copies verified, no trims"
