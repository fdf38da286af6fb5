/* SPDX-License-Identifier: BSD-3-Clause */
/* serve: nbdkit with the backupaccess filter and the snapshotaccess
 * plugin per device.
 */
#ifndef BACKUPACCESS_HELPER_SERVE_H
#define BACKUPACCESS_HELPER_SERVE_H

#include "options.h"
#include "state.h"

/* The state serve works on: that of a setup in the run directory, or
 * without one, with --nbd-path, a new one for the exports there (no
 * QEMU backend: not ours to undo), saved.  Dies if there is none, or
 * one already.
 */
struct helper_state *do_serve_state (struct opts *o);

/* Starts an nbdkit for every device of st that has none running, each
 * recorded first, and records its URI.
 */
void serve_devices (struct helper_state *st, const struct serve_opts *so);

/* The path of a program or module of the project (the filter, the
 * plugin, the copy or mount program): the file named by the environment
 * variable env, else file beside the helper or in its parent (the build
 * tree), else installed (found by nbdkit, or in PATH).
 */
char *module_path (const char *env, const char *file, const char *installed);

/* Stops device d's nbdkit if st records one, after printing what its
 * log says (the filter's summary, the last errors); recorded when done.
 */
void serve_stop (struct helper_state *st, struct device_state *d);

#endif /* BACKUPACCESS_HELPER_SERVE_H */
