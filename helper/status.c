/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices as the provider sees them (printed by setup, serve and
 * run), and status: bytes read, discarded and left, and the fleecing
 * image's size.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "qmpops.h"
#include "rundir.h"
#include "state.h"
#include "status.h"
#include "util.h"

/* The provider's view of the devices. */
json_object *
describe (const struct helper_state *st)
{
  json_object *out = json_object_new_object ();
  json_object *list = json_object_new_array ();

  set_str (out, "run-dir", run_dir);
  set_str (out, "backend", st->backend);
  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    json_object *o = json_object_new_object ();
    set_str (o, "device", d->device);
    json_object_object_add (o, "size", json_object_new_int64 (d->size));
    set_str (o, "bitmap-mode", d->bitmap_mode ?: "none");
    set_str (o, "bitmap-name", d->bitmap_name);
    set_str (o, "nbd-path", d->nbd_path);
    set_str (o, "export", d->export);
    json_object_object_add (o, "cluster-size",
                            json_object_new_int64 (d->cluster_size));
    set_str (o, "uri", d->uri);
    set_str (o, "file", d->file);
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  return out;
}

static int64_t
fleecing_bytes (const struct device_state *d)
{
  struct stat sb;
  const char *file = d->fleece_file;

  if (file)
    return stat (file, &sb) == 0 ? (int64_t) sb.st_blocks * 512 : -1;
  if (qmp_is_open () && d->fleece_node) {
    json_object *nodes = named_nodes ();
    int64_t r = node_image_int (find_node (nodes, d->fleece_node),
                                "actual-size");
    json_object_put (nodes);
    return r;
  }
  return -1;
}

/* Whether QEMU answers: "running", or "gone" (nothing listens: what is
 * shown is local), or "unreachable" (another reason, said on stderr).
 */
static const char *
connect_qemu (const struct helper_state *st)
{
  char err[1024];

  if (qmp_connect (st->qmp, err, sizeof err) == 0)
    return "running";
  if (errno == ENOENT || errno == ECONNREFUSED) {
    warn ("%s: QEMU is gone; the counters are those nbdkit left", err);
    return "gone";
  }
  warn ("%s: the fleecing images' sizes are unknown", err);
  return "unreachable";
}

void
print_status (const struct helper_state *st)
{
  json_object *out = json_object_new_object ();
  json_object *list = json_object_new_array ();

  if (st->qmp && backend_of_state (st))
    set_str (out, "qemu", connect_qemu (st));
  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    json_object *o = json_object_new_object (), *counters = NULL;
    const char *sf = d->status_file;
    set_str (o, "device", d->device);
    if (sf)
      counters = json_object_from_file (sf);
    json_object_object_add (o, "bytes-read", json_object_new_int64
                            (get_int (counters, "bytes-read", 0)));
    json_object_object_add (o, "bytes-discarded", json_object_new_int64
                            (get_int (counters, "bytes-discarded", 0)));
    json_object_object_add (o, "bytes-left", json_object_new_int64
                            (get_int (counters, "bytes-left", d->size)));
    json_object_object_add (o, "snapshot-broken", json_object_new_boolean
                            (get_bool (counters, "broken")));
    json_object_object_add (o, "fleecing-size",
                            json_object_new_int64 (fleecing_bytes (d)));
    json_object_put (counters);
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  print_json (out);
  json_object_put (out);
}
