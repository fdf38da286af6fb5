/* SPDX-License-Identifier: BSD-3-Clause */
/* The state file, DIR/state.json. */
#ifndef BACKUPACCESS_HELPER_STATE_H
#define BACKUPACCESS_HELPER_STATE_H

#include <stdbool.h>

#include <json.h>

extern json_object *state;

char *state_path (void);
void save_state (void);
bool load_state (void);
json_object *devices (void);

#endif /* BACKUPACCESS_HELPER_STATE_H */
