/* SPDX-License-Identifier: BSD-3-Clause */
/* mount: a backupaccess-mount per device, its export as a file, and the
 * dirty regions of each file for consumers that read files.  The mount
 * reads QEMU's export itself, under the rules of the filter; once a
 * device is served, it reads through that nbdkit instead: one keeper of
 * what has been read and discarded per export, or each would take the
 * other's discards for a broken snapshot.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <json.h>

#include "backend.h"
#include "mapfile.h"
#include "mount.h"
#include "proc.h"
#include "regions.h"
#include "rundir.h"
#include "serve.h"
#include "state.h"
#include "util.h"

/* The regions in the mount's DEV.dirty file: what it reads. */
static json_object *
dirty_regions_of (const struct device_state *d)
{
  json_object *list = json_object_new_array ();
  struct ba_regions dirty;
  char *path = xasprintf ("%s.dirty", d->file);
  char err[1024];

  ba_regions_init (&dirty);
  if (ba_map_parse_file (path, &dirty, err, sizeof err) == -1)
    die ("device %s: %s", d->device, err);
  for (size_t i = 0; i < dirty.n; i++) {
    json_object *r = json_object_new_array ();
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].start));
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].end
                                                     - dirty.r[i].start));
    json_object_array_add (list, r);
  }
  ba_regions_free (&dirty);
  free (path);
  return list;
}

/* The mount's command line, and what it formats. */
struct mount_cmd {
  char *program, *pidfile, *log, *cluster;
  char *argv[24];
};

/* Where the mount reads: the device's nbdkit if it is served (its
 * socket, or its URI on TCP), the bitmap from QEMU; else QEMU's export,
 * with the status file and the clean clusters discarded as serve's
 * nbdkit would.
 */
static size_t
source_args (struct mount_cmd *c, struct device_state *d,
             const struct backend *be, size_t a)
{
  if (d->uri == NULL) {
    c->argv[a++] = "--socket";
    c->argv[a++] = d->nbd_path;
    c->argv[a++] = "--export";
    c->argv[a++] = d->export;
    c->argv[a++] = "--status";
    c->argv[a++] = d->status_file;
    if (d->bitmap_name && be && be->discard_clean)
      c->argv[a++] = "--discard-clean";
  }
  else {
    c->argv[a++] = d->socket ? "--socket" : "--uri";
    c->argv[a++] = d->socket ? d->socket : d->uri;
    /* Its nbdkit may read for other clients too. */
    c->argv[a++] = "--behind-filter";
  }
  if (d->bitmap_name) {
    c->argv[a++] = "--bitmap";
    c->argv[a++] = d->bitmap_name;
    if (d->uri) {
      c->argv[a++] = "--bitmap-socket";
      c->argv[a++] = d->nbd_path;
      c->argv[a++] = "--bitmap-export";
      c->argv[a++] = d->export;
    }
  }
  return a;
}

static void
mount_cmd_init (struct mount_cmd *c, struct device_state *d,
                const struct backend *be, const char *file)
{
  size_t a = 0;

  c->program = module_path ("BACKUPACCESS_MOUNT", "mount/backupaccess-mount",
                            "backupaccess-mount");
  c->pidfile = xasprintf ("%s/%s.mount.pid", run_dir, d->device);
  c->log = xasprintf ("%s/%s.mount.log", run_dir, d->device);
  c->cluster = xasprintf ("%" PRIi64, d->cluster_size);
  c->argv[a++] = c->program;
  c->argv[a++] = "--foreground";        /* so that its log is ours */
  c->argv[a++] = "--pidfile";
  c->argv[a++] = c->pidfile;
  c->argv[a++] = "--cluster";
  c->argv[a++] = c->cluster;
  a = source_args (c, d, be, a);
  /* MOUNTPOINT/FILENAME.  No allow_other: only the caller can open it. */
  c->argv[a++] = (char *) file;
  c->argv[a] = NULL;
}

static void
mount_cmd_free (struct mount_cmd *c)
{
  free (c->program);
  free (c->pidfile);
  free (c->log);
  free (c->cluster);
}

/* Device d's mount, its export as the file DIR/DEV.mnt/DEV; recorded
 * first, so that teardown removes it.
 */
static void
start_mount (struct helper_state *st, struct device_state *d,
             const char *mnt, const char *file)
{
  const struct backend *be = backend_named (st->backend);
  struct mount_cmd c;
  pid_t pid;

  if (d->uri == NULL) {
    char *status = xasprintf ("%s/%s.status.json", run_dir, d->device);
    state_set (&d->status_file, status);
    free (status);
  }
  mount_cmd_init (&c, d, be, file);
  state_set (&d->mount, mnt);
  state_set (&d->mount_pidfile, c.pidfile);
  state_save (st);
  if (mkdir (mnt, 0700) == -1 && errno != EEXIST)
    die ("mkdir %s: %m", mnt);
  unlink (c.pidfile);
  pid = spawn (c.argv, c.log, true);
  for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (c.pidfile); w++) {
    if (waitpid (pid, NULL, WNOHANG) == pid)
      break;                    /* it failed */
    sleep_ms (100);
  }
  if (!read_pidfile (c.pidfile))
    die ("device %s: backupaccess-mount did not start: %s", d->device,
         tail_of (c.log));
  make_private (c.pidfile);
  state_set (&d->file, file);
  state_save (st);
  mount_cmd_free (&c);
}

