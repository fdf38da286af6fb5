/* SPDX-License-Identifier: BSD-3-Clause */
/* The backend for Proxmox VE's backup access API: finding it, the checks
 * made before backup-access-setup is called, recording what it set up,
 * and backup-access-teardown.
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "qmpops.h"
#include "state.h"
#include "util.h"

/* The form of backup-access-setup, found by the preflight. */
static const char *setup_form;

static bool
proxmox_available (void)
{
  json_object *r = qmp_try ("query-proxmox-support", NULL);
  bool ok = get_bool (r, "backup-access-api");

  json_object_put (r);
  return ok;
}

/* Which form of backup-access-setup this QEMU takes, from its schema:
 * "devices" (current) or "devlist" (the first version).
 */
static const char *
proxmox_setup_form (void)
{
  json_object *schema = qmp_list ("query-qmp-schema", NULL);
  const char *arg_type = NULL, *form = NULL;
  size_t n = alen (schema);

  for (size_t i = 0; i < n; i++) {
    json_object *e = json_object_array_get_idx (schema, i);
    if (strcmp (get_str (e, "name") ?: "", "backup-access-setup") == 0 &&
        strcmp (get_str (e, "meta-type") ?: "", "command") == 0)
      arg_type = get_str (e, "arg-type");
  }
  for (size_t i = 0; arg_type && i < n; i++) {
    json_object *e = json_object_array_get_idx (schema, i), *members;
    if (strcmp (get_str (e, "name") ?: "", arg_type) != 0 ||
        !json_object_object_get_ex (e, "members", &members))
      continue;
    for (size_t j = 0; j < alen (members); j++) {
      const char *m = get_str (json_object_array_get_idx (members, j),
                               "name");
      if (m && (strcmp (m, "devices") == 0 || strcmp (m, "devlist") == 0))
        form = strcmp (m, "devices") == 0 ? "devices" : "devlist";
    }
  }
  json_object_put (schema);
  if (form == NULL)
    die ("this QEMU reports backup-access-api, but its schema has no "
         "backup-access-setup with 'devices' or 'devlist'");
  return form;
}

/* The provider's vocabulary for Proxmox's bitmap-action. */
static const char *
bitmap_mode_of_action (const char *action)
{
  if (action == NULL)
    return "none";
  if (strcmp (action, "used") == 0)
    return "reuse";
  if (strcmp (action, "new") == 0 || strcmp (action, "invalid") == 0 ||
      strcmp (action, "missing-recreated") == 0)
    return "new";
  return "none";
}

/* Checks made before anything is changed: the options, the API's
 * form, and the fleecing nodes vzdump adds.
 */
static void
proxmox_preflight (struct setup_opts *o)
{
  json_object *nodes;

  if (o->target_id == NULL)
    o->target_id = o->bitmap ? o->bitmap : "backupaccess";
  if (o->bitmap == NULL && strcmp (o->bitmap_mode, "none") != 0)
    die ("--bitmap-mode %s needs --bitmap", o->bitmap_mode);
  setup_form = proxmox_setup_form ();
  nodes = named_nodes ();

  for (int i = 0; i < o->ndevs; i++) {
    char *fl = xasprintf ("%s-fleecing", o->devs[i]);
    if (find_node (nodes, fl) == NULL)
      die ("device %s: fleecing node '%s' not found: add a qcow2 node of "
           "the same size with discard=unmap first", o->devs[i], fl);
    free (fl);
  }
  json_object_put (nodes);
}

