#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The preferred block size the filter advertises, and what it keeps a
# standard copier from doing:
#  1. without dirty regions: the cluster (at most 32M, nbdkit's limit);
#  2. with dirty regions: never more than their alignment (the bitmap's
#     granularity, or more), so that aligned requests of that size never
#     mix clean and dirty bytes; at least 512; the same over the nbd
#     plugin, whatever the plugin prefers;
#  3. backupaccess-clean=zero, a map of 64K granules, cluster 128K:
#     nbdcopy with its default 256K requests is refused, saying which
#     request size to use; with the README's options it makes the right
#     incremental backup into a qcow2 overlay of the previous one (dirty
#     granules the guest zeroed included).
. "$(dirname "$0")/functions.sh"
command -v qemu-img >/dev/null && command -v qemu-nbd >/dev/null ||
  skip "qemu-img and qemu-nbd (qemu-utils) are not installed"

size=$((16 * 1048576 + 777))
make_disk "$tmp/old.img" $size 21

# expect_preferred WANT: the preferred block size at $uri.
expect_preferred () {
  local got
  got=$("$PY" -c 'import nbd, sys
h = nbd.NBD(); h.connect_uri(sys.argv[1])
print(h.get_block_size(nbd.SIZE_PREFERRED))' "$uri")
  [ "$got" = "$1" ] || fail "preferred block size $got, expected $1"
  echo "   preferred block size $got"
}
# write_map FILE GRANULE N SEED: N random dirty granules, merged; one of
# them is the last, ending at the end of the disk.
write_map () {
  "$PY" - "$@" $size <<'EOF'
import random, sys
import itlib
path, g, n, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
starts = sorted(set(rng.randrange(0, size // g) * g for _ in range(n)))
regions = []
for s in starts + [size // g * g]:
    e = min(s + g, size)
    if regions and s <= regions[-1][1]:
        regions[-1] = (regions[-1][0], e)
    else:
        regions.append((s, e))
itlib.write_map(path, regions)
EOF
}

note "no dirty regions: the cluster"
start_filter file "$tmp/old.img" backupaccess-discard=false
expect_preferred 65536
stop_nbdkit
start_filter file "$tmp/old.img" backupaccess-discard=false \
  backupaccess-cluster=1M
expect_preferred 1048576
stop_nbdkit
start_filter file "$tmp/old.img" backupaccess-discard=false \
  backupaccess-cluster=64M
expect_preferred 33554432
stop_nbdkit

note "64K granules: at most 64K, whatever the cluster"
write_map "$tmp/g64k.map" 65536 40 1
for cluster in 64K 128K 1M; do
  start_filter file "$tmp/old.img" backupaccess-map="$tmp/g64k.map" \
    backupaccess-discard=false backupaccess-cluster=$cluster
  expect_preferred 65536
  stop_nbdkit
done

note "4M granules: the cluster, up to 4M"
write_map "$tmp/g4m.map" 4194304 2 2
for c in 65536 1048576 8388608; do
  start_filter file "$tmp/old.img" backupaccess-map="$tmp/g4m.map" \
    backupaccess-discard=false backupaccess-cluster=$c
  expect_preferred $((c < 4194304 ? c : 4194304))
  stop_nbdkit
done

note "regions not aligned to 512 bytes: 512"
printf '1000 5000\n70000 130000\n' > "$tmp/odd.map"
start_filter file "$tmp/old.img" backupaccess-map="$tmp/odd.map" \
  backupaccess-discard=false
expect_preferred 512
stop_nbdkit

note "over the nbd plugin (memory plugin behind it)"
start_nbdkit memory size=$size
mem_sock=$sock mem_pid=$nbdkit_pid
start_filter nbd socket="$mem_sock" backupaccess-map="$tmp/g64k.map" \
  backupaccess-discard=false backupaccess-cluster=128K
expect_preferred 65536
stop_nbdkit
stop_nbdkit "$mem_pid"

note "clean=zero, 64K granules, cluster 128K: nbdcopy"
# The disk now: the old one with the dirty granules changed, one of them
# zeroed by the guest.
write_map "$tmp/dirty.map" 65536 30 3
"$PY" - "$tmp/old.img" "$tmp/new.img" "$tmp/dirty.map" <<'EOF'
import random, sys
import itlib
disk = bytearray(itlib.read_file(sys.argv[1]))
rng = random.Random(4)
for i, (s, e) in enumerate(itlib.read_map(sys.argv[3])):
    disk[s:e] = bytes(e - s) if i == 3 else rng.randbytes(e - s)
with open(sys.argv[2], "wb") as f:
    f.write(disk)
EOF
overlay=$tmp/incr.qcow2
qemu-img create -q -f qcow2 -b "$tmp/old.img" -F raw "$overlay"
cp "$tmp/new.img" "$tmp/snap.img"
start_filter file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map" \
  backupaccess-cluster=128K backupaccess-clean=zero
expect_preferred 65536
if nbdcopy --destination-is-zero --sparse=0 "$uri" \
     -- [ qemu-nbd -f qcow2 "$overlay" ] 2>"$tmp/nbdcopy.err"; then
  fail "nbdcopy with 256K requests over 64K granules succeeded"
fi
grep -q 'Operation not permitted' "$tmp/nbdcopy.err" ||
  fail "nbdcopy failed for another reason: $(cat "$tmp/nbdcopy.err")"
grep -q 'the read mixes clean and dirty bytes: read what extents report as data, in aligned requests of at most 65536 bytes, the preferred block size (nbdcopy --request-size=65536)' \
  "$nbdkit_log" || fail "no refusal that says what to change in $nbdkit_log"
echo "   256K requests: refused, with the size to use"
stop_nbdkit

# The filter discards what it read: in a copy (the file plugin punches
# holes).
cp "$tmp/new.img" "$tmp/snap.img"
qemu-img create -q -f qcow2 -b "$tmp/old.img" -F raw "$overlay"
start_filter file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map" \
  backupaccess-cluster=128K backupaccess-clean=zero
nbdcopy --destination-is-zero --sparse=0 --request-size=65536 "$uri" \
  -- [ qemu-nbd -f qcow2 "$overlay" ]
stop_nbdkit
grep -q ' 0 requests refused' "$nbdkit_log" ||
  fail "requests were refused: $(cat "$nbdkit_log")"
qemu-img compare -q -f qcow2 -F raw "$overlay" "$tmp/new.img" ||
  fail "the incremental backup on top of the old disk differs from the new one"
echo "   65536-byte requests: the overlay equals the new disk"
