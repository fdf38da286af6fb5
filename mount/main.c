/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-mount: QEMU's snapshot-access export as a file, read
 * in-process with libnbd under the backupaccess rules (lib/view.c):
 * reads only inside the dirty bitmap, whole aligned clusters discarded
 * once read or punched out, a broken snapshot failing every read.  For
 * backup programs that read files (Proxmox VE's file-handle consumers).
 *
 * This file: the command line, start-up and shut-down.  disk.c does the
 * I/O, fs.c is the FUSE glue.
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdarg.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cluster.h"
#include "disk.h"
#include "fs.h"
#include "log.h"
#include "size.h"

#define USAGE \
  "Usage: " PROGRAM_NAME " [OPTIONS] MOUNTPOINT[/FILENAME]\n" \
  "         (--socket SOCKET [--export NAME] | --uri URI)\n" \
  "\n" \
  "Mounts QEMU's snapshot-access NBD export as the file FILENAME (default:\n" \
  "the export name, or \"disk\") in the directory MOUNTPOINT, with\n" \
  "FILENAME.dirty beside it (the dirty regions, \"OFFSET LENGTH\" lines).\n" \
  "Read it with O_DIRECT; unmount with fusermount3 -u MOUNTPOINT.\n" \
  "\n" \
  "  -U, --socket SOCKET      QEMU's NBD server (a unix socket)\n" \
  "  -e, --export NAME        The export (default \"\")\n" \
  "      --uri URI            The export as an NBD URI instead\n" \
  "  -b, --bitmap NAME        Readable: only qemu:dirty-bitmap:NAME\n" \
  "      --bitmap-socket SOCKET, --bitmap-export NAME, --bitmap-uri URI\n" \
  "                           Where to read the bitmap (default: the export)\n" \
  "  -c, --cluster SIZE       Copy-before-write cluster (default 64K)\n" \
  "  -C, --connections N      Connections to QEMU (default 4)\n" \
  "      --request-size SIZE  QEMU's reads in pieces of SIZE (default 256K)\n" \
  "      --trim-batch SIZE    Discards in batches of SIZE (default 4M)\n" \
  "      --discard-clean      Discard the clean clusters at start-up\n" \
  "      --behind-filter      The export is nbdkit's backupaccess filter's:\n" \
  "                           pass its refusals on as they are\n" \
  "  -r, --readonly           Never discard (no trims to QEMU)\n" \
  "  -P, --pidfile FILE       Write the process ID there once mounted\n" \
  "      --status FILE        The counters as JSON, every second\n" \
  "  -f, --foreground         Do not become a daemon (log to stderr)\n" \
  "  -v, --verbose            A debug line per request\n" \
  "      --fuse-debug         libfuse's debug output\n" \
  "      --help, -V, --version\n"

enum { OPT_URI = 256, OPT_BITMAP_SOCKET, OPT_BITMAP_EXPORT, OPT_BITMAP_URI,
       OPT_REQUEST_SIZE, OPT_TRIM_BATCH, OPT_DISCARD_CLEAN, OPT_STATUS,
       OPT_FUSE_DEBUG, OPT_HELP, OPT_BEHIND_FILTER };

static const struct option long_options[] = {
  { "socket", required_argument, NULL, 'U' },
  { "export", required_argument, NULL, 'e' },
  { "uri", required_argument, NULL, OPT_URI },
  { "bitmap", required_argument, NULL, 'b' },
  { "bitmap-socket", required_argument, NULL, OPT_BITMAP_SOCKET },
  { "bitmap-export", required_argument, NULL, OPT_BITMAP_EXPORT },
  { "bitmap-uri", required_argument, NULL, OPT_BITMAP_URI },
  { "cluster", required_argument, NULL, 'c' },
  { "connections", required_argument, NULL, 'C' },
  { "request-size", required_argument, NULL, OPT_REQUEST_SIZE },
  { "trim-batch", required_argument, NULL, OPT_TRIM_BATCH },
  { "discard-clean", no_argument, NULL, OPT_DISCARD_CLEAN },
  { "behind-filter", no_argument, NULL, OPT_BEHIND_FILTER },
  { "readonly", no_argument, NULL, 'r' },
  { "pidfile", required_argument, NULL, 'P' },
  { "status", required_argument, NULL, OPT_STATUS },
  { "foreground", no_argument, NULL, 'f' },
  { "verbose", no_argument, NULL, 'v' },
  { "fuse-debug", no_argument, NULL, OPT_FUSE_DEBUG },
  { "help", no_argument, NULL, OPT_HELP },
  { "version", no_argument, NULL, 'V' },
  { NULL, 0, NULL, 0 },
};

struct options {
  struct disk_config disk;
  char *mountpoint, *name;
  const char *pidfile;
  char *pidfile_abs, *status_abs;       /* what the two point to */
  bool foreground, fuse_debug;
};

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  fprintf (stderr, PROGRAM_NAME ": ");
  vfprintf (stderr, fmt, ap);
  fprintf (stderr, "\n");
  va_end (ap);
  exit (EXIT_FAILURE);
}

