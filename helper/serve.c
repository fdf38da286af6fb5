/* SPDX-License-Identifier: BSD-3-Clause */
/* serve: an nbdkit with the backupaccess filter and plugin per device,
 * on a unix socket in the run directory or on TCP with TLS, and the
 * URIs clients read it at.
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
#include "cluster.h"
#include "options.h"
#include "proc.h"
#include "regions.h"
#include "rundir.h"
#include "serve.h"
#include "state.h"
#include "util.h"

/* Where the filter and the plugin are: beside this program (the build
 * tree), else installed in nbdkit's directories.
 */
static char *
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

/* A path as a URI query value: '&', '#', '%', spaces, anything not
 * plain is percent-encoded (libnbd decodes it), so that a directory's
 * name can neither break the URI nor add parameters to it.
 */
static char *
uri_escape (const char *s)
{
  char *out = malloc (strlen (s) * 3 + 1), *p = out;

  if (out == NULL)
    die ("out of memory");
  for (; *s; s++) {
    unsigned char c = *s;
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
        (c >= '0' && c <= '9') || strchr ("-._~/", c))
      *p++ = c;
    else
      p += sprintf (p, "%%%02X", c);
  }
  *p = '\0';
  return out;
}

/* The user name of a PSK file ("USER:HEXKEY" lines, as psktool(1)
 * writes them), after checking that only its owner (root or the caller)
 * can read it and that its first key is long enough.
 */
static char *
psk_user (const char *path)
{
  int fd = open (path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
  struct stat st;
  char line[1024], *colon, *user;
  FILE *fp;
  size_t i, hex;

  if (fd == -1)
    die ("--tls-psk %s: %m", path);
  if (fstat (fd, &st) == -1)
    die ("--tls-psk %s: %m", path);
  if (!S_ISREG (st.st_mode))
    die ("--tls-psk %s: not a regular file", path);
  if ((st.st_uid != 0 && st.st_uid != geteuid ()) || (st.st_mode & 077))
    die ("--tls-psk %s: must be owned by root or you and readable by its "
         "owner only (chmod 600)", path);
  fp = fdopen (fd, "r");
  if (fp == NULL)
    die ("--tls-psk %s: %m", path);
  if (fgets (line, sizeof line, fp) == NULL)
    line[0] = '\0';
  fclose (fp);
  line[strcspn (line, "\r\n")] = '\0';
  colon = strchr (line, ':');
  for (i = 0; colon && line + i < colon; i++)
    if (!((line[i] >= 'a' && line[i] <= 'z') ||
          (line[i] >= 'A' && line[i] <= 'Z') ||
          (line[i] >= '0' && line[i] <= '9') || strchr ("-._", line[i])))
      break;
  for (hex = 0; colon && colon[1 + hex] &&
         strchr ("0123456789abcdefABCDEF", colon[1 + hex]); hex++)
    ;
  if (colon == NULL || colon == line || line + i != colon ||
      colon[1 + hex] != '\0' || hex % 2 != 0 || hex < 32)
    die ("--tls-psk %s: the first line must be USER:HEXKEY (a user name of "
         "letters, digits, '-', '.', '_' and a key of at least 16 bytes), "
         "as 'psktool -u USER -p FILE' writes it", path);
  user = strndup (line, colon - line);
  if (user == NULL)
    die ("out of memory");
  return user;
}

/* HOST:PORT, [IPV6]:PORT. */
static void
parse_listen (const char *listen, char **host, int *port, int ndevs)
{
  const char *colon = strrchr (listen, ':');
  char *end;
  long p;
  size_t n;

  if (colon == NULL || colon == listen)
    die ("--listen %s: expected HOST:PORT", listen);
  errno = 0;
  p = strtol (colon + 1, &end, 10);
  if (errno || end == colon + 1 || *end || p < 1 || p + ndevs - 1 > 65535)
    die ("--listen %s: the port must be 1 to 65535, and one more per "
         "further device", listen);
  n = colon - listen;
  if (listen[0] == '[' && n > 2 && listen[n - 1] == ']')
    *host = strndup (listen + 1, n - 2);
  else
    *host = strndup (listen, n);
  if (*host == NULL)
    die ("out of memory");
  for (const char *c = *host; *c; c++)
    if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') ||
          (*c >= '0' && *c <= '9') || strchr ("-.:", *c)))
      die ("--listen %s: not a host name or an IP address", listen);
  *port = (int) p;
}

