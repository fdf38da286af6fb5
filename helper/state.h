/* SPDX-License-Identifier: BSD-3-Clause */
/* The state of one backup access, kept in DIR/state.json: what has been
 * set up, recorded before (or as) each step is taken, so that teardown
 * can undo a setup that stopped half-way, and can run twice.
 */
#ifndef BACKUPACCESS_HELPER_STATE_H
#define BACKUPACCESS_HELPER_STATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* One device.  The names in quotes are the keys in the file.  Strings
 * are owned by the record (set them with state_set); NULL = not set.
 */
struct device_state {
  /* Every backend, and serve --nbd-path. */
  char *device;                 /* "device": the user's name, in file names */
  char *export;                 /* "export": QEMU's NBD export */
  char *node;                   /* "node": the snapshot-access node */
  int64_t size;                 /* "size": bytes */
  int64_t cluster_size;         /* "cluster-size": copy-before-write's */
  char *bitmap_mode;            /* "bitmap-mode": none, new, reuse */
  char *bitmap_name;            /* "bitmap-name": the bitmap exported */
  char *bitmap_node;            /* "bitmap-node": its node */

  /* The upstream backend: what teardown removes or merges back. */
  char *source_node;            /* "source-node": the disk's node */
  char *fleece_file;            /* "fleece-file": image we created */
  char *fleece_node;            /* "fleece-node" */
  char *cbw_node;               /* "cbw-node": copy-before-write filter */
  char *qdev;                   /* "qdev": the guest device switched to it */
  bool cbw_bitmap;              /* "cbw-bitmap": it has the frozen one */
  char *job;                    /* "job": the backup job */
  char *live_bitmap;            /* "live-bitmap": --bitmap */
  char *frozen_bitmap;          /* "frozen-bitmap": its frozen copy */
  char *created_bitmap;         /* "created-bitmap": made by this backup */
  char *marker_bitmap;          /* "marker-bitmap": "a full backup runs" */

  /* QEMU's NBD export. */
  bool exported;                /* "exported" */
  char *nbd_path;               /* "nbd-path": its socket */

  /* serve: nbdkit. */
  char *pidfile;                /* "pidfile" */
  char *socket;                 /* "socket": unix socket (NULL on TCP) */
  char *tls_psk;                /* "tls-psk": PSK file */
  char *status_file;            /* "status-file": the filter's counters */
  char *nbdkit_log;             /* "nbdkit-log" */
  int64_t nbdkit_pid;           /* "nbdkit-pid": 0 if none */
  char *uri;                    /* "uri": where clients read it */

  /* mount: backupaccess-mount. */
  char *mount;                  /* "mount": the mount point */
  char *mount_pidfile;          /* "mount-pidfile" */
  char *file;                   /* "file": the file in it */
};

struct helper_state {
  char *backend;                /* "backend": proxmox, upstream, serve */
  char *qmp;                    /* "qmp": QEMU's QMP socket */
  char *target_id;              /* "target-id": Proxmox's */
  char *tag;                    /* "tag": in the upstream names */
  char *nbd_path;               /* "nbd-path": QEMU's NBD server */
  bool nbd_server_started;      /* "nbd-server-started" */
  bool proxmox_setup;           /* "proxmox-setup" */
  bool vm_paused;               /* "vm-paused": by setup, not resumed yet */
  struct device_state *devices; /* "devices" */
  size_t ndevices;
};

/* A new state, for a backend, not saved yet. */
struct helper_state *state_new (const char *backend);

/* Loads DIR/state.json: NULL if there is none.  Dies if it cannot be
 * read, is no state, or names a device that is not a plain name.
 */
struct helper_state *state_load (void);

/* Whether DIR/state.json exists; dies if it cannot be read or is no
 * state.
 */
bool state_exists (void);

/* Writes DIR/state.json (through a temporary file, renamed over it). */
void state_save (const struct helper_state *st);

void state_free (struct helper_state *st);

/* Adds a device, all unset, and returns it.  A pointer to another
 * device of st is no longer valid after this.
 */
struct device_state *state_add_device (struct helper_state *st);

/* Sets a string of a record to a copy of value (NULL: unset). */
void state_set (char **field, const char *value);

/* DIR/state.json. */
char *state_path (void);

#endif /* BACKUPACCESS_HELPER_STATE_H */
