#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Random-order, random-size, unaligned reads covering every dirty byte
# of a disk with a map of several unaligned regions, for three cluster
# sizes and disk sizes that are not a multiple of the cluster size.
#
# After EVERY read the trims that reached the plugin (log filter below
# the filter) must be exactly the clusters completed so far, computed
# here independently: each cluster with a dirty byte, once all its dirty
# bytes were read, trimmed once, cluster-aligned (the last one ends at
# the end of the disk).  So no trim comes early, none is missing, none
# is repeated.  The data read must equal the source; re-reading
# discarded bytes must fail with EPERM "already read and discarded";
# the summary line must add up.
. "$(dirname "$0")/functions.sh"

round () {
  local name=$1 size=$2 cluster=$3 seed=$4 nregions=$5 maxregion=$6 maxpiece=$7
  note "$name: disk $size, cluster $cluster, $nregions regions, pieces <= $maxpiece"
  make_disk "$tmp/src.img" "$size" "$seed"
  cp "$tmp/src.img" "$tmp/snap.img"
  rm -f "$tmp/plugin.log"
  "$PY" - "$tmp/dirty.map" "$size" "$seed" "$nregions" "$maxregion" <<'EOF'
import random, sys
import itlib
path, size, seed, n, maxlen = sys.argv[1], *map(int, sys.argv[2:])
rng = random.Random(seed)
regions = itlib.random_regions(rng, size, n, maxlen)
# One region from the start of the disk, one up to its end.
regions[0] = (0, regions[0][1])
regions[-1] = (regions[-1][0], size)
itlib.write_map(path, regions)
EOF
  start_filter_unbatched --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
    backupaccess-map="$tmp/dirty.map" backupaccess-cluster="$cluster"
  "$PY" - "$sock" "$tmp/src.img" "$tmp/dirty.map" "$tmp/plugin.log" \
    "$nbdkit_log" "$cluster" "$seed" "$maxpiece" "$tmp/counts" <<'EOF'
import random, sys
import itlib
from itlib import check

sock, src, mapfile, plugin_log, nbdkit_log = sys.argv[1:6]
cluster, seed, maxpiece = map(int, sys.argv[6:9])
counts = sys.argv[9]
disk = itlib.read_file(src)
size = len(disk)
dirty = itlib.read_map(mapfile)
rng = random.Random(seed * 7 + 1)
pieces = itlib.split_random(dirty, rng, 1, maxpiece)
rng.shuffle(pieces)

h = itlib.connect(sock)
log = itlib.Log(plugin_log)
copy = bytearray(size)
consumed = []
for i, (s, e) in enumerate(pieces):
    data = h.pread(e - s, s)
    check(data == disk[s:e], "read [%d, %d): wrong data" % (s, e))
    copy[s:e] = data
    consumed = itlib.merge(consumed + [(s, e)])
    expected = itlib.complete_clusters(dirty, consumed, size, cluster)
    itlib.check_trims(log.refresh().trims(), expected, size, cluster,
                      "after read %d [%d, %d)" % (i, s, e))
check(itlib.merge(consumed) == dirty, "the pieces do not cover the map")
for s, e in dirty:
    check(copy[s:e] == disk[s:e], "assembled copy differs in [%d, %d)" % (s, e))
all_clusters = itlib.dirty_clusters(dirty, size, cluster)
itlib.check_trims(log.trims(), all_clusters, size, cluster, "at the end")
log.check_trim_order(dirty, cluster, size)
log.check_all_ok()
check(len(log.ranges("Read")) == len(pieces), "not every read reached the plugin")

# Everything is discarded now: re-reads fail and say why.
refused = 0
for _ in range(8):
    s, e = rng.choice(dirty)
    off = rng.randrange(s, e)
    cnt = rng.randint(1, min(e - off, 100000))
    itlib.expect_error(lambda: h.pread(cnt, off), "EPERM",
                       "re-read [%d, +%d)" % (off, cnt))
    itlib.expect_message(nbdkit_log,
        "backupaccess: read [%d, +%d) refused: [%d, %d) was already read "
        "and discarded" % (off, cnt, off, off + cnt))
    refused += 1
reads_before = len(pieces)
check(len(log.refresh().ranges("Read")) == reads_before,
      "a refused re-read reached the plugin")
h.shutdown()
with open(counts, "w") as f:
    f.write("%d %d %d %d %d %d\n" % (
        itlib.total(dirty), len(pieces), itlib.total(all_clusters),
        len(log.trims()), refused, len(dirty)))
print("   %d reads over %d regions (%d dirty bytes), %d trims, %d re-reads refused"
      % (len(pieces), len(dirty), itlib.total(dirty), len(log.trims()), refused))
EOF
  stop_nbdkit
  "$PY" - "$nbdkit_log" "$tmp/counts" <<'EOF'
import sys
import itlib
s = itlib.summary(sys.argv[1])
dirty, reads, discarded, trims, refused, _ = map(int, open(sys.argv[2]).read().split())
want = dict(bytes_read=dirty, reads=reads, bytes_discarded=discarded,
            trims=trims, trim_errors=0, refused=refused, readable_left=0,
            readable_total=dirty)
itlib.run(lambda: itlib.check(s == want, "summary %s, expected %s" % (s, want)))
EOF
}

#     name      size             cluster  seed regions maxregion maxpiece
round small64k  $((4194304 + 12345)) 65536    11   16      300000    70000
round tiny4k    $((1048576 + 777))   4096     12   12      40000     9000
round big1m     $((3145728 + 100))   1048576  13   5       900000    300000
round c512      $((262144 + 3))      512      14   10      9000      1500
