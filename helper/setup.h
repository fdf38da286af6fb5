/* SPDX-License-Identifier: BSD-3-Clause */
/* setup. */
#ifndef BACKUPACCESS_HELPER_SETUP_H
#define BACKUPACCESS_HELPER_SETUP_H

#include "options.h"
#include "state.h"

/* Checks the options and QEMU, then sets up snapshot access and QEMU's
 * exports, each step recorded first; returns the state.  Dies on error,
 * after undoing what was set up.
 */
struct helper_state *do_setup (struct opts *o);

#endif /* BACKUPACCESS_HELPER_SETUP_H */
