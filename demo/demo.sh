#!/usr/bin/env bash
# make demo: a full and an incremental backup of a generated demo disk,
# read through the backupaccess filter over nbdkit's file plugin, each
# verified against the disk.  A copy of the disk stands in for QEMU's
# snapshot-access export: the filter's discards punch holes into it,
# the way they free QEMU's fleecing image.  Everything lives in a
# temporary folder that is removed at the end.
set -euo pipefail
export PATH=/usr/bin:$PATH
top=$(cd "$(dirname "$0")/.." && pwd)
filter=$top/nbdkit-backupaccess-filter.so
size_mib=${DEMO_SIZE_MIB:-256}
tmp=$(mktemp -d /tmp/backupaccess-demo.XXXXXX)
pids=()
cleanup () {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || :; wait "$p" 2>/dev/null || :; done
  rm -rf "$tmp"
}
trap cleanup EXIT

now () { date +%s.%N; }
mib () { echo "scale=1; $1 / 1048576" | bc; }
du_mib () { echo "scale=1; $(du -B1 "$1" | cut -f1) / 1048576" | bc; }

# Serves $2 through the filter on socket $1, with extra filter arguments.
serve () {
  local sock=$1 file=$2; shift 2
  nbdkit -f -U "$sock" --filter="$filter" file "$file" "$@" \
    2>>"$tmp/nbdkit.log" &
  pids+=($!)
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.1; done
  echo "demo: nbdkit did not start:"; cat "$tmp/nbdkit.log"; exit 1
}
stop_last () {
  local p=${pids[-1]}
  kill "$p"; wait "$p" || :
  unset 'pids[-1]'
}

echo "== demo disk: ${size_mib} MiB of random data with a zeroed 16 MiB hole"
head -c $((size_mib * 1048576)) /dev/urandom > "$tmp/disk.raw"
dd if=/dev/zero of="$tmp/disk.raw" bs=1M seek=32 count=16 conv=notrunc status=none

echo "== full backup through the filter (no map: the whole disk)"
cp --sparse=always "$tmp/disk.raw" "$tmp/snapshot.raw"
before=$(du_mib "$tmp/snapshot.raw")
serve "$tmp/full.sock" "$tmp/snapshot.raw"
t0=$(now)
nbdcopy --connections=4 "nbd+unix:///?socket=$tmp/full.sock" "$tmp/full.raw"
t1=$(now)
stop_last
cmp "$tmp/full.raw" "$tmp/disk.raw"
full_secs=$(echo "$t1 - $t0" | bc)
echo "   verified: full.raw equals the disk"
echo "   snapshot stand-in: ${before} MiB before, $(du_mib "$tmp/snapshot.raw") MiB after (discarded behind the reads)"

echo "== guest writes: 24 random writes, tracked at 1 MiB granularity"
/usr/bin/python3 - "$tmp/disk.raw" "$tmp/dirty.map" <<'PY'
import os, random, sys
disk, mapfile = sys.argv[1], sys.argv[2]
size = os.path.getsize(disk)
gran = 1 << 20
rng = random.Random(42)
dirty = set()
with open(disk, "r+b") as f:
    for _ in range(24):
        length = rng.randrange(512, 300 * 1024)
        offset = rng.randrange(0, size - length)
        f.seek(offset)
        f.write(os.urandom(length))
        dirty.update(range(offset // gran, (offset + length - 1) // gran + 1))
# The same text "nbdinfo --map=qemu:dirty-bitmap:NAME" prints.
with open(mapfile, "w") as m:
    cluster, n = 0, size // gran
    while cluster < n:
        state = cluster in dirty
        end = cluster
        while end < n and (end in dirty) == state:
            end += 1
        m.write("%10d  %10d  %d  %s\n" % (cluster * gran, (end - cluster) * gran,
                                          int(state), "dirty" if state else "clean"))
        cluster = end
PY
dirty_bytes=$(awk '$3 == 1 { s += $2 } END { print s + 0 }' "$tmp/dirty.map")
echo "   dirty: $(grep -c dirty "$tmp/dirty.map") regions, $(mib "$dirty_bytes") MiB"

echo "== incremental backup through the filter into a qcow2 overlay of the full backup"
cp --sparse=always "$tmp/disk.raw" "$tmp/snapshot.raw"
serve "$tmp/inc.sock" "$tmp/snapshot.raw" \
  backupaccess-map="$tmp/dirty.map" backupaccess-clean=zero
qemu-img create -q -f qcow2 -b "$tmp/full.raw" -F raw "$tmp/incremental.qcow2"
t0=$(now)
nbdcopy --destination-is-zero "nbd+unix:///?socket=$tmp/inc.sock" \
  -- [ qemu-nbd -f qcow2 "$tmp/incremental.qcow2" ]
t1=$(now)
stop_last
qemu-img compare -q "$tmp/incremental.qcow2" "$tmp/disk.raw"
inc_secs=$(echo "$t1 - $t0" | bc)
echo "   verified: full.raw + incremental.qcow2 equals the disk after the writes"

echo
echo "== summary"
printf '   full backup:        %s MiB in %.2f s (%.0f MiB/s)\n' "$size_mib" "$full_secs" \
  "$(echo "$size_mib / $full_secs" | bc -l)"
printf '   incremental backup: %s MiB dirty, overlay %s MiB on disk, %.2f s\n' \
  "$(mib "$dirty_bytes")" "$(du_mib "$tmp/incremental.qcow2")" "$inc_secs"
grep 'backupaccess: summary' "$tmp/nbdkit.log" | sed 's/^nbdkit: backupaccess: summary: /   filter: /'
echo "demo: OK"
