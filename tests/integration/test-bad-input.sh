#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Bad input stops nbdkit at start-up: it exits non-zero within 10 s,
# prints a specific message, and serves nothing (see
# expect_startup_failure in functions.sh).  Then a good configuration
# with the same disk starts and serves, so that the failures above are
# due to the input alone.
. "$(dirname "$0")/functions.sh"

size=1048576
make_disk "$tmp/disk.img" $size 9
n=0

# bad_map MESSAGE CONTENT [EXTRA ARGS]: a map file with CONTENT (printf %b).
bad_map () {
  local msg=$1 content=$2
  shift 2
  n=$((n + 1))
  printf '%b' "$content" > "$tmp/bad$n.map"
  note "map $(printf '%q' "$content")"
  expect_startup_failure "$msg" --filter="$FILTER" file "$tmp/disk.img" \
    backupaccess-map="$tmp/bad$n.map" "$@"
}
# bad_args MESSAGE ARGS...: filter parameters.
bad_args () {
  local msg=$1
  shift
  note "$*"
  expect_startup_failure "$msg" --filter="$FILTER" file "$tmp/disk.img" "$@"
}

printf '0 4096\n' > "$tmp/good.map"

note "missing map file"
expect_startup_failure "backupaccess-map: $tmp/no-such.map: No such file or directory" \
  --filter="$FILTER" file "$tmp/disk.img" backupaccess-map="$tmp/no-such.map"
note "map is a directory"
expect_startup_failure "backupaccess-map: $tmp: read error" \
  --filter="$FILTER" file "$tmp/disk.img" backupaccess-map="$tmp"

bad_map 'line 2: offset "hello" is not an unsigned decimal number that fits in 64 bits' \
  '0 4096\nhello world\n'
bad_map 'line 3: expected "OFFSET LENGTH" or a line of "nbdinfo --map=qemu:dirty-bitmap:NAME"' \
  '0 4096\n8192 4096\n12345\n'
bad_map 'line 2: offset 0 is lower than the previous line'"'"'s offset 100000: the map must be sorted' \
  '100000 10\n0 10\n'
bad_map 'line 1: offset "-5" is not an unsigned decimal number that fits in 64 bits' \
  '-5 100\n'
bad_map 'line 1: length "-100" is not an unsigned decimal number that fits in 64 bits' \
  '5 -100\n'
bad_map 'line 1: offset "18446744073709551616" is not an unsigned decimal number that fits in 64 bits' \
  '18446744073709551616 10\n'
bad_map 'line 1: length "99999999999999999999999" is not an unsigned decimal number that fits in 64 bits' \
  '0 99999999999999999999999\n'
bad_map 'line 1: offset 18446744073709551615 + length 2 overflows' \
  '18446744073709551615 2\n'
bad_map 'line 1: offset 9223372036854775808 + length 9223372036854775808 overflows' \
  '9223372036854775808 9223372036854775808\n'
bad_map 'line 1: offset "0x10" is not an unsigned decimal number' '0x10 10\n'
bad_map 'line 1: region has length 0' '0 0\n'
bad_map 'line 2: mixes plain "OFFSET LENGTH" lines with nbdinfo --map lines' \
  '0 10\n20 10 1 dirty\n'
bad_map 'line 2: clean region at 5 overlaps a dirty region that ends at 10' \
  '0 10 1 dirty\n5 10 0 clean\n'
bad_map 'line 2: the map contains a NUL byte' '0 10\n20\0 30\n'
bad_map "backupaccess-map: $tmp/bad$((n + 1)).map: dirty region [1000000, 1100000) ends past the end of the disk (size $size)" \
  '0 4096\n1000000 100000\n'
bad_map "dirty region [1048575, 1048577) ends past the end of the disk (size $size)" \
  '1048575 2\n'

note "a base:allocation map given by mistake (nbdinfo --map of the disk)"
cp "$tmp/disk.img" "$tmp/sparse.img"
truncate -s $((2 * size)) "$tmp/sparse.img"     # data, then a hole
start_nbdkit file "$tmp/sparse.img"
nbdinfo --map "$uri" > "$tmp/base.map"
stop_nbdkit
cat "$tmp/base.map"
grep -qw data "$tmp/base.map" && grep -qw hole,zero "$tmp/base.map" ||
  fail "unexpected nbdinfo --map output"
expect_startup_failure 'line 1: description "data" with type 0 (expected "clean"): is this a map of qemu:dirty-bitmap:NAME? A base:allocation map cannot be used' \
  --filter="$FILTER" file "$tmp/disk.img" backupaccess-map="$tmp/base.map"
