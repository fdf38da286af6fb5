/* SPDX-License-Identifier: BSD-3-Clause */
/* teardown: unmount, stop nbdkit, then undo in QEMU what the state
 * file records, and remove the run directory; also the roll-back of a
 * setup that failed half-way.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json.h>

#include "mount.h"
#include "proc.h"
#include "qmp.h"
#include "qmpops.h"
#include "rundir.h"
#include "serve.h"
#include "state.h"
#include "teardown.h"
#include "util.h"

static bool
teardown_qemu (struct helper_state *st, bool success)
{
  bool proxmox = strcmp (st->backend ?: "", "proxmox") == 0;

  /* Exports first: an exported bitmap is busy, and merging it back
   * would fail (or abort QEMU).
   */
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    if (d->exported) {
      json_object *r = qmp_run (true, "block-export-del",
                                obj ("id", S (d->export), END));
      json_object_put (r);
      wait_gone ("query-block-exports", "id", d->export);
      d->exported = false;
      state_save (st);
    }
  }
  if (st->nbd_server_started) {
    json_object_put (qmp_run (true, "nbd-server-stop", NULL));
    st->nbd_server_started = false;
    state_save (st);
  }

  if (proxmox) {
    if (st->proxmox_setup) {
      /* Errors are reported, not fatal: vzdump does the same. */
      json_object_put (qmp_run (true, "backup-access-teardown", obj (
        "target-id", S (st->target_id),
        "success", json_object_new_boolean (success), END)));
      st->proxmox_setup = false;
      state_save (st);
    }
    return true;
  }

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
  return true;
}

/* What QEMU's going away during a backup means for the next one. */
static void
explain_qemu_gone (const struct helper_state *st)
{
  bool proxmox = strcmp (st->backend ?: "", "proxmox") == 0;

  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    const char *dev = d->device ?: "?";
    const char *live = d->live_bitmap;
    const char *frozen = d->frozen_bitmap;

    if (proxmox)
      warn ("device %s: QEMU keeps its dirty bitmaps in memory: the next "
            "backup is a full one", dev);
    else if (live && frozen)
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

static void
stop_local (struct helper_state *st)
{
  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    const char *mnt = d->mount;
    if (mnt) {
      char *argv[] = { "fusermount3", "-u", (char *) mnt, NULL };
      char *lazy[] = { "fusermount3", "-u", "-z", (char *) mnt, NULL };
      pid_t pid = d->mount_pidfile ? read_pidfile (d->mount_pidfile) : 0;
      if (run_wait (argv, NULL) != 0 && is_mounted (mnt)) {
        /* Busy: a process still has the file open.  Detached now, gone
         * when it closes the file; its reads fail once nbdfuse stops.
         */
        warn ("device %s: %s is busy (a process has the file open): "
              "unmounted lazily", d->device, mnt);
        run_wait (lazy, NULL);
      }
      stop_pid (pid);
      if (d->mount_pidfile)
        unlink (d->mount_pidfile);
      rmdir (mnt);
      state_set (&d->mount, NULL);
      state_save (st);
    }
    if (d->pidfile) {
      pid_t pid = read_pidfile (d->pidfile);
      long started = (long) d->nbdkit_pid;
      /* Not listening yet, or never told to go on. */
      if (pid == 0 && process_running ((pid_t) started) &&
          cmdline_mentions (started, run_dir))
        pid = (pid_t) started;
      stop_pid (pid);
      if (d->nbdkit_log)
        report_log (d->device, d->nbdkit_log);
      unlink (d->pidfile);
      if (d->socket)
        unlink (d->socket);
      state_set (&d->pidfile, NULL);
      state_save (st);
    }
  }
  stop_strays ();
}

void
do_teardown (bool success)
{
  bool ok = true;
  struct helper_state *st;

  if (access (run_dir, F_OK) == -1 && errno == ENOENT) {
    warn ("%s: nothing to tear down", run_dir);
    return;
  }
  make_run_dir ();
  {
    /* Left by a helper killed while it saved the state. */
    char *p = state_path (), *tmp = xasprintf ("%s.tmp", p);
    unlink (tmp);
    free (tmp);
    free (p);
  }
  st = state_load ();
  if (st == NULL) {
    /* The state is written before any change: there is none. */
    warn ("%s: nothing to tear down", run_dir);
    rmdir (run_dir);
    return;
  }
  stop_local (st);
  if (strcmp (st->backend ?: "", "serve") != 0) {
    char err[1024];
    if (qmp == NULL)            /* else a roll-back: the same connection */
      qmp = ba_qmp_connect (st->qmp, qmp_timeout_ms (), err, sizeof err);
    if (qmp == NULL) {
      /* Nothing listens: QEMU is gone, and nothing is left in it to
       * undo.  Anything else (another QMP client, a timeout): keep the
       * state, so that teardown can be run again.
       */
      if (errno != ENOENT && errno != ECONNREFUSED)
        die ("%s: nothing was torn down; try again", err);
      warn ("%s (QEMU is gone: only local state is cleaned up)", err);
      explain_qemu_gone (st);
      ok = false;
    }
    else
      teardown_qemu (st, success);
  }
  {
    char *p = state_path ();
    for (size_t i = 0; i < st->ndevices; i++) {
      const struct device_state *d = &st->devices[i];
      const char *f = d->fleece_file;
      if (!ok && f)
        unlink (f);
      if (d->status_file)
        unlink (d->status_file);
      for (const char *const *ext = (const char *const[]) {
             "nbdkit.log", "nbdfuse.log", NULL }; *ext; ext++) {
        char *f = xasprintf ("%s/%s.%s", run_dir, d->device, *ext);
        unlink (f);
        free (f);
      }
    }
    unlink (p);
    free (p);
    p = xasprintf ("%s/qemu-img.log", run_dir);
    unlink (p);
    free (p);
    /* QEMU removes its NBD server's socket when told to stop the
     * server, not when it dies or quits.
     */
    if (!ok && st->nbd_server_started) {
      p = xasprintf ("%s/qemu-nbd.sock", run_dir);
      unlink (p);
      free (p);
    }
    remove_stray_sockets ();
    if (rmdir (run_dir) == -1)
      warn ("rmdir %s: %m", run_dir);
  }
  state_free (st);
  if (!ok)
    exit (1);
}

void
roll_back (void)
{
  fprintf (stderr, "%s: undoing what was set up\n", progname);
  do_teardown (false);
}
