/* SPDX-License-Identifier: BSD-3-Clause */
/* The state file, DIR/state.json, as a typed record: see state.h.  One
 * table per record names each member's key, so that loading and saving
 * cannot disagree.  The file is read by lib/statefile.c (which checks
 * its shape) and written with json-c.  A key that is not set (a NULL
 * string, a false flag, no nbdkit pid) is left out: every reader, this
 * one and those before it, reads a missing key and a null alike.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json.h>

#include "cluster.h"
#include "rundir.h"
#include "state.h"
#include "statefile.h"
#include "util.h"

enum kind { TEXT, NUMBER, FLAG };

struct field {
  const char *key;
  size_t offset;
  int64_t absent;               /* NUMBER: its value when missing */
  enum kind kind;
  bool always;                  /* NUMBER: saved even when absent's */
};

#define DEV(k, type, member, none, all)                               \
  { .key = (k), .kind = (type), .absent = (none), .always = (all),    \
    .offset = offsetof (struct device_state, member) }
#define TOP(k, type, member)                                          \
  { .key = (k), .kind = (type),                                       \
    .offset = offsetof (struct helper_state, member) }

static const struct field device_fields[] = {
  DEV ("device", TEXT, device, 0, false),
  DEV ("export", TEXT, export, 0, false),
  DEV ("node", TEXT, node, 0, false),
  DEV ("size", NUMBER, size, 0, true),
  DEV ("cluster-size", NUMBER, cluster_size, BA_CLUSTER_DEFAULT, true),
  DEV ("bitmap-mode", TEXT, bitmap_mode, 0, false),
  DEV ("bitmap-name", TEXT, bitmap_name, 0, false),
  DEV ("bitmap-node", TEXT, bitmap_node, 0, false),
  DEV ("source-node", TEXT, source_node, 0, false),
  DEV ("fleece-file", TEXT, fleece_file, 0, false),
  DEV ("fleece-node", TEXT, fleece_node, 0, false),
  DEV ("cbw-node", TEXT, cbw_node, 0, false),
  DEV ("qdev", TEXT, qdev, 0, false),
  DEV ("cbw-bitmap", FLAG, cbw_bitmap, 0, false),
  DEV ("job", TEXT, job, 0, false),
  DEV ("live-bitmap", TEXT, live_bitmap, 0, false),
  DEV ("frozen-bitmap", TEXT, frozen_bitmap, 0, false),
  DEV ("created-bitmap", TEXT, created_bitmap, 0, false),
  DEV ("marker-bitmap", TEXT, marker_bitmap, 0, false),
  DEV ("exported", FLAG, exported, 0, false),
  DEV ("nbd-path", TEXT, nbd_path, 0, false),
  DEV ("pidfile", TEXT, pidfile, 0, false),
  DEV ("socket", TEXT, socket, 0, false),
  DEV ("tls-psk", TEXT, tls_psk, 0, false),
  DEV ("status-file", TEXT, status_file, 0, false),
  DEV ("nbdkit-log", TEXT, nbdkit_log, 0, false),
  DEV ("nbdkit-pid", NUMBER, nbdkit_pid, 0, false),
  DEV ("uri", TEXT, uri, 0, false),
  DEV ("mount", TEXT, mount, 0, false),
  DEV ("mount-pidfile", TEXT, mount_pidfile, 0, false),
  DEV ("file", TEXT, file, 0, false),
};

static const struct field state_fields[] = {
  TOP ("backend", TEXT, backend),
  TOP ("qmp", TEXT, qmp),
  TOP ("target-id", TEXT, target_id),
  TOP ("tag", TEXT, tag),
  TOP ("nbd-path", TEXT, nbd_path),
  TOP ("nbd-server-started", FLAG, nbd_server_started),
  TOP ("proxmox-setup", FLAG, proxmox_setup),
  TOP ("vm-paused", FLAG, vm_paused),
};

#define NFIELDS(t) (sizeof (t) / sizeof (t)[0])

void
state_set (char **field, const char *value)
{
  char *copy = NULL;

  if (value && (copy = strdup (value)) == NULL)
    die ("out of memory");
  free (*field);
  *field = copy;
}

/* Members of a record from a JSON object, as the helper always read
 * them: a string only if it is one, a number only if it is an integer,
 * a flag with json-c's truth.
 */
