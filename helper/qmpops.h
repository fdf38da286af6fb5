/* SPDX-License-Identifier: BSD-3-Clause */
/* QMP operations of the helper, over lib/qmp.c: one connection to
 * QEMU, commands, their JSON arguments, and the queries of block nodes,
 * bitmaps, exports and jobs the helper makes.  Errors die with "QMP
 * COMMAND: what QEMU said" unless said otherwise.
 */
#ifndef BACKUPACCESS_HELPER_QMPOPS_H
#define BACKUPACCESS_HELPER_QMPOPS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json.h>

/* Connects to QEMU's QMP socket (timeout: BACKUPACCESS_QMP_TIMEOUT
 * seconds, default 60); dies if it cannot.
 */
void qmp_open (const char *path);

/* The same unless connected already (a roll-back keeps the connection
 * of the setup it undoes); -1 with the reason in err and errno
 * (ENOENT or ECONNREFUSED: nothing listens, QEMU is gone) if it cannot.
 */
int qmp_connect (const char *path, char *err, size_t errlen);

bool qmp_is_open (void);
void qmp_close (void);

/* Runs a command and returns its answer (json_object_put it); args is
 * consumed.  With ok_errors, QEMU's refusal is a warning and NULL.
 */
json_object *qmp_run (bool ok_errors, const char *cmd, json_object *args);

/* The same, NULL without a word if QEMU refuses. */
json_object *qmp_try (const char *cmd, json_object *args);

/* The same, with QEMU's refusal in err. */
json_object *qmp_call (const char *cmd, json_object *args, char *err,
                       size_t errlen);

/* qmp_run for a command that returns a list; anything else dies. */
json_object *qmp_list (const char *cmd, json_object *args);

/* Builds a JSON object from "key", json_object* pairs, ended by END (a
 * typed null: a bare NULL in a variadic list need not be a pointer).
 */
#define END ((const char *) NULL)
json_object *obj (const char *key, ...);
#define S(x) json_object_new_string (x)

/* query-named-block-nodes (flat). */
json_object *named_nodes (void);
/* The node of that name in named_nodes' list, or NULL. */
json_object *find_node (json_object *nodes, const char *name);
/* A dirty bitmap of a node of named_nodes' list, or NULL. */
json_object *find_bitmap (json_object *nodes, const char *node,
                          const char *bitmap);
/* Whether a node of named_nodes' list has that dirty bitmap. */
bool node_has_bitmap (json_object *nodes, const char *node,
                      const char *bitmap);
/* An integer of a node's "image" (virtual-size, cluster-size,
 * actual-size), -1 if none.
 */
int64_t node_image_int (json_object *node, const char *key);

/* Waits until query's list has no entry whose key is value (an export
 * or job going away); dies after WAIT_SECONDS.
 */
void wait_gone (const char *query, const char *key, const char *value);

/* The block node of a device (a node name, or a drive's or qdev's
 * block backend); dies if there is none.
 */
char *resolve_device (const char *dev);

#endif /* BACKUPACCESS_HELPER_QMPOPS_H */
