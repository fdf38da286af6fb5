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
teardown_qemu (bool success)
{
  json_object *devs = devices ();
  bool proxmox = strcmp (get_str (state, "backend") ?: "", "proxmox") == 0;

  /* Exports first: an exported bitmap is busy, and merging it back
   * would fail (or abort QEMU).
   */
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    if (get_bool (d, "exported")) {
      json_object *r = qmp_run (true, "block-export-del",
                                obj ("id", S (get_str (d, "export")), END));
      json_object_put (r);
      wait_gone ("query-block-exports", "id", get_str (d, "export"));
      json_object_object_add (d, "exported", NULL);
      save_state ();
    }
  }
  if (get_bool (state, "nbd-server-started")) {
    json_object_put (qmp_run (true, "nbd-server-stop", NULL));
    json_object_object_add (state, "nbd-server-started", NULL);
    save_state ();
  }

  if (proxmox) {
    if (get_bool (state, "proxmox-setup")) {
      /* Errors are reported, not fatal: vzdump does the same. */
      json_object_put (qmp_run (true, "backup-access-teardown", obj (
        "target-id", S (get_str (state, "target-id")),
        "success", json_object_new_boolean (success), END)));
      json_object_object_add (state, "proxmox-setup", NULL);
      save_state ();
    }
    return true;
  }

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *source = get_str (d, "source-node");
    const char *frozen = get_str (d, "frozen-bitmap");
    const char *live = get_str (d, "live-bitmap");
    json_object *nodes = named_nodes ();

    if (get_str (d, "node") && find_node (nodes, get_str (d, "node")))
      json_object_put (qmp_run (true, "blockdev-del",
                                obj ("node-name", S (get_str (d, "node")),
                                     END)));
    if (get_str (d, "job")) {
      /* Cancelling the sync=none job removes copy-before-write. */
      json_object_put (qmp_run (true, "block-job-cancel", obj (
        "device", S (get_str (d, "job")),
        "force", json_object_new_boolean (1), END)));
      wait_gone ("query-block-jobs", "device", get_str (d, "job"));
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
    if (!success && source && get_str (d, "created-bitmap")) {
      /* A full backup that failed: no base for an incremental. */
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (get_str (d, "created-bitmap")),
        END)));
    }
    /* Only now, after that: the live bitmap can be trusted. */
    if (source && get_str (d, "marker-bitmap") &&
        node_has_bitmap (nodes, source, get_str (d, "marker-bitmap")))
      json_object_put (qmp_run (true, "block-dirty-bitmap-remove", obj (
        "node", S (source), "name", S (get_str (d, "marker-bitmap")),
        END)));
    if (get_str (d, "fleece-node") && find_node (nodes,
                                                 get_str (d, "fleece-node")))
      json_object_put (qmp_run (true, "blockdev-del", obj (
        "node-name", S (get_str (d, "fleece-node")), END)));
    json_object_put (nodes);
    if (get_str (d, "fleece-file") && unlink (get_str (d, "fleece-file"))
        == -1 && errno != ENOENT)
      warn ("removing %s: %m", get_str (d, "fleece-file"));
    json_object_object_add (d, "job", NULL);
    json_object_object_add (d, "frozen-bitmap", NULL);
    json_object_object_add (d, "marker-bitmap", NULL);
    json_object_object_add (d, "node", NULL);
    json_object_object_add (d, "fleece-node", NULL);
    save_state ();
  }
  return true;
}

