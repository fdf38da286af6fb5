# SPDX-License-Identifier: BSD-3-Clause
# Helpers for the integration tests, sourced by tests/integration/test-*.sh.
#
#   . "$(dirname "$0")/functions.sh"
#
# Sets up a temporary directory $tmp (removed at exit) and an EXIT trap
# that stops every nbdkit started with start_nbdkit, even when the test
# fails.  Exit codes follow tests/run-tests: 0 pass, 77 skip, else fail.
#
# Variables after sourcing:
#   TOP     the repository (from the runner, or found from this file)
#   FILTER  the built filter, $TOP/nbdkit-backupaccess-filter.so
#   PY      /usr/bin/python3 (the one with the nbd module)
#   tmp     the per-test temporary directory
# After start_nbdkit:
#   sock, uri, nbdkit_pid, nbdkit_log   of the server just started
#
# Python helpers (log parsing, region arithmetic, disks) live in
# itlib.py beside this file; PYTHONPATH points at it.

set -euo pipefail
export PATH=${BACKUPACCESS_TEST_BIN:+$BACKUPACCESS_TEST_BIN:}/usr/bin:$PATH

if [ -z "${TOP:-}" ]; then
  TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
fi
export TOP
FILTER=$TOP/nbdkit-backupaccess-filter.so
PY=/usr/bin/python3
export PYTHONPATH=$TOP/tests/integration${PYTHONPATH:+:$PYTHONPATH}
export PYTHONDONTWRITEBYTECODE=1
test_name=$(basename "$0")

skip () { echo "$test_name: SKIP: $*"; exit 77; }
fail () { echo "$test_name: FAIL: $*" >&2; exit 1; }
note () { echo "== $test_name: $*"; }

for prog in nbdkit nbdinfo nbdcopy timeout cmp; do
  command -v "$prog" >/dev/null || skip "$prog is not installed"
done
[ -x "$PY" ] && "$PY" -c 'import nbd' 2>/dev/null ||
  skip "$PY with the nbd module (python3-libnbd) is not installed"
[ -f "$FILTER" ] || skip "$FILTER is not built (run make all)"

tmp=$(mktemp -d /tmp/backupaccess-it.XXXXXX)
nbdkit_pids=()
nbdkit_count=0

_cleanup () {
  local rc=$? p
  trap - EXIT
  set +e
  for p in "${nbdkit_pids[@]}"; do
    kill "$p" 2>/dev/null
  done
  for p in "${nbdkit_pids[@]}"; do
    wait "$p" 2>/dev/null
  done
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 77 ] && [ -n "${nbdkit_log:-}" ] &&
     [ -f "$nbdkit_log" ]; then
    echo "--- last nbdkit stderr ($nbdkit_log):"
    tail -n 30 "$nbdkit_log"
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap _cleanup EXIT
trap 'exit 130' INT      # so that the EXIT trap runs on signals too
trap 'exit 143' TERM

# start_nbdkit [NBDKIT ARGS...]
# Runs "nbdkit -f -U SOCK ARGS..." in the background, with its stderr in
# $tmp/nbdkit-N.log, and waits (at most ~10 s) until it listens.  Fails
# the test when it exits or does not listen in time.  Each call gets its
# own socket and log; sets sock, uri, nbdkit_pid, nbdkit_log.
start_nbdkit () {
  nbdkit_count=$((nbdkit_count + 1))
  sock=$tmp/sock-$nbdkit_count
  uri="nbd+unix:///?socket=$sock"
  nbdkit_log=$tmp/nbdkit-$nbdkit_count.log
  nbdkit -f -U "$sock" "$@" </dev/null 2>"$nbdkit_log" &
  nbdkit_pid=$!
  nbdkit_pids+=("$nbdkit_pid")
  local i
  for ((i = 0; i < 100; i++)); do
    if ! kill -0 "$nbdkit_pid" 2>/dev/null; then
      cat "$nbdkit_log" >&2
      fail "nbdkit $* exited at start-up"
    fi
    [ -S "$sock" ] && return 0
    sleep 0.1
  done
  cat "$nbdkit_log" >&2
  fail "nbdkit $* did not listen on $sock within 10 s"
}

# start_filter [ARGS...]: start_nbdkit with the filter on top.
start_filter () {
  start_nbdkit --filter="$FILTER" "$@"
}

# start_filter_unbatched [ARGS...]: the filter trimming after every read
# (no batch), so that a test can check the trims each read causes.
start_filter_unbatched () {
  start_filter "$@" backupaccess-trim-batch=0
}

# stop_nbdkit [PID]: SIGTERM and wait, so that .unload (the summary
# line) has run.  Default: the last one started.  Fails the test when
# nbdkit does not exit within ~10 s or exits with a failure.
stop_nbdkit () {
  local pid=${1:-$nbdkit_pid} i rc=0 p rest=()
  kill "$pid" 2>/dev/null || :
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -0 "$pid" 2>/dev/null && { kill -9 "$pid"; fail "nbdkit $pid ignored SIGTERM"; }
  wait "$pid" || rc=$?
  for p in "${nbdkit_pids[@]}"; do [ "$p" = "$pid" ] || rest+=("$p"); done
  nbdkit_pids=("${rest[@]+"${rest[@]}"}")
  [ "$rc" -eq 0 ] || fail "nbdkit $pid exited with status $rc after SIGTERM"
}

# expect_startup_failure MESSAGE [NBDKIT ARGS...]
# nbdkit must refuse to start: exit non-zero within 10 s, print MESSAGE
# (a fixed string) on stderr, and serve nothing.
expect_startup_failure () {
  local msg=$1 rc=0
  shift
  nbdkit_count=$((nbdkit_count + 1))
  local bsock=$tmp/bad-$nbdkit_count.sock blog=$tmp/bad-$nbdkit_count.log
  timeout -k 2 10 nbdkit -f -U "$bsock" "$@" </dev/null 2>"$blog" || rc=$?
  if [ "$rc" -eq 0 ]; then
    cat "$blog" >&2; fail "nbdkit $* exited with status 0"
  fi
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    cat "$blog" >&2; fail "nbdkit $* kept running (served) instead of failing"
  fi
  if ! grep -qF -- "$msg" "$blog"; then
    cat "$blog" >&2; fail "nbdkit $* failed (status $rc) without the message: $msg"
  fi
  # Nothing may be served on its socket.
  if [ -S "$bsock" ] &&
     nbdinfo --size "nbd+unix:///?socket=$bsock" >/dev/null 2>&1; then
    fail "nbdkit $*: something still serves $bsock"
  fi
  echo "   ok (status $rc): $(grep -F -- "$msg" "$blog" | head -n 1)"
}

# make_disk FILE SIZE SEED: FILE of SIZE deterministic random bytes.
make_disk () {
  "$PY" -c 'import itlib, sys; itlib.make_disk(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))' \
    "$1" "$2" "$3"
}

# summary_line LOG: the filter's summary line in an nbdkit stderr log.
summary_line () {
  grep -F 'nbdkit: backupaccess: summary:' "$1" ||
    fail "no summary line in $1"
}

# assert_grep PATTERN FILE: fixed-string grep that fails the test.
assert_grep () {
  grep -qF -- "$1" "$2" || { cat "$2" >&2; fail "\"$1\" not found in $2"; }
}
assert_not_grep () {
  if grep -F -- "$1" "$2" >&2; then fail "\"$1\" unexpectedly found in $2"; fi
}