/* A size (lib/size.h) of at most max. */
static uint64_t
parse_size (const char *what, const char *s, uint64_t max)
{
  uint64_t v;
  const char *why;

  if (ba_parse_size (s, max, &v, &why) == -1)
    die ("%s '%s': %s", what, s, why);
  return v;
}

/* path, absolute (from the working directory). */
static char *
absolute (const char *path)
{
  char *cwd, *r;

  if (path[0] == '/')
    r = strdup (path);
  else {
    cwd = getcwd (NULL, 0);
    if (cwd == NULL)
      die ("getcwd: %m");
    if (asprintf (&r, "%s/%s", cwd, path) == -1)
      r = NULL;
    free (cwd);
  }
  if (r == NULL)
    die ("out of memory");
  return r;
}

/* MOUNTPOINT, or MOUNTPOINT/FILENAME when MOUNTPOINT is no directory. */
static void
split_mountpoint (struct options *o, const char *arg)
{
  struct stat st;
  char *slash;

  if (stat (arg, &st) == 0 && S_ISDIR (st.st_mode)) {
    o->mountpoint = strdup (arg);
    o->name = strdup (o->disk.up.export && *o->disk.up.export
                      ? o->disk.up.export : "disk");
  }
  else if ((slash = strrchr (arg, '/')) != NULL && slash[1] != '\0') {
    o->mountpoint = strndup (arg, (size_t) (slash - arg) + (slash == arg));
    o->name = strdup (slash + 1);
  }
  else
    die ("%s: no such directory", arg);
  if (o->mountpoint == NULL || o->name == NULL)
    die ("out of memory");
  if (strchr (o->name, '/') || strcmp (o->name, ".") == 0 ||
      strcmp (o->name, "..") == 0 || strlen (o->name) > 200)
    die ("%s: not a file name", o->name);
}

static void
check_options (const struct options *o)
{
  const struct disk_config *c = &o->disk;

  if ((c->up.socket == NULL) == (c->up.uri == NULL))
    die ("give the export as --socket SOCKET [--export NAME] or --uri URI");
  if (c->up.uri && c->up.export)
    die ("--export is for --socket; a URI names its export");
  if (c->bitmap_uri && (c->bitmap_socket || c->bitmap_export))
    die ("--bitmap-uri names where the bitmap is; --bitmap-socket and "
         "--bitmap-export are the other way to say it");
  if ((c->bitmap_uri || c->bitmap_socket || c->bitmap_export) && !c->bitmap)
    die ("where to read the bitmap is given, but no --bitmap NAME");
  if (c->bitmap && *c->bitmap == '\0')
    die ("--bitmap: the bitmap name is empty");
  if (c->discard_clean && c->readonly)
    die ("--discard-clean discards, --readonly never does: give one");
}

static void
parse_options (int argc, char **argv, struct options *o)
{
  struct disk_config *c = &o->disk;
  int opt;

  memset (o, 0, sizeof *o);
  c->cluster = BA_CLUSTER_DEFAULT;
  c->trim_batch = UINT64_C (4) << 20;
  c->up.connections = 4;
  while ((opt = getopt_long (argc, argv, "U:e:b:c:C:rP:fvV", long_options,
                             NULL)) != -1) {
    switch (opt) {
    case 'U': c->up.socket = optarg; break;
    case 'e': c->up.export = optarg; break;
    case OPT_URI: c->up.uri = optarg; break;
    case 'b': c->bitmap = optarg; break;
    case OPT_BITMAP_SOCKET: c->bitmap_socket = optarg; break;
    case OPT_BITMAP_EXPORT: c->bitmap_export = optarg; break;
    case OPT_BITMAP_URI: c->bitmap_uri = optarg; break;
    case 'c':
      c->cluster = parse_size ("--cluster", optarg, BA_CLUSTER_MAX);
      if (!ba_cluster_size_valid ((int64_t) c->cluster))
        die ("--cluster %s: the cluster size must be " BA_CLUSTER_RULE,
             optarg);
      break;
    case 'C':
      c->up.connections = (unsigned) parse_size ("--connections", optarg,
                                                 BA_UPSTREAM_CONNECTIONS_MAX);
      if (c->up.connections == 0)
        die ("--connections %s: at least 1", optarg);
      break;
    case OPT_REQUEST_SIZE:
      c->up.piece = (uint32_t) parse_size ("--request-size", optarg,
                                           BA_UPSTREAM_MAX_REQUEST);
      if (!ba_upstream_piece_valid (c->up.piece))
        die ("--request-size %s: " BA_UPSTREAM_PIECE_RULE, optarg);
      break;
    case OPT_TRIM_BATCH:
      c->trim_batch = parse_size ("--trim-batch", optarg, UINT64_C (1) << 30);
      break;
    case OPT_DISCARD_CLEAN: c->discard_clean = true; break;
    case OPT_BEHIND_FILTER: c->behind_filter = true; break;
    case 'r': c->readonly = true; break;
    case 'P': o->pidfile = optarg; break;
    case OPT_STATUS: c->status_path = optarg; break;
    case 'f': o->foreground = true; break;
    case 'v': log_verbose = true; break;
    case OPT_FUSE_DEBUG: o->fuse_debug = true; break;
    case OPT_HELP: printf ("%s", USAGE); exit (EXIT_SUCCESS);
    case 'V':
      printf (PROGRAM_NAME " %s\n", PACKAGE_VERSION);
      exit (EXIT_SUCCESS);
    default: fprintf (stderr, "%s", USAGE); exit (2);
    }
  }
  if (optind != argc - 1) {
    fprintf (stderr, "%s", USAGE);
    exit (2);
  }
  check_options (o);
  split_mountpoint (o, argv[optind]);
  /* A daemon runs in /. */
  if (o->pidfile) {
    o->pidfile_abs = absolute (o->pidfile);
    o->pidfile = o->pidfile_abs;
  }
  if (c->status_path) {
    o->status_abs = absolute (c->status_path);
    c->status_path = o->status_abs;
  }
}

