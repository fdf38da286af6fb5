#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Several connections at once, sharing one coverage state.
#  1. nbdcopy --connections=4 of a whole disk (no map): copy equal to the
#     source; every cluster trimmed exactly once over all connections.
#  2. nbdcopy --connections=4 with a map of 64K granules (as a QEMU
#     bitmap's) and backupaccess-clean=zero, in requests of a granule:
#     the copy has the source's bytes in the dirty regions, zeroes
#     elsewhere; exactly the dirty clusters are trimmed, each once.
#  3. Four client processes, each with its own connection and 8 requests
#     in flight, reading random unaligned pieces dealt round-robin, so that
#     most clusters are completed by reads from several connections:
#     data correct, each dirty cluster trimmed exactly once, and only after
#     all its dirty bytes were read.
. "$(dirname "$0")/functions.sh"

check_log () {   # check_log LOG SIZE CLUSTER MAPFILE|- MIN_CONNECTIONS
  "$PY" - "$@" <<'EOF'
import sys
import itlib
path, size, cluster, mapfile = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
min_conns = int(sys.argv[5])
def main():
    dirty = [(0, size)] if mapfile == "-" else itlib.read_map(mapfile)
    log = itlib.Log(path)
    log.check_all_ok()
    conns = {e.conn for e in log.starts("Read")}
    itlib.check(len(conns) >= min_conns, "reads came over %d connection(s)" % len(conns))
    itlib.check_trims(log.trims(), itlib.dirty_clusters(dirty, size, cluster),
                      size, cluster)
    log.check_trim_order(dirty, cluster, size)
    tconns = {e.conn for e in log.starts("Trim")}
    print("   %d reads over %d connections; %d trims (sent on %d connections),"
          " each cluster once" % (len(log.starts("Read")), len(conns),
                                  len(log.trims()), len(tconns)))
itlib.run(main)
EOF
}

# nbdcopy hands out the disk to its connections in 128 MiB pieces:
# 3 x 128 MiB + a bit makes all four of them work.  The disk is sparse
# (random 1 MiB every 16 MiB) to be quick; noextents below makes the
# file plugin report all of it as data, so nbdcopy reads every byte.
big=$((3 * 128 * 1048576 + 777))
note "nbdcopy --connections=4, whole (sparse) disk of $big bytes"
"$PY" -c 'import itlib, sys; itlib.make_sparse_disk(sys.argv[1], int(sys.argv[2]), 3)' \
  "$tmp/big.img" $big
cp --sparse=always "$tmp/big.img" "$tmp/snap.img"
start_filter --filter=log --filter=noextents file "$tmp/snap.img" \
  logfile="$tmp/plugin1.log"
nbdcopy --connections=4 --threads=4 --requests=16 --request-size=32768 \
  "$uri" "$tmp/copy.img"
cmp "$tmp/big.img" "$tmp/copy.img" || fail "the copy differs from the source"
stop_nbdkit
rm -f "$tmp/big.img" "$tmp/snap.img" "$tmp/copy.img"
check_log "$tmp/plugin1.log" $big 65536 - 4

size=$((16 * 1048576 + 777))
make_disk "$tmp/src.img" $size 4

note "nbdcopy --connections=4, map, backupaccess-clean=zero"
"$PY" - "$tmp/dirty.map" $size <<'EOF'
import random, sys
import itlib
size, g = int(sys.argv[2]), 65536
granules = []
for s, e in itlib.random_regions(random.Random(31), size, 40, 400000):
    s, e = s // g * g, min(size, (e + g - 1) // g * g)
    if granules and s <= granules[-1][1]:
        granules[-1] = (granules[-1][0], max(e, granules[-1][1]))
    else:
        granules.append((s, e))
itlib.write_map(sys.argv[1], granules)
EOF
cp "$tmp/src.img" "$tmp/snap.img"
rm -f "$tmp/copy.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin2.log" \
  backupaccess-map="$tmp/dirty.map" backupaccess-clean=zero
nbdcopy --connections=4 --requests=16 --request-size=65536 "$uri" \
  "$tmp/copy.img"
stop_nbdkit
"$PY" - "$tmp/src.img" "$tmp/copy.img" "$tmp/dirty.map" <<'EOF'
import sys
import itlib
src, copy = itlib.read_file(sys.argv[1]), itlib.read_file(sys.argv[2])
dirty = itlib.read_map(sys.argv[3])
def main():
    itlib.check(len(copy) == len(src), "copy has size %d" % len(copy))
    for s, e in dirty:
        itlib.check(copy[s:e] == src[s:e], "copy differs in dirty [%d, %d)" % (s, e))
    for s, e in itlib.complement(dirty, len(src)):
        itlib.check(copy[s:e].count(0) == e - s, "copy not zero in clean [%d, %d)" % (s, e))
    print("   copy: dirty regions equal the source, the rest is zero")
itlib.run(main)
EOF
check_log "$tmp/plugin2.log" $size 65536 "$tmp/dirty.map" 1

note "4 client processes, random unaligned pieces, 8 requests in flight each"
"$PY" - "$tmp/dirty.map" $size <<'EOF'
import random, sys
import itlib
size = int(sys.argv[2])
regions = itlib.random_regions(random.Random(32), size, 30, 600000)
regions[-1] = (regions[-1][0], size)
itlib.write_map(sys.argv[1], regions)
EOF
cp "$tmp/src.img" "$tmp/snap.img"
start_filter --filter=log file "$tmp/snap.img" logfile="$tmp/plugin3.log" \
  backupaccess-map="$tmp/dirty.map" backupaccess-cluster=32768
"$PY" - "$sock" "$tmp/src.img" "$tmp/dirty.map" <<'EOF'
import multiprocessing, random, sys
import nbd
import itlib

sock, src, mapfile = sys.argv[1:4]
disk = itlib.read_file(src)
dirty = itlib.read_map(mapfile)
rng = random.Random(33)
pieces = itlib.split_random(dirty, rng, 1, 50000)
rng.shuffle(pieces)
NPROC = 4

def worker(k):
    mine = pieces[k::NPROC]
    h = itlib.connect(sock)
    inflight = {}
    def reap():
        for cookie in list(inflight):
            if h.aio_command_completed(cookie):   # raises if it failed
                s, e, buf = inflight.pop(cookie)
                if buf.to_bytearray() != disk[s:e]:
                    raise Exception("worker %d: wrong data in [%d, %d)" % (k, s, e))
    for s, e in mine:
        while len(inflight) >= 8:
            h.poll(-1)
            reap()
        buf = nbd.Buffer(e - s)
        inflight[h.aio_pread(buf, s)] = (s, e, buf)
    while inflight:
        h.poll(-1)
        reap()
    h.shutdown()
    return len(mine)

with multiprocessing.get_context("fork").Pool(NPROC) as pool:
    done = pool.map(worker, range(NPROC))
itlib.run(lambda: itlib.check(sum(done) == len(pieces), "not every piece read"))
print("   %d pieces read correctly by %d processes" % (len(pieces), NPROC))
EOF
stop_nbdkit
check_log "$tmp/plugin3.log" $size 32768 "$tmp/dirty.map" 4
summary_line "$nbdkit_log" | grep -qE ' 0 trim errors, 0 requests refused, 0 of [0-9]+ readable bytes left' ||
  fail "summary: $(summary_line "$nbdkit_log")"
