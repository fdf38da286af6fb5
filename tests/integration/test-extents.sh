#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Extents (base:allocation) through the filter, checked with
# nbdinfo --map against the map:
#  1. file plugin: dirty regions are data (type 0), the rest a hole
#     (type 1); the plugin is only ever asked about readable runs.
#  2. backupaccess-clean=zero: the rest is hole,zero (type 3); reads of
#     clean bytes are refused all the same, and so are reads that mix
#     clean and dirty bytes, saying so.
#  3. after reading some clusters completely, they show as unreadable too
#     (type 1, as answered by the filter: the file plugin would call its
#     punched holes type 3; with clean=zero too, so that a copier that
#     skips zeroes reads them and is refused); re-reads still fail.
#  4. a plugin without extents (noextents filter below): readable runs
#     are data.
#  5. the memory plugin behind the nbd plugin, with a 64K hole never
#     written inside a dirty region: that hole keeps the plugin's type
#     (hole,zero) inside the readable area; with clean=zero it is data
#     (type 0), since only unreadable regions may look like clean ones.
#     Discarded clusters are freed in the memory plugin.
#  6. a plugin reporting everything as a hole that is not zero (type 1,
#     as QEMU does for clusters from a backing file): readable regions
#     are data (type 0), so that type 1 always means unreadable.
. "$(dirname "$0")/functions.sh"

size=$((2 * 1048576 + 12345))
make_disk "$tmp/src.img" $size 8
# Four dirty regions; the last one ends at the end of the disk.
printf '1000 5000\n70000 130000\n300000 300000\n%d %d\n' \
  $((size - 7000)) 7000 > "$tmp/dirty.map"

expect_map () {   # expect_map URI CLEAN_TYPE [DISCARDED_RANGES]
  "$PY" - "$tmp/dirty.map" $size "$@" <<'EOF'
import sys
import itlib
mapfile, size, uri, clean_type = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
gone = eval(sys.argv[5]) if len(sys.argv) > 5 else []
def main():
    dirty = itlib.read_map(mapfile)
    readable = itlib.subtract(dirty, gone)
    want = itlib.typed_runs([(s, e, 0) for s, e in readable] +
                            [(s, e, 1) for s, e in itlib.intersect(dirty, gone)] +
                            [(s, e, clean_type) for s, e in itlib.complement(dirty, size)])
    itlib.check_runs(itlib.nbdinfo_map(uri), want, "nbdinfo --map")
    print("   nbdinfo --map: %d runs as expected" % len(want))
itlib.run(main)
EOF
}

check_plugin_extents () {   # check_plugin_extents LOG: asked only about readable runs
  "$PY" - "$tmp/dirty.map" "$1" "${2:-[]}" <<'EOF'
import sys
import itlib
dirty, log = itlib.read_map(sys.argv[1]), itlib.Log(sys.argv[2])
gone = eval(sys.argv[3])
def main():
    ext = log.ranges("Extents")
    itlib.check(ext, "the plugin was never asked for extents")
    for off, cnt in ext:
        itlib.check(any(s <= off and off + cnt <= e for s, e in itlib.subtract(dirty, gone)),
                    "plugin asked for extents of [%d, +%d), not inside one "
                    "readable run" % (off, cnt))
    print("   %d extents requests reached the plugin, all inside readable runs" % len(ext))
itlib.run(main)
EOF
}

note "file plugin, clean=hole (default)"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin1.log" \
  backupaccess-map="$tmp/dirty.map"
expect_map "$uri" 1
check_plugin_extents "$tmp/plugin1.log"
# Read clusters 0 (all of [1000, 6000)) and 2 ([131072, 196608)), and the
# tail region; a piece of cluster 1 only: cluster 1 stays readable.
"$PY" - "$sock" <<'EOF'
import sys
import itlib
h = itlib.connect(sys.argv[1])
size = h.get_size()
for off, cnt in ((1000, 5000), (131072, 65536), (70000, 1000), (size - 7000, 7000)):
    h.pread(cnt, off)
h.shutdown()
EOF
gone="[(0, 65536), (131072, 196608), ($((size / 65536 * 65536)), $size)]"
mark=$(wc -l < "$tmp/plugin1.log")
expect_map "$uri" 1 "$gone"
tail -n +$((mark + 1)) "$tmp/plugin1.log" > "$tmp/plugin1b.log"
check_plugin_extents "$tmp/plugin1b.log" "$gone"
stop_nbdkit

note "file plugin, backupaccess-clean=zero"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map" \
  backupaccess-clean=zero
