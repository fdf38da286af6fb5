/* SPDX-License-Identifier: BSD-3-Clause */
/* QMP operations of the helper, over lib/qmp.c. */
#ifndef BACKUPACCESS_HELPER_QMPOPS_H
#define BACKUPACCESS_HELPER_QMPOPS_H

#include <stdbool.h>
#include <stdint.h>

#include <json.h>

#include "qmp.h"

extern struct ba_qmp *qmp;

int qmp_timeout_ms (void);
void qmp_open (const char *path);
json_object *qmp_run (bool ok_errors, const char *cmd, json_object *args);
json_object *qmp_list (const char *cmd, json_object *args);

/* Builds a JSON object from "key", json_object* pairs, ended by END (a
 * typed null: a bare NULL in a variadic list need not be a pointer).
 */
#define END ((const char *) NULL)
json_object *obj (const char *key, ...);
#define S(x) json_object_new_string (x)

json_object *find_node (json_object *nodes, const char *name);
bool node_has_bitmap (json_object *nodes, const char *node,
                      const char *bitmap);
json_object *named_nodes (void);
int64_t node_image_int (json_object *node, const char *key);
void wait_gone (const char *query, const char *key, const char *value);
char *resolve_device (const char *dev);

#endif /* BACKUPACCESS_HELPER_QMPOPS_H */
