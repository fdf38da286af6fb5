/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-backupaccess-filter: a safe view of a QEMU snapshot-access export.
 *
 * The nbdkit glue over the readable view (lib/view.c), which holds the
 * rules:
 * - reads only inside the readable set (dirty regions minus discarded
 *   clusters); everything else is refused with EPERM before it reaches
 *   the plugin;
 * - once every readable byte of a cluster has been read (or trimmed by
 *   the client), one aligned trim discards it upstream, so that QEMU's
 *   fleecing image shrinks;
 * - extents: unreadable regions are holes, answered here; readable ones
 *   come from the plugin; the preferred block size keeps aligned
 *   requests inside the dirty regions' granules.
 *
 * The view is process-wide, shared by every connection; it locks
 * itself.  This file's own lock guards the flusher thread's state, and
 * is never held across a call to the plugin.  The status file has a
 * thread of its own (lib/status.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cluster.h"
#include "mapfile.h"
#include "bitmap.h"
#include "regions.h"
#include "status.h"
#include "view.h"

/* -D backupaccess.verbose=1: one debug line per request. */
NBDKIT_DLL_PUBLIC int backupaccess_debug_verbose = 0;

/* Parameters. */
static char *map_path;
static char *bitmap_name;
static char *bitmap_uri;
/* The plugin's own connection parameters (nbd plugin, snapshotaccess
 * plugin), seen on the way through: the default place of the bitmap.
 */
static char *plugin_socket, *plugin_export, *plugin_uri;
/* The snapshotaccess plugin's cluster=, seen on the way through: the
 * same setting, which must agree with backupaccess-cluster.
 */
static int64_t plugin_cluster = -1;
static char *status_path;       /* counters for the helper, every second */
static int64_t cluster_size = BA_CLUSTER_DEFAULT;
static bool discard = true;
static bool clean_is_zero;
static bool discard_clean;
/* Completed clusters are trimmed in batches of this many bytes (one
 * trim per client read would cost an upstream round trip per read).
 */
static int64_t trim_batch = INT64_C (4) << 20;
static int64_t discard_lag;     /* recent bytes kept readable */
static unsigned params_seen;    /* bit per parameter, to refuse repeats */

/* The dirty regions, until the view takes a copy in .after_fork. */
static struct ba_regions dirty;
static bool have_dirty;         /* else the whole disk is readable */
static struct ba_view *view;
static struct ba_status *status;        /* the status file's thread */
/* The flusher's state below is guarded by lock. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
/* The flusher thread sends the batch every second, so that the last
 * discards of a slow or idle client (a FUSE mount) do not wait for
 * its connection to end.  It sends them through the plugin context of
 * an open connection (there is a batch only while one is open): one of
 * its own would be one more connection to QEMU, and the nbd plugin
 * logs an error when opened outside a connection.  A connection waits
 * in .finalize until the flusher no longer uses its context.
 */
static bool parallel_plugin;    /* the flusher may run beside requests */
static nbdkit_next **open_nexts;        /* the open connections' contexts */
static size_t nr_open_nexts;
static nbdkit_next *flushing_via;       /* in use by the flusher */
static pthread_t flush_thread;
static bool flush_running, flush_stop;
static pthread_cond_t flush_cond = PTHREAD_COND_INITIALIZER;
static pthread_cond_t flushed_cond = PTHREAD_COND_INITIALIZER;
static uint64_t disk_size;
static bool disk_size_known;

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

static void
backupaccess_unload (void)
{
  ba_status_stop (status);
  free (status_path);
  if (view) {
    char summary[512];
    ba_view_summary (view, summary, sizeof summary);
    /* The summary goes to nbdkit's stderr, which is its log when it
     * runs in the foreground.
     */
    fprintf (stderr, "nbdkit: backupaccess: summary: %s\n", summary);
  }
  ba_view_free (view);
  ba_regions_free (&dirty);
  free (map_path);
  free (bitmap_name);
  free (bitmap_uri);
  free (plugin_socket);
  free (plugin_export);
  free (plugin_uri);
}

/* Refuses a parameter given twice: a conflicting command line. */
static int
seen_once (unsigned bit, const char *key)
{
  if (params_seen & bit) {
    nbdkit_error ("%s given more than once", key);
    return -1;
  }
  params_seen |= bit;
  return 0;
}

static int
backupaccess_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  if (strcmp (key, "backupaccess-map") == 0) {
    if (seen_once (1, key) == -1)
      return -1;
    map_path = nbdkit_absolute_path (value);
    return map_path ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-cluster") == 0) {
    if (seen_once (2, key) == -1)
      return -1;
    cluster_size = nbdkit_parse_size (value);
    if (cluster_size == -1)
      return -1;
    if (!ba_cluster_size_valid (cluster_size)) {
      nbdkit_error ("backupaccess-cluster=%s: the cluster size must be "
                    BA_CLUSTER_RULE, value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-discard") == 0) {
    int r;
    if (seen_once (4, key) == -1)
      return -1;
    r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    discard = r;
    return 0;
  }
  if (strcmp (key, "backupaccess-clean") == 0) {
    if (seen_once (8, key) == -1)
      return -1;
    if (strcmp (value, "hole") == 0)
      clean_is_zero = false;
    else if (strcmp (value, "zero") == 0)
      clean_is_zero = true;
    else {
      nbdkit_error ("backupaccess-clean=%s: expected \"hole\" or \"zero\"",
                    value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-discard-clean") == 0) {
    int r;
    if (seen_once (128, key) == -1)
      return -1;
    r = nbdkit_parse_bool (value);
    if (r == -1)
      return -1;
    discard_clean = r;
    return 0;
  }
  if (strcmp (key, "backupaccess-trim-batch") == 0) {
    if (seen_once (256, key) == -1)
      return -1;
    trim_batch = nbdkit_parse_size (value);
    if (trim_batch == -1)
      return -1;
    if (trim_batch > INT64_C (1) << 30) {
      nbdkit_error ("backupaccess-trim-batch=%s: at most 1G", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-discard-lag") == 0) {
    if (seen_once (512, key) == -1)
      return -1;
    discard_lag = nbdkit_parse_size (value);
    if (discard_lag == -1)
      return -1;
    if (discard_lag > INT64_C (1) << 30) {
      nbdkit_error ("backupaccess-discard-lag=%s: at most 1G", value);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "backupaccess-status") == 0) {
    if (seen_once (64, key) == -1)
      return -1;
    status_path = nbdkit_absolute_path (value);
    return status_path ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-bitmap") == 0) {
    if (seen_once (16, key) == -1)
      return -1;
    if (*value == '\0') {
      nbdkit_error ("backupaccess-bitmap: the bitmap name is empty");
      return -1;
    }
    bitmap_name = strdup (value);
    return bitmap_name ? 0 : -1;
  }
  if (strcmp (key, "backupaccess-uri") == 0) {
    if (seen_once (32, key) == -1)
      return -1;
    bitmap_uri = strdup (value);
    return bitmap_uri ? 0 : -1;
  }
  if (strncmp (key, "backupaccess-", 13) == 0) {
    nbdkit_error ("unknown parameter %s (see nbdkit --filter=backupaccess "
                  "null --help)", key);
    return -1;
  }
  /* Keep a copy of where the plugin connects, and pass it on. */
  if (strcmp (key, "socket") == 0) {
    free (plugin_socket);
    plugin_socket = nbdkit_absolute_path (value);
    if (plugin_socket == NULL)
      return -1;
  }
  else if (strcmp (key, "cluster") == 0) {
    plugin_cluster = nbdkit_parse_size (value);
    if (plugin_cluster == -1)
      return -1;
  }
  else if (strcmp (key, "export") == 0 || strcmp (key, "uri") == 0) {
    char **copy = key[0] == 'e' ? &plugin_export : &plugin_uri;
    free (*copy);
    *copy = strdup (value);
    if (*copy == NULL)
      return -1;
  }
  return next (nxdata, key, value);
}

static int
backupaccess_config_complete (nbdkit_next_config_complete *next,
                              nbdkit_backend *nxdata)
{
  if (map_path && bitmap_name) {
    nbdkit_error ("backupaccess-map and backupaccess-bitmap both name the "
                  "dirty regions: give one of them");
    return -1;
  }
  if (bitmap_uri && !bitmap_name) {
    nbdkit_error ("backupaccess-uri is where backupaccess-bitmap is read "
                  "from, but no backupaccess-bitmap was given");
    return -1;
  }
  if (bitmap_name && !bitmap_uri && !plugin_uri && !plugin_socket) {
    nbdkit_error ("backupaccess-bitmap: no place to read it from: give "
                  "backupaccess-uri=URI, or the plugin's socket= or uri=");
    return -1;
  }
  /* One cluster size for both: the plugin's alone is taken as the
   * filter's too; two different ones are a mistake that costs either
   * every discard or, on QEMU 7.x, the VM.
   */
  if (plugin_cluster != -1) {
    if (!(params_seen & 2))
      cluster_size = plugin_cluster;
    else if (plugin_cluster != cluster_size) {
      nbdkit_error ("backupaccess-cluster=%" PRIi64 " and the plugin's "
                    "cluster=%" PRIi64 " differ: both are QEMU's "
                    "copy-before-write cluster size (the larger of 64K and "
                    "the fleecing image's cluster size); give it once, as "
                    "cluster=SIZE", cluster_size, plugin_cluster);
      return -1;
    }
  }
  if (map_path) {
    char err[512];
    if (ba_map_parse_file (map_path, &dirty, err, sizeof err) == -1) {
      nbdkit_error ("backupaccess-map: %s", err);
      return -1;
    }
    have_dirty = true;
  }
  return next (nxdata);
}

/* Reads the dirty bitmap once, before nbdkit serves anyone: a bitmap
 * read later might have changed, and errors here stop nbdkit at once.
 * When the plugin is an NBD client (socket= or uri=), the disk size is
 * asked of the same export here too.
 */
static int
backupaccess_get_ready (int thread_model)
{
  char err[1024];
  const char *uri = bitmap_uri ? bitmap_uri : plugin_uri;
  /* Without a bitmap only the size is fetched: ba_bitmap_fetch clears
   * the set it is given, which must not be the regions of a
   * backupaccess-map.
   */
  struct ba_regions none;
  int r;

  parallel_plugin = thread_model == NBDKIT_THREAD_MODEL_PARALLEL;
  if (bitmap_name == NULL && uri == NULL && plugin_socket == NULL)
    return 0;                   /* the size comes in .after_fork */
  ba_regions_init (&none);
  r = ba_bitmap_fetch (uri, uri ? NULL : plugin_socket, plugin_export,
                       bitmap_name, bitmap_name ? &dirty : &none,
                       &disk_size, err, sizeof err);
  ba_regions_free (&none);
  if (r == -1) {
    if (bitmap_name)
      nbdkit_error ("backupaccess-bitmap=%s: %s", bitmap_name, err);
    else
      nbdkit_error ("backupaccess: %s", err);
    return -1;
  }
  disk_size_known = true;
  if (bitmap_name) {
    have_dirty = true;
    nbdkit_debug ("backupaccess: bitmap %s: %zu dirty regions, %" PRIu64
                  " dirty bytes of %" PRIu64, bitmap_name, dirty.n,
                  ba_regions_total (&dirty), disk_size);
  }
  return 0;
}

static int
backupaccess_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
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
  disk_size = size;
  disk_size_known = true;
  return 0;
}

static int send_trims (nbdkit_next *next, const struct ba_regions *trims,
                       bool clean, int *err);

/* Discards every cluster with no dirty byte, once, before clients come:
 * where copy-before-write has no bitmap (upstream QEMU's blockdev-backup
 * sync=none), it then stops copying them on guest writes, and the
 * fleecing image holds only what the backup reads.
 */
/* Opens a writable plugin context of our own, ready to trim, or
 * returns NULL (the plugin's errors are logged; a plugin that cannot
 * trim is left to the caller to report).
 */
static nbdkit_next *
open_trim_context (nbdkit_backend *backend)
{
  nbdkit_next *next;

  next = nbdkit_next_context_open (backend, 0,
                                   plugin_export ? plugin_export : "", 1);
  if (next == NULL)
    return NULL;
  if (next->prepare (next) == -1)
    goto close;
  /* nbdkit checks every request against the size it was told. */
  if (next->get_size (next) == -1)
    goto finalize;
  if (next->can_write (next) != 1 || next->can_trim (next) != 1)
    goto finalize;
  return next;
 finalize:
  next->finalize (next);
 close:
  nbdkit_next_context_close (next);
  return NULL;
}

static void
close_context (nbdkit_next *next)
{
  next->finalize (next);
  nbdkit_next_context_close (next);
}

static int
discard_clean_clusters (nbdkit_backend *backend)
{
  struct ba_regions clean;
  nbdkit_next *next;
  int err = 0, r = -1;

  ba_regions_init (&clean);
  if (ba_view_clean_clusters (view, &clean) == -1) {
    nbdkit_error ("backupaccess-discard-clean: %m");
    return -1;
  }
  next = open_trim_context (backend);
  if (next) {
    r = send_trims (next, &clean, true, &err);
    close_context (next);
  }
  else
    nbdkit_error ("backupaccess-discard-clean: the plugin cannot trim");
  nbdkit_debug ("backupaccess: discarded %zu clean ranges, %" PRIu64
                " bytes", clean.n, ba_regions_total (&clean));
  ba_regions_free (&clean);
  return r;
}

/* The flusher thread: once a second, the batch goes out. */
static void *
flush_loop (void *arg)
{
  pthread_mutex_lock (&lock);
  while (!flush_stop) {
    struct timespec ts;
    struct ba_regions due;
    int err;

    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec++;
    pthread_cond_timedwait (&flush_cond, &lock, &ts);
    if (flush_stop || nr_open_nexts == 0)
      continue;
    ba_regions_init (&due);
    if (ba_view_flush (view, &due) == -1)
      nbdkit_error ("backupaccess: out of memory sending discards");
    if (due.n > 0) {
      flushing_via = open_nexts[0];
      pthread_mutex_unlock (&lock);
      send_trims (flushing_via, &due, false, &err);
      pthread_mutex_lock (&lock);
      flushing_via = NULL;
      pthread_cond_broadcast (&flushed_cond);
    }
    ba_regions_free (&due);
  }
  pthread_mutex_unlock (&lock);
  return NULL;
}

static int
start_flusher (void)
{
  int e;

  if (!parallel_plugin) {
    nbdkit_debug ("backupaccess: the plugin is not parallel: a batch of "
                  "discards waits for its connection to fill it or end");
    return 0;
  }
  e = pthread_create (&flush_thread, NULL, flush_loop, NULL);
  if (e != 0) {
    nbdkit_error ("backupaccess: pthread_create: %s", strerror (e));
    return -1;
  }
  flush_running = true;
  return 0;
}

/* After the last connection, before the plugin goes. */
static void
backupaccess_cleanup (nbdkit_backend *backend)
{
  if (flush_running) {
    pthread_mutex_lock (&lock);
    flush_stop = true;
    pthread_cond_signal (&flush_cond);
    pthread_mutex_unlock (&lock);
    pthread_join (flush_thread, NULL);
    flush_running = false;
  }
  free (open_nexts);
  open_nexts = NULL;
}

/* A connection's context becomes available to the flusher, or stops
 * being so (waiting until the flusher is done with it).
 */
static int
offer_to_flusher (nbdkit_next *next)
{
  nbdkit_next **n;

  pthread_mutex_lock (&lock);
  n = realloc (open_nexts, (nr_open_nexts + 1) * sizeof (nbdkit_next *));
  if (n == NULL) {
    pthread_mutex_unlock (&lock);
    nbdkit_error ("realloc: %m");
    return -1;
  }
  open_nexts = n;
  open_nexts[nr_open_nexts++] = next;
  pthread_mutex_unlock (&lock);
  return 0;
}

static void
withdraw_from_flusher (nbdkit_next *next)
{
  pthread_mutex_lock (&lock);
  for (size_t i = 0; i < nr_open_nexts; i++)
    if (open_nexts[i] == next) {
      open_nexts[i] = open_nexts[--nr_open_nexts];
      break;
    }
  while (flushing_via == next)
    pthread_cond_wait (&flushed_cond, &lock);
  pthread_mutex_unlock (&lock);
}

/* Sets up the state once, before any client is served, and checks the
 * dirty regions against the disk: bad input stops nbdkit here.
 */
static int
backupaccess_after_fork (nbdkit_backend *backend)
{
  char err[512];

  if (!disk_size_known && learn_disk_size (backend) == -1)
    return -1;

  if (have_dirty &&
      ba_regions_check_size (&dirty, disk_size, err, sizeof err) == -1) {
    if (map_path)
      nbdkit_error ("backupaccess-map: %s: %s", map_path, err);
    else
      nbdkit_error ("backupaccess-bitmap=%s: %s", bitmap_name, err);
    return -1;
  }
  {
    const struct ba_view_config config = {
      .disk_size = disk_size, .cluster_size = cluster_size,
      .dirty = have_dirty ? &dirty : NULL, .discard = discard,
      .clean_is_zero = clean_is_zero, .trim_batch = trim_batch,
      .discard_lag = discard_lag,
    };
    bool safe;
    uint32_t preferred;

    view = ba_view_new (&config);
    if (view == NULL) {
      nbdkit_error ("backupaccess: cannot set up the view of the export: %m");
      return -1;
    }
    preferred = ba_view_preferred_size (view, &safe);
    if (!safe)
      nbdkit_debug ("backupaccess: the dirty regions are not aligned to "
                    "%" PRIu32 " bytes, the smallest preferred block size: "
                    "requests of that size can mix clean and dirty bytes, "
                    "and are then refused", preferred);
  }
  if (discard_clean && have_dirty &&
      discard_clean_clusters (backend) == -1)
    return -1;
  if (discard && trim_batch > 0 && start_flusher () == -1)
    return -1;
  if (status_path) {
    status = ba_status_start (view, status_path, err, sizeof err);
    if (status == NULL) {
      nbdkit_error ("backupaccess-status: %s", err);
      return -1;
    }
  }
  nbdkit_debug ("backupaccess: disk size %" PRIu64 ", %zu dirty regions, "
                "cluster %" PRIi64 ", preferred block size %" PRIu32
                ", discard %s", disk_size, have_dirty ? dirty.n : (size_t) 1,
                cluster_size, ba_view_preferred_size (view, NULL),
                discard ? "on" : "off");
  ba_regions_free (&dirty);     /* the view has its copy */
  return 0;
}

static void flush_batch (nbdkit_next *next);

static int
backupaccess_finalize (nbdkit_next *next, void *handle)
{
  if (discard) {
    if (flush_running)
      withdraw_from_flusher (next);
    flush_batch (next);
  }
  return 0;
}

static int
backupaccess_prepare (nbdkit_next *next, void *handle, int readonly)
{
  int64_t size = next->get_size (next);

  if (size == -1)
    return -1;
  if ((uint64_t) size != disk_size) {
    nbdkit_error ("backupaccess: the export's size changed from %" PRIu64
                  " to %" PRIi64 " since start-up", disk_size, size);
    return -1;
  }
  if (discard && readonly) {
    nbdkit_error ("backupaccess: discard after read needs a writable "
                  "connection: do not use nbdkit -r, or set "
                  "backupaccess-discard=false");
    return -1;
  }
  if (discard && next->can_trim (next) != 1) {
    nbdkit_error ("backupaccess: the plugin cannot trim, so nothing read "
                  "could be discarded: export it writable, or set "
                  "backupaccess-discard=false");
    return -1;
  }
  if (discard && flush_running)
    return offer_to_flusher (next);
  return 0;
}

/* The plugin's limits, with the view's preferred size inside them. */
static int
backupaccess_block_size (nbdkit_next *next, void *handle,
                         uint32_t *minimum, uint32_t *preferred,
                         uint32_t *maximum)
{
  if (next->block_size (next, minimum, preferred, maximum) == -1)
    return -1;
  if (*minimum == 0) {          /* the plugin has no constraints */
    *minimum = 1;
    *maximum = 0xffffffff;
  }
  *preferred = ba_view_preferred_size (view, NULL);
  if (*preferred < *minimum)
    *preferred = *minimum;
  while (*preferred > *maximum && *preferred > *minimum)
    *preferred /= 2;            /* powers of two */
  return 0;
}

/* Writes are never allowed; trims are, so the connection is writable.
 * With backupaccess-discard=false the plugin may lack trim (.prepare
 * only checks it when discarding): then offer none, since a client trim
 * completing a cluster would be forwarded, and nbdkit aborts when a
 * filter trims a plugin that cannot trim.
 */
static int
backupaccess_can_trim (nbdkit_next *next, void *handle)
{
  if (discard)
    return 1;                   /* .prepare checked the plugin */
  return next->can_trim (next);
}

static int
backupaccess_can_zero (nbdkit_next *next, void *handle)
{
  return NBDKIT_ZERO_NATIVE;    /* so that zero requests reach us: EPERM */
}

static int
backupaccess_can_fast_zero (nbdkit_next *next, void *handle)
{
  return 0;
}

static int
backupaccess_can_fua (nbdkit_next *next, void *handle)
{
  return NBDKIT_FUA_NONE;
}

static int
backupaccess_can_cache (nbdkit_next *next, void *handle)
{
  return NBDKIT_CACHE_NONE;     /* a cache request could read clean areas */
}

static int
backupaccess_can_extents (nbdkit_next *next, void *handle)
{
  /* Asked so that nbdkit knows the plugin's answer before .extents. */
  if (next->can_extents (next) == -1)
    return -1;
  return 1;                     /* holes are answered here in any case */
}

/* Sends trims for whole clusters (clean: of clean clusters at
 * start-up), counted in the view.  Returns 0, or -1 with *err set after
 * trying every range.
 */
static int
send_trims (nbdkit_next *next, const struct ba_regions *trims,
            bool clean, int *err)
{
  int r = 0;

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t start = trims->r[i].start, end = trims->r[i].end;
    while (start < end) {
      uint64_t len = ba_trim_piece (start, end, cluster_size, UINT32_MAX);
      int e = 0;
      if (next->trim (next, len, start, 0, &e) == -1) {
        nbdkit_error ("backupaccess: discarding [%" PRIu64 ", +%" PRIu64
                      ") upstream failed: %s", start, len, strerror (e));
        ba_view_trimmed (view, len, false, clean);
        *err = e ? e : EIO;
        r = -1;
      }
      else {
        if (backupaccess_debug_verbose)
          nbdkit_debug ("backupaccess: trim [%" PRIu64 ", +%" PRIu64 ")",
                        start, len);
        ba_view_trimmed (view, len, true, clean);
      }
      start += len;
    }
  }
  return r;
}

/* Sends the batch (at the end of a connection; the lag stays). */
static void
flush_batch (nbdkit_next *next)
{
  struct ba_regions due;
  int err;

  ba_regions_init (&due);
  if (ba_view_flush (view, &due) == -1)
    nbdkit_error ("backupaccess: out of memory sending the last discards");
  send_trims (next, &due, false, &err);
  ba_regions_free (&due);
}

/* Sends the trims that a read or a client trim of [offset, +count)
 * made due (r: what the view said).
 */
static int
discard_due (nbdkit_next *next, int r, struct ba_regions *trims,
             uint64_t offset, uint64_t count, int *err)
{
  int r2;

  if (r == -1) {
    nbdkit_error ("backupaccess: out of memory recording discarded "
                  "clusters near [%" PRIu64 ", +%" PRIu64 ")",
                  offset, count);
    *err = ENOMEM;
  }
  r2 = send_trims (next, trims, false, err);
  ba_regions_free (trims);
  return r == -1 || r2 == -1 ? -1 : 0;
}

/* A refused read: EPERM, or EIO for a broken snapshot. */
static int
refuse (uint64_t offset, uint32_t count, enum ba_view_refusal why,
        const struct ba_range *bad, int *err)
{
  char msg[512];

  ba_view_refusal_message (view, why, bad, msg, sizeof msg);
  nbdkit_error ("backupaccess: read [%" PRIu64 ", +%" PRIu32 ") refused: "
                "%s", offset, count, msg);
  *err = why == BA_VIEW_BROKEN ? EIO : EPERM;
  return -1;
}

/* QEMU refused a read that is dirty and, as far as we know, was never
 * discarded (EINVAL through the nbd plugin, EPERM through ours).
 * Unless another request discarded it meanwhile, the snapshot is
 * broken: copy-before-write failed (fleecing image full, or
 * cbw-timeout) and QEMU now refuses everything.
 */
static int
upstream_refused (uint64_t offset, uint32_t count, int *err)
{
  struct ba_range bad;

  if (ba_view_upstream_refused (view, offset, count, &bad)
      == BA_VIEW_DISCARDED) {
    nbdkit_error ("backupaccess: read [%" PRIu64 ", +%" PRIu32 ") failed: "
                  "[%" PRIu64 ", %" PRIu64 ") was discarded by another "
                  "request while this one was in flight",
                  offset, count, bad.start, bad.end);
    *err = EPERM;
    return -1;
  }
  nbdkit_error ("backupaccess: read [%" PRIu64 ", +%" PRIu32 ") refused "
                "by the plugin although it is dirty and was never "
                "discarded: the snapshot is broken (copy-before-write "
                "failed: fleecing image full or cbw-timeout?); this backup "
                "must fail, and every further read fails", offset, count);
  *err = EIO;
  return -1;
}

/* The read path. */
static int
backupaccess_pread (nbdkit_next *next, void *handle, void *buf,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err)
{
  struct ba_range bad;
  struct ba_regions trims;
  enum ba_view_refusal why;
  int r, ignored;

  why = ba_view_check_read (view, offset, count, &bad);
  if (why != BA_VIEW_READABLE)
    return refuse (offset, count, why, &bad, err);

  /* A failed read consumes nothing. */
  if (next->pread (next, buf, count, offset, flags, err) == -1) {
    if (*err == EINVAL || *err == EPERM)
      return upstream_refused (offset, count, err);
    return -1;
  }

  if (backupaccess_debug_verbose)
    nbdkit_debug ("backupaccess: read [%" PRIu64 ", +%" PRIu32 ")",
                  offset, count);
  /* The data reached the client; a failed discard only costs space in
   * the fleecing image and is logged and counted.
   */
  ba_regions_init (&trims);
  r = ba_view_read_done (view, offset, count, &trims);
  discard_due (next, r, &trims, offset, count, &ignored);
  return 0;
}

/* Client trims count as consumed, like reads; only whole clusters are
 * ever trimmed upstream.
 */
static int
backupaccess_trim (nbdkit_next *next, void *handle, uint32_t count,
                   uint64_t offset, uint32_t flags, int *err)
{
  struct ba_regions trims;
  int r;

  if (backupaccess_debug_verbose)
    nbdkit_debug ("backupaccess: client trim [%" PRIu64 ", +%" PRIu32 ")",
                  offset, count);
  ba_regions_init (&trims);
  r = ba_view_client_trim (view, offset, count, &trims);
  return discard_due (next, r, &trims, offset, count, err);
}

static int
backupaccess_pwrite (nbdkit_next *next, void *handle, const void *buf,
                     uint32_t count, uint64_t offset, uint32_t flags,
                     int *err)
{
  nbdkit_error ("backupaccess: write [%" PRIu64 ", +%" PRIu32 ") refused: "
                "a backup view is read-only", offset, count);
  *err = EPERM;
  return -1;
}

static int
backupaccess_zero (nbdkit_next *next, void *handle, uint32_t count,
                   uint64_t offset, uint32_t flags, int *err)
{
  nbdkit_error ("backupaccess: write zeroes [%" PRIu64 ", +%" PRIu32
                ") refused: a backup view is read-only", offset, count);
  *err = EPERM;
  return -1;
}

/* At most this many plugin calls per extents request: clients ask again
 * from where the answer stopped.
 */
#define MAX_UPSTREAM_EXTENTS_CALLS 16

static int
backupaccess_extents (nbdkit_next *next, void *handle, uint32_t count,
                      uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents, int *err)
{
  uint64_t end = offset + count;
  unsigned calls = 0;

  while (offset < end && calls < MAX_UPSTREAM_EXTENTS_CALLS) {
    enum ba_view_extent kind;
    uint64_t len = ba_view_extent_run (view, offset, end, &kind);

    if (len == 0)
      break;
    /* Unreadable runs: holes, clean ones reading as zeroes with
     * backupaccess-clean=zero (see ba_view_unreadable_flags).
     */
    if (kind != BA_VIEW_EXTENT_READABLE) {
      if (nbdkit_add_extent (extents, offset, len,
                             ba_view_unreadable_flags (view, kind)) == -1) {
        *err = errno;
        return -1;
      }
    }
    else {
      /* Ask the plugin about the readable run only: QEMU fails a query
       * that crosses into an unreadable area.
       */
      struct nbdkit_extents *up;
      uint64_t reached = offset;

      if (next->can_extents (next) != 1) {    /* plugin: all data */
        if (nbdkit_add_extent (extents, offset, len, 0) == -1) {
          *err = errno;
          return -1;
        }
        offset += len;
        continue;
      }
      up = nbdkit_extents_new (offset, offset + len);
      if (up == NULL) {
        *err = errno;
        return -1;
      }
      calls++;
      if (next->extents (next, len, offset, flags, up, err) == -1) {
        nbdkit_extents_free (up);
        return -1;
      }
      for (size_t i = 0; i < nbdkit_extents_count (up); i++) {
        struct nbdkit_extent e = nbdkit_get_extent (up, i);
        if (nbdkit_add_extent (extents, e.offset, e.length,
                               ba_view_readable_flags (view, e.type)) == -1) {
          *err = errno;
          nbdkit_extents_free (up);
          return -1;
        }
        reached = e.offset + e.length;
      }
      nbdkit_extents_free (up);
      if (reached < offset + len)
        break;                  /* the plugin answered part of the run */
    }
    offset += len;
    if (flags & NBDKIT_FLAG_REQ_ONE)
      break;
  }
  return 0;
}

static struct nbdkit_filter filter = {
  .name               = "backupaccess",
  .longname           = "nbdkit backupaccess filter",
  .unload             = backupaccess_unload,
  .config             = backupaccess_config,
  .config_complete    = backupaccess_config_complete,
  .config_help        = backupaccess_config_help,
  .thread_model       = backupaccess_thread_model,
  .get_ready          = backupaccess_get_ready,
  .after_fork         = backupaccess_after_fork,
  .cleanup            = backupaccess_cleanup,
  .prepare            = backupaccess_prepare,
  .finalize           = backupaccess_finalize,
  .block_size         = backupaccess_block_size,
  .can_trim           = backupaccess_can_trim,
  .can_zero           = backupaccess_can_zero,
  .can_fast_zero      = backupaccess_can_fast_zero,
  .can_fua            = backupaccess_can_fua,
  .can_cache          = backupaccess_can_cache,
  .can_extents        = backupaccess_can_extents,
  .pread              = backupaccess_pread,
  .pwrite             = backupaccess_pwrite,
  .trim               = backupaccess_trim,
  .zero               = backupaccess_zero,
  .extents            = backupaccess_extents,
};

NBDKIT_REGISTER_FILTER (filter)
