/* SPDX-License-Identifier: BSD-3-Clause */
/* run: setup or serve, then COMMAND with the devices in its
 * environment, or with --copy-into a backupaccess-copy per device (one
 * after the other, straight from QEMU's exports, no nbdkit), then
 * teardown, with success only when COMMAND, or every copy, exited 0;
 * SIGINT and SIGTERM go to the child and end in a teardown with failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "mount.h"
#include "options.h"
#include "qmpops.h"
#include "run.h"
#include "rundir.h"
#include "listen.h"
#include "serve.h"
#include "setup.h"
#include "state.h"
#include "status.h"
#include "teardown.h"
#include "util.h"

/* The caller's umask, given back to COMMAND in run. */
mode_t caller_umask;

/* The signal that came (SIGINT, SIGTERM), passed on to the command
 * while it runs.
 */
static volatile sig_atomic_t got_signal;
static volatile sig_atomic_t child_pid;

static void
on_signal (int sig)
{
  got_signal = sig;
  if (child_pid > 0)
    kill (child_pid, sig);
}

/* The devices, for COMMAND: BACKUPACCESS_JSON (as printed, on one
 * line), BACKUPACCESS_RUN_DIR, BACKUPACCESS_URI_n.
 */
static void
set_environment (const struct helper_state *st, json_object *out)
{
  char *json = strdup (json_object_to_json_string_ext
                       (out, JSON_C_TO_STRING_PLAIN));

  setenv ("BACKUPACCESS_JSON", json, 1);
  setenv ("BACKUPACCESS_RUN_DIR", run_dir, 1);
  for (size_t i = 0; i < st->ndevices; i++) {
    char *k = xasprintf ("BACKUPACCESS_URI_%zu", i);
    setenv (k, st->devices[i].uri, 1);
    free (k);
  }
  free (json);
}

/* Runs COMMAND with the caller's umask, passing on SIGINT and SIGTERM;
 * its exit status, or 128 + the signal that ended it or was passed on.
 */
static int
run_command (char **cmd)
{
  pid_t pid, parent = getpid ();
  int status, rc;
  sigset_t stop, old;

  /* Blocked until child_pid is set, and in the child until its
   * handlers are the default ones: a signal in between, or one that
   * came before, still ends the command.
   */
  sigemptyset (&stop);
  sigaddset (&stop, SIGINT);
  sigaddset (&stop, SIGTERM);
  sigprocmask (SIG_BLOCK, &stop, &old);
  pid = fork ();
  if (pid == -1)
    die ("fork: %m");
  if (pid == 0) {
    signal (SIGINT, SIG_DFL);
    signal (SIGTERM, SIG_DFL);
    umask (caller_umask);
    /* The backup lives as long as we do: a helper killed (SIGKILL, no
     * teardown) ends the command too.
     */
    prctl (PR_SET_PDEATHSIG, SIGTERM);
    if (getppid () != parent)
      _exit (128 + SIGTERM);
    sigprocmask (SIG_SETMASK, &old, NULL);
    execvp (cmd[0], cmd);
    fprintf (stderr, "%s: cannot run %s: %m\n", progname, cmd[0]);
    _exit (127);
  }
  child_pid = pid;
  if (got_signal)
    kill (pid, got_signal);
  sigprocmask (SIG_SETMASK, &old, NULL);
  while (waitpid (pid, &status, 0) == -1)
    if (errno != EINTR)
      die ("waitpid: %m");
  child_pid = 0;                /* reaped: its pid may be reused */
  rc = WIFEXITED (status) ? WEXITSTATUS (status) : 128 + WTERMSIG (status);
  if (got_signal && rc == 0)
    rc = 128 + got_signal;
  return rc;
}

int
do_run (struct opts *o, char **cmd)
{
  struct helper_state *st;
  json_object *out;
  int rc;
  struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };

  serve_preflight (&o->serve, o->setup.ndevs, NULL);
  if (o->mount && o->serve.tls_psk)
    die ("--mount: backupaccess-mount does not speak TLS: give no "
         "--tls-psk to mount");
  /* From here on: a signal during setup or serve must end in a
   * teardown with failure too, not kill the helper half-way.
   */
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
  st = o->setup.qmp ? do_setup (o) : do_serve_state (o);
  on_die (roll_back);
  serve_devices (st, &o->serve);
  out = describe (st);
  if (o->mount)
    mount_devices (st, out);
  set_environment (st, out);
  json_object_put (out);
  state_free (st);
  on_die (NULL);
  /* While COMMAND runs, another helper may tear the backup down (or ask
   * for its status): QEMU's monitor and the run directory are free.
   */
  qmp_close ();
  release_run_dir ();

  rc = run_command (cmd);
  warn ("%s exited with %d: tearing down with %s", cmd[0], rc,
        rc == 0 ? "success" : "failure");
  if (do_teardown (rc == 0))
    return rc;
  /* Not ours to say that this backup is good: another helper ended it
   * (and its bitmap) while COMMAND ran.
   */
  warn ("error: the backup access was torn down by another helper while "
        "%s ran: the backup failed", cmd[0]);
  return rc == 0 ? 1 : rc;
}

/* ---- run --copy-into ---- */