static void
fields_from_json (void *rec, const struct field *f, size_t n, json_object *o)
{
  for (size_t i = 0; i < n; i++) {
    char *p = (char *) rec + f[i].offset;
    switch (f[i].kind) {
    case TEXT: state_set ((char **) p, get_str (o, f[i].key)); break;
    case NUMBER: *(int64_t *) p = get_int (o, f[i].key, f[i].absent); break;
    case FLAG: *(bool *) p = get_bool (o, f[i].key); break;
    }
  }
}

static void
fields_to_json (const void *rec, const struct field *f, size_t n,
                json_object *o)
{
  for (size_t i = 0; i < n; i++) {
    const char *p = (const char *) rec + f[i].offset;
    const char *s;
    int64_t v;

    switch (f[i].kind) {
    case TEXT:
      s = *(char *const *) p;
      if (s)
        json_object_object_add (o, f[i].key, json_object_new_string (s));
      break;
    case NUMBER:
      v = *(const int64_t *) p;
      if (f[i].always || v != f[i].absent)
        json_object_object_add (o, f[i].key, json_object_new_int64 (v));
      break;
    case FLAG:
      if (*(const bool *) p)
        json_object_object_add (o, f[i].key, json_object_new_boolean (1));
      break;
    }
  }
}

static void
fields_free (void *rec, const struct field *f, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (f[i].kind == TEXT)
      free (*(char **) ((char *) rec + f[i].offset));
}

struct helper_state *
state_new (const char *backend)
{
  struct helper_state *st = calloc (1, sizeof *st);

  if (st == NULL)
    die ("out of memory");
  state_set (&st->backend, backend);
  return st;
}

struct device_state *
state_add_device (struct helper_state *st)
{
  struct device_state *d;

  d = reallocarray (st->devices, st->ndevices + 1, sizeof *d);
  if (d == NULL)
    die ("out of memory");
  st->devices = d;
  d = &st->devices[st->ndevices++];
  memset (d, 0, sizeof *d);
  d->cluster_size = BA_CLUSTER_DEFAULT;
  return d;
}

void
state_free (struct helper_state *st)
{
  if (st == NULL)
    return;
  for (size_t i = 0; i < st->ndevices; i++)
    fields_free (&st->devices[i], device_fields, NFIELDS (device_fields));
  free (st->devices);
  fields_free (st, state_fields, NFIELDS (state_fields));
  free (st);
}

char *
state_path (void)
{
  return xasprintf ("%s/state.json", run_dir);
}

void
state_save (const struct helper_state *st)
{
  char *path = state_path ();
  char *tmp = xasprintf ("%s.tmp", path);
  json_object *o = json_object_new_object ();
  json_object *devs = json_object_new_array ();
  int fd;
  const char *text;

  fields_to_json (st, state_fields, NFIELDS (state_fields), o);
  for (size_t i = 0; i < st->ndevices; i++) {
    json_object *d = json_object_new_object ();
    fields_to_json (&st->devices[i], device_fields, NFIELDS (device_fields),
                    d);
    json_object_array_add (devs, d);
  }
  json_object_object_add (o, "devices", devs);
  text = json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY);
  fd = open (tmp, O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC,
             0600);
  if (fd == -1 || write (fd, text, strlen (text)) != (ssize_t) strlen (text)
      || write (fd, "\n", 1) != 1 || fsync (fd) == -1 || close (fd) == -1 ||
      rename (tmp, path) == -1)
    die ("writing %s: %m", path);
  json_object_put (o);
  free (tmp);
  free (path);
}

/* The JSON of DIR/state.json, or NULL if there is none. */
static json_object *
read_state (void)
{
  char *path = state_path ();
  char err[PATH_MAX * 2 + 512];
  json_object *o;

  if (ba_state_load (path, &o, err, sizeof err) == -1)
    die ("%s", err);
  free (path);
  return o;
}

bool
state_exists (void)
{
  json_object *o = read_state ();
  bool r = o != NULL;

  json_object_put (o);
  return r;
}

struct helper_state *
state_load (void)
{
  json_object *o = read_state (), *devs;
  struct helper_state *st;

  if (o == NULL)
    return NULL;
  st = state_new (NULL);
  fields_from_json (st, state_fields, NFIELDS (state_fields), o);
  /* lib/statefile.c made sure that it is a list of objects. */
  if (json_object_object_get_ex (o, "devices", &devs))
    for (size_t i = 0; i < alen (devs); i++) {
      struct device_state *d = state_add_device (st);
      fields_from_json (d, device_fields, NFIELDS (device_fields),
                        json_object_array_get_idx (devs, i));
      /* Device names are joined into paths in the run directory. */
      if (d->device)
        check_name ("device in the state file", d->device, false);
    }
  json_object_put (o);
  return st;
}
