/* SPDX-License-Identifier: BSD-3-Clause */
/* Copy-before-write over a guest device: see upstream-cbw.h.  QEMU has
 * no atomic way to put a filter node of one's own above a device's
 * node (blockdev-backup inserts one atomically, but always with
 * on-cbw-error=break-guest-write), so the VM is paused for the switch:
 * no guest write lands between the bitmap's freeze and the filter.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json.h>

#include "qmpops.h"
#include "state.h"
#include "upstream-cbw.h"
#include "util.h"

/* How long one copy into the fleecing image may take before the
 * snapshot breaks (the guest's write then goes on): shorter than a
 * guest's own I/O timeout (30 s for Linux's SCSI disks), long enough
 * for a busy store.  QEMU before 9.1 keeps it in nanoseconds in 32
 * bits: above 4 s it wraps around (5 s becomes 0.7 s).
 */
#define CBW_TIMEOUT 20
#define CBW_TIMEOUT_32BIT 4

/* The QOM path of a device from query-block's "qdev": its id (the
 * device is then /machine/peripheral/ID) or its path.
 */
static char *
qom_path (const char *qdev)
{
  return qdev[0] == '/' ? xasprintf ("%s", qdev)
    : xasprintf ("/machine/peripheral/%s", qdev);
}

/* The QOM paths of the devices whose root is node, and how many. */
static size_t
devices_on (const char *node, char **path)
{
  json_object *blk = qmp_list ("query-block", NULL);
  size_t n = 0;

  *path = NULL;
  for (size_t j = 0; j < alen (blk); j++) {
    json_object *b = json_object_array_get_idx (blk, j), *ins;
    const char *qdev = get_str (b, "qdev");

    if (qdev && *qdev && json_object_object_get_ex (b, "inserted", &ins) &&
        strcmp (get_str (ins, "node-name") ?: "", node) == 0) {
      free (*path);
      *path = qom_path (qdev);
      n++;
    }
  }
  json_object_put (blk);
  return n;
}

char *
cbw_device_path (const char *source)
{
  char *path;
  size_t n = devices_on (source, &path);

  if (n == 1)
    return path;
  free (path);
  if (n > 1)
    warn ("node %s: %zu guest devices share it: copy-before-write is "
          "inserted by blockdev-backup, and a full fleecing store fails "
          "the guest's writes", source, n);
  else
    warn ("node %s: no guest device has it as its drive: "
          "copy-before-write is inserted by blockdev-backup, and a full "
          "fleecing store fails the guest's writes", source);
  return NULL;
}

/* Whether this QEMU is version major.minor or later. */
static bool
qemu_at_least (int major, int minor)
{
  static int64_t have_major = -1, have_minor = -1;

  if (have_major == -1) {
    json_object *v = qmp_run (false, "query-version", NULL), *q;
    if (json_object_object_get_ex (v, "qemu", &q)) {
      have_major = get_int (q, "major", 0);
      have_minor = get_int (q, "minor", 0);
    }
    json_object_put (v);
  }
  return have_major > major || (have_major == major && have_minor >= minor);
}

/* A property of a QOM object as a string, or NULL if it has none. */
static char *
qom_get_str (const char *path, const char *property)
{
  json_object *r = qmp_try ("qom-get", obj ("path", S (path),
                                            "property", S (property), END));
  char *s = NULL;

  if (r && json_object_is_type (r, json_type_string))
    s = xasprintf ("%s", json_object_get_string (r));
  json_object_put (r);
  return s;
}

/* The iothread a device's requests run in ("" for the main loop): its
 * own (virtio-blk), or its controller's (a disk on virtio-scsi: the
 * parent of its bus).
 */
static char *
device_iothread (const char *path)
{
  char *io = qom_get_str (path, "iothread"), *bus, *slash;

  if (io == NULL && (bus = qom_get_str (path, "parent_bus")) != NULL) {
    if ((slash = strrchr (bus, '/')) != NULL && slash != bus) {
      *slash = '\0';
      io = qom_get_str (bus, "iothread");
    }
    free (bus);
  }
  return io;
}

