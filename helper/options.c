/* SPDX-License-Identifier: BSD-3-Clause */
/* The helper's command line: the options every command takes, into
 * struct opts, with sizes parsed and paths made absolute (and the run
 * and fleecing directories checked) once.
 */
#define _GNU_SOURCE
#include <getopt.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json.h>

#include "cluster.h"
#include "options.h"
#include "rundir.h"
#include "size.h"
#include "util.h"

enum {
  OPT_QMP = 256, OPT_RUN_DIR, OPT_DEVICE, OPT_BITMAP, OPT_BITMAP_MODE,
  OPT_FLEECING_DIR, OPT_CLUSTER, OPT_BACKEND, OPT_TARGET_ID, OPT_NBD_PATH,
  OPT_BANDWIDTH, OPT_SUCCESS, OPT_FAILURE, OPT_MOUNT, OPT_HELP,
  OPT_LISTEN, OPT_TLS_PSK, OPT_INSECURE_NO_TLS, OPT_CLEAN, OPT_COPY_INTO,
};

static const struct option long_options[] = {
  { "qmp", required_argument, NULL, OPT_QMP },
  { "run-dir", required_argument, NULL, OPT_RUN_DIR },
  { "device", required_argument, NULL, OPT_DEVICE },
  { "bitmap", required_argument, NULL, OPT_BITMAP },
  { "bitmap-mode", required_argument, NULL, OPT_BITMAP_MODE },
  { "fleecing-dir", required_argument, NULL, OPT_FLEECING_DIR },
  { "cluster-size", required_argument, NULL, OPT_CLUSTER },
  { "backend", required_argument, NULL, OPT_BACKEND },
  { "target-id", required_argument, NULL, OPT_TARGET_ID },
  { "nbd-path", required_argument, NULL, OPT_NBD_PATH },
  { "bandwidth-limit", required_argument, NULL, OPT_BANDWIDTH },
  { "success", no_argument, NULL, OPT_SUCCESS },
  { "failure", no_argument, NULL, OPT_FAILURE },
  { "mount", no_argument, NULL, OPT_MOUNT },
  { "listen", required_argument, NULL, OPT_LISTEN },
  { "tls-psk", required_argument, NULL, OPT_TLS_PSK },
  { "insecure-no-tls", no_argument, NULL, OPT_INSECURE_NO_TLS },
  { "clean", required_argument, NULL, OPT_CLEAN },
  { "copy-into", required_argument, NULL, OPT_COPY_INTO },
  { "help", no_argument, NULL, OPT_HELP },
  { NULL, 0, NULL, 0 },
};

static char *
absolute (const char *path)
{
  char cwd[PATH_MAX];

  if (path[0] == '/')
    return strdup (path);
  if (getcwd (cwd, sizeof cwd) == NULL)
    die ("getcwd: %m");
  return xasprintf ("%s/%s", cwd, path);
}

/* A size (lib/size.h); the options hold it as an int64_t. */
static int64_t
parse_size (const char *what, const char *s)
{
  uint64_t v;
  const char *why;

  if (ba_parse_size (s, INT64_MAX, &v, &why) == -1)
    die ("%s '%s': %s", what, s, why);
  return (int64_t) v;
}

/* DEVICE=FILE[,backing=PREV][,backing-format=FMT] */
static void
parse_copy_into (struct opts *o, const char *arg)
{
  struct copy_into *c = &o->copies[o->ncopies++];
  char *s = strdup (arg), *eq, *key;

  if (s == NULL)
    die ("out of memory");
  eq = strchr (s, '=');

  if (eq == NULL || eq == s || eq[1] == '\0' || eq[1] == ',')
    die ("--copy-into %s: DEVICE=FILE[,backing=PREV][,backing-format=FMT]",
         arg);
  *eq = '\0';
  check_name ("--copy-into device", s, false);
  c->device = xasprintf ("%s", s);
  key = strchr (eq + 1, ',');
  if (key)
    *key++ = '\0';
  c->file = strdup (eq + 1);
  while (key) {
    char *next = strchr (key, ','), *val = strchr (key, '=');
    if (next)
      *next++ = '\0';
    if (val == NULL || val[1] == '\0')
      die ("--copy-into %s: '%s' is not KEY=VALUE (a file name with a "
           "comma is not possible here)", arg, key);
    *val++ = '\0';
    if (strcmp (key, "backing") == 0 && c->backing == NULL)
      c->backing = strdup (val);
    else if (strcmp (key, "backing-format") == 0 && !c->backing_format)
      c->backing_format = strdup (val);
    else
      die ("--copy-into %s: unknown or repeated '%s' (backing=PREV, "
           "backing-format=FMT)", arg, key);
    key = next;
  }
  free (s);
}

