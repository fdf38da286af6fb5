/* SPDX-License-Identifier: BSD-3-Clause */
/* The filter's parameters: .config takes the backupaccess-* ones (each
 * at most once) and passes the rest on to the plugin, keeping a copy of
 * where it connects and of its cluster=; .config_complete checks them
 * together and reads a backupaccess-map file, so that bad input stops
 * nbdkit before it serves anyone.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include <nbdkit-filter.h>

#include "cluster.h"
#include "mapfile.h"
#include "regions.h"

#include "config.h"

/* nbdkit finds the debug flag by its name. */
NBDKIT_DLL_PUBLIC int backupaccess_debug_verbose = 0;

struct filter_config config = {
  .plugin_cluster = -1,
  .cluster_size = BA_CLUSTER_DEFAULT,
  .discard = true,
  .trim_batch = INT64_C (4) << 20,
};

void
config_free (void)
{
  ba_regions_free (&config.dirty);
  free (config.map_path);
  free (config.bitmap_name);
  free (config.bitmap_uri);
  free (config.plugin_socket);
  free (config.plugin_export);
  free (config.plugin_uri);
  free (config.status_path);
}

/* The backupaccess-* parameters, a bit each in config.params_seen. */
enum {
  SEEN_MAP = 1 << 0,
  SEEN_CLUSTER = 1 << 1,
  SEEN_DISCARD = 1 << 2,
  SEEN_CLEAN = 1 << 3,
  SEEN_BITMAP = 1 << 4,
  SEEN_URI = 1 << 5,
  SEEN_STATUS = 1 << 6,
  SEEN_DISCARD_CLEAN = 1 << 7,
  SEEN_TRIM_BATCH = 1 << 8,
  SEEN_DISCARD_LAG = 1 << 9,
};

/* Refuses a parameter given twice: a conflicting command line. */
static int
seen_once (unsigned bit, const char *key)
{
  if (config.params_seen & bit) {
    nbdkit_error ("%s given more than once", key);
    return -1;
  }
  config.params_seen |= bit;
  return 0;
}

/* A boolean parameter, into *out. */
static int
parse_bool_param (const char *value, bool *out)
{
  int r = nbdkit_parse_bool (value);

  if (r == -1)
    return -1;
  *out = r;
  return 0;
}

/* A size parameter of at most 1G, into *out. */
static int
parse_size_to_1g (const char *key, const char *value, int64_t *out)
{
  int64_t r = nbdkit_parse_size (value);

  if (r == -1)
    return -1;
  if (r > INT64_C (1) << 30) {
    nbdkit_error ("%s=%s: at most 1G", key, value);
    return -1;
  }
  *out = r;
  return 0;
}

