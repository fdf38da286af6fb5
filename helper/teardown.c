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

/* Unmounts, stops nbdkit, and what a helper killed half-way left. */
static void
stop_local (struct helper_state *st)
{
  for (size_t i = 0; i < st->ndevices; i++) {
    mount_stop (st, &st->devices[i]);
    serve_stop (st, &st->devices[i]);
  }
  stop_stray_processes ();
  mount_stop_strays ();
}

/* Undoes what the state records in QEMU, the exports first; false if
 * QEMU is gone (nothing is left in it to undo).
 */
static bool
teardown_qemu (struct helper_state *st, bool success)
{
  const struct backend *be = backend_of_state (st);
  char err[1024];

  if (be == NULL)
    return true;
  if (qmp_connect (st->qmp, err, sizeof err) == -1) {
    /* Nothing listens: QEMU is gone.  Anything else (another QMP
     * client, a timeout): keep the state, so that teardown can be run
     * again.
     */
    if (errno != ENOENT && errno != ECONNREFUSED)
      die ("%s: nothing was torn down; try again", err);
    warn ("%s (QEMU is gone: only local state is cleaned up)", err);
    be->explain_qemu_gone (st);
    return false;
  }
  stop_exports (st);
  be->teardown (st, success);
  return true;
}

/* The files of the run directory, and the directory.  qemu_gone: the
 * fleecing images and QEMU's NBD socket are ours to remove too.
 */
static void
remove_files (const struct helper_state *st, bool qemu_gone)
{
  char *p;

  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    if (qemu_gone && d->fleece_file)
      unlink (d->fleece_file);
    if (d->status_file)
      unlink (d->status_file);
    /* The pidfiles too: a stray that stop_local ended may have written
     * its own after the helper that started it was killed.
     */
    for (const char *const *ext = (const char *const[]) {
           "nbdkit.log", "mount.log", "nbdkit.pid", "mount.pid", NULL };
         *ext; ext++) {
      char *f = xasprintf ("%s/%s.%s", run_dir, d->device, *ext);
      unlink (f);
      free (f);
    }
  }
  p = state_path ();
  unlink (p);
  free (p);
  p = xasprintf ("%s/qemu-img.log", run_dir);
  unlink (p);
  free (p);
  /* QEMU removes its NBD server's socket when told to stop the server,
   * not when it dies or quits.
   */
  if (qemu_gone && st->nbd_server_started) {
    p = xasprintf ("%s/qemu-nbd.sock", run_dir);
    unlink (p);
    free (p);
  }
  remove_stray_sockets ();
  if (rmdir (run_dir) == -1)
    warn ("rmdir %s: %m", run_dir);
}

/* For die during a teardown: what is left, and what to do. */
static void
unfinished (void)
{
  fprintf (stderr, "%s: the teardown did not finish: %s keeps the state of "
           "what is left; run teardown again\n", progname, run_dir);
}

bool
do_teardown (bool success)
{
  struct helper_state *st;
  char *p, *tmp;
  bool ok;

  /* Never made here: a directory removed by another teardown while we
   * waited is not replaced by an empty one (nor is one that holds a
   * backup access set up since then torn down).
   */
  if (!lock_existing_run_dir ()) {
    warn ("%s: nothing to tear down", run_dir);
    return false;
  }
  /* Left by a helper killed while it saved the state. */
  p = state_path ();
  tmp = xasprintf ("%s.tmp", p);
  unlink (tmp);
  free (tmp);
  free (p);
  st = state_load ();
  if (st == NULL) {
    /* The state is written before any change: there is none. */
    warn ("%s: nothing to tear down", run_dir);
    rmdir (run_dir);
    return false;
  }
  on_die (unfinished);
  stop_local (st);
  ok = teardown_qemu (st, success);
  on_die (NULL);
  remove_files (st, !ok);
  state_free (st);
  unlock_run_dir ();
  if (!ok)
    exit (1);
  return true;
}

void
roll_back (void)
{
  fprintf (stderr, "%s: undoing what was set up\n", progname);
  do_teardown (false);
}
