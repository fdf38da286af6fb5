/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices as printed, and status. */
#ifndef BACKUPACCESS_HELPER_STATUS_H
#define BACKUPACCESS_HELPER_STATUS_H

#include <json.h>

#include "state.h"

/* The devices as setup, serve and run print them. */
json_object *describe (const struct helper_state *st);

/* status: prints the counters of each device. */
void print_status (const struct helper_state *st);

#endif /* BACKUPACCESS_HELPER_STATUS_H */
