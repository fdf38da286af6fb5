/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-copy: a full or incremental backup of one disk, read
 * straight from QEMU's snapshot-access export with the backupaccess
 * filter's rules in this process (lib/copy.c, lib/view.c), written into
 * a new qcow2 image (on top of the previous backup for an incremental)
 * or a sparse raw file.  This file: the options, and the copy from start
 * to finish; a backup is either complete and flushed under its name, or
 * the program fails and leaves none.
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <json.h>

#include "bitmap.h"
#include "cluster.h"
#include "program.h"
#include "size.h"

#define USAGE \
  "backupaccess-copy (--socket SOCKET --export NAME | --uri URI)\n" \
  "                  [--bitmap NAME] [--backing PREV [--backing-format FMT]]\n" \
  "                  [--format qcow2|raw] [--cluster SIZE]\n" \
  "                  [--discard[=BOOL]] [--discard-clean]\n" \
  "                  [--bandwidth-limit BYTES_PER_S] [--connections N]\n" \
  "                  [--requests N] [--request-size SIZE] [--no-extents]\n" \
  "                  [--trim-batch SIZE]\n" \
  "                  [--progress] [--status FILE] OUTPUT\n" \
  "backupaccess-copy --check [--backing PREV [--backing-format FMT]]\n" \
  "                  [--format qcow2|raw] OUTPUT\n" \
  "\n" \
  "Copies QEMU's snapshot-access export (the whole disk, or with --bitmap\n" \
  "the dirty regions, into a qcow2 overlay of the previous backup PREV)\n" \
  "into OUTPUT, discarding in QEMU what it has copied.  OUTPUT exists only\n" \
  "once the backup is complete.  See backupaccess-copy(1).\n"

const char *progname = "backupaccess-copy";

/* Trims are batched like the filter's (backupaccess-trim-batch). */
#define TRIM_BATCH_DEFAULT ((uint64_t) 4 << 20)
#define CONNECTIONS_DEFAULT 2
#define REQUESTS_DEFAULT 16

static void
vwarn (const char *fmt, va_list ap)
{
  fprintf (stderr, "%s: ", progname);
  vfprintf (stderr, fmt, ap);
  fputc ('\n', stderr);
}

void
warn (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vwarn (fmt, ap);
  va_end (ap);
}

static void __attribute__ ((format (printf, 1, 2), noreturn))
die (const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vwarn (fmt, ap);
  va_end (ap);
  exit (1);
}

/* A size (lib/size.h); the limits are each option's own. */
static uint64_t
parse_size (const char *what, const char *s)
{
  uint64_t v;
  const char *why;

  if (ba_parse_size (s, UINT64_MAX, &v, &why) == -1)
    die ("%s '%s': %s", what, s, why);
  return v;
}

static unsigned
parse_count (const char *what, const char *s, unsigned max)
{
  uint64_t v = parse_size (what, s);

  if (v < 1 || v > max)
    die ("%s %s: from 1 to %u", what, s, max);
  return (unsigned) v;
}

static bool
parse_bool (const char *what, const char *s)
{
  if (s == NULL || !strcmp (s, "true") || !strcmp (s, "yes") ||
      !strcmp (s, "on") || !strcmp (s, "1"))
    return true;
  if (!strcmp (s, "false") || !strcmp (s, "no") || !strcmp (s, "off") ||
      !strcmp (s, "0"))
    return false;
  die ("%s=%s: true or false", what, s);
}

static const char *
parse_format (const char *what, const char *s)
{
  if (strcmp (s, "qcow2") != 0 && strcmp (s, "raw") != 0)
    die ("%s %s: qcow2 or raw", what, s);
  return s;
}

/* A relative path as "./PATH": QEMU takes "PROTOCOL:..." before any
 * '/' for a protocol, and a leading '-' for an option.
 */
static const char *
file_path (const char *p)
{
  char *q;

  if (p[0] == '/' || strncmp (p, "./", 2) == 0 || strncmp (p, "../", 3) == 0)
    return p;
  if (asprintf (&q, "./%s", p) == -1)
    die ("out of memory");
  return q;
}

