#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
# No shell anywhere: the C sources start programs with an argv only
# (fork + execvp), never through system(3), popen(3), an exec of a shell
# or "sh -c"; the Proxmox VE backup provider starts its programs from
# argument lists only (its file consumer is a program, not a command
# line).
set -u
cd "$(dirname "$0")/../.."
fail=0

hits=$(grep -nE '\b(system|popen|execl|execlp|execle|posix_spawnp?)[[:space:]]*\(|"/bin/(ba)?sh"|"sh"[[:space:]]*,[[:space:]]*"-c"' \
         helper/*.c lib/*.c filter/*.c plugin/*.c copy/*.c)
if [ -n "$hits" ]; then
  echo "FAIL: a shell, or a call that can run one, in the C sources:"
  echo "$hits"
  fail=1
fi

# The backup provider (Perl) starts programs with a list only: no
# system, backquotes, qx, pipe opens, and exec only as exec { PROGRAM } LIST.
hits=$(grep -rnE '\bsystem[[:space:]]*\(|`|\bqx[[:punct:]]|open[[:space:]]*\([^)]*["'"'"']\|?-\|?["'"'"']|\bexec[[:space:]]+[^{[:space:]]' \
         provider/lib | grep -vE '^[^:]+:[0-9]+:[[:space:]]*#')
if [ -n "$hits" ]; then
  echo "FAIL: a way to run a shell in the backup provider:"
  echo "$hits"
  fail=1
fi

[ $fail = 0 ] && echo ok
exit $fail
