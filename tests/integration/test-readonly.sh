#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Discard needs a writable connection to a plugin that can trim.
#  1. nbdkit -r with discard on: nbdkit starts, but every connection is
#     refused with a clear message, and nothing reaches the plugin.
#  2. nbdkit -r with backupaccess-discard=false: reads work (refused
#     outside the map), the export is read-only, nothing is trimmed.
#  3. A writable plugin that cannot trim (eval plugin), discard on:
#     connections refused with a clear message.
#  4. The same plugin with backupaccess-discard=false: reads work, and a
#     client trim must not crash nbdkit (nbdkit asserts when a filter
#     trims a plugin that cannot trim).
. "$(dirname "$0")/functions.sh"

size=1048576
make_disk "$tmp/src.img" $size 7
printf '4096 200000\n700000 1000\n' > "$tmp/dirty.map"
cp "$tmp/src.img" "$tmp/snap.img"

note "nbdkit -r, discard on: connections refused"
start_filter -r --filter=log file "$tmp/snap.img" logfile="$tmp/plugin1.log" \
  backupaccess-map="$tmp/dirty.map"
if nbdinfo --size "$uri" > "$tmp/out" 2>&1; then
  fail "nbdinfo connected through -r with discard on: $(cat "$tmp/out")"
fi
"$PY" - "$sock" <<'EOF'
import sys
import itlib
def main():
    itlib.expect_error(lambda: itlib.connect(sys.argv[1]), None, "connect")
itlib.run(main)
EOF
assert_grep "backupaccess: discard after read needs a writable connection: do not use nbdkit -r, or set backupaccess-discard=false" "$nbdkit_log"
kill -0 "$nbdkit_pid" || fail "nbdkit exited"
stop_nbdkit
if grep -E ' (Read|Trim|Extents) id=' "$tmp/plugin1.log" >&2; then
  fail "requests reached the plugin"
fi
echo "   refused: $(grep -m1 -F 'discard after read' "$nbdkit_log")"

note "nbdkit -r, backupaccess-discard=false: reads work"
start_filter -r --filter=log file "$tmp/snap.img" logfile="$tmp/plugin2.log" \
  backupaccess-map="$tmp/dirty.map" backupaccess-discard=false
"$PY" - "$sock" "$tmp/src.img" "$nbdkit_log" <<'EOF'
import sys
import itlib
from itlib import check
sock, src, nbdkit_log = sys.argv[1:4]
def main():
    disk = itlib.read_file(src)
    h = itlib.connect(sock)
    check(h.is_read_only(), "the export is not read-only")
    check(not h.can_trim(), "trim offered on a read-only export")
    for _ in range(2):            # twice: nothing is discarded
        for s, n in ((4096, 200000), (700000, 1000), (4096, 1)):
            check(h.pread(n, s) == disk[s:s + n], "read [%d, +%d): wrong data" % (s, n))
    itlib.expect_error(lambda: h.pread(4096, 0), "EPERM", "read [0, +4096)")
    itlib.expect_message(nbdkit_log, "backupaccess: read [0, +4096) refused: "
                         "[0, 4096) is outside the dirty regions")
    h.shutdown()
itlib.run(main)
EOF
stop_nbdkit
grep -q ' Read id=' "$tmp/plugin2.log" || fail "no reads reached the plugin"
if grep -E ' Trim id=' "$tmp/plugin2.log" >&2; then fail "trims reached the plugin"; fi
cmp "$tmp/src.img" "$tmp/snap.img" || fail "the disk changed"
echo "   reads work, read-only, nothing trimmed"

# A writable plugin without trim: eval, reading the disk with dd.
eval_plugin=(eval
  get_size="echo $size"
  pread="dd if=$tmp/snap.img skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none"
  pwrite='exit 0' can_write='exit 0' can_trim='exit 3' can_zero='exit 3')

note "writable plugin without trim, discard on: connections refused"
start_filter "${eval_plugin[@]}" backupaccess-map="$tmp/dirty.map"
if nbdinfo --size "$uri" > "$tmp/out" 2>&1; then
  fail "nbdinfo connected to a plugin that cannot trim, discard on"
fi
assert_grep "backupaccess: the plugin cannot trim, so nothing read could be discarded: export it writable, or set backupaccess-discard=false" "$nbdkit_log"
stop_nbdkit
echo "   refused: $(grep -m1 -F 'cannot trim' "$nbdkit_log")"

note "writable plugin without trim, backupaccess-discard=false: reads, client trim"
start_filter "${eval_plugin[@]}" backupaccess-map="$tmp/dirty.map" \
  backupaccess-discard=false
"$PY" - "$sock" "$tmp/src.img" <<'EOF'
import sys
import nbd
import itlib
from itlib import check
sock, src = sys.argv[1:3]
def main():
    disk = itlib.read_file(src)
    h = itlib.connect(sock)
    check(h.pread(65536, 4096) == disk[4096:4096 + 65536], "wrong data")
    if h.can_trim():
        # A client trim of a whole dirty region (clusters 0-3): whatever
        # the filter does with it, nbdkit must survive.
        try:
            h.trim(200000, 4096)      # count, offset
        except nbd.Error as e:
            check(e.errno in ("EPERM", "EINVAL", "EOPNOTSUPP"),
                  "client trim failed with %s" % e)
    check(h.pread(1000, 700000) == disk[700000:701000],
          "read after the client trim: wrong data")
    h.shutdown()
itlib.run(main)
EOF
kill -0 "$nbdkit_pid" 2>/dev/null || fail "nbdkit died: $(tail -n 3 "$nbdkit_log")"
assert_not_grep "Assertion" "$nbdkit_log"
stop_nbdkit
echo "   reads work, nbdkit survived the client trim"
