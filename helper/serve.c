/* SPDX-License-Identifier: BSD-3-Clause */
/* serve: an nbdkit with the backupaccess filter and the snapshotaccess
 * plugin per device, on a unix socket in the run directory or on TCP
 * with TLS, and the URIs clients read it at.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "bitmap.h"
#include "listen.h"
#include "cluster.h"
#include "options.h"
#include "proc.h"
#include "regions.h"
#include "rundir.h"
#include "serve.h"
#include "state.h"
#include "util.h"

/* Where the filter, the plugin and the copy program are: beside this
 * program (the build tree), else installed.
 */
char *
module_path (const char *env, const char *file, const char *installed)
{
  char self[PATH_MAX];
  ssize_t n;

  const char *given = getenv (env);

  if (given)
    return strdup (given);
  n = readlink ("/proc/self/exe", self, sizeof self - 1);
  if (n > 0) {
    char *slash, *p;
    self[n] = '\0';
    slash = strrchr (self, '/');
    if (slash) {
      *slash = '\0';
      /* helper/backupaccess-helper in the build tree: modules one up. */
      p = xasprintf ("%s/../%s", self, file);
      if (access (p, R_OK) == 0)
        return p;
      free (p);
      p = xasprintf ("%s/%s", self, file);
      if (access (p, R_OK) == 0)
        return p;
      free (p);
    }
  }
  return strdup (installed);
}

/* What the nbdkit of every device shares. */
struct serving {
  const struct serve_opts *so;
  const struct backend *be;     /* NULL for serve --nbd-path */
  struct listen_addr la;
  char *filter, *plugin;
};

/* nbdkit's command line for a device, and the files it makes.  The
 * arrays hold every option nbdkit_cmd_init may give: grow them with it.
 */
struct nbdkit_cmd {
  char *sock, *pidfile, *log, *status;
  char *formatted[12];          /* the arguments formatted here */
  size_t nformatted;
  char *argv[26];
};

/* arg, kept to be freed with c. */
static char *
keep (struct nbdkit_cmd *c, char *arg)
{
  c->formatted[c->nformatted++] = arg;
  return arg;
}

static void
nbdkit_cmd_init (struct nbdkit_cmd *c, const struct serving *sv,
                 const struct device_state *d, int i)
{
  const struct serve_opts *so = sv->so;
  const char *dev = d->device;
  size_t a = 0;

  memset (c, 0, sizeof *c);
  c->sock = xasprintf ("%s/%s.sock", run_dir, dev);
  c->pidfile = xasprintf ("%s/%s.nbdkit.pid", run_dir, dev);
  c->log = xasprintf ("%s/%s.nbdkit.log", run_dir, dev);
  c->status = xasprintf ("%s/%s.status.json", run_dir, dev);
  c->argv[a++] = "nbdkit";
  c->argv[a++] = "-f";          /* so that its errors reach the log */
  c->argv[a++] = "--log=stderr";
  c->argv[a++] = "--pidfile";
  c->argv[a++] = c->pidfile;
  if (sv->la.host) {
    c->argv[a++] = "-i";
    c->argv[a++] = sv->la.host;
    c->argv[a++] = "-p";
    c->argv[a++] = keep (c, xasprintf ("%d", sv->la.port + i));
  }
  else {
    c->argv[a++] = "-U";
    c->argv[a++] = c->sock;
  }
  if (so->tls_psk) {
    c->argv[a++] = "--tls=require";
    c->argv[a++] = keep (c, xasprintf ("--tls-psk=%s", so->tls_psk));
  }
  if (so->bandwidth > 0)
    c->argv[a++] = "--filter=rate";
  c->argv[a++] = keep (c, xasprintf ("--filter=%s", sv->filter));
  c->argv[a++] = sv->plugin;
  c->argv[a++] = keep (c, xasprintf ("socket=%s", d->nbd_path));
  c->argv[a++] = keep (c, xasprintf ("export=%s", d->export));
  c->argv[a++] = keep (c, xasprintf ("backupaccess-cluster=%" PRIi64,
                                     d->cluster_size));
  c->argv[a++] = keep (c, xasprintf ("cluster=%" PRIi64, d->cluster_size));
  c->argv[a++] = keep (c, xasprintf ("backupaccess-status=%s", c->status));
  if (d->bitmap_name) {
    c->argv[a++] = keep (c, xasprintf ("backupaccess-bitmap=%s",
                                       d->bitmap_name));
    if (sv->be && sv->be->discard_clean && !d->cbw_bitmap)
      c->argv[a++] = "backupaccess-discard-clean=true";
  }
  if (so->clean_zero)
    c->argv[a++] = "backupaccess-clean=zero";
  if (so->bandwidth > 0)
    c->argv[a++] = keep (c, xasprintf ("rate=%" PRIi64, so->bandwidth * 8));
  c->argv[a] = NULL;
}

static void
nbdkit_cmd_free (struct nbdkit_cmd *c)
{
  for (size_t j = 0; j < c->nformatted; j++)
    free (c->formatted[j]);
  free (c->sock);
  free (c->pidfile);
  free (c->log);
  free (c->status);
}

/* Starts device d's nbdkit, recorded first, and waits until it
 * listens.
 */
