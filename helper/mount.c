/* SPDX-License-Identifier: BSD-3-Clause */
/* mount: nbdfuse per served device, and the dirty regions of each
 * file for consumers that read files.
 */
#define _GNU_SOURCE
#include <errno.h>
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

#include "bitmap.h"
#include "mount.h"
#include "proc.h"
#include "regions.h"
#include "rundir.h"
#include "state.h"
#include "util.h"

static json_object *
dirty_regions_of (const struct device_state *d)
{
  json_object *list = json_object_new_array ();
  struct ba_regions dirty;
  uint64_t size;
  char err[1024];

  if (d->bitmap_name == NULL) {
    json_object *r = json_object_new_array ();
    json_object_array_add (r, json_object_new_int64 (0));
    json_object_array_add (r, json_object_new_int64 (d->size));
    json_object_array_add (list, r);
    return list;
  }
  ba_regions_init (&dirty);
  if (ba_bitmap_fetch (NULL, d->nbd_path, d->export, d->bitmap_name,
                       &dirty, &size, err, sizeof err) == -1)
    die ("device %s: %s", d->device, err);
  for (size_t i = 0; i < dirty.n; i++) {
    json_object *r = json_object_new_array ();
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].start));
    json_object_array_add (r, json_object_new_int64 (dirty.r[i].end
                                                     - dirty.r[i].start));
    json_object_array_add (list, r);
  }
  ba_regions_free (&dirty);
  return list;
}

/* Device d's nbdfuse, its export as the file DIR/DEV.mnt/DEV; recorded
 * first, so that teardown removes it.
 */
static void
start_nbdfuse (struct helper_state *st, struct device_state *d,
               char *mnt, char *file)
{
  char *pidfile = xasprintf ("%s/%s.nbdfuse.pid", run_dir, d->device);
  char *log = xasprintf ("%s/%s.nbdfuse.log", run_dir, d->device);
  /* No allow_other: only the caller can open the file. */
  char *argv[] = { "nbdfuse", "-P", pidfile, file, d->uri, NULL };
  pid_t pid;

  state_set (&d->mount, mnt);
  state_set (&d->mount_pidfile, pidfile);
  state_save (st);
  if (mkdir (mnt, 0700) == -1 && errno != EEXIST)
    die ("mkdir %s: %m", mnt);
  unlink (pidfile);
  pid = spawn (argv, log, true);
  for (int w = 0; w < WAIT_SECONDS * 10 && !read_pidfile (pidfile); w++) {
    if (waitpid (pid, NULL, WNOHANG) == pid)
      break;                    /* it failed */
    sleep_ms (100);
  }
  if (!read_pidfile (pidfile))
    die ("device %s: nbdfuse did not start: %s", d->device, tail_of (log));
  make_private (pidfile);
  state_set (&d->file, file);
  state_save (st);
  free (pidfile);
  free (log);
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

    if (d->uri == NULL)
      die ("device %s is not served: run 'serve' first", dev);
    if (d->tls_psk)
      die ("device %s is served with TLS, which nbdfuse cannot use (libnbd "
           "1.14 takes no PSK file from its URI): serve it without "
           "--tls-psk to mount it", dev);
    if (d->mount == NULL)
      start_nbdfuse (st, d, mnt, file);
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

void
mount_stop (struct helper_state *st, struct device_state *d)
{
  char *mnt = d->mount;
  char *argv[] = { "fusermount3", "-u", mnt, NULL };
  char *lazy[] = { "fusermount3", "-u", "-z", mnt, NULL };
  pid_t pid;

  if (mnt == NULL)
    return;
  pid = d->mount_pidfile ? read_pidfile (d->mount_pidfile) : 0;
  if (run_wait (argv, NULL) != 0 && is_mounted (mnt)) {
    /* Busy: a process still has the file open.  Detached now, gone when
     * it closes the file; its reads fail once nbdfuse stops.
     */
    warn ("device %s: %s is busy (a process has the file open): "
          "unmounted lazily", d->device, mnt);
    run_wait (lazy, NULL);
  }
  stop_pid (pid);
  if (d->mount_pidfile)
    unlink (d->mount_pidfile);
  rmdir (mnt);
  state_set (&d->mount, NULL);
  state_save (st);
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
}
