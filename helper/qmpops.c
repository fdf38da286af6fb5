/* SPDX-License-Identifier: BSD-3-Clause */
/* QMP operations of the helper over lib/qmp.c: commands that die on
 * error (or warn, where an error is expected), JSON arguments, block
 * node and bitmap queries, and waits for something to go away.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "qmp.h"
#include "qmpops.h"
#include "util.h"

#define QMP_TIMEOUT_MS 60000

/* The connection to QEMU, one per run of the helper. */
static struct ba_qmp *qmp;

/* How long QEMU may take to answer a command: 60 s, or
 * BACKUPACCESS_QMP_TIMEOUT seconds.
 */
static int
qmp_timeout_ms (void)
{
  const char *s = getenv ("BACKUPACCESS_QMP_TIMEOUT");
  char *end;
  long v;

  if (s == NULL || *s == '\0')
    return QMP_TIMEOUT_MS;
  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || *end || v < 1 || v > 3600)
    die ("BACKUPACCESS_QMP_TIMEOUT=%s: expected seconds, 1 to 3600", s);
  return (int) v * 1000;
}

void
qmp_open (const char *path)
{
  char err[1024];
  qmp = ba_qmp_connect (path, qmp_timeout_ms (), err, sizeof err);
  if (qmp == NULL)
    die ("%s", err);
}

int
qmp_connect (const char *path, char *err, size_t errlen)
{
  if (qmp == NULL)
    qmp = ba_qmp_connect (path, qmp_timeout_ms (), err, errlen);
  return qmp ? 0 : -1;
}

bool
qmp_is_open (void)
{
  return qmp != NULL;
}

void
qmp_close (void)
{
  if (qmp) {
    ba_qmp_close (qmp);
    qmp = NULL;
  }
}

/* A connection that failed is out of step (a late answer would be
 * taken for the next one's): closed, so that a roll-back starts afresh.
 */
static void __attribute__ ((noreturn))
lost (const char *cmd, const char *err)
{
  qmp_close ();
  die ("QMP %s: %s", cmd, err);
}

/* Runs a QMP command; dies on error unless ok_errors, in which case
 * it returns NULL.  args is consumed.
 */
json_object *
qmp_run (bool ok_errors, const char *cmd, json_object *args)
{
  char err[1024];
  int qemu_error;
  json_object *r = ba_qmp_cmd (qmp, cmd, args, &qemu_error, err, sizeof err);

  json_object_put (args);
  if (r == NULL) {
    if (!qemu_error)
      lost (cmd, err);
    if (!ok_errors)
      die ("QMP %s: %s", cmd, err);
    warn ("QMP %s: %s (ignored)", cmd, err);
  }
  return r;
}

json_object *
qmp_try (const char *cmd, json_object *args)
{
  char err[1024];

  return qmp_call (cmd, args, err, sizeof err);
}

json_object *
qmp_call (const char *cmd, json_object *args, char *err, size_t errlen)
{
  int qemu_error;
  json_object *r = ba_qmp_cmd (qmp, cmd, args, &qemu_error, err, errlen);

  json_object_put (args);
  if (r == NULL && !qemu_error)
    lost (cmd, err);
  return r;
}

/* Runs a QMP command that returns a list; anything else is an error. */
json_object *
qmp_list (const char *cmd, json_object *args)
{
  json_object *r = qmp_run (false, cmd, args);

  if (!json_object_is_type (r, json_type_array))
    die ("QMP %s: QEMU's answer is not a list", cmd);
  return r;
}

json_object *
obj (const char *key, ...)
{
  json_object *o = json_object_new_object ();
  va_list ap;

  va_start (ap, key);
  while (key) {
    json_object_object_add (o, key, va_arg (ap, json_object *));
    key = va_arg (ap, const char *);
  }
  va_end (ap);
  return o;
}

/* The block node with this node name, from query-named-block-nodes. */
json_object *
find_node (json_object *nodes, const char *name)
{
  for (size_t i = 0; i < alen (nodes); i++) {
    json_object *n = json_object_array_get_idx (nodes, i);
    const char *nn = get_str (n, "node-name");
    if (nn && strcmp (nn, name) == 0)
      return n;
  }
  return NULL;
}

/* A dirty bitmap of a node (from query-named-block-nodes), or NULL. */
json_object *
find_bitmap (json_object *nodes, const char *node, const char *bitmap)
{
  json_object *n = find_node (nodes, node), *bm;

  if (n && json_object_object_get_ex (n, "dirty-bitmaps", &bm))
    for (size_t j = 0; j < alen (bm); j++) {
      json_object *b = json_object_array_get_idx (bm, j);
      if (strcmp (get_str (b, "name") ?: "", bitmap) == 0)
        return b;
    }
  return NULL;
}

bool
node_has_bitmap (json_object *nodes, const char *node, const char *bitmap)
{
  return find_bitmap (nodes, node, bitmap) != NULL;
}

json_object *
named_nodes (void)
{
  return qmp_list ("query-named-block-nodes",
                   obj ("flat", json_object_new_boolean (1), END));
}

int64_t
node_image_int (json_object *node, const char *key)
{
  json_object *image;
  if (node && json_object_object_get_ex (node, "image", &image))
    return get_int (image, key, -1);
  return -1;
}

/* Waits until the list a query returns has no entry whose key is
 * value: an export (query-block-exports, "id") or a block job
 * (query-block-jobs, "device") that is going away.
 */
void
wait_gone (const char *query, const char *key, const char *value)
{
  for (int i = 0; i < WAIT_SECONDS * 10; i++) {
    json_object *list = qmp_list (query, NULL);
    bool found = false;
    for (size_t j = 0; j < alen (list); j++)
      if (strcmp (get_str (json_object_array_get_idx (list, j), key) ?: "",
                  value) == 0)
        found = true;
    json_object_put (list);
    if (!found)
      return;
    sleep_ms (100);
  }
  die ("%s still lists %s after %d s", query, value, WAIT_SECONDS);
}

/* The block node of a device: a node name, or a drive's or qdev's
 * block backend.  Dies if there is none.
 */
char *
resolve_device (const char *dev)
{
  json_object *nodes = named_nodes ();
  json_object *blk = qmp_list ("query-block", NULL);
  const char *source = NULL;
  char *r;

  if (dev == NULL)
    die ("no device given");
  if (find_node (nodes, dev))
    source = dev;
  for (size_t j = 0; source == NULL && j < alen (blk);
       j++) {
    json_object *b = json_object_array_get_idx (blk, j), *ins;
    if ((strcmp (get_str (b, "device") ?: "", dev) == 0 ||
         strcmp (get_str (b, "qdev") ?: "", dev) == 0) &&
        json_object_object_get_ex (b, "inserted", &ins))
      source = get_str (ins, "node-name");
  }
  if (source == NULL)
    die ("device %s: no such block node or drive in this QEMU", dev);
  r = strdup (source);
  json_object_put (nodes);
  json_object_put (blk);
  return r;
}