/* backup-access-setup's arguments, in the form this QEMU takes. */
static json_object *
setup_args (const struct setup_opts *o)
{
  json_object *args;
  char *devlist = NULL;

  if (strcmp (setup_form, "devices") == 0) {
    json_object *list = json_object_new_array ();
    for (int i = 0; i < o->ndevs; i++)
      json_object_array_add (list, obj ("device", S (o->devs[i]),
                                        "bitmap-mode", S (o->bitmap_mode),
                                        END));
    return obj ("target-id", S (o->target_id), "devices", list, END);
  }
  for (int i = 0; i < o->ndevs; i++) {
    char *d = xasprintf ("%s%s%s", devlist ? devlist : "",
                         devlist ? "," : "", o->devs[i]);
    free (devlist);
    devlist = d;
  }
  args = obj ("target-id", S (o->target_id), "devlist", S (devlist), END);
  if (strcmp (o->bitmap_mode, "none") != 0)
    json_object_object_add (args, "bitmap-name", S (o->bitmap));
  free (devlist);
  return args;
}

/* A device of backup-access-setup's answer r, checked, into st (nodes:
 * named_nodes, for the fleecing node's cluster size).
 */
static void
add_device (struct helper_state *st, const struct setup_opts *o,
            json_object *r, json_object *nodes)
{
  struct device_state *d;
  const char *dev = get_str (r, "device");
  char *fl;
  bool asked = false;

  if (dev == NULL || get_str (r, "node-name") == NULL)
    die ("backup-access-setup returned an entry without device/node-name");
  /* The device names file names and nbdkit's export=, the bitmap name
   * nbdkit's backupaccess-bitmap=: both as plain as the user's.
   */
  check_name ("device returned by QEMU", dev, false);
  for (int j = 0; j < o->ndevs; j++)
    asked |= strcmp (o->devs[j], dev) == 0;
  if (!asked)
    die ("backup-access-setup returned device '%s', which was not asked "
         "for", dev);
  fl = xasprintf ("%s-fleecing", dev);
  if (get_str (r, "bitmap-name"))
    check_name ("bitmap name returned by QEMU", get_str (r, "bitmap-name"),
                true);
  d = state_add_device (st);
  state_set (&d->device, dev);
  state_set (&d->export, dev);
  state_set (&d->node, get_str (r, "node-name"));
  d->size = get_int (r, "size", 0);
  state_set (&d->bitmap_mode,
             bitmap_mode_of_action (get_str (r, "bitmap-action")));
  state_set (&d->bitmap_name, get_str (r, "bitmap-name"));
  state_set (&d->bitmap_node, get_str (r, "bitmap-node-name"));
  state_set (&d->fleece_node, fl);
  d->cluster_size = ba_cbw_cluster (node_image_int (find_node (nodes, fl),
                                                    "cluster-size"));
  free (fl);
}

static void
proxmox_setup (struct helper_state *st, const struct setup_opts *o)
{
  json_object *nodes = named_nodes (), *args = setup_args (o), *result;

  /* Recorded first: teardown must call backup-access-teardown even if
   * we die right after QEMU set it up.
   */
  st->proxmox_setup = true;
  state_save (st);
  result = qmp_list ("backup-access-setup", args);
  for (size_t i = 0; i < alen (result); i++)
    add_device (st, o, json_object_array_get_idx (result, i), nodes);
  json_object_put (result);
  json_object_put (nodes);
  state_save (st);
}

static void
proxmox_teardown (struct helper_state *st, bool success)
{
  if (!st->proxmox_setup)
    return;
  /* Errors are reported, not fatal: vzdump does the same. */
  json_object_put (qmp_run (true, "backup-access-teardown", obj (
    "target-id", S (st->target_id),
    "success", json_object_new_boolean (success), END)));
  st->proxmox_setup = false;
  state_save (st);
}

static void
proxmox_explain_qemu_gone (const struct helper_state *st)
{
  for (size_t i = 0; i < st->ndevices; i++)
    warn ("device %s: QEMU keeps its dirty bitmaps in memory: the next "
          "backup is a full one", st->devices[i].device ?: "?");
}

const struct backend backend_proxmox = {
  .name = "proxmox",
  .available = proxmox_available,
  .preflight = proxmox_preflight,
  .setup = proxmox_setup,
  .teardown = proxmox_teardown,
  .explain_qemu_gone = proxmox_explain_qemu_gone,
  .discard_clean = false,
};
