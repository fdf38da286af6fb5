/* SPDX-License-Identifier: BSD-3-Clause */
/* Copy-before-write over a guest device, the upstream way that never
 * fails the guest's writes: a copy-before-write node of our own with
 * on-cbw-error=break-snapshot and a cbw-timeout, the device's drive
 * switched to it (qom-set) while the VM is paused, so that the frozen
 * bitmap and the snapshot begin at the same instant; and at teardown
 * the device switched back before the node goes.
 */
#ifndef BACKUPACCESS_HELPER_UPSTREAM_CBW_H
#define BACKUPACCESS_HELPER_UPSTREAM_CBW_H

#include <stdbool.h>
#include <time.h>

#include <json.h>

#include "state.h"

/* The QOM path of the one guest device whose drive is the node source
 * (its block backend's root), or NULL: no device has it as its root
 * (a node that qemu-storage-daemon exports, a node under a filter), or
 * several do.  Then blockdev-backup inserts copy-before-write, and a
 * full fleecing store fails the guest's writes.
 */
char *cbw_device_path (const char *source);

/* Before anything is changed: dies if device dev (its node: source)
 * cannot be served safely by this QEMU.
 */
void cbw_preflight (const char *dev, const char *source);

/* cbw-timeout for this QEMU, in seconds. */
int cbw_timeout (void);

/* The VM paused around the switch. */
struct vm_pause {
  bool paused;                  /* by us: resume it */
  struct timespec start;
};

/* Pauses the VM if it runs (recorded in st first); a VM that is not
 * running is left as it is.
 */
void vm_pause (struct helper_state *st, struct vm_pause *p);

/* Resumes what vm_pause paused, records it, and says how long the
 * pause took.
 */
void vm_resume (struct helper_state *st, const struct vm_pause *p);

/* Adds d's copy-before-write node d->cbw_node above d->source_node,
 * writing into d->fleece_node, with d->frozen_bitmap as the clusters to
 * copy and to read if d->cbw_bitmap, and switches the device d->qdev
 * to it.  All of that recorded before.  Call with the VM paused, after
 * the bitmap's freeze.
 */
void cbw_insert (const struct device_state *d, int timeout);

/* At teardown, once snapshot-access is gone (while it is there, the
 * filter shares no writes to the source node, so the device cannot
 * leave it): switches d's device back to its source node if it is on
 * d's copy-before-write node, then deletes that node.  Dies rather
 * than delete a node that the device still uses.
 */
void cbw_remove (const struct device_state *d, json_object *nodes);

/* At teardown: resumes the VM if a setup paused it and was stopped
 * before it could resume it, in this QEMU (one of our fleecing nodes
 * is there: a QEMU started again is not ours to resume).
 */
void vm_resume_left (struct helper_state *st);

#endif /* BACKUPACCESS_HELPER_UPSTREAM_CBW_H */
