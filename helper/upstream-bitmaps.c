/* SPDX-License-Identifier: BSD-3-Clause */
/* The dirty bitmaps of an upstream backup: see upstream-bitmaps.h.
 * What QEMU holds is checked first: a live bitmap that cannot be
 * trusted makes the backup a full one, and what unfinished backups left
 * (QEMU stopped during them, saved their bitmaps, and was started again)
 * is folded into this one.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "qmpops.h"
#include "state.h"
#include "upstream-bitmaps.h"
#include "util.h"

/* The bitmaps of a source node that matter to a new backup: the live
 * one, and what unfinished backups left behind.  Those are ours
 * ("ba-TAG-N-frozen": the changes frozen for a backup; "ba-TAG-N-full":
 * the live bitmap was made by a full backup) and belong to no backup
 * in progress (a backup job "ba-TAG-N", or a copy-before-write node
 * "ba-TAG-N-cbw"): QEMU stopped during that backup, saved them, and
 * was started again.
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

/* Whether the backup "ba-TAG-N" (the first len bytes of name) is in
 * progress: its job runs, or its copy-before-write node is there.
 */
static bool
in_progress (const char *name, size_t len, json_object *jobs,
             json_object *nodes)
{
  char *cbw = xasprintf ("%.*s-cbw", (int) len, name);
  bool r = find_node (nodes, cbw) != NULL;

  free (cbw);
  for (size_t k = 0; k < alen (jobs); k++) {
    const char *job = get_str (json_object_array_get_idx (jobs, k),
                               "device");
    if (job && strlen (job) == len && strncmp (job, name, len) == 0)
      r = true;
  }
  return r;
}

static void
scan_bitmaps (json_object *node, const char *live, struct bitmaps_seen *b)
{
  json_object *dirty, *jobs = qmp_run (false, "query-block-jobs", NULL);
  json_object *nodes = named_nodes ();
  size_t n = 0;

  memset (b, 0, sizeof *b);
  if (node == NULL || !json_object_object_get_ex (node, "dirty-bitmaps",
                                                  &dirty)) {
    json_object_put (jobs);
    json_object_put (nodes);
    return;
  }
  n = alen (dirty);             /* a hostile reply: not an array */
  b->left = calloc (n + 1, sizeof *b->left);
  b->left_frozen = calloc (n + 1, sizeof *b->left_frozen);
  if (b->left == NULL || b->left_frozen == NULL)
    die ("out of memory");
  for (size_t j = 0; j < n; j++) {
    json_object *bm = json_object_array_get_idx (dirty, j);
    const char *name = get_str (bm, "name");
    bool frozen, running;
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
    running = in_progress (name, len, jobs, nodes);
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
  json_object_put (nodes);
}

static void
free_bitmaps_seen (struct bitmaps_seen *b)
{
  for (size_t j = 0; j < b->nleft; j++)
    free (b->left[j]);
  free (b->left);
  free (b->left_frozen);
}

/* A live bitmap that cannot be trusted is removed: the backup starts
 * again as a full one rather than make an incremental that misses
 * changes.
 */
static void
distrust (const struct device_state *d, const char *live,
          struct bitmaps_seen *b)
{
  const char *why = NULL;

  if (b->live && b->live_inconsistent)
    why = "is inconsistent: QEMU stopped without saving it (killed?), "
      "so the changes since the last backup are unknown";
  else if (b->live && !b->live_recording)
    why = "is disabled: it did not record every change";
  else if (b->live && b->full_left)
    why = "was made by a full backup that never finished (QEMU "
      "stopped during it)";
  else if (b->live && b->inconsistent_left)
    why = "lacks the changes frozen for an unfinished backup, which "
      "QEMU did not save (killed?)";
  if (why) {
    warn ("device %s: bitmap '%s' %s: it is made again, and this "
          "backup is a full one (bitmap-mode new)", d->device, live, why);
    json_object_put (qmp_run (false, "block-dirty-bitmap-remove", obj (
      "node", S (d->source_node), "name", S (live), END)));
    b->live = false;
  }
}

/* A full backup: a new live bitmap, recording from now on. */
static void
start_full (struct helper_state *st, struct device_state *d,
            const char *live, const char *job, const struct bitmaps_seen *b)
{
  const char *source = d->source_node;
  char *marker = xasprintf ("%s-full", job);
  bool persistent;
  json_object *r;

  /* The frozen copies of unfinished backups add nothing to it. */
  for (size_t j = 0; j < b->nleft; j++)
    json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
      "node", S (source), "name", S (b->left[j]), END)));
  /* Recorded first: if this backup fails, the bitmap must go, or the
   * next run would take it for the base of an incremental.  The marker
   * says the same to a QEMU restarted after a clean shutdown (which
   * saves persistent bitmaps): it is added first, and removed at
   * teardown.
   */
  state_set (&d->created_bitmap, live);
  state_set (&d->marker_bitmap, marker);
  state_save (st);
  r = qmp_try ("block-dirty-bitmap-add", obj (
    "node", S (source), "name", S (marker),
    "persistent", json_object_new_boolean (1),
    "disabled", json_object_new_boolean (1), END));
  persistent = r != NULL;
  json_object_put (r);
  if (!persistent) {
    state_set (&d->marker_bitmap, NULL);
    state_save (st);
  }
  /* Persistent where the format allows, so that it outlives QEMU. */
  json_object_put (qmp_run (false, "block-dirty-bitmap-add", obj (
    "node", S (source), "name", S (live),
    "persistent", json_object_new_boolean (persistent), END)));
  free (marker);
}

