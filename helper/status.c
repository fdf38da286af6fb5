/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices as the provider sees them (printed by setup, serve and
 * run), and status: bytes read, discarded and left, and the fleecing
 * image's size.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <json.h>

#include "cluster.h"
#include "qmpops.h"
#include "rundir.h"
#include "state.h"
#include "status.h"
#include "util.h"

/* The provider's view of the devices. */
json_object *
describe (void)
{
  json_object *out = json_object_new_object (), *list = json_object_new_array ();
  json_object *devs = devices ();

  set_str (out, "run-dir", run_dir);
  set_str (out, "backend", get_str (state, "backend"));
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *o = json_object_new_object ();
    set_str (o, "device", get_str (d, "device"));
    json_object_object_add (o, "size",
                            json_object_new_int64 (get_int (d, "size", 0)));
    set_str (o, "bitmap-mode", get_str (d, "bitmap-mode") ?: "none");
    set_str (o, "bitmap-name", get_str (d, "bitmap-name"));
    set_str (o, "nbd-path", get_str (d, "nbd-path"));
    set_str (o, "export", get_str (d, "export"));
    json_object_object_add (o, "cluster-size", json_object_new_int64
                            (get_int (d, "cluster-size", BA_CLUSTER_DEFAULT)));
    set_str (o, "uri", get_str (d, "uri"));
    set_str (o, "file", get_str (d, "file"));
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  return out;
}

static int64_t
fleecing_bytes (json_object *d)
{
  struct stat st;
  const char *file = get_str (d, "fleece-file");

  if (file)
    return stat (file, &st) == 0 ? (int64_t) st.st_blocks * 512 : -1;
  if (qmp && get_str (d, "fleece-node")) {
    json_object *nodes = named_nodes ();
    int64_t r = node_image_int (find_node (nodes, get_str (d, "fleece-node")),
                                "actual-size");
    json_object_put (nodes);
    return r;
  }
  return -1;
}

void
status_command (void)
{
  json_object *out = json_object_new_object (), *list = json_object_new_array ();
  json_object *devs = devices ();

  if (get_str (state, "qmp") &&
      strcmp (get_str (state, "backend") ?: "", "serve") != 0)
    qmp_open (get_str (state, "qmp"));
  for (size_t i = 0; i < alen (devs); i++) {
    json_object *d = json_object_array_get_idx (devs, i);
    json_object *o = json_object_new_object (), *st = NULL;
    const char *sf = get_str (d, "status-file");
    set_str (o, "device", get_str (d, "device"));
    if (sf)
      st = json_object_from_file (sf);
    json_object_object_add (o, "bytes-read", json_object_new_int64
                            (get_int (st, "bytes-read", 0)));
    json_object_object_add (o, "bytes-discarded", json_object_new_int64
                            (get_int (st, "bytes-discarded", 0)));
    json_object_object_add (o, "bytes-left", json_object_new_int64
                            (get_int (st, "bytes-left",
                                      get_int (d, "size", 0))));
    json_object_object_add (o, "snapshot-broken",
                            json_object_new_boolean (get_bool (st, "broken")));
    json_object_object_add (o, "fleecing-size",
                            json_object_new_int64 (fleecing_bytes (d)));
    json_object_put (st);
    json_object_array_add (list, o);
  }
  json_object_object_add (out, "devices", list);
  print_json (out);
  json_object_put (out);
}
