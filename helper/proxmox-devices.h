/* SPDX-License-Identifier: BSD-3-Clause */
/* The devices of a Proxmox VE backup access as its QEMU finds them
 * (pve-qemu's get_single_device_info: a BlockBackend name, else a node
 * name, a throttle node looked through; the fleecing image likewise),
 * and what must hold for backup-access-setup not to fail half-way (which
 * leaves nodes QEMU cannot remove and aborts at quit) or abort at once:
 * checked on QEMU's answers to query-block and query-named-block-nodes
 * before anything is changed.  No I/O: unit-tested.
 */
#ifndef BACKUPACCESS_HELPER_PROXMOX_DEVICES_H
#define BACKUPACCESS_HELPER_PROXMOX_DEVICES_H

#include <stddef.h>
#include <stdint.h>

#include <json.h>

/* Proxmox's background bitmap, one per device during a backup access. */
#define PVE_BACKGROUND_BITMAP "backup-access-background-bitmap"

struct pve_device {
  const char *name;             /* as given (set by the caller) */
  /* Found: strings owned by the JSON answers. */
  const char *node;             /* copy-before-write and the bitmap go here */
  const char *fleece_node;      /* the fleecing image's node */
  int64_t size;                 /* bytes */
  int64_t fleece_cluster;       /* the fleecing image's cluster, -1 unknown */
};

/* Finds devs[0..n-1] (name set) in QEMU's answers blocks (query-block)
 * and nodes (query-named-block-nodes, flat) and checks them for a
 * backup-access-setup of target (the bitmap's name) in bitmap mode
 * (none, new, use).  0, or -1 with the reason in err.
 */
int pve_find_devices (json_object *blocks, json_object *nodes,
                      const char *target, const char *mode,
                      struct pve_device *devs, size_t n,
                      char *err, size_t errlen);

#endif /* BACKUPACCESS_HELPER_PROXMOX_DEVICES_H */
