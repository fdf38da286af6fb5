/* SPDX-License-Identifier: BSD-3-Clause */
/* The dirty bitmaps of an upstream backup (--bitmap NAME, the "live"
 * bitmap, which records every change to the disk): checked before the
 * backup, made anew for a full one, frozen into a copy for an
 * incremental one, and at teardown merged back if the backup failed.
 */
#ifndef BACKUPACCESS_HELPER_UPSTREAM_BITMAPS_H
#define BACKUPACCESS_HELPER_UPSTREAM_BITMAPS_H

#include <stdbool.h>

#include <json.h>

#include "state.h"

/* Before device d's backup (node: its source node's entry from
 * named_nodes; job: the backup's name, "ba-TAG-N", which the bitmaps
 * made for it are named after): returns "new" for a full backup (the
 * live bitmap made now), or "reuse" for an incremental one, with the
 * actions that freeze its changes into *frozen added to actions, for
 * the transaction at the instant copy-before-write begins.  What it
 * makes is recorded in st first.
 */
const char *bitmaps_prepare (struct helper_state *st,
                             struct device_state *d, const char *live,
                             json_object *node, const char *job,
                             json_object *actions, char **frozen);

/* At teardown, once copy-before-write is gone (nodes: named_nodes from
 * before): on failure the frozen changes go back into the live bitmap;
 * the frozen copy goes, and the marker, and the live bitmap of a full
 * backup that failed.
 */
void bitmaps_teardown (const struct device_state *d, json_object *nodes,
                       bool success);

#endif /* BACKUPACCESS_HELPER_UPSTREAM_BITMAPS_H */
