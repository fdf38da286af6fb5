/* SPDX-License-Identifier: BSD-3-Clause */
/* The backend for upstream QEMU (7.2 and later), by hand: per device a
 * fleecing image, a frozen copy of the dirty bitmap and copy-before-write
 * inserted in one transaction, then snapshot-access with discard; and
 * the way back, which keeps every change in the bitmap when the backup
 * failed.
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
#include "util.h"

/* The bitmaps of a source node that matter to a new backup: the live
 * one, and what unfinished backups left behind.  Those are ours
 * ("ba-TAG-N-frozen": the changes frozen for a backup; "ba-TAG-N-full":
 * the live bitmap was made by a full backup) and belong to no running
 * backup job "ba-TAG-N": QEMU stopped during that backup, saved them,
 * and was started again.
 */
struct bitmaps_seen {
  bool live, live_inconsistent, live_recording, live_persistent;
  bool full_left, inconsistent_left;
  char **left;                  /* leftover bitmaps */
  bool *left_frozen;            /* ... a frozen copy (else a marker) */
  size_t nleft;
};

static bool
has_suffix (const char *s, const char *suffix)
{
  size_t n = strlen (s), m = strlen (suffix);
  return n >= m && strcmp (s + n - m, suffix) == 0;
}

static void
scan_bitmaps (json_object *node, const char *live, struct bitmaps_seen *b)
{
  json_object *dirty, *jobs = qmp_run (false, "query-block-jobs", NULL);
  size_t n = 0;

  memset (b, 0, sizeof *b);
  if (node == NULL || !json_object_object_get_ex (node, "dirty-bitmaps",
                                                  &dirty)) {
    json_object_put (jobs);
    return;
  }
  n = json_object_array_length (dirty);
  b->left = calloc (n + 1, sizeof *b->left);
  b->left_frozen = calloc (n + 1, sizeof *b->left_frozen);
  if (b->left == NULL || b->left_frozen == NULL)
    die ("out of memory");
  for (size_t j = 0; j < n; j++) {
    json_object *bm = json_object_array_get_idx (dirty, j);
    const char *name = get_str (bm, "name");
    bool frozen, running = false;
    size_t len;

    if (name == NULL)
      continue;
    if (strcmp (name, live) == 0) {
      b->live = true;
      b->live_inconsistent = get_bool (bm, "inconsistent");
      b->live_recording = get_bool (bm, "recording");
      b->live_persistent = get_bool (bm, "persistent");
      continue;
    }
    frozen = has_suffix (name, "-frozen");
    if (strncmp (name, "ba-", 3) != 0 ||
        !(frozen || has_suffix (name, "-full")) || get_bool (bm, "busy"))
      continue;
    len = strlen (name) - strlen (frozen ? "-frozen" : "-full");
    for (size_t k = 0; k < json_object_array_length (jobs); k++) {
      const char *job = get_str (json_object_array_get_idx (jobs, k),
                                 "device");
      if (job && strlen (job) == len && strncmp (job, name, len) == 0)
        running = true;
    }
    if (running)
      continue;
    if (get_bool (bm, "inconsistent"))
      b->inconsistent_left = true;
    if (!frozen)
      b->full_left = true;
    b->left_frozen[b->nleft] = frozen && !get_bool (bm, "inconsistent");
    b->left[b->nleft++] = strdup (name);
  }
  json_object_put (jobs);
}

static void
free_bitmaps_seen (struct bitmaps_seen *b)
{
  for (size_t j = 0; j < b->nleft; j++)
    free (b->left[j]);
  free (b->left);
  free (b->left_frozen);
}

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
  for (int i = 0; i < o->ndevs; i++)
    free (resolve_device (o->devs[i]));
  if (stat (o->fleecing_dir, &sb) == -1 || !S_ISDIR (sb.st_mode))
    die ("--fleecing-dir %s: not a directory", o->fleecing_dir);
}

/* Fleecing image, a frozen copy of the bitmap and copy-before-write
 * inserted in one transaction, then snapshot-access with discard.
 */
