#!/usr/bin/env bash
# No shell anywhere: the C sources start programs with an argv only
# (fork + execvp), never through system(3), popen(3), an exec of a shell
# or "sh -c"; the vzdump hook never evals, never uses backquotes, and
# its one "sh -c" (the operator's BACKUPACCESS_CONSUMER) takes the
# command and the exit file as arguments, not pasted into the script.
set -u
cd "$(dirname "$0")/../.."
fail=0

hits=$(grep -nE '\b(system|popen|execl|execlp|execle|posix_spawnp?)[[:space:]]*\(|"/bin/(ba)?sh"|"sh"[[:space:]]*,[[:space:]]*"-c"' \
         helper/*.c lib/*.c filter/*.c plugin/*.c)
if [ -n "$hits" ]; then
  echo "FAIL: a shell, or a call that can run one, in the C sources:"
  echo "$hits"
  fail=1
fi

hook=contrib/vzdump-hook
hits=$(grep -nE '(^|[^[:alnum:]_])eval([^[:alnum:]_]|$)|`' "$hook" | grep -v '^[0-9]*:#')
if [ -n "$hits" ]; then
  echo "FAIL: eval or backquotes in $hook:"
  echo "$hits"
  fail=1
fi
# Every sh -c gets its script in single quotes, the data as "$@".
hits=$(grep -nE 'sh -c' "$hook" | grep -v '^[0-9]*:#' |
         grep -vE "sh -c '[^'\$]*(\"\\\$[0-9]\"[^'\$]*|\\\$\?[^'\$]*)*'")
if [ -n "$hits" ]; then
  echo "FAIL: sh -c with something other than a fixed script in $hook:"
  echo "$hits"
  fail=1
fi
# The hook runs with pattern expansion off.
grep -qE '^set -[a-z]*f' "$hook" || { echo "FAIL: $hook: no set -f"; fail=1; }

[ $fail = 0 ] && echo ok
exit $fail