/* Every device copied is one set up. */
static void
add_copied_devices (struct setup_opts *so, const struct opts *o)
{
  for (int i = 0; i < o->ncopies; i++) {
    char *dev = o->copies[i].device;
    bool listed = dev == NULL;
    for (int j = 0; j < so->ndevs && !listed; j++)
      listed = so->devs[j] && strcmp (so->devs[j], dev) == 0;
    if (!listed)
      so->devs[so->ndevs++] = dev;
  }
}

void
parse_options (int argc, char **argv, struct opts *o, const char *help)
{
  int c;

  memset (o, 0, sizeof *o);
  o->success = -1;
  o->setup.backend = "auto";
  o->setup.cluster = BA_CLUSTER_DEFAULT;
  o->setup.devs = calloc (argc + 1, sizeof (char *));
  o->copies = calloc (argc + 1, sizeof *o->copies);
  while ((c = getopt_long (argc, argv, "+", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_QMP: o->setup.qmp = optarg; break;
    case OPT_RUN_DIR: run_dir = optarg; break;
    case OPT_DEVICE: o->setup.devs[o->setup.ndevs++] = optarg; break;
    case OPT_BITMAP: o->setup.bitmap = optarg; break;
    case OPT_BITMAP_MODE: o->setup.bitmap_mode = optarg; break;
    case OPT_FLEECING_DIR: o->setup.fleecing_dir = optarg; break;
    case OPT_CLUSTER:
      o->setup.cluster = parse_size ("--cluster-size", optarg);
      if (!ba_cluster_size_valid (o->setup.cluster))
        die ("--cluster-size %s: " BA_CLUSTER_RULE, optarg);
      break;
    case OPT_BACKEND: o->setup.backend = optarg; break;
    case OPT_TARGET_ID: o->setup.target_id = optarg; break;
    case OPT_NBD_PATH: o->nbd_path = optarg; break;
    case OPT_BANDWIDTH:
      o->serve.bandwidth = parse_size ("--bandwidth-limit", optarg);
      break;
    case OPT_LISTEN: o->serve.listen = optarg; break;
    case OPT_TLS_PSK: o->serve.tls_psk = optarg; break;
    case OPT_INSECURE_NO_TLS: o->serve.insecure_no_tls = true; break;
    case OPT_CLEAN:
      if (strcmp (optarg, "zero") != 0 && strcmp (optarg, "hole") != 0)
        die ("--clean %s: zero or hole", optarg);
      o->serve.clean_zero = strcmp (optarg, "zero") == 0;
      break;
    case OPT_COPY_INTO: parse_copy_into (o, optarg); break;
    case OPT_SUCCESS: o->success = 1; break;
    case OPT_FAILURE: o->success = 0; break;
    case OPT_MOUNT: o->mount = true; break;
    case OPT_HELP:
      printf ("Usage: %s\n%s", progname, help);
      exit (0);
    default:
      fprintf (stderr, "Usage: %s\n%s", progname, help);
      exit (2);
    }
  }
  add_copied_devices (&o->setup, o);
  if (run_dir == NULL)
    die ("--run-dir DIR is required");
  /* Later commands may run from another directory. */
  {
    char *abs = absolute (run_dir);
    run_dir = checked_dir_path ("--run-dir", abs, false);
    free (abs);
  }
  if (o->setup.qmp)
    o->setup.qmp = absolute (o->setup.qmp);
  if (o->setup.fleecing_dir) {
    char *abs = absolute (o->setup.fleecing_dir);
    o->setup.fleecing_dir = checked_dir_path ("--fleecing-dir", abs, true);
    free (abs);
  }
  if (o->nbd_path)
    o->nbd_path = absolute (o->nbd_path);
  if (o->serve.tls_psk)         /* nbdkit changes to / */
    o->serve.tls_psk = absolute (o->serve.tls_psk);
}

void
free_options (struct opts *o)
{
  for (int i = 0; i < o->ncopies; i++) {
    free (o->copies[i].device);
    free (o->copies[i].file);
    free (o->copies[i].backing);
    free (o->copies[i].backing_format);
  }
  free (o->copies);
  free (o->setup.devs);
  free ((char *) o->nbd_path);
  free ((char *) o->setup.qmp);
  free ((char *) o->setup.fleecing_dir);
  free ((char *) o->serve.tls_psk);
}