static void
upstream_setup (struct helper_state *st, const struct setup_opts *o)
{
  char tag[16];

  snprintf (tag, sizeof tag, "%06lx",
            ((unsigned long) getpid () * 2654435761UL ^
             (unsigned long) time (NULL)) & 0xffffff);
  state_set (&st->tag, tag);

  for (int i = 0; i < o->ndevs; i++) {
    const char *dev = o->devs[i];
    json_object *nodes = named_nodes (), *node, *actions;
    struct device_state *d;
    char *source = resolve_device (dev);
    const char *mode = "none";
    char *fleece_file, *cluster_opt, *size_str;
    /* Names of our own, unique to this setup: teardown may delete
     * whatever the state file names, so nothing of anybody else's may
     * carry such a name.  QEMU allows node names of 31 characters.
     */
    char *fleece_node = xasprintf ("ba-%s-%d-fleece", tag, i);
    char *cbw_node = xasprintf ("ba-%s-%d-cbw", tag, i);
    char *snap_node = xasprintf ("ba-%s-%d-snapshot", tag, i);
    char *frozen = NULL, *job = xasprintf ("ba-%s-%d", tag, i);
    char *marker = NULL;
    bool persistent = false;
    int64_t size;

    node = find_node (nodes, source);
    size = node_image_int (node, "virtual-size");
    if (size <= 0)
      die ("device %s: cannot learn its size", dev);

    d = state_add_device (st);
    state_set (&d->device, dev);
    state_set (&d->export, dev);
    state_set (&d->source_node, source);
    d->size = size;
    d->cluster_size = ba_cbw_cluster (o->cluster);

    /* The fleecing image: recorded before it exists. */
    fleece_file = xasprintf ("%s/%s.%s.fleecing.qcow2", o->fleecing_dir,
                             dev, tag);
    state_set (&d->fleece_file, fleece_file);
    state_save (st);
    {
      /* Never overwrite a file that is not ours. */
      int fd = open (fleece_file, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC,
                     0600);
      if (fd == -1)
        die ("%s: %m", fleece_file);
      close (fd);
    }
    cluster_opt = xasprintf ("cluster_size=%" PRIi64, o->cluster);
    size_str = xasprintf ("%" PRIi64, size);
    {
      char *argv[] = { "qemu-img", "create", "-q", "-f", "qcow2", "-o",
                       cluster_opt, fleece_file, size_str, NULL };
      char *log = xasprintf ("%s/qemu-img.log", run_dir);
      if (run_wait (argv, log) != 0)
        die ("qemu-img create %s failed: %s", fleece_file, tail_of (log));
      free (log);
    }
    state_set (&d->fleece_node, fleece_node);
    state_save (st);
    json_object_put (qmp_run (false, "blockdev-add", obj (
      "driver", S ("qcow2"), "node-name", S (fleece_node),
      "discard", S ("unmap"),
      "file", obj ("driver", S ("file"), "filename", S (fleece_file), END),
      END)));

    actions = json_object_new_array ();
    if (o->bitmap) {
      struct bitmaps_seen b;
      const char *why = NULL;

      scan_bitmaps (node, o->bitmap, &b);
      /* The live bitmap cannot be trusted: start again with a full
       * backup rather than make an incremental that misses changes.
       */
      if (b.live && b.live_inconsistent)
        why = "is inconsistent: QEMU stopped without saving it (killed?), "
          "so the changes since the last backup are unknown";
      else if (b.live && !b.live_recording)
        why = "is disabled: it did not record every change";
      else if (b.live && b.full_left)
        why = "was made by a full backup that never finished (QEMU "
          "stopped during it)";
      else if (b.live && b.inconsistent_left)
        why = "lacks the changes frozen for an unfinished backup, which "
          "QEMU did not save (killed?)";
      if (why) {
        warn ("device %s: bitmap '%s' %s: it is made again, and this "
              "backup is a full one (bitmap-mode new)", dev, o->bitmap, why);
        json_object_put (qmp_run (false, "block-dirty-bitmap-remove", obj (
          "node", S (source), "name", S (o->bitmap), END)));
        b.live = false;
      }
      if (!b.live) {
        /* A full backup: the frozen copies of unfinished backups add
         * nothing to it.
         */
        for (size_t j = 0; j < b.nleft; j++)
          json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
            "node", S (source), "name", S (b.left[j]), END)));
        /* Recorded first: if this backup fails, the bitmap must go, or
         * the next run would take it for the base of an incremental.
         * The marker says the same to a QEMU restarted after a clean
         * shutdown (which saves persistent bitmaps): it is added first,
         * and removed at teardown.
         */
        marker = xasprintf ("ba-%s-%d-full", tag, i);
        state_set (&d->created_bitmap, o->bitmap);
        state_set (&d->marker_bitmap, marker);
        state_save (st);
        {
          json_object *r = qmp_try ("block-dirty-bitmap-add", obj (
            "node", S (source), "name", S (marker),
            "persistent", json_object_new_boolean (1),
            "disabled", json_object_new_boolean (1), END));
          persistent = r != NULL;
          json_object_put (r);
          if (!persistent) {
            state_set (&d->marker_bitmap, NULL);
            state_save (st);
          }
        }
        /* Persistent where the format allows, so that it outlives QEMU. */
        json_object_put (qmp_run (false, "block-dirty-bitmap-add", obj (
          "node", S (source), "name", S (o->bitmap),
          "persistent", json_object_new_boolean (persistent), END)));
        mode = "new";
      }
      else {
        /* Freeze: a disabled copy holds the changes up to now, the live
         * bitmap restarts; atomic with the copy-before-write insertion.
         * The copy is persistent like the live bitmap, so that a QEMU
         * that shuts down during the backup saves it; what such
         * unfinished backups left is merged in here.
         */
        json_object *merge = json_object_new_array ();
        json_object_array_add (merge, S (o->bitmap));
        for (size_t j = 0; j < b.nleft; j++)
          if (b.left_frozen[j])
            json_object_array_add (merge, S (b.left[j]));
        if (b.nleft)
          warn ("device %s: adding the changes of %zu unfinished "
                "backup(s) to this one", dev, b.nleft);
        mode = "reuse";
        frozen = xasprintf ("ba-%s-%d-frozen", tag, i);
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-add"), "data",
          obj ("node", S (source), "name", S (frozen),
               "persistent", json_object_new_boolean (b.live_persistent),
               END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-merge"), "data",
          obj ("node", S (source), "target", S (frozen), "bitmaps", merge,
               END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-clear"), "data",
          obj ("node", S (source), "name", S (o->bitmap), END), END));
        json_object_array_add (actions, obj (
          "type", S ("block-dirty-bitmap-disable"), "data",
          obj ("node", S (source), "name", S (frozen), END), END));
        for (size_t j = 0; j < b.nleft; j++)
          json_object_array_add (actions, obj (
            "type", S ("block-dirty-bitmap-remove"), "data",
            obj ("node", S (source), "name", S (b.left[j]), END), END));
      }
      free_bitmaps_seen (&b);
      state_set (&d->live_bitmap, o->bitmap);
    }
    json_object_array_add (actions, obj (
      "type", S ("blockdev-backup"), "data",
      obj ("job-id", S (job), "device", S (source), "target", S (fleece_node),
           "sync", S ("none"), "filter-node-name", S (cbw_node),
           "auto-finalize", json_object_new_boolean (1),
           "auto-dismiss", json_object_new_boolean (1), END), END));
    state_set (&d->job, job);
    state_set (&d->cbw_node, cbw_node);
    state_set (&d->frozen_bitmap, frozen);
    state_set (&d->bitmap_mode, mode);
    state_save (st);
    json_object_put (qmp_run (false, "transaction",
                              obj ("actions", actions, END)));

    state_set (&d->node, snap_node);
    state_save (st);
    json_object_put (qmp_run (false, "blockdev-add", obj (
      "driver", S ("snapshot-access"), "node-name", S (snap_node),
      "file", S (cbw_node), "discard", S ("unmap"), END)));
    if (frozen) {
      state_set (&d->bitmap_name, frozen);
      state_set (&d->bitmap_node, source);
    }
    state_save (st);

    free (fleece_file);
    free (cluster_opt);
    free (size_str);
    free (fleece_node);
    free (cbw_node);
    free (snap_node);
    free (frozen);
    free (marker);
    free (job);
    free (source);
    json_object_put (nodes);
  }
}