void
mount_devices (struct helper_state *st, json_object *out)
{
  json_object *list = json_object_new_array ();

  for (size_t i = 0; i < st->ndevices; i++) {
    struct device_state *d = &st->devices[i];
    const char *dev = d->device;
    char *mnt = xasprintf ("%s/%s.mnt", run_dir, dev);
    char *file = xasprintf ("%s/%s", mnt, dev);
    json_object *o;

    if (d->tls_psk)
      die ("device %s is served with TLS, which backupaccess-mount does not "
           "speak: serve it without --tls-psk to mount it", dev);
    if (d->mount == NULL)
      start_mount (st, d, mnt, file);
    else if (!d->mount_pidfile || !read_pidfile (d->mount_pidfile))
      die ("device %s: its backupaccess-mount has gone: tear the backup "
           "down with --failure (the bitmap keeps every change) and start "
           "again", dev);
    o = json_object_new_object ();
    set_str (o, "device", dev);
    set_str (o, "file", file);
    json_object_object_add (o, "dirty-regions", dirty_regions_of (d));
    json_object_array_add (list, o);
    free (mnt);
    free (file);
  }
  json_object_object_add (out, "mounts", list);
}

/* Whether a directory is a mount point, from /proc/self/mounts. */
static bool
is_mounted (const char *dir)
{
  FILE *fp = fopen ("/proc/self/mounts", "r");
  char line[4096];
  bool found = false;

  if (fp == NULL)
    return true;                /* cannot tell: try to unmount */
  while (!found && fgets (line, sizeof line, fp)) {
    char *sp = strchr (line, ' ');
    size_t n = strlen (dir);
    /* Field 2; our paths have no characters that mounts escapes. */
    if (sp && strncmp (sp + 1, dir, n) == 0 && sp[1 + n] == ' ')
      found = true;
  }
  fclose (fp);
  return found;
}

/* Waits up to WAIT_SECONDS for a process to exit by itself. */
static void
wait_exit (pid_t pid)
{
  for (int w = 0; w < WAIT_SECONDS * 10 && process_running (pid); w++)
    sleep_ms (100);
}

void
mount_stop (struct helper_state *st, struct device_state *d)
{
  char *mnt = d->mount;
  char *argv[] = { "fusermount3", "-u", mnt, NULL };
  char *lazy[] = { "fusermount3", "-u", "-z", mnt, NULL };
  char *log;
  pid_t pid;

  if (mnt == NULL)
    return;
  pid = d->mount_pidfile ? read_pidfile (d->mount_pidfile) : 0;
  if (run_wait (argv, NULL) != 0 && is_mounted (mnt)) {
    /* Busy: a process still has the file open.  Detached now, gone when
     * it closes the file; its reads fail once the mount stops.
     */
    warn ("device %s: %s is busy (a process has the file open): "
          "unmounted lazily", d->device, mnt);
    run_wait (lazy, NULL);
  }
  else if (pid)
    wait_exit (pid);     /* it sends its last discards, and exits */
  stop_pid (pid);
  log = xasprintf ("%s/%s.mount.log", run_dir, d->device);
  report_log (d->device, "backupaccess-mount", log);
  free (log);
  if (d->mount_pidfile)
    unlink (d->mount_pidfile);
  rmdir (mnt);
  state_set (&d->mount, NULL);
  state_save (st);
}

/* Removes the empty mount points left in the run directory (by a
 * mount that was stopped without a record).
 */
static void
remove_mount_points (void)
{
  DIR *dir = opendir (run_dir);
  struct dirent *e;

  while (dir && (e = readdir (dir)) != NULL) {
    size_t n = strlen (e->d_name);
    if (n > 4 && strcmp (e->d_name + n - 4, ".mnt") == 0) {
      char *p = xasprintf ("%s/%s", run_dir, e->d_name);
      if (!is_mounted (p))
        rmdir (p);
      free (p);
    }
  }
  if (dir)
    closedir (dir);
}

void
mount_stop_strays (void)
{
  char *prefix = xasprintf ("%s/", run_dir);
  FILE *fp = fopen ("/proc/self/mounts", "r");
  char line[4096];

  while (fp && fgets (line, sizeof line, fp)) {
    char *mnt = strchr (line, ' '), *end;
    if (mnt == NULL || strncmp (mnt + 1, prefix, strlen (prefix)) != 0 ||
        (end = strchr (mnt + 1, ' ')) == NULL)
      continue;
    *end = '\0';
    {
      char *argv[] = { "fusermount3", "-u", "-z", mnt + 1, NULL };
      warn ("unmounting %s, left by a helper that was killed", mnt + 1);
      run_wait (argv, NULL);
      rmdir (mnt + 1);
    }
  }
  if (fp)
    fclose (fp);
  free (prefix);
  remove_mount_points ();
}