static void
start_nbdkit (struct helper_state *st, struct device_state *d,
              const struct nbdkit_cmd *c, const struct serving *sv)
{
  const char *dev = d->device;
  int go;
  pid_t pid;

  state_set (&d->pidfile, c->pidfile);
  state_set (&d->socket, sv->la.host ? NULL : c->sock);
  state_set (&d->tls_psk, sv->so->tls_psk);
  state_set (&d->status_file, c->status);
  state_set (&d->nbdkit_log, c->log);
  state_save (st);
  /* Left by an nbdkit that died: ours, in our directory. */
  unlink (c->pidfile);
  unlink (c->sock);
  /* It writes the pidfile once it listens. */
  pid = spawn_detached ((char **) c->argv, c->log, &go);
  d->nbdkit_pid = pid;
  state_save (st);
  if (write (go, "g", 1) != 1)
    die ("starting nbdkit: %m");
  close (go);
  for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (c->pidfile); w++) {
    if (!process_running (pid))
      die ("device %s: nbdkit failed: %s", dev, tail_of (c->log));
    sleep_ms (100);
  }
  if (!read_pidfile (c->pidfile)) {
    stop_pid (pid);
    die ("device %s: nbdkit did not start: %s", dev, tail_of (c->log));
  }
  /* .after_fork errors end it just after it wrote the pidfile. */
  sleep_ms (200);
  if (!read_pidfile (c->pidfile))
    die ("device %s: nbdkit exited: %s", dev, tail_of (c->log));
  make_private (c->pidfile);
  if (!sv->la.host)
    make_private (c->sock);
}

/* Device i: nbdkit started unless it runs already, and its URI. */
static void
serve_device (struct helper_state *st, struct device_state *d,
              const struct serving *sv, int i)
{
  struct nbdkit_cmd c;
  char *uri;

  if (d->pidfile && read_pidfile (d->pidfile) &&
      kill (read_pidfile (d->pidfile), 0) == 0)
    return;                     /* already served */
  if (d->mount && d->uri == NULL)
    die ("device %s is mounted, and its mount reads QEMU's export itself: "
         "a second reader would take its discards for a broken snapshot; "
         "serve a device before mounting it, or not at all", d->device);
  if (d->uri)
    die ("device %s: its nbdkit has gone: what it read is discarded in "
         "QEMU, and a new one would take that for a broken snapshot; this "
         "backup cannot go on: tear it down with --failure (the bitmap "
         "keeps every change) and start again", d->device);
  nbdkit_cmd_init (&c, sv, d, i);
  start_nbdkit (st, d, &c, sv);
  uri = client_uri (&sv->la, i, c.sock);
  state_set (&d->uri, uri);
  free (uri);
  state_save (st);
  nbdkit_cmd_free (&c);
}

void
serve_devices (struct helper_state *st, const struct serve_opts *so)
{
  struct serving sv = { .so = so, .be = backend_named (st->backend) };

  serve_preflight (so, (int) st->ndevices, &sv.la);
  sv.filter = module_path ("BACKUPACCESS_FILTER",
                           "nbdkit-backupaccess-filter.so", "backupaccess");
  sv.plugin = module_path ("BACKUPACCESS_PLUGIN",
                           "nbdkit-snapshotaccess-plugin.so", "snapshotaccess");
  for (size_t i = 0; i < st->ndevices; i++)
    serve_device (st, &st->devices[i], &sv, (int) i);
  free (sv.filter);
  free (sv.plugin);
  listen_addr_free (&sv.la);
}

void
serve_stop (struct helper_state *st, struct device_state *d)
{
  pid_t pid;
  long started;

  if (d->pidfile == NULL)
    return;
  pid = read_pidfile (d->pidfile);
  started = (long) d->nbdkit_pid;
  /* Not listening yet, or never told to go on. */
  if (pid == 0 && process_running ((pid_t) started) &&
      cmdline_mentions (started, run_dir))
    pid = (pid_t) started;
  stop_pid (pid);
  if (d->nbdkit_log)
    report_log (d->device, "nbdkit", d->nbdkit_log);
  unlink (d->pidfile);
  if (d->socket)
    unlink (d->socket);
  state_set (&d->pidfile, NULL);
  state_save (st);
}

/* serve for an export that exists already (a provider's nbd-path). */
struct helper_state *
do_serve_state (struct opts *o)
{
  struct helper_state *st;

  lock_run_dir ();
  if (o->nbd_path == NULL) {
    st = state_load ();
    if (st == NULL)
      die ("%s has no backup access: run 'setup', or give --nbd-path",
           run_dir);
    return st;
  }
  if (o->setup.ndevs == 0)
    die ("serve --nbd-path needs at least one --device DEV[:BITMAP]");
  if (state_exists ())
    die ("%s already holds a backup access: tear it down first", run_dir);
  st = state_new ("serve");
  for (int i = 0; i < o->setup.ndevs; i++) {
    struct device_state *d;
    char *dev = strdup (o->setup.devs[i]);
    char *colon = strchr (dev, ':');
    struct ba_regions none;
    uint64_t size;
    char err[1024];

    if (colon) {
      *colon = '\0';
      check_name ("bitmap", colon + 1, true);
    }
    check_name ("device", dev, false);
    /* The size, and a check that the export is there. */
    ba_regions_init (&none);
    if (ba_bitmap_fetch (NULL, o->nbd_path, dev, NULL, &none, &size,
                         err, sizeof err) == -1)
      die ("device %s: %s", dev, err);
    d = state_add_device (st);
    state_set (&d->device, dev);
    state_set (&d->export, dev);
    state_set (&d->nbd_path, o->nbd_path);
    state_set (&d->bitmap_name, colon ? colon + 1 : NULL);
    state_set (&d->bitmap_mode, colon ? "reuse" : "none");
    d->size = (int64_t) size;
    d->cluster_size = ba_cbw_cluster (o->setup.cluster);
    free (dev);
  }
  state_save (st);
  return st;
}