/* Deletes the nodes, cancels the job (which removes copy-before-write),
 * merges the frozen bitmap back on failure, removes the bitmaps made
 * for this backup and the fleecing image.
 */
static void
upstream_teardown (struct helper_state *st, bool success)
{
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    const char *source = d->source_node;
    const char *frozen = d->frozen_bitmap;
    const char *live = d->live_bitmap;
    json_object *nodes = named_nodes ();

    if (d->node && find_node (nodes, d->node))
      json_object_put (qmp_run (true, "blockdev-del",
                                obj ("node-name", S (d->node),
                                     END)));
    if (d->job) {
      /* Cancelling the sync=none job removes copy-before-write. */
      json_object_put (qmp_run (true, "block-job-cancel", obj (
        "device", S (d->job),
        "force", json_object_new_boolean (1), END)));
      wait_gone ("query-block-jobs", "device", d->job);
    }
    if (frozen && source) {
      if (node_has_bitmap (nodes, source, frozen)) {
        /* On failure the next incremental must still see every change. */
        if (!success && live) {
          json_object *list = json_object_new_array ();
          json_object_array_add (list, S (frozen));
          json_object_put (qmp_run (false, "block-dirty-bitmap-merge", obj (
            "node", S (source), "target", S (live), "bitmaps", list, END)));
        }
        json_object_put (qmp_run (false, "block-dirty-bitmap-remove",
                                  obj ("node", S (source),
                                       "name", S (frozen), END)));
      }
    }
    if (!success && source && d->created_bitmap) {
      /* A full backup that failed: no base for an incremental. */
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (d->created_bitmap),
        END)));
    }
    /* Only now, after that: the live bitmap can be trusted. */
    if (source && d->marker_bitmap &&
        node_has_bitmap (nodes, source, d->marker_bitmap))
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (d->marker_bitmap),
        END)));
    if (d->fleece_node && find_node (nodes, d->fleece_node))
      json_object_put (qmp_run (true, "blockdev-del", obj (
        "node-name", S (d->fleece_node), END)));
    json_object_put (nodes);
    if (d->fleece_file && unlink (d->fleece_file) == -1 && errno != ENOENT)
      warn ("removing %s: %m", d->fleece_file);
    state_set (&d->job, NULL);
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
  /* Copy-before-write without a bitmap: it would copy clean clusters,
   * which nobody reads, into the fleecing image.
   */
  .discard_clean = true,
};
