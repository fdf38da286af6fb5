/* SPDX-License-Identifier: BSD-3-Clause */
/* Upstream QEMU (7.2 and later), set up by hand: a fleecing image, a
 * frozen copy of the dirty bitmap and copy-before-write inserted in one
 * transaction, then snapshot-access with discard.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "proc.h"
#include "qmp.h"
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

/* Upstream QEMU (7.2 and later), by hand: fleecing image, a frozen copy
 * of the bitmap and copy-before-write inserted in one transaction, then
 * snapshot-access with discard.
 */
void
setup_upstream (struct helper_state *st, const struct setup_opts *o)
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
        char err[1024];
        int qe;
        json_object *r;
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
          json_object *args = obj ("node", S (source), "name", S (marker),
                                   "persistent", json_object_new_boolean (1),
                                   "disabled", json_object_new_boolean (1),
                                   END);
          r = ba_qmp_cmd (qmp, "block-dirty-bitmap-add", args, &qe,
                          err, sizeof err);
          json_object_put (args);
          persistent = r != NULL;
          json_object_put (r);
          if (!persistent) {
            if (!qe)
              die ("QMP block-dirty-bitmap-add: %s", err);
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
