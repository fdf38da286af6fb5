#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# The summary line printed at unload (SIGTERM): exactly one line, only
# at exit, with the bytes and requests read, the bytes and trims
# discarded, trim errors, refused requests and the readable bytes left.
#  1. A known sequence of reads (some refused).
#  2. No client at all.
#  3. A plugin whose trims fail (error filter below the filter): the
#     read still succeeds, the failure is logged and counted, the cluster
#     is not readable any more.
. "$(dirname "$0")/functions.sh"

size=1048576
make_disk "$tmp/src.img" $size 10
# 135000 dirty bytes: [1000, 6000) [70000, 200000)
printf '1000 5000\n70000 130000\n' > "$tmp/dirty.map"

expect_summary () {   # expect_summary LOG TEXT
  local line
  line=$(summary_line "$1")
  [ "$(grep -cF 'backupaccess: summary:' "$1")" = 1 ] || fail "more than one summary line"
  case "$line" in
    *"summary: $2"*) echo "   $line" ;;
    *) fail "summary line: $line
expected:     nbdkit: backupaccess: summary: $2" ;;
  esac
}

note "a known sequence of reads"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter_unbatched file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map"
"$PY" - "$sock" <<'EOF'
import sys
import itlib
def main():
    h = itlib.connect(sys.argv[1])
    h.pread(5000, 1000)                   # cluster 0 complete: 1 trim
    h.pread(10000, 70000)
    h.pread(1, 199999)
    itlib.expect_error(lambda: h.pread(10, 0))       # clean
    itlib.expect_error(lambda: h.pread(10, 1000))    # discarded
    itlib.expect_error(lambda: h.pread(1, 200000))   # clean
    h.trim(200000, 0)                     # client trim of all: discards
    h.shutdown()                          # clusters 1-3
itlib.run(main)
EOF
if grep -F 'backupaccess: summary:' "$nbdkit_log"; then
  fail "summary printed before nbdkit exits"
fi
stop_nbdkit
# Reads: 5000 + 10000 + 1 bytes.  Trims: [0, 64K) after the first read,
# then [64K, 256K) after the client trim: 4 clusters in 2 trims.
expect_summary "$nbdkit_log" "15001 bytes read in 3 reads, 262144 bytes discarded in 2 trims, 0 trim errors, 3 requests refused, 0 of 135000 readable bytes left"

note "no client"
start_filter_unbatched file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map"
stop_nbdkit
expect_summary "$nbdkit_log" "0 bytes read in 0 reads, 0 bytes discarded in 0 trims, 0 trim errors, 0 requests refused, 135000 of 135000 readable bytes left"

note "trims fail in the plugin"
cp "$tmp/src.img" "$tmp/snap.img"
start_filter_unbatched --filter=error file "$tmp/snap.img" backupaccess-map="$tmp/dirty.map" \
  error-trim=EIO error-trim-rate=1
"$PY" - "$sock" "$tmp/src.img" <<'EOF'
import sys
import itlib
def main():
    disk = itlib.read_file(sys.argv[2])
    h = itlib.connect(sys.argv[1])
    itlib.check(h.pread(5000, 1000) == disk[1000:6000],
                "the read that completed cluster 0 failed or is wrong")
    itlib.expect_error(lambda: h.pread(10, 1000), "EPERM", "re-read")
    h.shutdown()
itlib.run(main)
EOF
stop_nbdkit
assert_grep "backupaccess: discarding [0, +65536) upstream failed: Input/output error" "$nbdkit_log"
expect_summary "$nbdkit_log" "5000 bytes read in 1 reads, 0 bytes discarded in 0 trims, 1 trim errors, 1 requests refused, 130000 of 135000 readable bytes left"