/* Checks serve's options (also before run sets anything up); returns
 * the host, port and PSK user when asked for them.
 */
void
serve_preflight (const struct serve_opts *so, int ndevs,
                 char **host, int *port, char **user)
{
  char *h = NULL, *u = NULL;
  int p = 0;

  if (so->listen && !so->tls_psk && !so->insecure_no_tls)
    die ("--listen %s: TCP is served with TLS only: give --tls-psk FILE "
         "(or, on a network where anyone may read the disks, "
         "--insecure-no-tls)", so->listen);
  if (so->insecure_no_tls && (!so->listen || so->tls_psk))
    die ("--insecure-no-tls goes with --listen, and without --tls-psk");
  if (so->bandwidth > INT64_MAX / 8)
    die ("--bandwidth-limit: too large");
  if (so->listen)
    parse_listen (so->listen, &h, &p, ndevs > 0 ? ndevs : 1);
  if (so->tls_psk)
    u = psk_user (so->tls_psk);
  if (host)
    *host = h;
  else
    free (h);
  if (port)
    *port = p;
  if (user)
    *user = u;
  else
    free (u);
}

void
serve_devices (struct helper_state *st, const struct serve_opts *so)
{
  const struct backend *be = backend_named (st->backend);
  int64_t bandwidth = so->bandwidth;
  char *host = NULL, *user = NULL, *psk_esc = NULL;
  int port = 0;

  serve_preflight (so, (int) st->ndevices, &host, &port, &user);
  if (so->tls_psk)
    psk_esc = uri_escape (so->tls_psk);
  char *filter = module_path ("BACKUPACCESS_FILTER",
                              "nbdkit-backupaccess-filter.so",
                              "backupaccess");
  char *plugin = module_path ("BACKUPACCESS_PLUGIN",
                              "nbdkit-backupaccess-plugin.so",
                              "backupaccess");

  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    const char *dev = d->device;
    char *sock = xasprintf ("%s/%s.sock", run_dir, dev);
    char *pidfile = xasprintf ("%s/%s.nbdkit.pid", run_dir, dev);
    char *log = xasprintf ("%s/%s.nbdkit.log", run_dir, dev);
    char *status = xasprintf ("%s/%s.status.json", run_dir, dev);
    char *filter_arg = xasprintf ("--filter=%s", filter);
    char *socket_arg = xasprintf ("socket=%s", d->nbd_path);
    char *export_arg = xasprintf ("export=%s", d->export);
    char *cluster_arg = xasprintf ("backupaccess-cluster=%" PRIi64,
                                   d->cluster_size);
    char *plugin_cluster_arg = xasprintf ("cluster=%" PRIi64,
                                          d->cluster_size);
    char *status_arg = xasprintf ("backupaccess-status=%s", status);
    char *bitmap_arg = d->bitmap_name
      ? xasprintf ("backupaccess-bitmap=%s", d->bitmap_name)
      : NULL;
    char *rate_arg = bandwidth > 0
      ? xasprintf ("rate=%" PRIi64, bandwidth * 8) : NULL;
    char *port_arg = xasprintf ("%d", port + (int) i);
    char *psk_arg = so->tls_psk ? xasprintf ("--tls-psk=%s", so->tls_psk)
      : NULL;
    char *argv[24];
    int a = 0, go;
    pid_t pid;

    if (d->pidfile && read_pidfile (d->pidfile) &&
        kill (read_pidfile (d->pidfile), 0) == 0)
      goto next;                /* already served */
    if (d->uri)
      die ("device %s: its nbdkit has gone: what it read is discarded in "
           "QEMU, and a new one would take that for a broken snapshot; this "
           "backup cannot go on: tear it down with --failure (the bitmap "
           "keeps every change) and start again", dev);
    argv[a++] = "nbdkit";
    argv[a++] = "-f";           /* so that its errors reach the log */
    argv[a++] = "--log=stderr";
    argv[a++] = "--pidfile";
    argv[a++] = pidfile;
    if (host) {
      argv[a++] = "-i";
      argv[a++] = host;
      argv[a++] = "-p";
      argv[a++] = port_arg;
    }
    else {
      argv[a++] = "-U";
      argv[a++] = sock;
    }
    if (psk_arg) {
      argv[a++] = "--tls=require";
      argv[a++] = psk_arg;
    }
    if (rate_arg)
      argv[a++] = "--filter=rate";
    argv[a++] = filter_arg;
    argv[a++] = plugin;
    argv[a++] = socket_arg;
    argv[a++] = export_arg;
    argv[a++] = cluster_arg;
    argv[a++] = plugin_cluster_arg;
    argv[a++] = status_arg;
    if (bitmap_arg) {
      argv[a++] = bitmap_arg;
      if (be && be->discard_clean)
        argv[a++] = "backupaccess-discard-clean=true";
    }
    if (rate_arg)
      argv[a++] = rate_arg;
    argv[a] = NULL;

    state_set (&d->pidfile, pidfile);
    state_set (&d->socket, host ? NULL : sock);
    state_set (&d->tls_psk, so->tls_psk);
    state_set (&d->status_file, status);
    state_set (&d->nbdkit_log, log);
    state_save (st);
    /* Left by an nbdkit that died: ours, in our directory. */
    unlink (pidfile);
    unlink (sock);
    /* It writes the pidfile once it listens. */
    pid = spawn_detached (argv, log, &go);
    d->nbdkit_pid = pid;
    state_save (st);
    if (write (go, "g", 1) != 1)
      die ("starting nbdkit: %m");
    close (go);
    for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (pidfile); w++) {
      if (!process_running (pid))
        die ("device %s: nbdkit failed: %s", dev, tail_of (log));
      sleep_ms (100);
    }
    if (!read_pidfile (pidfile)) {
      stop_pid (pid);
      die ("device %s: nbdkit did not start: %s", dev, tail_of (log));
    }
    /* .after_fork errors end it just after it wrote the pidfile. */
    sleep_ms (200);
    if (!read_pidfile (pidfile))
      die ("device %s: nbdkit exited: %s", dev, tail_of (log));
    make_private (pidfile);
    if (!host)
      make_private (sock);
    {
      char *esc = uri_escape (sock);
      /* IPv6 addresses in brackets; the PSK's user before the host. */
      bool v6 = host && strchr (host, ':');
      char *uri = host
        ? xasprintf ("nbd%s://%s%s%s%s%s:%s/%s%s", psk_esc ? "s" : "",
                     user ? user : "", user ? "@" : "", v6 ? "[" : "", host,
                     v6 ? "]" : "", port_arg, psk_esc ? "?tls-psk-file=" : "",
                     psk_esc ? psk_esc : "")
        : xasprintf ("nbd%s+unix://%s%s/?socket=%s%s%s", psk_esc ? "s" : "",
                     user ? user : "", user ? "@" : "", esc,
                     psk_esc ? "&tls-psk-file=" : "", psk_esc ? psk_esc : "");
      free (esc);
      state_set (&d->uri, uri);
      free (uri);
    }
    state_save (st);
  next:
    free (sock);
    free (pidfile);
    free (log);
    free (status);
    free (filter_arg);
    free (socket_arg);
    free (export_arg);
    free (cluster_arg);
    free (plugin_cluster_arg);
    free (status_arg);
    free (bitmap_arg);
    free (rate_arg);
    free (port_arg);
    free (psk_arg);
  }
  free (filter);
  free (plugin);
  free (host);
  free (user);
  free (psk_esc);
}

/* What nbdkit's log says, before teardown removes it: the filter's
 * summary, and the last errors.
 */
void
report_log (const char *dev, const char *log)
{
  FILE *fp = fopen (log, "r");
  char line[1024], last[3][1024];
  unsigned errors = 0;

  if (fp == NULL)
    return;
  while (fgets (line, sizeof line, fp)) {
    line[strcspn (line, "\n")] = '\0';
    if (strstr (line, "backupaccess: summary:"))
      warn ("device %s: %s", dev, line);
    else if (strstr (line, " error: ")) {
      snprintf (last[errors % 3], sizeof last[0], "%s", line);
      errors++;
    }
  }
  fclose (fp);
  if (errors)
    warn ("device %s: nbdkit logged %u error(s), the last:", dev, errors);
  for (unsigned i = errors > 3 ? errors - 3 : 0; i < errors; i++)
    warn ("  %s", last[i % 3]);
}

/* serve for an export that exists already (a provider's nbd-path). */
struct helper_state *
do_serve_state (struct opts *o)
{
  struct helper_state *st;

  make_run_dir ();
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
