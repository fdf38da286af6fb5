#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# Runs each libFuzzer target (tests/fuzz/fuzz_*, built by make fuzz) for
# a bounded time from its seed corpus (tests/fuzz/corpus/NAME, read
# only: new inputs go to a temporary directory).  A crash, a sanitizer
# report or a failed property fails the test; the input is kept in
# ${TMPDIR:-/tmp}/backupaccess-fuzz-crashes and printed in hex.
#   FUZZ_SECONDS   per target (default 10; make fuzz-long: 600)
#   FUZZ_RUNS      at most this many executions per target (default 2000000)
#   FUZZ_TARGETS   names to run (default all), e.g. "coverage qmp"
set -u
cd "${TOP:-$(dirname "$0")/../..}"
secs=${FUZZ_SECONDS:-10}
runs=${FUZZ_RUNS:-2000000}

if [ -n "${BACKUPACCESS_SAN:-}" ]; then
  echo "under make check-$BACKUPACCESS_SAN: the fuzzers carry their own ASan and UBSan (make check runs them)"
  exit 77
fi
if ! command -v clang >/dev/null; then
  echo "clang is not installed (make deps)"
  exit 77
fi
# Up to date after make check; else built here.
make -s fuzz >/dev/null || { echo "make fuzz failed"; exit 1; }

tmp=$(mktemp -d /tmp/backupaccess-fuzz.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
keep=${TMPDIR:-/tmp}/backupaccess-fuzz-crashes
failed=0

if [ -n "${FUZZ_TARGETS:-}" ]; then
  names=$FUZZ_TARGETS
else
  names=$(for f in tests/fuzz/fuzz_*.c; do f=${f%.c}; echo "${f#tests/fuzz/fuzz_}"; done)
fi
for name in $names; do
  bin=tests/fuzz/fuzz_$name
  dict=
  [ -f "tests/fuzz/$name.dict" ] && dict=-dict=tests/fuzz/$name.dict
  mkdir -p "$tmp/$name"
  start=$SECONDS
  # timeout only against a hang of libFuzzer itself.
  timeout -k 10 $((secs * 2 + 120)) "$bin" $dict \
    -max_total_time="$secs" -runs="$runs" -timeout=60 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$tmp/$name-" \
    "$tmp/$name" "tests/fuzz/corpus/$name" >"$tmp/$name.log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$tmp/$name.log")
  corpus=$(ls "tests/fuzz/corpus/$name" "$tmp/$name" | grep -vc '^$\|:$')
  if [ $rc -eq 0 ]; then
    echo "fuzz_$name: ${execs:-?} executions in $((SECONDS - start)) s," \
         "corpus $corpus inputs: ok"
    continue
  fi
  failed=1
  echo "fuzz_$name: FAILED (exit $rc) after $((SECONDS - start)) s:"
  grep -E 'property failed|ERROR|SUMMARY|Assertion|runtime error' \
    "$tmp/$name.log" | head -n 20 | sed 's/^/  /'
  mkdir -p "$keep"
  for a in "$tmp/$name"-*; do
    [ -f "$a" ] || continue
    cp "$a" "$keep/"
    echo "  input kept as $keep/$(basename "$a"); rerun: $bin $keep/$(basename "$a")"
    od -A d -t x1 "$a" | head -n 20 | sed 's/^/  | /'
  done
done
exit $failed
