/* SPDX-License-Identifier: BSD-3-Clause */
/* The backend for upstream QEMU (7.2 and later), by hand: per device a
 * fleecing image, a frozen copy of the dirty bitmap and copy-before-write
 * inserted at one instant (upstream-cbw.c: a filter of our own that
 * breaks the snapshot, not the guest's writes, when the fleecing store
 * fails; a backup job for a node with no guest device), then
 * snapshot-access with discard; and the way back, which keeps every
 * change in the bitmap when the backup failed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "proc.h"
#include "qmpops.h"
#include "rundir.h"
#include "state.h"
#include "upstream-bitmaps.h"
#include "upstream-cbw.h"
#include "util.h"

static bool
upstream_available (void)
{
  return true;
}

/* Checks made before anything is changed: the options, the devices'
 * nodes, and the fleecing directory.
 */
static void
upstream_preflight (struct setup_opts *o)
{
  struct stat sb;

  if (o->fleecing_dir == NULL)
    die ("upstream QEMU: --fleecing-dir DIR is needed for the fleecing "
         "images");
  if (strcmp (o->bitmap_mode, "new") == 0)
    die ("--bitmap-mode new: only with Proxmox's API; upstream, a missing "
         "--bitmap is created (a full backup)");
  for (int i = 0; i < o->ndevs; i++) {
    char *source = resolve_device (o->devs[i]);
    cbw_preflight (o->devs[i], source);
    free (source);
  }
  if (stat (o->fleecing_dir, &sb) == -1 || !S_ISDIR (sb.st_mode))
    die ("--fleecing-dir %s: not a directory", o->fleecing_dir);
}

/* The fleecing image, and its node: each recorded before it exists. */
static void
add_fleecing (struct helper_state *st, struct device_state *d,
              const struct setup_opts *o, const char *tag,
              const char *fleece_node)
{
  char *file = xasprintf ("%s/%s.%s.fleecing.qcow2", o->fleecing_dir,
                          d->device, tag);
  char *cluster_opt = xasprintf ("cluster_size=%" PRIi64, o->cluster);
  char *size_str = xasprintf ("%" PRIi64, d->size);
  char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o",
                   cluster_opt, file, size_str, NULL };
  char *log = xasprintf ("%s/qemu-img.log", run_dir);
  int fd;

  state_set (&d->fleece_file, file);
  state_save (st);
  /* Never overwrite a file that is not ours. */
  fd = open (file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd == -1)
    die ("%s: %m", file);
  close (fd);
  if (run_wait (argv, log) != 0)
    die ("qemu-img create %s failed: %s", file, tail_of (log));
  state_set (&d->fleece_node, fleece_node);
  state_save (st);
  json_object_put (qmp_run (false, "blockdev-add", obj (
    "driver", S ("qcow2"), "node-name", S (fleece_node),
    "discard", S ("unmap"),
    "file", obj ("driver", S ("file"), "filename", S (file), END),
    END)));
  free (log);
  free (size_str);
  free (cluster_opt);
  free (file);
}

/* Copy-before-write by a backup job (sync=none) from the source node to
 * the fleecing node, whose filter node is cbw_node: for a node that no
 * guest device has as its drive.  Added to the setup's transaction;
 * recorded first.
 */
static void
add_backup_job (struct helper_state *st, struct device_state *d,
                const char *job, const char *cbw_node, json_object *actions)
{
  json_object_array_add (actions, obj (
    "type", S ("blockdev-backup"), "data",
    obj ("job-id", S (job), "device", S (d->source_node),
         "target", S (d->fleece_node),
         "sync", S ("none"), "filter-node-name", S (cbw_node),
         "auto-finalize", json_object_new_boolean (1),
         "auto-dismiss", json_object_new_boolean (1), END), END));
  state_set (&d->job, job);
  state_set (&d->cbw_node, cbw_node);
  state_save (st);
}

/* ba-TAG-N-SUFFIX: names of our own, unique to this setup.  Teardown
 * may delete whatever the state file names, so nothing of anybody
 * else's may carry such a name.  QEMU allows node names of 31
 * characters.
 */
static char *
our_name (const char *tag, int i, const char *suffix)
{
  return xasprintf ("ba-%s-%d%s", tag, i, suffix);
}

/* Device i of o, up to copy-before-write: its fleecing image, its
 * bitmaps (a freeze added to actions), and how copy-before-write gets
 * above it (a guest device to switch, or a backup job in actions).
 */
static void
prepare_device (struct helper_state *st, const struct setup_opts *o,
                const char *tag, int i, json_object *actions)
{
  const char *dev = o->devs[i];
  json_object *nodes = named_nodes ();
  char *source = resolve_device (dev);
  json_object *node = find_node (nodes, source);
  int64_t size = node_image_int (node, "virtual-size");
  char *job = our_name (tag, i, "");
  char *fleece_node = our_name (tag, i, "-fleece");
  char *qdev, *cbw_node, *frozen = NULL;
  const char *mode = "none";
  struct device_state *d;

  if (size <= 0)
    die ("device %s: cannot learn its size", dev);
  d = state_add_device (st);
  state_set (&d->device, dev);
  state_set (&d->export, dev);
  state_set (&d->source_node, source);
  d->size = size;
  d->cluster_size = ba_cbw_cluster (o->cluster);
  add_fleecing (st, d, o, tag, fleece_node);

  if (o->bitmap) {
    mode = bitmaps_prepare (st, d, o->bitmap, node, job, actions, &frozen);
    state_set (&d->live_bitmap, o->bitmap);
  }
  state_set (&d->frozen_bitmap, frozen);
  state_set (&d->bitmap_mode, mode);
  qdev = cbw_device_path (source);
  cbw_node = our_name (tag, i, "-cbw");
  if (qdev) {
    /* Recorded now: nothing is saved while the VM is paused. */
    state_set (&d->qdev, qdev);
    state_set (&d->cbw_node, cbw_node);
    d->cbw_bitmap = frozen != NULL;
  }
  else
    add_backup_job (st, d, job, cbw_node, actions);
  state_save (st);

  free (cbw_node);
  free (qdev);
  free (fleece_node);
  free (frozen);
  free (job);
  free (source);
  json_object_put (nodes);
}

