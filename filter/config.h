/* SPDX-License-Identifier: BSD-3-Clause */
/* The filter's parameters: the backupaccess-* settings, parsed once in
 * .config and .config_complete into one struct, and the plugin's own
 * connection parameters seen on the way through.  Everything here is
 * written before nbdkit serves anyone and only read afterwards, so it
 * needs no lock.
 */
#ifndef BACKUPACCESS_FILTER_CONFIG_H
#define BACKUPACCESS_FILTER_CONFIG_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "regions.h"

/* -D backupaccess.verbose=1: one debug line per request. */
extern NBDKIT_DLL_PUBLIC int backupaccess_debug_verbose;

struct filter_config {
  char *map_path;
  char *bitmap_name;
  char *bitmap_uri;
  /* The plugin's own connection parameters (nbd plugin, snapshotaccess
   * plugin), seen on the way through: the default place of the bitmap.
   */
  char *plugin_socket, *plugin_export, *plugin_uri;
  /* The snapshotaccess plugin's cluster=, seen on the way through: the
   * same setting, which must agree with backupaccess-cluster.
   */
  int64_t plugin_cluster;
  char *status_path;            /* counters for the helper, every second */
  int64_t cluster_size;
  bool discard;
  bool clean_is_zero;
  bool discard_clean;
  /* Completed clusters are trimmed in batches of this many bytes (one
   * trim per client read would cost an upstream round trip per read).
   */
  int64_t trim_batch;
  int64_t discard_lag;          /* recent bytes kept readable */
  unsigned params_seen;         /* bit per parameter, to refuse repeats */

  /* The dirty regions (backupaccess-map's here, backupaccess-bitmap's
   * in .get_ready), until the view takes a copy in .after_fork.
   */
  struct ba_regions dirty;
  bool have_dirty;              /* else the whole disk is readable */
};

extern struct filter_config config;

#define backupaccess_config_help \
  "backupaccess-map=FILE       Dirty regions (nbdinfo --map output or\n" \
  "                            \"OFFSET LENGTH\" lines); default: all.\n" \
  "backupaccess-bitmap=NAME    Read the dirty regions from QEMU's\n" \
  "                            qemu:dirty-bitmap:NAME at start-up.\n" \
  "backupaccess-uri=URI        Where to read the bitmap (default: the\n" \
  "                            plugin's socket=/export= or uri=).\n" \
  "backupaccess-cluster=SIZE   Copy-before-write cluster size (default:\n" \
  "                            the snapshotaccess plugin's cluster=,\n" \
  "                            or 64K).\n" \
  "backupaccess-discard=BOOL   Discard clusters once read (default true).\n" \
  "backupaccess-clean=hole|zero  How clean regions are reported in\n" \
  "                            extents (default hole; zero: for a copy\n" \
  "                            into an overlay of the previous backup).\n" \
  "backupaccess-discard-clean=BOOL  Discard the clean clusters at\n" \
  "                            start-up (default false).\n" \
  "backupaccess-trim-batch=SIZE  Send discards in batches of SIZE\n" \
  "                            (default 4M; 0: after every read).\n" \
  "backupaccess-discard-lag=SIZE  Keep the last SIZE bytes read\n" \
  "                            readable until more is read (default 0).\n" \
  "backupaccess-status=FILE    Write the counters there as JSON, every\n" \
  "                            second while they change."

int backupaccess_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                         const char *key, const char *value);
int backupaccess_config_complete (nbdkit_next_config_complete *next,
                                  nbdkit_backend *nxdata);
/* Frees the strings and the dirty regions (in .unload). */
void config_free (void);

#endif /* BACKUPACCESS_FILTER_CONFIG_H */
