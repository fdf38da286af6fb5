/* SPDX-License-Identifier: BSD-3-Clause */
/* teardown, and the roll-back of a setup that failed. */
#ifndef BACKUPACCESS_HELPER_TEARDOWN_H
#define BACKUPACCESS_HELPER_TEARDOWN_H

#include <stdbool.h>

void do_teardown (bool success);
void roll_back (void);

#endif /* BACKUPACCESS_HELPER_TEARDOWN_H */
