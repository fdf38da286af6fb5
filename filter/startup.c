/* SPDX-License-Identifier: BSD-3-Clause */
/* Getting ready.  .get_ready reads the dirty bitmap (and, from an NBD
 * plugin, the disk size) before nbdkit serves anyone; .after_fork asks
 * the plugin for the size if that is still unknown, checks the dirty
 * regions against it, builds the view and starts what runs beside the
 * clients: the discard of the clean clusters, the flusher, the status
 * file.  Every error here stops nbdkit before a client comes.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "bitmap.h"
#include "regions.h"
#include "status.h"
#include "view.h"

#include "config.h"
#include "flusher.h"
#include "startup.h"

struct filter_state state;

/* Reads the dirty bitmap once, before nbdkit serves anyone: a bitmap
 * read later might have changed, and errors here stop nbdkit at once.
 * When the plugin is an NBD client (socket= or uri=), the disk size is
 * asked of the same export here too.
 */
int
backupaccess_get_ready (int thread_model)
{
  char err[1024];
  const char *uri = config.bitmap_uri ? config.bitmap_uri
                                      : config.plugin_uri;
  /* Without a bitmap only the size is fetched: ba_bitmap_fetch clears
   * the set it is given, which must not be the regions of a
   * backupaccess-map.
   */
  struct ba_regions none;
  int r;

  state.parallel_plugin = thread_model == NBDKIT_THREAD_MODEL_PARALLEL;
  if (config.bitmap_name == NULL && uri == NULL &&
      config.plugin_socket == NULL)
    return 0;                   /* the size comes in .after_fork */
  ba_regions_init (&none);
  r = ba_bitmap_fetch (uri, uri ? NULL : config.plugin_socket,
                       config.plugin_export, config.bitmap_name,
                       config.bitmap_name ? &config.dirty : &none,
                       &state.disk_size, err, sizeof err);
  ba_regions_free (&none);
  if (r == -1) {
    if (config.bitmap_name)
      nbdkit_error ("backupaccess-bitmap=%s: %s", config.bitmap_name, err);
    else
      nbdkit_error ("backupaccess: %s", err);
    return -1;
  }
  state.disk_size_known = true;
  if (config.bitmap_name) {
    config.have_dirty = true;
    nbdkit_debug ("backupaccess: bitmap %s: %zu dirty regions, %" PRIu64
                  " dirty bytes of %" PRIu64, config.bitmap_name,
                  config.dirty.n, ba_regions_total (&config.dirty),
                  state.disk_size);
  }
  return 0;
}

/* Asks the plugin for the disk size, in a context of our own. */
static int
learn_disk_size (nbdkit_backend *backend)
{
  nbdkit_next *next = nbdkit_next_context_open (backend, 1, "", 1);
  int64_t size;

  if (next == NULL)
    return -1;
  if (next->prepare (next) == -1) {
    nbdkit_next_context_close (next);
    return -1;
  }
  size = next->get_size (next);
  next->finalize (next);
  nbdkit_next_context_close (next);
  if (size == -1)
    return -1;
  state.disk_size = size;
  state.disk_size_known = true;
  return 0;
}

/* Sets up the state once, before any client is served, and checks the
 * dirty regions against the disk: bad input stops nbdkit here.
 */
int
backupaccess_after_fork (nbdkit_backend *backend)
{
  char err[512];

  if (!state.disk_size_known && learn_disk_size (backend) == -1)
    return -1;

  if (config.have_dirty &&
      ba_regions_check_size (&config.dirty, state.disk_size,
                             err, sizeof err) == -1) {
    if (config.map_path)
      nbdkit_error ("backupaccess-map: %s: %s", config.map_path, err);
    else
      nbdkit_error ("backupaccess-bitmap=%s: %s", config.bitmap_name, err);
    return -1;
  }
  {
    const struct ba_view_config view_config = {
      .disk_size = state.disk_size, .cluster_size = config.cluster_size,
      .dirty = config.have_dirty ? &config.dirty : NULL,
      .discard = config.discard, .clean_is_zero = config.clean_is_zero,
      .trim_batch = config.trim_batch, .discard_lag = config.discard_lag,
    };
    bool safe;
    uint32_t preferred;

    state.view = ba_view_new (&view_config);
    if (state.view == NULL) {
      nbdkit_error ("backupaccess: cannot set up the view of the export: %m");
      return -1;
    }
    preferred = ba_view_preferred_size (state.view, &safe);
    if (!safe)
      nbdkit_debug ("backupaccess: the dirty regions are not aligned to "
                    "%" PRIu32 " bytes, the smallest preferred block size: "
                    "requests of that size can mix clean and dirty bytes, "
                    "and are then refused", preferred);
  }
  if (config.discard_clean && config.have_dirty &&
      discard_clean_clusters (backend) == -1)
    return -1;
  if (config.discard && config.trim_batch > 0 &&
      start_flusher (state.parallel_plugin) == -1)
    return -1;
  if (config.status_path) {
    state.status = ba_status_start (state.view, config.status_path,
                                    err, sizeof err);
    if (state.status == NULL) {
      nbdkit_error ("backupaccess-status: %s", err);
      return -1;
    }
  }
  nbdkit_debug ("backupaccess: disk size %" PRIu64 ", %zu dirty regions, "
                "cluster %" PRIi64 ", preferred block size %" PRIu32
                ", discard %s", state.disk_size,
                config.have_dirty ? config.dirty.n : (size_t) 1,
                config.cluster_size, ba_view_preferred_size (state.view, NULL),
                config.discard ? "on" : "off");
  ba_regions_free (&config.dirty);      /* the view has its copy */
  return 0;
}
