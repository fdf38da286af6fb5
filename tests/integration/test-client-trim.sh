#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Client trims count as consumed, like reads, and only whole clusters
# are ever trimmed upstream.  After every request the trims that reached
# the plugin (log filter) must be exactly the clusters completed so far
# by reads and client trims together, computed here independently.
#  1. A scripted sequence: an unaligned trim inside a cluster (nothing
#     sent), a read completing that cluster (one aligned trim), trims
#     over clean bytes and over discarded clusters (accepted, nothing
#     sent), one unaligned trim completing several clusters at once, the
#     tail cluster ending at the end of the disk, reads of trimmed
#     clusters refused.
#  2. Random mixes of reads and unaligned client trims (with a map, and
#     without one), the client predicting which reads must be refused.
. "$(dirname "$0")/functions.sh"

size=$((1048576 + 3000))
cluster=65536
make_disk "$tmp/src.img" $size 5

cat > "$tmp/model.py" <<'EOF'
import sys
import itlib
from itlib import check


class Model:
    """A connection to the filter plus the client's model of it."""

    def __init__(self, sock, src, plugin_log, nbdkit_log, dirty, cluster):
        self.h = itlib.connect(sock)
        self.disk = itlib.read_file(src)
        self.size = len(self.disk)
        self.log = itlib.Log(plugin_log)
        self.nbdkit_log = nbdkit_log
        self.dirty = dirty
        self.cluster = cluster
        self.consumed = []
        self.nreads = 0
        self.nrefused = 0

    def done(self):
        return itlib.complete_clusters(self.dirty, self.consumed, self.size,
                                       self.cluster)

    def verify(self, what):
        itlib.check_trims(self.log.refresh().trims(), self.done(), self.size,
                          self.cluster, "after " + what)

    def trim(self, off, cnt):
        self.h.trim(cnt, off)
        self.consumed = itlib.merge(self.consumed + [(off, off + cnt)])
        self.verify("client trim [%d, +%d)" % (off, cnt))

    def read(self, off, cnt):
        what = "read [%d, +%d)" % (off, cnt)
        bad = itlib.first_unreadable(self.dirty, self.done(), off, off + cnt)
        if bad:
            self.nrefused += 1
            itlib.expect_error(lambda: self.h.pread(cnt, off), "EPERM", what)
            itlib.expect_message(self.nbdkit_log, itlib.refusal_message(what, bad))
        else:
            check(self.h.pread(cnt, off) == self.disk[off:off + cnt],
                  what + ": wrong data")
            self.consumed = itlib.merge(self.consumed + [(off, off + cnt)])
            self.nreads += 1
        self.verify(what)

    def finish(self):
        self.h.shutdown()
        self.log.refresh().check_all_ok()
        for e in self.log.starts("Write") + self.log.starts("Zero"):
            itlib.fail("a write reached the plugin: %r" % e)
EOF
export PYTHONPATH=$tmp:$PYTHONPATH

note "scripted sequence"
# [1000, 6000) [70000, 200000) [300000, 500000) [1040000, end of disk)
printf '1000 5000\n70000 130000\n300000 200000\n1040000 %d\n' $((size - 1040000)) \
  > "$tmp/dirty.map"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter_unbatched --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
  backupaccess-map="$tmp/dirty.map"
"$PY" - "$sock" "$tmp/src.img" "$tmp/plugin.log" "$nbdkit_log" "$tmp/dirty.map" <<'EOF'
import sys
import itlib, model
from itlib import check

