/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-helper: sets up snapshot access to a running QEMU's disks
 * over QMP, serves it through nbdkit + the backupaccess filter, mounts
 * it with nbdfuse, reports progress, and tears it all down again.
 *
 * Every step is recorded in DIR/state.json before (or as) it is taken,
 * so that "teardown" can undo a setup that stopped half-way, and can run
 * twice.  No shell is ever used: child processes get an argv.
 *
 * This file: the commands and their usage.
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <json.h>

#include "mount.h"
#include "options.h"
#include "run.h"
#include "rundir.h"
#include "serve.h"
#include "setup.h"
#include "state.h"
#include "status.h"
#include "teardown.h"
#include "util.h"

#define SETUP_USAGE \
  "  setup --qmp SOCKET --run-dir DIR --device DEV [--device DEV ...]\n" \
  "        [--bitmap NAME] [--bitmap-mode none|new|use]\n" \
  "        [--fleecing-dir DIR] [--cluster-size SIZE]\n" \
  "        [--backend auto|proxmox|upstream] [--target-id ID]\n" \
  "      Set up snapshot access in a running QEMU and export it over\n" \
  "      NBD on DIR/qemu-nbd.sock; prints the devices as JSON.\n"

#define SERVE_USAGE \
  "  serve --run-dir DIR [--nbd-path SOCKET --device DEV[:BITMAP] ...\n" \
  "        [--cluster-size SIZE]] [--bandwidth-limit BYTES_PER_S]\n" \
  "        [--listen HOST:PORT] [--tls-psk FILE] [--insecure-no-tls]\n" \
  "      Start nbdkit with the backupaccess filter per device, on\n" \
  "      DIR/DEV.sock (or TCP HOST:PORT, PORT+1, ..., with TLS); prints\n" \
  "      the client URIs as JSON.  Without --nbd-path it serves what\n" \
  "      'setup' exported.\n"

#define MOUNT_USAGE \
  "  mount --run-dir DIR\n" \
  "      nbdfuse per served device (DIR/DEV.mnt/DEV); prints the files\n" \
  "      and their dirty regions.  Open the files with O_DIRECT.\n"

#define STATUS_USAGE \
  "  status --run-dir DIR\n" \
  "      Bytes read, discarded and left, and the fleecing image size.\n"

#define TEARDOWN_USAGE \
  "  teardown --run-dir DIR --success|--failure\n" \
  "      Unmount, stop nbdkit, remove QEMU's exports, then end the\n" \
  "      snapshot access (on failure the bitmap keeps every change).\n" \
  "      Works after a partial setup, and twice.\n"

#define RUN_USAGE \
  "  run SETUP-OR-SERVE-OPTIONS [--mount] -- COMMAND [ARGS...]\n" \
  "      setup (with --qmp) or serve, run COMMAND with\n" \
  "      BACKUPACCESS_JSON, BACKUPACCESS_RUN_DIR and BACKUPACCESS_URI_n\n" \
  "      in its environment, then teardown: --success only when COMMAND\n" \
  "      exited 0; SIGINT/SIGTERM tear down with --failure.\n"

static void
usage (FILE *fp, int status)
{
  fprintf (fp, "Usage: %s COMMAND [OPTIONS]\n\n"
           "Commands:\n" SETUP_USAGE SERVE_USAGE MOUNT_USAGE STATUS_USAGE
           TEARDOWN_USAGE RUN_USAGE
           "\nEach command takes --help.  See backupaccess-helper(1).\n",
           progname);
  exit (status);
}

int
main (int argc, char **argv)
{
  struct opts o;
  const char *cmd;
  struct helper_state *st = NULL;
  json_object *out;
  int rc = 0;

  /* Everything made here and by the children (state, logs, pidfiles,
   * nbdkit's sockets, the filter's status files, fleecing images) is
   * the caller's alone, whatever umask the caller has.
   */
  caller_umask = umask (077);
  if (argc < 2)
    usage (stderr, 2);
  cmd = argv[1];
  if (strcmp (cmd, "--help") == 0 || strcmp (cmd, "-h") == 0)
    usage (stdout, 0);
  argv++;
  argc--;

  if (strcmp (cmd, "setup") == 0) {
    parse_options (argc, argv, &o, SETUP_USAGE);
    st = do_setup (&o);
    on_die (NULL);
    out = describe (st);
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "serve") == 0) {
    parse_options (argc, argv, &o, SERVE_USAGE);
    serve_preflight (&o.serve, o.setup.ndevs, NULL, NULL, NULL);
    st = do_serve_state (&o);
    serve_devices (st, &o.serve);
    out = describe (st);
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "mount") == 0) {
    parse_options (argc, argv, &o, MOUNT_USAGE);
    make_run_dir ();
    st = state_load ();
    if (st == NULL)
      die ("%s has no backup access", run_dir);
    out = json_object_new_object ();
    mount_devices (st, out);
    print_json (out);
    json_object_put (out);
  }
  else if (strcmp (cmd, "status") == 0) {
    parse_options (argc, argv, &o, STATUS_USAGE);
    make_run_dir ();
    st = state_load ();
    if (st == NULL)
      die ("%s has no backup access", run_dir);
    status_command (st);
  }
  else if (strcmp (cmd, "teardown") == 0) {
    parse_options (argc, argv, &o, TEARDOWN_USAGE);
    if (o.success == -1)
      die ("teardown needs --success or --failure");
    do_teardown (o.success);
  }
  else if (strcmp (cmd, "run") == 0) {
    parse_options (argc, argv, &o, RUN_USAGE);
    if (optind >= argc)
      die ("run needs -- COMMAND [ARGS...]");
    rc = do_run (&o, argv + optind);
  }
  else {
    fprintf (stderr, "%s: unknown command '%s'\n", progname, cmd);
    usage (stderr, 2);
  }
  free (o.setup.devs);
  free ((char *) o.nbd_path);
  free ((char *) o.setup.qmp);
  free ((char *) o.setup.fleecing_dir);
  free ((char *) o.serve.tls_psk);
  free (run_dir);
  state_free (st);
  return rc;
}
