#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Reads inside and outside the dirty regions of a map (file plugin).
# Reads wholly inside the dirty regions return the disk's bytes; any
# read that touches a clean byte fails with EPERM, the nbdkit log names
# the first clean range it touched, and the refused read never reaches
# the plugin (the log filter below the filter sees exactly the accepted
# reads).  Run with a plain "OFFSET LENGTH" map and with the same regions
# as nbdinfo --map=qemu:dirty-bitmap:NAME prints them, over the file
# plugin; then over the nbd plugin (socket= and uri=), as in production
# where the plugin is an NBD client of QEMU's export.
. "$(dirname "$0")/functions.sh"

size=1048576
make_disk "$tmp/src.img" $size 1
# [1000, 6000) [70000, 200000) (two adjacent lines) [300000, 500000)
# [1040000, end of disk)
cat > "$tmp/plain.map" <<'EOF'
# plain map, comments and blank lines allowed

1000 5000
70000 100000
170000 30000    # adjacent to the line before: one region
300000 200000
1040000 8576
EOF
"$PY" -c 'import itlib; itlib.write_bitmap_map("'"$tmp"'/bitmap.map",
  [(1000, 6000), (70000, 200000), (300000, 500000), (1040000, 1048576)], 1048576)'

for variant in plain bitmap nbd-socket nbd-uri; do
  note "$variant"
  cp "$tmp/src.img" "$tmp/snap.img"
  rm -f "$tmp/plugin.log"
  case $variant in
    plain|bitmap)
      start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
        backupaccess-map="$tmp/$variant.map" ;;
    nbd-*)
      start_nbdkit file "$tmp/snap.img"
      backend_pid=$nbdkit_pid
      if [ $variant = nbd-socket ]; then nbdargs=(socket="$sock"); else nbdargs=(uri="$uri"); fi
      start_filter --filter=log nbd "${nbdargs[@]}" logfile="$tmp/plugin.log" \
        backupaccess-map="$tmp/plain.map" ;;
  esac
  "$PY" - "$sock" "$tmp/src.img" "$tmp/plugin.log" "$nbdkit_log" <<'EOF'
import sys
import itlib
from itlib import check

sock, src, plugin_log, nbdkit_log = sys.argv[1:]
disk = itlib.read_file(src)
h = itlib.connect(sock)

# (offset, count, first clean range it touches, or None if readable)
cases = [
    (1000, 4000, None),
    (70000, 4096, None),
    (150000, 40000, None),              # across two adjacent map lines
    (195000, 10000, (200000, 205000)),  # runs off the end of a region
    (0, 512, (0, 512)),                 # all clean, before everything
    (5000, 70000, (6000, 70000)),       # across a clean gap
    (190000, 120000, (200000, 300000)), # region, gap, region
    (600000, 4096, (600000, 604096)),   # all clean, in the middle
    (499000, 2000, (500000, 501000)),
    (250000, 100000, (250000, 300000)), # clean, then dirty
    (300000, 1, None),                  # one byte at a region's start
    (499999, 1, None),                  # one byte at a region's end
    (1039999, 2, (1039999, 1040000)),   # one clean byte before the tail
    (1040000, 8576, None),              # up to the end of the disk
    (5000, 1000, None),                 # completes cluster 0: discarded
    # The first unreadable range in offset order is named, discarded
    # or clean:
    (5000, 70000, (5000, 6000, "discarded")),
    (0, 70000, (0, 1000, "clean")),
]
accepted = []
for off, cnt, bad in cases:
    what = "read [%d, +%d)" % (off, cnt)
    if bad is None:
        data = h.pread(cnt, off)
        check(data == disk[off:off + cnt], what + ": wrong data")
        accepted.append((off, cnt))
    else:
        itlib.expect_error(lambda: h.pread(cnt, off), "EPERM", what)
        if len(bad) == 2:
            bad += ("clean",)
        itlib.expect_message(nbdkit_log, itlib.refusal_message(what, bad))
h.shutdown()

log = itlib.Log(plugin_log)
reads = log.ranges("Read")
check(reads == accepted,
      "reads that reached the plugin: %s, expected exactly %s"
      % (reads, accepted))
log.check_all_ok()
print("   %d reads accepted, %d refused, none of them reached the plugin"
      % (len(accepted), len(cases) - len(accepted)))
EOF
  stop_nbdkit
  case $variant in nbd-*) stop_nbdkit "$backend_pid" ;; esac
  # The refused requests are counted in the summary.
  summary_line "$nbdkit_log" | grep -qF ', 10 requests refused,' ||
    fail "summary does not count 10 refused requests: $(summary_line "$nbdkit_log")"
done