tail -n 1 "$tmp/base.map" > "$tmp/base2.map"
expect_startup_failure 'line 1: description "hole,zero" with type 3 (expected "dirty")' \
  --filter="$FILTER" file "$tmp/sparse.img" backupaccess-map="$tmp/base2.map"

bad_args 'backupaccess-cluster=3000: the cluster size must be a power of two between 512 and 1G' \
  backupaccess-cluster=3000
bad_args 'backupaccess-cluster=0: the cluster size must be a power of two between 512 and 1G' \
  backupaccess-cluster=0
bad_args 'backupaccess-cluster=256: the cluster size must be a power of two' \
  backupaccess-cluster=256
bad_args 'backupaccess-cluster=2G: the cluster size must be a power of two' \
  backupaccess-cluster=2G
bad_args 'could not parse size string (lots)' backupaccess-cluster=lots
bad_args 'backupaccess-map given more than once' \
  backupaccess-map="$tmp/good.map" backupaccess-map="$tmp/good.map"
bad_args 'backupaccess-cluster given more than once' \
  backupaccess-cluster=65536 backupaccess-cluster=65536
bad_args 'backupaccess-discard given more than once' \
  backupaccess-discard=true backupaccess-discard=false
bad_args 'backupaccess-clean given more than once' \
  backupaccess-clean=hole backupaccess-clean=zero
bad_args 'backupaccess-clean=maybe: expected "hole" or "zero"' backupaccess-clean=maybe
bad_args 'could not decipher boolean (perhaps)' backupaccess-discard=perhaps
bad_args 'could not decipher boolean (often)' backupaccess-discard-clean=often
bad_args 'backupaccess-discard-clean given more than once' \
  backupaccess-discard-clean=true backupaccess-discard-clean=true
bad_args 'backupaccess-trim-batch=2G: at most 1G' backupaccess-trim-batch=2G
bad_args 'backupaccess-discard-lag=1025M: at most 1G' backupaccess-discard-lag=1025M
bad_args 'could not parse size string (much)' backupaccess-trim-batch=much
bad_args 'backupaccess-trim-batch given more than once' \
  backupaccess-trim-batch=1M backupaccess-trim-batch=2M
bad_args 'backupaccess-discard-lag given more than once' \
  backupaccess-discard-lag=1M backupaccess-discard-lag=1M
bad_args 'backupaccess-status given more than once' \
  backupaccess-status="$tmp/s.json" backupaccess-status="$tmp/s.json"
bad_args 'unknown parameter backupaccess-frobnicate' backupaccess-frobnicate=1
bad_args 'cannot convert null or empty path to an absolute path' backupaccess-map=
bad_args 'backupaccess-map and backupaccess-bitmap both name the dirty regions' \
  backupaccess-map="$tmp/good.map" backupaccess-bitmap=b
bad_args 'backupaccess-uri is where backupaccess-bitmap is read from, but no backupaccess-bitmap was given' \
  backupaccess-uri=nbd+unix:///?socket=/nonexistent
bad_args 'backupaccess-bitmap: no place to read it from' backupaccess-bitmap=b
# The snapshotaccess plugin's cluster= and the filter's must agree (checked
# before the plugin connects anywhere).
note "backupaccess-cluster=64K with the plugin's cluster=128K"
expect_startup_failure 'backupaccess-cluster=65536 and the plugin'"'"'s cluster=131072 differ: both are QEMU'"'"'s copy-before-write cluster size' \
  --filter="$FILTER" "$TOP/nbdkit-snapshotaccess-plugin.so" socket="$tmp/no-such.sock" cluster=128K \
  backupaccess-cluster=64K

# The plugin's own parameters (checked before it connects anywhere).
bad_plugin_args () {
  local msg=$1
  shift
  note "plugin $*"
  expect_startup_failure "$msg" "$TOP/nbdkit-snapshotaccess-plugin.so" \
    socket="$tmp/no-qemu.sock" export=x "$@"
}
bad_plugin_args 'request-size=3000: must be a power of two between 4K and 32M' \
  request-size=3000
bad_plugin_args 'request-size=2K: must be a power of two between 4K and 32M' \
  request-size=2K
bad_plugin_args 'request-size=64M: must be a power of two between 4K and 32M' \
  request-size=64M
bad_plugin_args 'connections=0: must be between 1 and 64' connections=0
bad_plugin_args 'connections=65: must be between 1 and 64' connections=65
bad_plugin_args "cannot connect to $tmp/no-qemu.sock" request-size=64K

note "the same disk with a good map starts and serves"
start_filter file "$tmp/disk.img" backupaccess-map="$tmp/good.map" \
  backupaccess-cluster=64K backupaccess-discard=false backupaccess-clean=zero
[ "$(nbdinfo --size "$uri")" = $size ] || fail "the good configuration does not serve"
stop_nbdkit
