/* SPDX-License-Identifier: BSD-3-Clause */
/* run: setup or serve, a command, teardown. */
#ifndef BACKUPACCESS_HELPER_RUN_H
#define BACKUPACCESS_HELPER_RUN_H

#include <sys/types.h>

#include "options.h"

/* The caller's umask, given back to COMMAND. */
extern mode_t caller_umask;

/* setup (with --qmp) or serve, then cmd with the devices in its
 * environment, then teardown, with success only if cmd exited 0;
 * SIGINT and SIGTERM are passed on to cmd and end in a teardown with
 * failure.  Returns cmd's exit status (128 + a signal).
 */
int do_run (struct opts *o, char **cmd);

/* run --copy-into: checks every FILE first (nothing set up on bad
 * input), then setup (with --qmp) or serve's state (--nbd-path), then
 * backupaccess-copy per device straight from QEMU's export, one after
 * the other, then teardown with success only if every copy exited 0.
 * Returns the exit status of the first copy that failed (128 + a
 * signal), or 0.
 */
int do_run_copy (struct opts *o);

#endif /* BACKUPACCESS_HELPER_RUN_H */
