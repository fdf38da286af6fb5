/* SPDX-License-Identifier: BSD-3-Clause */
/* setup. */
#ifndef BACKUPACCESS_HELPER_SETUP_H
#define BACKUPACCESS_HELPER_SETUP_H

#include "options.h"

void do_setup (struct opts *o);

#endif /* BACKUPACCESS_HELPER_SETUP_H */