/* The pidfile, written whole (a new file renamed over it), so that
 * whoever waits for it never reads half a number.
 */
static void
write_pidfile (const char *path)
{
  char *tmp;
  FILE *fp;

  if (asprintf (&tmp, "%s.tmp", path) == -1)
    die ("out of memory");
  fp = fopen (tmp, "we");
  if (fp != NULL) {
    bool ok = fprintf (fp, "%d\n", (int) getpid ()) > 0;
    if (fclose (fp) == 0 && ok && rename (tmp, path) == 0) {
      free (tmp);
      return;
    }
  }
  log_error ("pidfile %s: %m", path);
  unlink (tmp);
  free (tmp);
}

/* The FUSE session on the mount point; NULL after a message. */
static struct fuse_session *
start_session (const struct options *o, struct fs *fs)
{
  /* No allow_other: only the caller can open the files. */
  char *argv[] = { PROGRAM_NAME, "-o",
                   o->disk.readonly
                   ? "fsname=backupaccess,subtype=backupaccess,"
                     "default_permissions,ro"
                   : "fsname=backupaccess,subtype=backupaccess,"
                     "default_permissions",
                   "-d", NULL };
  struct fuse_args args = FUSE_ARGS_INIT (o->fuse_debug ? 4 : 3, argv);
  struct fuse_session *se;

  se = fuse_session_new (&args, &fs_operations, sizeof fs_operations, fs);
  /* The session keeps nothing of args, which option parsing copied. */
  fuse_opt_free_args (&args);
  if (se == NULL)
    return NULL;
  if (fuse_set_signal_handlers (se) == -1) {
    fuse_session_destroy (se);
    return NULL;
  }
  if (fuse_session_mount (se, o->mountpoint) == -1) {
    fuse_remove_signal_handlers (se);
    fuse_session_destroy (se);
    return NULL;
  }
  return se;
}

/* Serves until unmounted or signalled (SIGTERM, SIGINT, SIGHUP).
 * Returns 0, the signal's number, or -1.
 */
static int
serve (struct fuse_session *se)
{
  struct fuse_loop_config *config = fuse_loop_cfg_create ();
  int r;

  if (config == NULL)
    return -1;
  /* Keep the workers (and their read buffers) between requests. */
  fuse_loop_cfg_set_idle_threads (config, 16);
  fuse_loop_cfg_set_max_threads (config, 16);
  r = fuse_session_loop_mt (se, config);
  fuse_loop_cfg_destroy (config);
  return r;
}

int
main (int argc, char **argv)
{
  struct options o;
  struct disk *disk;
  struct fs *fs;
  struct fuse_session *se;
  char err[1024];
  int r;

  parse_options (argc, argv, &o);
  disk = disk_open (&o.disk, err, sizeof err);
  if (disk == NULL)
    die ("%s", err);
  fs = fs_new (disk, o.name);
  if (fs == NULL)
    die ("out of memory");
  se = start_session (&o, fs);
  if (se == NULL) {
    disk_close (disk);
    die ("cannot mount %s", o.mountpoint);  /* libfuse said why */
  }
  if (!o.foreground) {
    log_to_syslog ();
    fuse_daemonize (0);
  }
  if (o.pidfile)
    write_pidfile (o.pidfile);
  if (disk_start (disk, err, sizeof err) == -1) {
    log_error ("%s", err);
    r = -1;
  }
  else {
    log_info ("%s/%s: %" PRIu64 " bytes, ready", o.mountpoint, o.name,
              disk_size (disk));
    r = serve (se);
    if (r > 0) {
      log_info ("signal %d: unmounting", r);
      r = 0;
    }
  }
  fuse_session_unmount (se);
  fuse_remove_signal_handlers (se);
  fuse_session_destroy (se);
  /* The last discards go out whatever signal comes now. */
  signal (SIGTERM, SIG_IGN);
  signal (SIGINT, SIG_IGN);
  signal (SIGHUP, SIG_IGN);
  disk_close (disk);
  fs_free (fs);
  free (o.mountpoint);
  free (o.name);
  free (o.pidfile_abs);
  free (o.status_abs);
  return r == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
