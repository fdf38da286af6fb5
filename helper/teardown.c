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

#include "backend.h"
#include "exports.h"
#include "mount.h"
#include "proc.h"
#include "qmpops.h"
#include "rundir.h"
#include "serve.h"
#include "state.h"
#include "teardown.h"
#include "util.h"

/* Undoes what the state records in QEMU: the exports first, then the
 * backend's setup.
 */
static void
teardown_qemu (struct helper_state *st, const struct backend *be,
               bool success)
{
  stop_exports (st);
  be->teardown (st, success);
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
  const struct backend *be;

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
  be = backend_of_state (st);
  if (be) {
    char err[1024];
    if (qmp_connect (st->qmp, err, sizeof err) == -1) {
      /* Nothing listens: QEMU is gone, and nothing is left in it to
       * undo.  Anything else (another QMP client, a timeout): keep the
       * state, so that teardown can be run again.
       */
      if (errno != ENOENT && errno != ECONNREFUSED)
        die ("%s: nothing was torn down; try again", err);
      warn ("%s (QEMU is gone: only local state is cleaned up)", err);
      be->explain_qemu_gone (st);
      ok = false;
    }
    else
      teardown_qemu (st, be, success);
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
