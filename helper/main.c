/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-helper: sets up snapshot access to a running QEMU's disks
 * over QMP, serves it through nbdkit + the backupaccess filter, mounts
 * it with backupaccess-mount, reports progress, and tears it all down
 * again.
 *
 * Every step is recorded in DIR/state.json before (or as) it is taken,
 * so that "teardown" can undo a setup that stopped half-way, and can run
 * twice.  No shell is ever used: child processes get an argv.
 *
 * This file: the commands and their usage.  The QMP sequences are in
 * backend-proxmox.c, backend-upstream.c (and upstream-bitmaps.c) and
 * exports.c; the state's record is state.h.
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
#include "listen.h"
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
  "        [--clean zero|hole]\n" \
  "        [--listen HOST:PORT] [--tls-psk FILE] [--insecure-no-tls]\n" \
  "      Start nbdkit with the backupaccess filter per device, on\n" \
  "      DIR/DEV.sock (or TCP HOST:PORT, PORT+1, ..., with TLS); prints\n" \
  "      the client URIs as JSON.  Without --nbd-path it serves what\n" \
  "      'setup' exported.  --clean zero: clean regions read as zero\n" \
  "      extents, for incremental copies into an overlay.\n"

#define MOUNT_USAGE \
  "  mount --run-dir DIR\n" \
  "      backupaccess-mount per device (DIR/DEV.mnt/DEV), straight on\n" \
  "      QEMU's export (or through its nbdkit once served); prints the\n" \
  "      files and their dirty regions.  Open the files with O_DIRECT.\n"

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
  "      exited 0; SIGINT/SIGTERM tear down with --failure.\n" \
  "  run SETUP-OPTIONS [--bandwidth-limit BYTES_PER_S]\n" \
  "      --copy-into DEV=FILE[,backing=PREV][,backing-format=FMT] ...\n" \
  "      setup, then backupaccess-copy of each device straight from QEMU\n" \
  "      into FILE (a new qcow2 image, on top of the previous backup PREV\n" \
  "      for an incremental; or a raw file), then teardown: --success\n" \
  "      only when every copy succeeded.\n"

static void
usage (FILE *fp, int status)
{
  fprintf (fp, "Usage: %s COMMAND [OPTIONS]\n\n"
           "Commands:\n" SETUP_USAGE SERVE_USAGE MOUNT_USAGE STATUS_USAGE
           TEARDOWN_USAGE RUN_USAGE
           "\nEach command takes --help; --version prints the version.\n"
           "See backupaccess-helper(1).\n"
           "On Proxmox VE, vzdump sets up the backup access itself (one per "
           "VM):\nback VMs up to the backupaccess storage (README, "
           "\"Proxmox VE\"); 'setup' is\nfor VMs that vzdump is not backing "
           "up at the same time.\n",
           progname);
  exit (status);
}

static void
print_devices (const struct helper_state *st)
{
  json_object *out = describe (st);

  print_json (out);
  json_object_put (out);
}

/* The state in the run directory, which there must be (a missing one
 * is not made).
 */
static struct helper_state *
existing_state (void)
{
  struct helper_state *st = NULL;

  if (run_dir_exists ())
    st = state_load ();
  if (st == NULL)
    die ("%s has no backup access", run_dir);
  return st;
}

static int
cmd_setup (struct opts *o, int argc, char **argv)
{
  struct helper_state *st = do_setup (o);

  on_die (NULL);
  print_devices (st);
  state_free (st);
  return 0;
}

static int
cmd_serve (struct opts *o, int argc, char **argv)
{
  struct helper_state *st;

  serve_preflight (&o->serve, o->setup.ndevs, NULL);
  st = do_serve_state (o);
  serve_devices (st, &o->serve);
  print_devices (st);
  state_free (st);
  return 0;
}

static int
cmd_mount (struct opts *o, int argc, char **argv)
{
  struct helper_state *st;
  json_object *out;

  if (!lock_existing_run_dir ())
    die ("%s has no backup access", run_dir);
  st = existing_state ();
  out = json_object_new_object ();

  mount_devices (st, out);
  print_json (out);
  json_object_put (out);
  state_free (st);
  return 0;
}

static int
cmd_status (struct opts *o, int argc, char **argv)
{
  struct helper_state *st = existing_state ();

  print_status (st);
  state_free (st);
  return 0;
}

static int
cmd_teardown (struct opts *o, int argc, char **argv)
{
  if (o->success == -1)
    die ("teardown needs --success or --failure");
  do_teardown (o->success);
  return 0;
}

static int
cmd_run (struct opts *o, int argc, char **argv)
{
  if (o->ncopies > 0) {
    if (optind < argc)
      die ("run --copy-into takes no COMMAND: backupaccess-copy copies");
    return do_run_copy (o);
  }
  if (optind >= argc)
    die ("run needs -- COMMAND [ARGS...]");
  return do_run (o, argv + optind);
}

static const struct command {
  const char *name;
  const char *usage;
  /* After the options are parsed (argv[0]: the command): exit status. */
  int (*run) (struct opts *o, int argc, char **argv);
} commands[] = {
  { "setup", SETUP_USAGE, cmd_setup },
  { "serve", SERVE_USAGE, cmd_serve },
  { "mount", MOUNT_USAGE, cmd_mount },
  { "status", STATUS_USAGE, cmd_status },
  { "teardown", TEARDOWN_USAGE, cmd_teardown },
  { "run", RUN_USAGE, cmd_run },
};

int
main (int argc, char **argv)
{
  const struct command *c = NULL;
  struct opts o;
  int rc;

  /* Everything made here and by the children (state, logs, pidfiles,
   * nbdkit's sockets, the filter's status files, fleecing images) is
   * the caller's alone, whatever umask the caller has.
   */
  caller_umask = umask (077);
  if (argc < 2)
    usage (stderr, 2);
  if (strcmp (argv[1], "--help") == 0 || strcmp (argv[1], "-h") == 0)
    usage (stdout, 0);
  if (strcmp (argv[1], "--version") == 0 || strcmp (argv[1], "-V") == 0) {
    printf ("%s %s\n", progname, PACKAGE_VERSION);
    return EXIT_SUCCESS;
  }
  for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
    if (strcmp (argv[1], commands[i].name) == 0)
      c = &commands[i];
  if (c == NULL) {
    fprintf (stderr, "%s: unknown command '%s'\n", progname, argv[1]);
    usage (stderr, 2);
  }
  parse_options (argc - 1, argv + 1, &o, c->usage);
  rc = c->run (&o, argc - 1, argv + 1);
  free_options (&o);
  free (run_dir);
  return rc;
}