sock, src, plugin_log, nbdkit_log, mapfile = sys.argv[1:6]
def main():
    m = model.Model(sock, src, plugin_log, nbdkit_log, itlib.read_map(mapfile), 65536)
    size = m.size
    m.trim(1000, 3000)            # unaligned, inside cluster 0: nothing sent
    check(m.log.trims() == [], "an unaligned client trim reached the plugin")
    m.read(4000, 2000)            # completes cluster 0 (trim + read)
    check(m.log.trims() == [(0, 65536)], "trims %s" % m.log.trims())
    m.trim(10000, 50000)          # clean only: accepted, nothing sent
    m.trim(0, 100000)             # discarded + clean + part of cluster 1
    check(len(m.log.trims()) == 1, "trims %s" % m.log.trims())
    m.read(100000, 31072)         # completes cluster 1
    m.trim(0, 65536)              # aligned, already discarded: nothing new
    check(m.log.trims() == [(0, 65536), (65536, 65536)], "trims %s" % m.log.trims())
    m.read(70000, 100)            # trimmed and read: refused
    m.read(5000, 10)
    m.trim(131000, 369000)        # unaligned; completes clusters 2-7
    check(m.log.trims()[2:] == [(131072, 524288 - 131072)],
          "one coalesced aligned trim expected, got %s" % m.log.trims()[2:])
    m.read(1040000, 1000)
    m.trim(1041000, size - 1041000)   # to the end of the disk
    check(m.log.trims()[3:] == [(983040, size - 983040)],
          "tail trim expected, got %s" % m.log.trims()[3:])
    m.trim(0, size)               # everything: nothing left to send
    check(len(m.log.trims()) == 4, "trims %s" % m.log.trims())
    m.read(300000, 1)
    m.finish()
    print("   %d trims sent, all aligned: %s" % (len(m.log.trims()), m.log.trims()))
itlib.run(main)
EOF
stop_nbdkit

for variant in map full; do
  note "random reads and client trims ($variant)"
  cp "$tmp/src.img" "$tmp/snap.img"
  rm -f "$tmp/plugin.log"
  if [ $variant = map ]; then
    "$PY" -c 'import itlib, random, sys
itlib.write_map(sys.argv[1], itlib.random_regions(random.Random(51), int(sys.argv[2]), 10, 150000))' \
      "$tmp/dirty.map" $size
    mapargs=(backupaccess-map="$tmp/dirty.map")
  else
    printf '0 %d\n' $size > "$tmp/dirty.map"
    mapargs=()
  fi
  start_filter_unbatched --filter=log file "$tmp/snap.img" logfile="$tmp/plugin.log" \
    "${mapargs[@]}" backupaccess-cluster=16384
  "$PY" - "$sock" "$tmp/src.img" "$tmp/plugin.log" "$nbdkit_log" "$tmp/dirty.map" <<'EOF'
import random, sys
import itlib, model

sock, src, plugin_log, nbdkit_log, mapfile = sys.argv[1:6]
def main():
    dirty = itlib.read_map(mapfile)
    m = model.Model(sock, src, plugin_log, nbdkit_log, dirty, 16384)
    rng = random.Random(52)
    pieces = itlib.split_random(dirty, rng, 1, 30000)
    rng.shuffle(pieces)
    for s, e in pieces:
        r = rng.random()
        if r < 0.55:
            m.read(s, e - s)
        elif r < 0.9:
            m.trim(s, e - s)
        else:                     # an arbitrary range, clean bytes and all
            off = rng.randrange(0, m.size)
            m.trim(off, rng.randint(1, min(m.size - off, 40000)))
            m.read(s, e - s)
    # Pieces refused because arbitrary trims discarded part of them are
    # not consumed in full: a trim of the whole disk finishes the rest.
    m.trim(0, m.size)
    itlib.check(m.done() == itlib.dirty_clusters(dirty, m.size, 16384),
                "the model did not finish")  # a test bug, not a filter one
    m.finish()
    print("   %d pieces, %d reads, %d refused, %d trims sent"
          % (len(pieces), m.nreads, m.nrefused, len(m.log.trims())))
    itlib.check(m.nrefused > 0, "no read was refused: a weak test")
itlib.run(main)
EOF
  stop_nbdkit
  summary_line "$nbdkit_log" | grep -qF ' 0 trim errors, ' ||
    fail "summary: $(summary_line "$nbdkit_log")"
  summary_line "$nbdkit_log" | grep -qE ', 0 of [0-9]+ readable bytes left' ||
    fail "summary: $(summary_line "$nbdkit_log")"
done
