/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices of a Proxmox VE backup access as its QEMU finds them, and
 * the checks that keep backup-access-setup from failing half-way or
 * aborting: see proxmox-devices.h.
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json.h>

#include "proxmox-devices.h"
#include "qmpops.h"
#include "util.h"

static bool
same (const char *a, const char *b)
{
  return a && b && strcmp (a, b) == 0;
}

/* The root node of the BlockBackend called name (-drive id=, drive_add
 * id=), NULL if there is none; *no_medium if it has nothing inserted.
 */
static const char *
backend_root (json_object *blocks, const char *name, bool *no_medium)
{
  for (size_t i = 0; i < alen (blocks); i++) {
    json_object *b = json_object_array_get_idx (blocks, i), *ins;
    if (!same (get_str (b, "device"), name))
      continue;
    if (!json_object_object_get_ex (b, "inserted", &ins) ||
        get_str (ins, "node-name") == NULL) {
      *no_medium = true;
      return NULL;
    }
    return get_str (ins, "node-name");
  }
  return NULL;
}

/* The entry of a node's list (query-named-block-nodes "children",
 * "dirty-bitmaps") whose key is value, or NULL.
 */
static json_object *
entry (json_object *node, const char *list, const char *key,
       const char *value)
{
  json_object *l;

  if (!json_object_object_get_ex (node, list, &l))
    return NULL;
  for (size_t i = 0; i < alen (l); i++) {
    json_object *e = json_object_array_get_idx (l, i);
    if (same (get_str (e, key), value))
      return e;
  }
  return NULL;
}

/* name as QEMU looks it up: a BlockBackend, else a node, and a node
 * (not a BlockBackend's root: QEMU does not) that is a throttle filter
 * through to its file child when through_throttle.  NULL with err.
 */
static json_object *
lookup (json_object *blocks, json_object *nodes, const char *name,
        bool through_throttle, char *err, size_t errlen)
{
  bool no_medium = false;
  const char *root = backend_root (blocks, name, &no_medium);
  json_object *node;

  if (no_medium) {
    snprintf (err, errlen, "'%s' has no medium", name);
    return NULL;
  }
  if (root)
    node = find_node (nodes, root);
  else {
    node = find_node (nodes, name);
    if (node && through_throttle && same (get_str (node, "drv"), "throttle"))
      node = find_node (nodes, get_str (entry (node, "children", "child",
                                               "file"), "node-name") ?: "");
  }
  if (node == NULL)
    snprintf (err, errlen, "'%s' not found: no drive (BlockBackend) or "
              "block node of that name in this QEMU (a device id such as "
              "'scsi0' is neither)", name);
  return node;
}

/* The bitmaps of d's node that would make QEMU fail half-way or abort,
 * or make an incremental backup miss changes.
 */
static int
check_bitmaps (json_object *node, const struct pve_device *d,
               const char *target, const char *mode, char *err, size_t errlen)
{
  json_object *b = entry (node, "dirty-bitmaps", "name", target);

  /* QEMU makes one with a bitmap (new, use), after the devices before. */
  if (strcmp (mode, "none") != 0 &&
      entry (node, "dirty-bitmaps", "name", PVE_BACKGROUND_BITMAP)) {
    snprintf (err, errlen, "device %s: node %s has a bitmap '%s' already "
              "(another backup access, or one that failed half-way): QEMU "
              "would fail half-way", d->name, d->node, PVE_BACKGROUND_BITMAP);
    return -1;
  }
  if (b && get_bool (b, "busy")) {
    snprintf (err, errlen, "device %s: bitmap '%s' on node %s is in use "
              "(exported over NBD, or by a block job): QEMU would abort",
              d->name, target, d->node);
    return -1;
  }
  if (b && strcmp (mode, "use") == 0 &&
      (!get_bool (b, "recording") || get_bool (b, "inconsistent"))) {
    snprintf (err, errlen, "device %s: bitmap '%s' on node %s is %s: it "
              "may lack changes; use --bitmap-mode new for a full backup",
              d->name, target, d->node,
              get_bool (b, "inconsistent") ? "inconsistent" : "disabled");
    return -1;
  }
  return 0;
}

/* Device d: its node, its fleecing image's, and their checks. */
static int
find_one (json_object *blocks, json_object *nodes, struct pve_device *d,
          const char *target, const char *mode, char *err, size_t errlen)
{
  char why[512], *fl = xasprintf ("%s-fleecing", d->name);
  json_object *node = lookup (blocks, nodes, d->name, true, why, sizeof why);
  json_object *fnode = NULL;
  int r = -1;

  if (node == NULL) {
    snprintf (err, errlen, "device %s", why);
    goto out;
  }
  d->node = get_str (node, "node-name");
  d->size = node_image_int (node, "virtual-size");
  fnode = lookup (blocks, nodes, fl, false, why, sizeof why);
  if (fnode == NULL) {
    snprintf (err, errlen, "device %s: its fleecing image %s; attach a "
              "qcow2 (or raw) image of the same size, with discard, as "
              "node or drive '%s' first", d->name, why, fl);
    goto out;
  }
  d->fleece_node = get_str (fnode, "node-name");
  d->fleece_cluster = node_image_int (fnode, "cluster-size");
  /* QEMU compares sectors. */
  if ((node_image_int (fnode, "virtual-size") + 511) / 512 !=
      (d->size + 511) / 512) {
    snprintf (err, errlen, "device %s: its fleecing image %s has %" PRIi64
              " bytes, the device %" PRIi64 ": they must be the same size",
              d->name, fl, node_image_int (fnode, "virtual-size"), d->size);
    goto out;
  }
  if (get_bool (fnode, "ro")) {
    snprintf (err, errlen, "device %s: its fleecing image %s is read-only",
              d->name, fl);
    goto out;
  }
  r = check_bitmaps (node, d, target, mode, err, errlen);
 out:
  free (fl);
  return r;
}

/* No node twice among the devices' and fleecing images' nodes: QEMU
 * would fail half-way on the second.
 */
static int
check_distinct (const struct pve_device *devs, size_t n, char *err,
                size_t errlen)
{
  for (size_t i = 0; i < 2 * n; i++)
    for (size_t j = i + 1; j < 2 * n; j++) {
      const struct pve_device *a = &devs[i / 2], *b = &devs[j / 2];
      const char *na = i % 2 ? a->fleece_node : a->node;
      const char *nb = j % 2 ? b->fleece_node : b->node;
      if (same (na, nb)) {
        snprintf (err, errlen, "%s%s and %s%s are the same node %s: QEMU "
                  "would fail half-way", a->name, i % 2 ? "-fleecing" : "",
                  b->name, j % 2 ? "-fleecing" : "", na);
        return -1;
      }
    }
  return 0;
}

int
pve_find_devices (json_object *blocks, json_object *nodes,
                  const char *target, const char *mode,
                  struct pve_device *devs, size_t n, char *err, size_t errlen)
{
  if (n == 0) {
    snprintf (err, errlen, "no device given (QEMU would abort)");
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    if (find_one (blocks, nodes, &devs[i], target, mode, err, errlen) == -1)
      return -1;
  return check_distinct (devs, n, err, errlen);
}
