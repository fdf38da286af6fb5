/* SPDX-License-Identifier: BSD-3-Clause */
/* mount: nbdfuse per served device. */
#ifndef BACKUPACCESS_HELPER_MOUNT_H
#define BACKUPACCESS_HELPER_MOUNT_H

#include <stdbool.h>

#include <json.h>

#include "state.h"

void mount_devices (struct helper_state *st, json_object *out);
bool is_mounted (const char *dir);

#endif /* BACKUPACCESS_HELPER_MOUNT_H */