int
backupaccess_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  if (strcmp (key, "backupaccess-map") == 0) {
    if (seen_once (SEEN_MAP, key) == -1)
      return -1;
    config.map_path = nbdkit_absolute_path (value);
    return config.map_path ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-cluster") == 0) {
    if (seen_once (SEEN_CLUSTER, key) == -1)
      return -1;
    config.cluster_size = nbdkit_parse_size (value);
    if (config.cluster_size == -1)
      return -1;
    if (!ba_cluster_size_valid (config.cluster_size)) {
      nbdkit_error ("backupaccess-cluster=%s: the cluster size must be "
                    BA_CLUSTER_RULE, value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-discard") == 0) {
    if (seen_once (SEEN_DISCARD, key) == -1)
      return -1;
    return parse_bool_param (value, &config.discard);
  }
  if (strcmp (key, "backupaccess-clean") == 0) {
    if (seen_once (SEEN_CLEAN, key) == -1)
      return -1;
    if (strcmp (value, "hole") == 0)
      config.clean_is_zero = false;
    else if (strcmp (value, "zero") == 0)
      config.clean_is_zero = true;
    else {
      nbdkit_error ("backupaccess-clean=%s: expected \"hole\" or \"zero\"",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-discard-clean") == 0) {
    if (seen_once (SEEN_DISCARD_CLEAN, key) == -1)
      return -1;
    return parse_bool_param (value, &config.discard_clean);
  }
  if (strcmp (key, "backupaccess-trim-batch") == 0) {
    if (seen_once (SEEN_TRIM_BATCH, key) == -1)
      return -1;
    return parse_size_to_1g (key, value, &config.trim_batch);
  }
  if (strcmp (key, "backupaccess-discard-lag") == 0) {
    if (seen_once (SEEN_DISCARD_LAG, key) == -1)
      return -1;
    return parse_size_to_1g (key, value, &config.discard_lag);
  }
  if (strcmp (key, "backupaccess-status") == 0) {
    if (seen_once (SEEN_STATUS, key) == -1)
      return -1;
    config.status_path = nbdkit_absolute_path (value);
    return config.status_path ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-bitmap") == 0) {
    if (seen_once (SEEN_BITMAP, key) == -1)
      return -1;
    if (*value == '\0') {
      nbdkit_error ("backupaccess-bitmap: the bitmap name is empty");
      return -1;
    }
    config.bitmap_name = strdup (value);
    return config.bitmap_name ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-uri") == 0) {
    if (seen_once (SEEN_URI, key) == -1)
      return -1;
    config.bitmap_uri = strdup (value);
    return config.bitmap_uri ? 0 : -1;
  }
  if (strncmp (key, "backupaccess-", 13) == 0) {
    nbdkit_error ("unknown parameter %s (see nbdkit --filter=backupaccess "
                  "null --help)", key);
    return -1;
  }
  /* Keep a copy of where the plugin connects, and pass it on. */
  if (strcmp (key, "socket") == 0) {
    free (config.plugin_socket);
    config.plugin_socket = nbdkit_absolute_path (value);
    if (config.plugin_socket == NULL)
      return -1;
  }
  else if (strcmp (key, "cluster") == 0) {
    config.plugin_cluster = nbdkit_parse_size (value);
    if (config.plugin_cluster == -1)
      return -1;
  }
  else if (strcmp (key, "export") == 0 || strcmp (key, "uri") == 0) {
    char **copy = key[0] == 'e' ? &config.plugin_export : &config.plugin_uri;
    free (*copy);
    *copy = strdup (value);
    if (*copy == NULL)
      return -1;
  }
  return next (nxdata, key, value);
}

int
backupaccess_config_complete (nbdkit_next_config_complete *next,
                              nbdkit_backend *nxdata)
{
  if (config.map_path && config.bitmap_name) {
    nbdkit_error ("backupaccess-map and backupaccess-bitmap both name the "
                  "dirty regions: give one of them");
    return -1;
  }
  if (config.bitmap_uri && !config.bitmap_name) {
    nbdkit_error ("backupaccess-uri is where backupaccess-bitmap is read "
                  "from, but no backupaccess-bitmap was given");
    return -1;
  }
  if (config.bitmap_name && !config.bitmap_uri && !config.plugin_uri &&
      !config.plugin_socket) {
    nbdkit_error ("backupaccess-bitmap: no place to read it from: give "
                  "backupaccess-uri=URI, or the plugin's socket= or uri=");
    return -1;
  }
  /* One cluster size for both: the plugin's alone is taken as the
   * filter's too; two different ones are a mistake that costs either
   * every discard or, on QEMU 7.x, the VM.
   */
  if (config.plugin_cluster != -1) {
    if (!(config.params_seen & SEEN_CLUSTER))
      config.cluster_size = config.plugin_cluster;
    else if (config.plugin_cluster != config.cluster_size) {
      nbdkit_error ("backupaccess-cluster=%" PRIi64 " and the plugin's "
                    "cluster=%" PRIi64 " differ: both are QEMU's "
                    "copy-before-write cluster size (the larger of 64K and "
                    "the fleecing image's cluster size); give it once, as "
                    "cluster=SIZE", config.cluster_size,
                    config.plugin_cluster);
      return -1;
    }
  }
  if (config.map_path) {
    char err[512];
    if (ba_map_parse_file (config.map_path, &config.dirty,
                           err, sizeof err) == -1) {
      nbdkit_error ("backupaccess-map: %s", err);
      return -1;
    }
    config.have_dirty = true;
  }
  return next (nxdata);
}