enum {
  OPT_URI = 256, OPT_SOCKET, OPT_EXPORT, OPT_BITMAP, OPT_BACKING,
  OPT_BACKING_FORMAT, OPT_FORMAT, OPT_CLUSTER, OPT_DISCARD,
  OPT_DISCARD_CLEAN, OPT_BANDWIDTH, OPT_CONNECTIONS, OPT_REQUESTS,
  OPT_REQUEST_SIZE, OPT_NO_EXTENTS, OPT_PROGRESS, OPT_STATUS, OPT_CHECK,
  OPT_TRIM_BATCH,
  OPT_HELP, OPT_VERSION,
};

static const struct option long_options[] = {
  { "uri", required_argument, NULL, OPT_URI },
  { "socket", required_argument, NULL, OPT_SOCKET },
  { "export", required_argument, NULL, OPT_EXPORT },
  { "bitmap", required_argument, NULL, OPT_BITMAP },
  { "backing", required_argument, NULL, OPT_BACKING },
  { "backing-format", required_argument, NULL, OPT_BACKING_FORMAT },
  { "format", required_argument, NULL, OPT_FORMAT },
  { "cluster", required_argument, NULL, OPT_CLUSTER },
  { "discard", optional_argument, NULL, OPT_DISCARD },
  { "discard-clean", no_argument, NULL, OPT_DISCARD_CLEAN },
  { "bandwidth-limit", required_argument, NULL, OPT_BANDWIDTH },
  { "connections", required_argument, NULL, OPT_CONNECTIONS },
  { "requests", required_argument, NULL, OPT_REQUESTS },
  { "request-size", required_argument, NULL, OPT_REQUEST_SIZE },
  { "no-extents", no_argument, NULL, OPT_NO_EXTENTS },
  { "trim-batch", required_argument, NULL, OPT_TRIM_BATCH },
  { "progress", no_argument, NULL, OPT_PROGRESS },
  { "status", required_argument, NULL, OPT_STATUS },
  { "check", no_argument, NULL, OPT_CHECK },
  { "help", no_argument, NULL, OPT_HELP },
  { "version", no_argument, NULL, OPT_VERSION },
  { NULL, 0, NULL, 0 },
};

/* One option into *o. */
static void
set_option (struct options *o, int c, const char *arg)
{
  uint64_t v;

  switch (c) {
  case OPT_URI: o->uri = arg; break;
  case OPT_SOCKET: o->socket = arg; break;
  case OPT_EXPORT: o->export = arg; break;
  case OPT_BITMAP: o->bitmap = arg; break;
  case OPT_BACKING: o->backing = file_path (arg); break;
  case OPT_BACKING_FORMAT:
    o->backing_format = parse_format ("--backing-format", arg);
    break;
  case OPT_FORMAT: o->format = parse_format ("--format", arg); break;
  case OPT_CLUSTER:
    o->cluster = parse_size ("--cluster", arg);
    if (!ba_cluster_size_valid ((int64_t) o->cluster))
      die ("--cluster %s: %s", arg, BA_CLUSTER_RULE);
    break;
  case OPT_DISCARD: o->discard = parse_bool ("--discard", arg); break;
  case OPT_DISCARD_CLEAN: o->discard_clean = true; break;
  case OPT_BANDWIDTH:
    o->bandwidth = parse_size ("--bandwidth-limit", arg);
    if (o->bandwidth == 0)
      die ("--bandwidth-limit %s: more than 0 bytes per second", arg);
    break;
  case OPT_CONNECTIONS:
    o->connections = parse_count ("--connections", arg,
                                  BA_UPSTREAM_CONNECTIONS_MAX);
    break;
  case OPT_REQUESTS:
    o->requests = parse_count ("--requests", arg, COPY_REQUESTS_MAX);
    break;
  case OPT_REQUEST_SIZE:
    v = parse_size ("--request-size", arg);
    if (!ba_upstream_piece_valid (v))
      die ("--request-size %s: %s", arg, BA_UPSTREAM_PIECE_RULE);
    o->request_size = (uint32_t) v;
    break;
  case OPT_NO_EXTENTS: o->extents = false; break;
  case OPT_TRIM_BATCH: o->trim_batch = parse_size ("--trim-batch", arg); break;
  case OPT_PROGRESS: o->progress = true; break;
  case OPT_STATUS: o->status = arg; break;
  case OPT_CHECK: o->check = true; break;
  }
}

