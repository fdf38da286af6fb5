/* SPDX-License-Identifier: BSD-3-Clause */
/* run: setup or serve, a command, teardown. */
#ifndef BACKUPACCESS_HELPER_RUN_H
#define BACKUPACCESS_HELPER_RUN_H

#include <sys/types.h>

#include "options.h"

/* The caller's umask, given back to COMMAND. */
extern mode_t caller_umask;

int do_run (struct opts *o, char **cmd);

#endif /* BACKUPACCESS_HELPER_RUN_H */
