/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices as printed, and status. */
#ifndef BACKUPACCESS_HELPER_STATUS_H
#define BACKUPACCESS_HELPER_STATUS_H

#include <json.h>

json_object *describe (void);
void status_command (void);

#endif /* BACKUPACCESS_HELPER_STATUS_H */
