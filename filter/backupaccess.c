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
 * This file has the data path: a connection's checks, the read path,
 * client trims, extents, and the refusals of writes.  The parameters are
 * in config.c, getting ready (the bitmap, the disk size, the view) in
 * startup.c, and the trims sent upstream with their flusher thread in
 * flusher.c.  The view is process-wide, shared by every connection; it
 * locks itself.  The flusher's lock is never held across a call to the
 * plugin.  The status file has a thread of its own (lib/status.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include <nbdkit-filter.h>

#include "regions.h"
#include "status.h"
#include "view.h"

#include "config.h"
#include "flusher.h"
#include "startup.h"

static void
backupaccess_unload (void)
{
  ba_status_stop (state.status);
  if (state.view) {
    char summary[512];
    ba_view_summary (state.view, summary, sizeof summary);
    /* The summary goes to nbdkit's stderr, which is its log when it
     * runs in the foreground.
     */
    fprintf (stderr, "nbdkit: backupaccess: summary: %s\n", summary);
  }
  ba_view_free (state.view);
  config_free ();
}

static int
backupaccess_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

/* After the last connection, before the plugin goes. */
static void
backupaccess_cleanup (nbdkit_backend *backend)
{
  stop_flusher ();
}

static int
backupaccess_finalize (nbdkit_next *next, void *handle)
{
  if (config.discard) {
    if (flusher_running ())
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
  if ((uint64_t) size != state.disk_size) {
    nbdkit_error ("backupaccess: the export's size changed from %" PRIu64
                  " to %" PRIi64 " since start-up", state.disk_size, size);
    return -1;
  }
  if (config.discard && readonly) {
    nbdkit_error ("backupaccess: discard after read needs a writable "
                  "connection: do not use nbdkit -r, or set "
                  "backupaccess-discard=false");
    return -1;
  }
  if (config.discard && next->can_trim (next) != 1) {
    nbdkit_error ("backupaccess: the plugin cannot trim, so nothing read "
                  "could be discarded: export it writable, or set "
                  "backupaccess-discard=false");
    return -1;
  }
  if (config.discard && flusher_running ())
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
  *preferred = ba_view_preferred_size (state.view, NULL);
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
  if (config.discard)
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

  ba_view_refusal_message (state.view, why, bad, msg, sizeof msg);
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

  if (ba_view_upstream_refused (state.view, offset, count, &bad)
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

  why = ba_view_check_read (state.view, offset, count, &bad);
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
  r = ba_view_read_done (state.view, offset, count, &trims);
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
  r = ba_view_client_trim (state.view, offset, count, &trims);
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
    uint64_t len = ba_view_extent_run (state.view, offset, end, &kind);

    if (len == 0)
      break;
    /* Unreadable runs: holes, clean ones reading as zeroes with
     * backupaccess-clean=zero (see ba_view_unreadable_flags).
     */
    if (kind != BA_VIEW_EXTENT_READABLE) {
      uint32_t type = ba_view_unreadable_flags (state.view, kind);

      if (nbdkit_add_extent (extents, offset, len, type) == -1) {
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
        uint32_t type = ba_view_readable_flags (state.view, e.type);

        if (nbdkit_add_extent (extents, e.offset, e.length, type) == -1) {
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
