/* SPDX-License-Identifier: BSD-3-Clause */
/* teardown, and the roll-back of a setup that failed. */
#ifndef BACKUPACCESS_HELPER_TEARDOWN_H
#define BACKUPACCESS_HELPER_TEARDOWN_H

#include <stdbool.h>

/* Undoes what the run directory's state records (from a whole or a
 * partial setup, or serve), then removes the run directory.  With
 * success, the bitmap may forget what this backup holds.  Exits 1 when
 * QEMU is gone (after cleaning up what is local).  False if there was
 * nothing to tear down: no run directory (or it went while another
 * helper held it), or no state in it.
 */
bool do_teardown (bool success);

/* do_teardown (false), for on_die. */
void roll_back (void);

#endif /* BACKUPACCESS_HELPER_TEARDOWN_H */