expect_map "$uri" 3
"$PY" - "$sock" "$tmp/src.img" "$nbdkit_log" <<'EOF'
import sys
import itlib
from itlib import check
sock, src, nbdkit_log = sys.argv[1:4]
def main():
    disk = itlib.read_file(src)
    h = itlib.connect(sock)
    itlib.expect_error(lambda: h.pread(1000, 20000), "EPERM", "clean read")
    itlib.expect_message(nbdkit_log, "backupaccess: read [20000, +1000) "
                         "refused: [20000, 21000) is outside the dirty "
                         "regions (clean, not in this backup)")
    # [60000, 80000): clean up to 70000, then dirty
    itlib.expect_error(lambda: h.pread(20000, 60000), "EPERM", "mixed read")
    itlib.expect_message(nbdkit_log, "backupaccess: read [60000, +20000) "
                         "refused: [60000, 70000) is outside the dirty "
                         "regions (clean, not in this backup); the read "
                         "mixes clean and dirty bytes")
    check(h.pread(10000, 70000) == disk[70000:80000], "dirty read")
    h.pread(5000, 1000)                              # cluster 0 is complete
    # [0, 10000) is clean + discarded + clean: refused
    itlib.expect_error(lambda: h.pread(10000, 0), "EPERM", "read [0, +10000)")
    itlib.expect_message(nbdkit_log, "backupaccess: read [0, +10000) refused: "
                         "[0, 1000) is outside the dirty regions")
    itlib.expect_error(lambda: h.pread(5000, 1000), "EPERM", "re-read")
    itlib.expect_message(nbdkit_log, "backupaccess: read [1000, +5000) refused: "
                         "[1000, 6000) was already read and discarded")
    h.shutdown()
itlib.run(main)
EOF
expect_map "$uri" 3 "[(0, 65536)]"
stop_nbdkit

note "plugin without extents (noextents filter below)"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter --filter=noextents file "$tmp/snap.img" \
  backupaccess-map="$tmp/dirty.map"
expect_map "$uri" 1
stop_nbdkit

note "memory plugin behind the nbd plugin, a hole in a dirty region"
start_nbdkit memory size=$size
mem_sock=$sock
"$PY" - "$mem_sock" "$tmp/src.img" <<'EOF'
import sys
import itlib
h = itlib.connect(sys.argv[1])
disk = itlib.read_file(sys.argv[2])
# Write everything but [393216, 458752) (two 32K pages of the memory
# plugin), which stays a hole.
for s, e in ((0, 393216), (458752, len(disk))):
    for off in range(s, e, 1 << 20):
        h.pwrite(disk[off:min(e, off + (1 << 20))], off)
h.shutdown()
EOF
start_filter --filter=log nbd socket="$mem_sock" logfile="$tmp/plugin5.log" \
  backupaccess-map="$tmp/dirty.map"
"$PY" - "$tmp/dirty.map" $size "$uri" <<'EOF'
import sys
import itlib
dirty, size, uri = itlib.read_map(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def main():
    hole = [(393216, 458752)]
    want = itlib.typed_runs([(s, e, 0) for s, e in itlib.subtract(dirty, hole)] +
                            [(s, e, 3) for s, e in itlib.intersect(dirty, hole)] +
                            [(s, e, 1) for s, e in itlib.complement(dirty, size)])
    itlib.check_runs(itlib.nbdinfo_map(uri), want, "nbdinfo --map")
    print("   nbdinfo --map: the plugin's hole,zero shows inside a dirty region")
itlib.run(main)
EOF
check_plugin_extents "$tmp/plugin5.log"
# Reading the region [300000, 600000) through the filter discards
# clusters 4 to 9 in the memory plugin: they become holes there.
"$PY" - "$sock" "$mem_sock" "$tmp/src.img" $size <<'EOF2'
import sys
import itlib
sock, mem_sock, src, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def main():
    disk = itlib.read_file(src)
    h = itlib.connect(sock)
    got = h.pread(300000, 300000)
    hole = 393216 - 300000
    itlib.check(got[:hole] == disk[300000:393216] and
                got[hole:hole + 65536] == bytes(65536) and
                got[hole + 65536:] == disk[458752:600000],
                "read [300000, +300000) through the nbd plugin: wrong data")
    h.shutdown()
    got = itlib.nbdinfo_map("nbd+unix:///?socket=" + mem_sock)
    want = [(0, 262144, 0), (262144, 655360, 3), (655360, size, 0)]
    itlib.check_runs(got, want, "the memory plugin after the reads")
    print("   clusters 4-9 read through the filter are freed in the memory plugin")
itlib.run(main)
EOF2
stop_nbdkit

note "memory plugin behind the nbd plugin, backupaccess-clean=zero"
start_filter nbd socket="$mem_sock" backupaccess-map="$tmp/dirty.map" \
  backupaccess-clean=zero backupaccess-discard=false
# The memory plugin now has holes at [262144, 655360) too (discarded above).
"$PY" - "$tmp/dirty.map" $size "$uri" <<'EOF'
import sys
import itlib
dirty, size, uri = itlib.read_map(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def main():
    want = itlib.typed_runs([(s, e, 0) for s, e in dirty] +
                            [(s, e, 3) for s, e in itlib.complement(dirty, size)])
    itlib.check_runs(itlib.nbdinfo_map(uri), want, "nbdinfo --map")
    print("   nbdinfo --map: dirty regions are data, zero or not")
itlib.run(main)
EOF
stop_nbdkit

note "a plugin that reports type 1 (hole, not zero) everywhere"
start_filter -r eval get_size="echo $size" \
  pread="dd if=$tmp/src.img skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none" \
  can_extents='exit 0' extents='echo $4 $3 hole' \
  backupaccess-map="$tmp/dirty.map" backupaccess-discard=false
expect_map "$uri" 1