/* Freeze: a disabled copy holds the changes up to now, the live bitmap
 * restarts; at the instant copy-before-write begins (in one transaction
 * with the backup job, or with the VM paused).  The copy is
 * persistent like the live bitmap, so that a QEMU that shuts down
 * during the backup saves it; what such unfinished backups left is
 * merged in here.
 */
static void
freeze (const struct device_state *d, const char *live,
        const struct bitmaps_seen *b, const char *frozen,
        json_object *actions)
{
  const char *source = d->source_node;
  json_object *merge = json_object_new_array ();

  json_object_array_add (merge, S (live));
  for (size_t j = 0; j < b->nleft; j++)
    if (b->left_frozen[j])
      json_object_array_add (merge, S (b->left[j]));
  if (b->nleft)
    warn ("device %s: adding the changes of %zu unfinished "
          "backup(s) to this one", d->device, b->nleft);
  json_object_array_add (actions, obj (
    "type", S ("block-dirty-bitmap-add"), "data",
    obj ("node", S (source), "name", S (frozen),
         "persistent", json_object_new_boolean (b->live_persistent),
         END), END));
  json_object_array_add (actions, obj (
    "type", S ("block-dirty-bitmap-merge"), "data",
    obj ("node", S (source), "target", S (frozen), "bitmaps", merge,
         END), END));
  json_object_array_add (actions, obj (
    "type", S ("block-dirty-bitmap-clear"), "data",
    obj ("node", S (source), "name", S (live), END), END));
  json_object_array_add (actions, obj (
    "type", S ("block-dirty-bitmap-disable"), "data",
    obj ("node", S (source), "name", S (frozen), END), END));
  for (size_t j = 0; j < b->nleft; j++)
    json_object_array_add (actions, obj (
      "type", S ("block-dirty-bitmap-remove"), "data",
      obj ("node", S (source), "name", S (b->left[j]), END), END));
}

const char *
bitmaps_prepare (struct helper_state *st, struct device_state *d,
                 const char *live, json_object *node, const char *job,
                 json_object *actions, char **frozen)
{
  struct bitmaps_seen b;
  const char *mode;

  scan_bitmaps (node, live, &b);
  distrust (d, live, &b);
  if (!b.live) {
    start_full (st, d, live, job, &b);
    mode = "new";
  }
  else {
    *frozen = xasprintf ("%s-frozen", job);
    freeze (d, live, &b, *frozen, actions);
    mode = "reuse";
  }
  free_bitmaps_seen (&b);
  return mode;
}

void
bitmaps_teardown (const struct device_state *d, json_object *nodes,
                  bool success)
{
  const char *source = d->source_node;
  const char *frozen = d->frozen_bitmap;
  const char *live = d->live_bitmap;

  if (frozen && source && node_has_bitmap (nodes, source, frozen)) {
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
  if (!success && source && d->created_bitmap) {
    /* A full backup that failed: no base for an incremental. */
    json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
      "node", S (source), "name", S (d->created_bitmap), END)));
  }
  /* Only now, after that: the live bitmap can be trusted. */
  if (source && d->marker_bitmap &&
      node_has_bitmap (nodes, source, d->marker_bitmap))
    json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
      "node", S (source), "name", S (d->marker_bitmap), END)));
}