static void
parse_options (int argc, char **argv, struct options *o)
{
  int c;

  *o = (struct options) {
    .cluster = BA_CLUSTER_DEFAULT, .request_size = BA_UPSTREAM_PIECE_DEFAULT,
    .connections = CONNECTIONS_DEFAULT, .requests = REQUESTS_DEFAULT,
    .discard = true, .extents = true, .trim_batch = TRIM_BATCH_DEFAULT,
  };
  while ((c = getopt_long (argc, argv, "", long_options, NULL)) != -1) {
    if (c == OPT_HELP) {
      printf ("Usage: %s", USAGE);
      exit (0);
    }
    if (c == OPT_VERSION) {
      printf ("%s %s\n", progname, PACKAGE_VERSION);
      exit (0);
    }
    if (c == '?') {
      fprintf (stderr, "Usage: %s", USAGE);
      exit (2);
    }
    set_option (o, c, optarg);
  }
  if (optind != argc - 1) {
    fprintf (stderr, "%s: give one OUTPUT\nUsage: %s", progname, USAGE);
    exit (2);
  }
  o->output = file_path (argv[optind]);
  if (o->backing_format && !o->backing)
    die ("--backing-format without --backing");
  if (o->check)
    return;
  if (!o->uri == !o->socket)
    die ("give QEMU's export as --socket SOCKET --export NAME, or --uri URI");
  if (o->socket && o->export == NULL)
    die ("--socket needs --export NAME (QEMU's name of the export)");
  if (o->uri && o->export)
    die ("--export goes with --socket; a URI names its export itself");
}

/* QEMU's disk: its size and, with --bitmap, the dirty regions.  Returns
 * whether the backup is incremental (some bytes are clean).  Dies on
 * bad input, before anything is made.
 */
static bool
read_source (const struct options *o, struct ba_regions *dirty,
             uint64_t *size)
{
  char err[1024];
  uint64_t total;

  if (ba_bitmap_fetch (o->uri, o->socket, o->export, o->bitmap, dirty, size,
                       err, sizeof err) == -1)
    die ("%s", err);
  if (o->bitmap == NULL)
    return false;
  total = ba_regions_total (dirty);
  if (total == *size)
    return false;               /* every byte is dirty: a full backup */
  if (o->backing == NULL)
    die ("the dirty bitmap %s covers %" PRIu64 " of the %" PRIu64 " bytes "
         "of %s: this is an incremental backup, to be written on top of "
         "the previous backup: give it with --backing PREV", o->bitmap,
         total, *size, source_name (o));
  return true;
}

static void
install_signals (void)
{
  struct sigaction sa = { .sa_handler = SIG_IGN };

  sigaction (SIGPIPE, &sa, NULL);
}

static int wake_fd = -1;

static void
on_signal (int sig)
{
  uint64_t one = 1;

  copy_interrupted = sig;
  if (wake_fd >= 0 && write (wake_fd, &one, sizeof one) == -1) {
    /* readable already */
  }
}

static void
catch_stop_signals (void)
{
  struct sigaction sa = { .sa_handler = on_signal };

  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
}

/* The pool of connections to QEMU, one per worker (and base:allocation
 * on each, for the zero runs).
 */