/* What QEMU's going away during a backup means for the next one. */
static void
explain_qemu_gone (void)
{
  json_object *devs = devices ();
  bool proxmox = strcmp (get_str (state, "backend") ?: "", "proxmox") == 0;

  for (size_t i = 0; i < json_object_array_length (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *dev = get_str (d, "device") ?: "?";
    const char *live = get_str (d, "live-bitmap");
    const char *frozen = get_str (d, "frozen-bitmap");

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
stop_local (void)
{
  json_object *devs = devices ();

  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    const char *mnt = get_str (d, "mount");
    if (mnt) {
      char *argv[] = { "fusermount3", "-u", (char *) mnt, NULL };
      char *lazy[] = { "fusermount3", "-u", "-z", (char *) mnt, NULL };
      pid_t pid = get_str (d, "mount-pidfile")
        ? read_pidfile (get_str (d, "mount-pidfile")) : 0;
      if (run_wait (argv, NULL) != 0 && is_mounted (mnt)) {
        /* Busy: a process still has the file open.  Detached now, gone
         * when it closes the file; its reads fail once nbdfuse stops.
         */
        warn ("device %s: %s is busy (a process has the file open): "
              "unmounted lazily", get_str (d, "device"), mnt);
        run_wait (lazy, NULL);
      }
      stop_pid (pid);
      if (get_str (d, "mount-pidfile"))
        unlink (get_str (d, "mount-pidfile"));
      rmdir (mnt);
      json_object_object_add (d, "mount", NULL);
      save_state ();
    }
    if (get_str (d, "pidfile")) {
      pid_t pid = read_pidfile (get_str (d, "pidfile"));
      long started = (long) get_int (d, "nbdkit-pid", 0);
      /* Not listening yet, or never told to go on. */
      if (pid == 0 && process_running ((pid_t) started) &&
          cmdline_mentions (started, run_dir))
        pid = (pid_t) started;
      stop_pid (pid);
      if (get_str (d, "nbdkit-log"))
        report_log (get_str (d, "device"), get_str (d, "nbdkit-log"));
      unlink (get_str (d, "pidfile"));
      if (get_str (d, "socket"))
        unlink (get_str (d, "socket"));
      json_object_object_add (d, "pidfile", NULL);
      save_state ();
    }
  }
  stop_strays ();
}

void
do_teardown (bool success)
{
  bool ok = true;

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
  if (!load_state ()) {
    /* The state is written before any change: there is none. */
    warn ("%s: nothing to tear down", run_dir);
    rmdir (run_dir);
    return;
  }
  stop_local ();
  if (strcmp (get_str (state, "backend") ?: "", "serve") != 0) {
    char err[1024];
    if (qmp == NULL)            /* else a roll-back: the same connection */
      qmp = ba_qmp_connect (get_str (state, "qmp"), qmp_timeout_ms (),
                            err, sizeof err);
    if (qmp == NULL) {
      /* Nothing listens: QEMU is gone, and nothing is left in it to
       * undo.  Anything else (another QMP client, a timeout): keep the
       * state, so that teardown can be run again.
       */
      if (errno != ENOENT && errno != ECONNREFUSED)
        die ("%s: nothing was torn down; try again", err);
      warn ("%s (QEMU is gone: only local state is cleaned up)", err);
      explain_qemu_gone ();
      ok = false;
    }
    else
      teardown_qemu (success);
  }
  {
    char *p = state_path ();
    json_object *devs = devices ();
    for (size_t i = 0; i < alen (devs); i++) {
      json_object *d = json_object_array_get_idx (devs, i);
      const char *f = get_str (d, "fleece-file");
      if (!ok && f)
        unlink (f);
      if (get_str (d, "status-file"))
        unlink (get_str (d, "status-file"));
      for (const char *const *ext = (const char *const[]) {
             "nbdkit.log", "nbdfuse.log", NULL }; *ext; ext++) {
        char *f = xasprintf ("%s/%s.%s", run_dir, get_str (d, "device"), *ext);
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
    if (!ok && get_bool (state, "nbd-server-started")) {
      p = xasprintf ("%s/qemu-nbd.sock", run_dir);
      unlink (p);
      free (p);
    }
    remove_stray_sockets ();
    if (rmdir (run_dir) == -1)
      warn ("rmdir %s: %m", run_dir);
  }
  if (!ok)
    exit (1);
}

void
roll_back (void)
{
  fprintf (stderr, "%s: undoing what was set up\n", progname);
  do_teardown (false);
}