static const struct copy_into *
copy_of (const struct opts *o, const char *device)
{
  for (int i = 0; i < o->ncopies; i++)
    if (strcmp (o->copies[i].device, device) == 0)
      return &o->copies[i];
  return NULL;
}

/* backupaccess-copy's command line: argv[0..3] are the program and the
 * arguments every copy has; the rest are formatted in buf.
 */
struct copy_cmd {
  char *argv[24];
  char *formatted[4];
};

static void
copy_cmd_free (struct copy_cmd *c)
{
  free (c->argv[0]);
  for (size_t i = 0; i < 4; i++)
    free (c->formatted[i]);
}

/* The options about PREV, and FILE. */
static size_t
copy_cmd_output (struct copy_cmd *c, size_t a, const struct copy_into *ci)
{
  if (ci->backing) {
    c->argv[a++] = "--backing";
    c->argv[a++] = ci->backing;
  }
  if (ci->backing_format) {
    c->argv[a++] = "--backing-format";
    c->argv[a++] = ci->backing_format;
  }
  c->argv[a++] = "--";
  c->argv[a++] = ci->file;
  c->argv[a] = NULL;
  return a;
}

/* The copy of device d into ci. */
static void
copy_cmd_init (struct copy_cmd *c, const struct helper_state *st,
               const struct device_state *d, const struct copy_into *ci,
               const struct serve_opts *so)
{
  const struct backend *be = backend_named (st->backend);
  size_t a = 0;

  memset (c, 0, sizeof *c);
  c->argv[a++] = module_path ("BACKUPACCESS_COPY", "copy/backupaccess-copy",
                              "backupaccess-copy");
  c->argv[a++] = "--socket";
  c->argv[a++] = d->nbd_path;
  c->argv[a++] = "--export";
  c->argv[a++] = d->export;
  c->argv[a++] = "--cluster";
  c->argv[a++] = c->formatted[0] = xasprintf ("%" PRIi64, d->cluster_size);
  if (d->bitmap_name) {
    c->argv[a++] = "--bitmap";
    c->argv[a++] = d->bitmap_name;
    if (be && be->discard_clean)
      c->argv[a++] = "--discard-clean";
  }
  if (so->bandwidth > 0) {
    c->argv[a++] = "--bandwidth-limit";
    c->argv[a++] = c->formatted[1] = xasprintf ("%" PRIi64, so->bandwidth);
  }
  copy_cmd_output (c, a, ci);
}

/* Before anything is set up: the options, and each FILE and PREV as
 * backupaccess-copy --check sees them.
 */
static void
copy_preflight (const struct opts *o)
{
  const struct serve_opts *so = &o->serve;

  if (o->mount || so->listen || so->tls_psk || so->insecure_no_tls ||
      so->clean_zero)
    die ("--copy-into copies straight from QEMU, without nbdkit: --mount, "
         "--listen, --tls-psk and --clean are for nbdkit's clients");
  for (int i = 0; i < o->setup.ndevs; i++) {
    int n = 0;
    for (int j = 0; j < o->ncopies; j++)
      n += strcmp (o->copies[j].device, o->setup.devs[i]) == 0;
    if (n != 1)
      die ("device %s: %s --copy-into %s=FILE", o->setup.devs[i],
           n ? "more than one" : "no", o->setup.devs[i]);
  }
  for (int i = 0; i < o->ncopies; i++) {
    struct copy_cmd c = { .argv = { module_path ("BACKUPACCESS_COPY",
      "copy/backupaccess-copy", "backupaccess-copy"), "--check" } };
    copy_cmd_output (&c, 2, &o->copies[i]);
    if (run_command (c.argv) != 0)
      die ("device %s: --copy-into %s: nothing was set up",
           o->copies[i].device, o->copies[i].file);
    copy_cmd_free (&c);
  }
}

/* Copies every device, one after the other; the first failure (or a
 * signal) ends it.  Returns the exit status.
 */
static int
copy_devices (const struct helper_state *st, const struct opts *o)
{
  int rc = 0;

  for (size_t i = 0; i < st->ndevices && rc == 0 && !got_signal; i++) {
    const struct device_state *d = &st->devices[i];
    const struct copy_into *ci = copy_of (o, d->device);
    struct copy_cmd c;

    copy_cmd_init (&c, st, d, ci, &o->serve);
    warn ("device %s: bitmap-mode %s: copying into %s%s%s", d->device,
          d->bitmap_mode ? d->bitmap_mode : "none", ci->file,
          ci->backing ? " on top of " : "", ci->backing ? ci->backing : "");
    rc = run_command (c.argv);
    copy_cmd_free (&c);
    if (rc != 0)
      warn ("device %s: the copy failed (%d): %s is no backup", d->device,
            rc, ci->file);
  }
  if (rc == 0 && got_signal)
    rc = 128 + got_signal;
  return rc;
}

int
do_run_copy (struct opts *o)
{
  struct helper_state *st;
  int rc;
  struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_RESTART };

  copy_preflight (o);
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
  st = o->setup.qmp ? do_setup (o) : do_serve_state (o);
  on_die (roll_back);
  rc = copy_devices (st, o);
  state_free (st);
  on_die (NULL);
  warn ("%s: tearing down with %s", rc == 0 ? "every copy succeeded"
        : "a copy failed", rc == 0 ? "success" : "failure");
  qmp_close ();
  do_teardown (rc == 0);
  return rc;
}