/* The point in time: with the VM paused (if a guest device is to be
 * switched and it runs), the bitmaps' freeze and the backup jobs in
 * one transaction, then each guest device switched to a
 * copy-before-write node of ours.  So every device's snapshot and
 * frozen bitmap begin at the same instant.
 */
static void
insert_cbw (struct helper_state *st, json_object *actions)
{
  struct vm_pause pause = { .paused = false };
  bool switching = false;
  int timeout = 0;

  for (size_t i = 0; i < st->ndevices; i++)
    switching |= st->devices[i].qdev != NULL;
  if (switching) {
    timeout = cbw_timeout ();
    vm_pause (st, &pause);
  }
  if (alen (actions))
    json_object_put (qmp_run (false, "transaction",
                              obj ("actions", actions, END)));
  else
    json_object_put (actions);
  for (size_t i = 0; i < st->ndevices; i++)
    if (st->devices[i].qdev)
      cbw_insert (&st->devices[i], timeout);
  vm_resume (st, &pause);
}

static void
add_snapshot_access (struct helper_state *st, struct device_state *d,
                     const char *tag, int i)
{
  char *snap_node = our_name (tag, i, "-snapshot");

  state_set (&d->node, snap_node);
  state_save (st);
  json_object_put (qmp_run (false, "blockdev-add", obj (
    "driver", S ("snapshot-access"), "node-name", S (snap_node),
    "file", S (d->cbw_node), "discard", S ("unmap"), END)));
  if (d->frozen_bitmap) {
    state_set (&d->bitmap_name, d->frozen_bitmap);
    state_set (&d->bitmap_node, d->source_node);
  }
  state_save (st);
  free (snap_node);
}

static void
upstream_setup (struct helper_state *st, const struct setup_opts *o)
{
  json_object *actions = json_object_new_array ();
  char tag[16];

  snprintf (tag, sizeof tag, "%06lx",
            ((unsigned long) getpid () * 2654435761UL ^
             (unsigned long) time (NULL)) & 0xffffff);
  state_set (&st->tag, tag);
  for (int i = 0; i < o->ndevs; i++)
    prepare_device (st, o, tag, i, actions);
  insert_cbw (st, actions);
  for (size_t i = 0; i < st->ndevices; i++)
    add_snapshot_access (st, &st->devices[i], tag, (int) i);
}

/* Resumes a VM that setup left paused; then per device deletes
 * snapshot-access, removes copy-before-write (the device switched back
 * first, or the job cancelled), merges the frozen bitmap back on
 * failure, removes the bitmaps made for this backup and the fleecing
 * image.
 */
static void
upstream_teardown (struct helper_state *st, bool success)
{
  vm_resume_left (st);
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    json_object *nodes = named_nodes ();

    if (d->node && find_node (nodes, d->node))
      json_object_put (qmp_run (true, "blockdev-del",
                                obj ("node-name", S (d->node), END)));
    if (d->job) {
      /* Cancelling the sync=none job removes copy-before-write. */
      json_object_put (qmp_run (true, "block-job-cancel", obj (
        "device", S (d->job),
        "force", json_object_new_boolean (1), END)));
      wait_gone ("query-block-jobs", "device", d->job);
    }
    else
      cbw_remove (d, nodes);
    bitmaps_teardown (d, nodes, success);
    if (d->fleece_node && find_node (nodes, d->fleece_node))
      json_object_put (qmp_run (true, "blockdev-del", obj (
        "node-name", S (d->fleece_node), END)));
    json_object_put (nodes);
    if (d->fleece_file && unlink (d->fleece_file) == -1 && errno != ENOENT)
      warn ("removing %s: %m", d->fleece_file);
    state_set (&d->job, NULL);
    state_set (&d->cbw_node, NULL);
    state_set (&d->qdev, NULL);
    state_set (&d->frozen_bitmap, NULL);
    state_set (&d->marker_bitmap, NULL);
    state_set (&d->node, NULL);
    state_set (&d->fleece_node, NULL);
    state_save (st);
  }
}

static void
upstream_explain_qemu_gone (const struct helper_state *st)
{
  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    const char *dev = d->device ?: "?";
    const char *live = d->live_bitmap;
    const char *frozen = d->frozen_bitmap;

    if (live && frozen)
      warn ("device %s: if QEMU shut down cleanly, it saved the changes "
            "of this backup in bitmap '%s', and the next setup with "
            "--bitmap %s adds them back; if it was killed, bitmap '%s' is "
            "inconsistent and the next setup makes a full backup",
            dev, frozen, live, live);
    else if (live)
      warn ("device %s: this full backup did not finish: the next setup "
            "with --bitmap %s makes a full backup again", dev, live);
  }
}

const struct backend backend_upstream = {
  .name = "upstream",
  .available = upstream_available,
  .preflight = upstream_preflight,
  .setup = upstream_setup,
  .teardown = upstream_teardown,
  .explain_qemu_gone = upstream_explain_qemu_gone,
  /* blockdev-backup's copy-before-write has no bitmap: it would copy
   * clean clusters, which nobody reads, into the fleecing image.  Ours
   * (cbw-bitmap in the state) copies only the frozen bitmap's.
   */
  .discard_clean = true,
};