static struct ba_upstream *
open_source (const struct options *o, uint64_t size)
{
  const struct ba_upstream_params p = {
    .uri = o->uri, .socket = o->socket, .export = o->export,
    .meta_context = o->extents ? LIBNBD_CONTEXT_BASE_ALLOCATION : NULL,
    .connections = o->connections, .piece = o->request_size,
  };
  char err[1024];
  struct ba_upstream *src = ba_upstream_open (&p, err, sizeof err);

  if (src == NULL)
    die ("%s", err);
  if ((uint64_t) ba_upstream_size (src) != size)
    die ("%s changed its size", source_name (o));
  if (o->discard && !ba_upstream_can_trim (src))
    die ("%s does not offer discards: add the export with writable: true, "
         "or give --discard=false (the fleecing image then keeps growing)",
         source_name (o));
  return src;
}

static struct ba_copy *
new_copy (const struct options *o, const struct ba_regions *dirty,
          uint64_t size, bool zero)
{
  const struct ba_copy_config cfg = {
    .disk_size = size, .dirty = o->bitmap ? dirty : NULL,
    .cluster_size = o->cluster, .request_size = o->request_size,
    .destination_is_zero = zero, .discard = o->discard,
    .trim_batch = o->trim_batch,
  };
  struct ba_copy *copy = ba_copy_new (&cfg);

  if (copy == NULL)
    die ("%s: %m", source_name (o));
  return copy;
}

/* Makes the output and copies into it; false if the copy failed. */
static bool
copy_all (struct job *job, bool incremental)
{
  const struct options *o = job->o;
  struct ba_regions trims;
  char err[1024];

  ba_regions_init (&trims);
  if (output_open (job->out, o->connections, err, sizeof err) == -1) {
    ba_copy_fail (job->copy, "%s", err);
    return false;
  }
  if (incremental && o->discard && o->discard_clean) {
    if (ba_copy_clean_clusters (job->copy, &trims) == 0)
      send_trims_sync (job, &trims, true);
  }
  job->extents = o->extents && ba_upstream_can_meta_context (job->src);
  run_workers (job, report_progress);
  if (ba_copy_complete (job->copy)) {
    /* The last discards, then the image to stable storage. */
    if (o->discard && ba_copy_flush_trims (job->copy, &trims) == 0)
      send_trims_sync (job, &trims, false);
    if (output_commit (job->out, err, sizeof err) == -1)
      ba_copy_fail (job->copy, "%s", err);
  }
  else if (!ba_copy_failed (job->copy, NULL, 0))
    ba_copy_fail (job->copy, "not every byte was copied");
  ba_regions_free (&trims);
  return !ba_copy_failed (job->copy, NULL, 0);
}

int
main (int argc, char **argv)
{
  struct options o;
  struct ba_regions dirty;
  struct job job = { .o = &o };
  uint64_t size;
  bool incremental, ok;
  char err[1024];

  parse_options (argc, argv, &o);
  if (o.check) {
    /* What can be checked without QEMU: OUTPUT, PREV. */
    job.out = output_check (&o, 0, false, err, sizeof err);
    if (job.out == NULL)
      die ("%s", err);
    output_free (job.out);
    return 0;
  }
  install_signals ();
  ba_regions_init (&dirty);
  incremental = read_source (&o, &dirty, &size);
  job.out = output_check (&o, size, incremental, err, sizeof err);
  if (job.out == NULL)
    die ("%s", err);
  job.src = open_source (&o, size);
  job.copy = new_copy (&o, &dirty, size, output_is_zero (job.out));
  ba_regions_free (&dirty);
  job.rate = o.bandwidth ? rate_new (o.bandwidth) : NULL;
  wake_fd = job.wake_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (job.wake_fd == -1 || (o.bandwidth && job.rate == NULL))
    die ("%m");
  pthread_mutex_init (&job.lock, NULL);
  pthread_cond_init (&job.cond, NULL);
  catch_stop_signals ();

  job.incremental = incremental;
  job.t0 = now_ns ();
  ok = copy_all (&job, incremental);
  if (!ok)
    output_abort (job.out);
  workers_free (&job);
  ba_upstream_close (job.src);
  report_end (&job, ok);
  output_free (job.out);
  ba_copy_free (job.copy);
  rate_free (job.rate);
  return ok ? 0 : 1;
}
