/* SPDX-License-Identifier: BSD-3-Clause */
/* The backend for Proxmox VE's backup access API: finding it, the checks
 * made before backup-access-setup is called (proxmox-devices.c), what it
 * set up (or, when it failed half-way, left behind), and
 * backup-access-teardown, never while a bitmap of the backup is busy
 * (QEMU aborts).
 */
#define _GNU_SOURCE
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "backend.h"
#include "cluster.h"
#include "proxmox-devices.h"
#include "qmpops.h"
#include "state.h"
#include "util.h"

/* The devices as the preflight found them, in the order of --device. */
static struct pve_device *found;
static json_object *found_blocks, *found_nodes;

static bool
proxmox_available (void)
{
  json_object *r = qmp_try ("query-proxmox-support", NULL);
  bool ok = get_bool (r, "backup-access-api");

  json_object_put (r);
  return ok;
}

/* backup-access-setup must take the devices as a list (pve-qemu 9.2
 * and later, the form this helper speaks).
 */
static void
check_setup_form (void)
{
  json_object *schema = qmp_list ("query-qmp-schema", NULL);
  const char *arg_type = NULL;
  bool devices = false;

  for (size_t i = 0; i < alen (schema); i++) {
    json_object *e = json_object_array_get_idx (schema, i);
    if (strcmp (get_str (e, "name") ?: "", "backup-access-setup") == 0 &&
        strcmp (get_str (e, "meta-type") ?: "", "command") == 0)
      arg_type = get_str (e, "arg-type");
  }
  for (size_t i = 0; arg_type && i < alen (schema); i++) {
    json_object *e = json_object_array_get_idx (schema, i), *members;
    if (strcmp (get_str (e, "name") ?: "", arg_type) != 0 ||
        !json_object_object_get_ex (e, "members", &members))
      continue;
    for (size_t j = 0; j < alen (members); j++)
      devices |= strcmp (get_str (json_object_array_get_idx (members, j),
                                  "name") ?: "", "devices") == 0;
  }
  json_object_put (schema);
  if (!devices)
    die ("this QEMU reports backup-access-api, but its backup-access-setup "
         "takes no 'devices' list (pve-qemu 9.2 and later do)");
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
 * form, and the devices with their fleecing images as QEMU will find
 * them (never a setup that can fail half-way or abort).
 */
static void
proxmox_preflight (struct setup_opts *o)
{
  char err[1024];

  /* QEMU names the bitmap after the target. */
  if (o->target_id && o->bitmap && strcmp (o->target_id, o->bitmap) != 0)
    die ("--bitmap %s and --target-id %s: Proxmox VE names the bitmap after "
         "the target id; give one of them", o->bitmap, o->target_id);
  if (o->target_id == NULL)
    o->target_id = o->bitmap ? o->bitmap : "backupaccess";
  check_setup_form ();
  found_blocks = qmp_list ("query-block", NULL);
  found_nodes = named_nodes ();
  found = calloc (o->ndevs + 1, sizeof *found);
  if (found == NULL)
    die ("out of memory");
  for (int i = 0; i < o->ndevs; i++)
    found[i].name = o->devs[i];
  if (pve_find_devices (found_blocks, found_nodes, o->target_id,
                        o->bitmap_mode, found, o->ndevs, err,
                        sizeof err) == -1)
    die ("%s; nothing was changed", err);
}

/* backup-access-setup's arguments. */
static json_object *
setup_args (const struct setup_opts *o)
{
  json_object *list = json_object_new_array ();

  for (int i = 0; i < o->ndevs; i++)
    json_object_array_add (list, obj ("device", S (o->devs[i]),
                                      "bitmap-mode", S (o->bitmap_mode),
                                      END));
  return obj ("target-id", S (o->target_id), "devices", list, END);
}

/* A device of backup-access-setup's answer r, checked, into st. */
static void
add_device (struct helper_state *st, const struct setup_opts *o,
            json_object *r)
{
  struct device_state *d;
  const char *dev = get_str (r, "device");
  const struct pve_device *f = NULL;

  if (dev == NULL || get_str (r, "node-name") == NULL)
    die ("backup-access-setup returned an entry without device/node-name");
  /* The device names file names and nbdkit's export=, the bitmap name
   * nbdkit's backupaccess-bitmap=: both as plain as the user's.
   */
  check_name ("device returned by QEMU", dev, false);
  for (int j = 0; j < o->ndevs; j++)
    if (strcmp (o->devs[j], dev) == 0)
      f = &found[j];
  if (f == NULL)
    die ("backup-access-setup returned device '%s', which was not asked "
         "for", dev);
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
  state_set (&d->fleece_node, f->fleece_node);
  d->cluster_size = ba_cbw_cluster (f->fleece_cluster);
}

/* Appends piece (consumed) to *list, comma-separated. */
static void
add (char **list, char *piece)
{
  char *t = xasprintf ("%s%s %s", *list, **list ? "," : "", piece);

  free (*list);
  free (piece);
  *list = t;
}

/* What a refused backup-access-setup left behind, for the message: the
 * nodes and bitmaps there now that the preflight did not see.
 */
static char *
left_behind (void)
{
  json_object *now = named_nodes ();
  char *out = xasprintf ("%s", "");

  for (size_t i = 0; i < alen (now); i++) {
    json_object *n = json_object_array_get_idx (now, i), *bms;
    const char *name = get_str (n, "node-name") ?: "?";
    if (find_node (found_nodes, name) == NULL) {
      add (&out, xasprintf ("node %s (%s)", name, get_str (n, "drv") ?: "?"));
      continue;
    }
    if (!json_object_object_get_ex (n, "dirty-bitmaps", &bms))
      continue;
    for (size_t j = 0; j < alen (bms); j++) {
      const char *b = get_str (json_object_array_get_idx (bms, j), "name");
      if (b && !node_has_bitmap (found_nodes, name, b))
        add (&out, xasprintf ("bitmap '%s' on %s", b, name));
    }
  }
  json_object_put (now);
  return out;
}

static void
proxmox_setup (struct helper_state *st, const struct setup_opts *o)
{
  json_object *result;
  char err[1024];

  /* Recorded first: teardown must call backup-access-teardown if we
   * die before QEMU answers (if it answers with an error, it has set
   * nothing up, and a teardown could end another's backup access).
   */
  st->proxmox_setup = true;
  state_save (st);
  result = qmp_call ("backup-access-setup", setup_args (o), err, sizeof err);
  if (result == NULL) {
    char *left = left_behind (), msg[4096] = "";
    st->proxmox_setup = false;
    state_save (st);
    if (*left)
      snprintf (msg, sizeof msg, ".  QEMU failed half-way: in QEMU now and "
                "not before:%s.  QEMU cannot remove such nodes: it will "
                "abort when it quits (the guest runs on until then)", left);
    free (left);
    die ("QMP backup-access-setup: %s%s", err, msg);
  }
  if (!json_object_is_type (result, json_type_array))
    die ("QMP backup-access-setup: QEMU's answer is not a list");
  for (size_t i = 0; i < alen (result); i++)
    add_device (st, o, json_object_array_get_idx (result, i));
  json_object_put (result);
  state_save (st);
}

/* Dies unless every bitmap st exports is free: backup-access-teardown
 * on a busy one (still exported over NBD) aborts QEMU.
 */
static void
check_bitmaps_free (const struct helper_state *st)
{
  json_object *nodes = named_nodes ();

  for (size_t i = 0; i < st->ndevices; i++) {
    const struct device_state *d = &st->devices[i];
    if (d->bitmap_node && d->bitmap_name &&
        get_bool (find_bitmap (nodes, d->bitmap_node, d->bitmap_name),
                  "busy"))
      die ("device %s: bitmap '%s' on node %s is still in use (exported "
           "by someone else?): not ending the backup access, QEMU would "
           "abort; remove that export and run teardown again",
           d->device, d->bitmap_name, d->bitmap_node);
  }
  json_object_put (nodes);
}

static void
proxmox_teardown (struct helper_state *st, bool success)
{
  if (!st->proxmox_setup)
    return;
  check_bitmaps_free (st);
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