void
cbw_preflight (const char *dev, const char *source)
{
  char *path, *io = NULL;

  if (devices_on (source, &path) == 1 && !qemu_at_least (10, 0))
    io = device_iothread (path);
  if (io && *io)
    die ("device %s: %s runs in iothread %s: QEMU before 10.0 aborts "
         "serving such a disk over NBD (7.2 when the first client "
         "disconnects); run it in the main loop, or use QEMU 10.0 or "
         "later", dev, path, io);
  free (io);
  free (path);
}

int
cbw_timeout (void)
{
  return qemu_at_least (9, 1) ? CBW_TIMEOUT : CBW_TIMEOUT_32BIT;
}

void
vm_pause (struct helper_state *st, struct vm_pause *p)
{
  json_object *s = qmp_run (false, "query-status", NULL);

  /* Paused by its user (or not started yet): left so. */
  p->paused = strcmp (get_str (s, "status") ?: "", "running") == 0;
  json_object_put (s);
  if (!p->paused)
    return;
  st->vm_paused = true;
  state_save (st);
  clock_gettime (CLOCK_MONOTONIC, &p->start);
  json_object_put (qmp_run (false, "stop", NULL));
}

void
vm_resume (struct helper_state *st, const struct vm_pause *p)
{
  struct timespec end;

  if (!p->paused)
    return;
  json_object_put (qmp_run (false, "cont", NULL));
  clock_gettime (CLOCK_MONOTONIC, &end);
  st->vm_paused = false;
  state_save (st);
  fprintf (stderr, "%s: the VM was paused for %.1f ms to insert "
           "copy-before-write\n", progname,
           (double) (end.tv_sec - p->start.tv_sec) * 1e3 +
           (double) (end.tv_nsec - p->start.tv_nsec) / 1e6);
}

void
cbw_insert (const struct device_state *d, int timeout)
{
  json_object *args = obj (
    "driver", S ("copy-before-write"), "node-name", S (d->cbw_node),
    "file", S (d->source_node), "target", S (d->fleece_node),
    "on-cbw-error", S ("break-snapshot"),
    "cbw-timeout", json_object_new_int (timeout), END);

  /* With the frozen bitmap, only its clusters are copied, and only
   * they can be read.
   */
  if (d->cbw_bitmap)
    json_object_object_add (args, "bitmap", obj (
      "node", S (d->source_node), "name", S (d->frozen_bitmap), END));
  json_object_put (qmp_run (false, "blockdev-add", args));
  json_object_put (qmp_run (false, "qom-set", obj (
    "path", S (d->qdev), "property", S ("drive"), "value", S (d->cbw_node),
    END)));
}

void
cbw_remove (const struct device_state *d, json_object *nodes)
{
  char *path = NULL;

  if (d->cbw_node == NULL)
    return;
  if (d->qdev && devices_on (d->cbw_node, &path) > 0) {
    if (strcmp (path, d->qdev) != 0)
      die ("device %s: %s, not %s, uses copy-before-write node %s",
           d->device, path, d->qdev, d->cbw_node);
    json_object_put (qmp_run (false, "qom-set", obj (
      "path", S (d->qdev), "property", S ("drive"),
      "value", S (d->source_node), END)));
  }
  free (path);
  if (find_node (nodes, d->cbw_node))
    json_object_put (qmp_run (true, "blockdev-del", obj (
      "node-name", S (d->cbw_node), END)));
}

void
vm_resume_left (struct helper_state *st)
{
  json_object *nodes, *s;
  bool ours = false;

  if (!st->vm_paused)
    return;
  nodes = named_nodes ();
  for (size_t i = 0; i < st->ndevices; i++)
    if (st->devices[i].fleece_node &&
        find_node (nodes, st->devices[i].fleece_node))
      ours = true;
  json_object_put (nodes);
  s = qmp_run (false, "query-status", NULL);
  if (ours && strcmp (get_str (s, "status") ?: "", "paused") == 0) {
    warn ("resuming the VM, which setup paused");
    json_object_put (qmp_run (false, "cont", NULL));
  }
  json_object_put (s);
  st->vm_paused = false;
  state_save (st);
}
