/* SPDX-License-Identifier: BSD-3-Clause */
/* run: setup or serve, then COMMAND with the devices in its
 * environment, then teardown, with success only when COMMAND exited 0;
 * SIGINT and SIGTERM go to COMMAND and end in a teardown with failure.
 */
#define _GNU_SOURCE
#include <errno.h>
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

  rc = run_command (cmd);
  warn ("%s exited with %d: tearing down with %s", cmd[0], rc,
        rc == 0 ? "success" : "failure");
  qmp_close ();
  do_teardown (rc == 0);
  return rc;
}
