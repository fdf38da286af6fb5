#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# make bench: what the filter costs, as ratios within one run (the
# machines are shared and noisy; absolute times mean little).
#  1. nbdcopy throughput over nbdkit's memory plugin, with and without
#     the filter, 1 and 4 connections, rounds interleaved, medians.
#     nbdcopy runs with --no-extents so that it reads every byte (an
#     empty memory disk would otherwise be skipped as zeroes); the
#     reads are cheap, which makes the filter's share look its largest.
#  2. The filter's state for a 1 TiB disk in several read orders.
#  3. bench-qemu.py: the QEMU path (direct, nbd plugin, nbd plugin +
#     filter, our plugin, our plugin + filter) at 256K, 1M and 4M
#     requests, on QEMU 7.2 and 10.0.2, a fresh QEMU for every copy; an
#     incremental backup; the fleecing image's peak, discard on and off.
#     BENCH_ROUNDS sets the rounds of the throughput parts.
#  4. bench-mount.py: the file-handle path, dd bs=4M iflag=direct of a
#     mounted file: backupaccess-mount against nbdfuse straight on QEMU's
#     export, on QEMU 7.2 and 10.0.2, a fresh QEMU for every copy.
#  5. bench-scale.py: a 16 TiB export with 1,000,000 dirty extents:
#     nbdkit start to first byte, and its resident memory.
#  6. bench-copy.py: the built-in copy (backupaccess-copy) against
#     nbdcopy straight from QEMU, same request size and destination, on
#     QEMU 7.2 and 10.0.2, a fresh QEMU for every copy.
set -euo pipefail
export PATH=/usr/bin:$PATH
top=$(cd "$(dirname "$0")/.." && pwd)
filter=$top/nbdkit-backupaccess-filter.so
size=${BENCH_SIZE:-4G}
rounds=${BENCH_ROUNDS:-5}
tmp=$(mktemp -d /tmp/backupaccess-bench.XXXXXX)
pid=
cleanup () {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || :; wait "$pid" 2>/dev/null || :; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# Prints the seconds one nbdcopy takes through a fresh nbdkit.
measure () {
  local conns=$1 mode=$2 t0 t1
  local -a pre=() post=()
  case $mode in
    plain) ;;
    filter) pre=(--filter="$filter") ;;
    nodiscard) pre=(--filter="$filter"); post=(backupaccess-discard=false) ;;
  esac
  rm -f "$tmp/sock"
  nbdkit -f -U "$tmp/sock" "${pre[@]}" memory size="$size" "${post[@]}" \
    2>>"$tmp/nbdkit.log" &
  pid=$!
  for _ in $(seq 200); do [ -S "$tmp/sock" ] && break; sleep 0.05; done
  t0=$(date +%s.%N)
  nbdcopy --no-extents --connections="$conns" \
    "nbd+unix:///?socket=$tmp/sock" null:
  t1=$(date +%s.%N)
  kill "$pid"; wait "$pid" || :; pid=
  echo "$t1 - $t0" | bc -l
}

median () { tr ' ' '\n' | grep . | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

declare -A times
modes=(plain filter nodiscard)
for conns in 1 4; do
  for _ in $(seq "$rounds"); do
    for m in "${modes[@]}"; do
      times[$m,$conns]+="$(measure "$conns" "$m") "
    done
  done
done

echo "nbdcopy of a $size memory disk to null:, median of $rounds interleaved rounds ($(nproc) cores)"
echo "| path | 1 connection | share of plain | 4 connections | share of plain |"
echo "|---|---|---|---|---|"
declare -A label=([plain]="nbdkit memory, no filter"
                  [filter]="with the filter (discard on)"
                  [nodiscard]="with the filter, backupaccess-discard=false")
for m in "${modes[@]}"; do
  row="| ${label[$m]} |"
  for conns in 1 4; do
    t=$(echo "${times[$m,$conns]}" | median)
    p=$(echo "${times[plain,$conns]}" | median)
    row+=$(printf ' %.3f s | %.1f%% |' "$t" "$(echo "100 * $p / $t" | bc -l)")
  done
  echo "$row"
done
grep 'backupaccess: summary' "$tmp/nbdkit.log" | tail -n 1 |
  sed 's/^nbdkit: backupaccess: summary: /last filtered run: /'
echo
"$top/bench/coverage-memory"
echo
"$top/bench/bench-qemu.py"
echo
"$top/bench/bench-mount.py"
echo
"$top/bench/bench-scale.py"
echo
"$top/bench/bench-copy.py"
