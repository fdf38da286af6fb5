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

#endif /* BACKUPACCESS_HELPER_RUN_H */
