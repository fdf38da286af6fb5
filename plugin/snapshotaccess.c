/* SPDX-License-Identifier: BSD-3-Clause */
/* nbdkit-snapshotaccess-plugin: reads a QEMU snapshot-access export.
 *
 * Made for one job, unlike the general nbd plugin: a pool of upstream
 * connections shared by every client connection (lib/upstream.c).  A
 * read runs in the nbdkit thread that got it: split into pieces of the
 * size QEMU serves best, issued in parallel over idle connections and
 * driven by that thread, with libnbd reading straight into nbdkit's
 * buffer (no extra thread or hand-off per request).  The export is an
 * immutable snapshot, so multi-conn is advertised even though QEMU does
 * not advertise it on a writable export.  Trims are forwarded only when
 * aligned to the copy-before-write cluster (QEMU 7.x aborts on others).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>
#include <libnbd.h>

#include "cluster.h"
#include "upstream.h"

#define MAX_REQUEST BA_UPSTREAM_MAX_REQUEST

static char *socket_path, *export_name, *uri;
static unsigned connections = 4;
static int64_t cluster_size = BA_CLUSTER_DEFAULT;
static uint32_t request_size = BA_UPSTREAM_PIECE_DEFAULT;

/* The pool; handles[i] is connection i, for calls of the plugin's own. */
static struct ba_upstream *upstream;
static struct nbd_handle **handles;
static int64_t size = -1;
static bool can_trim_upstream, can_extents_upstream;
/* QEMU's block size constraints (0: none given). */
static int64_t qemu_minimum, qemu_preferred, qemu_maximum;

#define snapshotaccess_config_help \
  "socket=SOCKET         Unix socket of QEMU's NBD server.\n" \
  "export=NAME           Export name (with socket=).\n" \
  "uri=URI               Or an NBD URI instead of socket= and export=.\n" \
  "connections=N         Upstream connections in the pool (default 4).\n" \
  "request-size=SIZE     Reads are sent to QEMU in pieces of at most\n" \
  "                      SIZE, in parallel (default 256K).\n" \
  "cluster=SIZE          Copy-before-write cluster size: only trims\n" \
  "                      aligned to it are forwarded (default 64K)."

static void
snapshotaccess_unload (void)
{
  ba_upstream_close (upstream);
  free (handles);
  free (socket_path);
  free (export_name);
  free (uri);
}

static int
snapshotaccess_config (const char *key, const char *value)
{
  if (strcmp (key, "socket") == 0) {
    free (socket_path);
    socket_path = nbdkit_absolute_path (value);
    return socket_path ? 0 : -1;
  }
  if (strcmp (key, "export") == 0) {
    free (export_name);
    export_name = strdup (value);
    return export_name ? 0 : -1;
  }
  if (strcmp (key, "uri") == 0) {
    free (uri);
    uri = strdup (value);
    return uri ? 0 : -1;
  }
  if (strcmp (key, "connections") == 0) {
    if (nbdkit_parse_unsigned ("connections", value, &connections) == -1)
      return -1;
    if (connections < 1 || connections > BA_UPSTREAM_CONNECTIONS_MAX) {
      nbdkit_error ("connections=%s: must be between 1 and %d", value,
                    BA_UPSTREAM_CONNECTIONS_MAX);
      return -1;
    }
    return 0;
  }
  if (strcmp (key, "request-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1)
      return -1;
    if (!ba_upstream_piece_valid (r)) {
      nbdkit_error ("request-size=%s: must be " BA_UPSTREAM_PIECE_RULE, value);
      return -1;
    }
    request_size = r;
    return 0;
  }
  if (strcmp (key, "cluster") == 0) {
    cluster_size = nbdkit_parse_size (value);
    if (cluster_size == -1)
      return -1;
    if (!ba_cluster_size_valid (cluster_size)) {
      nbdkit_error ("cluster=%s: must be " BA_CLUSTER_RULE, value);
      return -1;
    }
    return 0;
  }
  nbdkit_error ("unknown parameter '%s'", key);
  return -1;
}

static int
snapshotaccess_config_complete (void)
{
  if ((socket_path == NULL) == (uri == NULL)) {
    nbdkit_error ("give either socket= (with export=) or uri=");
    return -1;
  }
  if (uri && export_name) {
    nbdkit_error ("export= goes with socket=; with uri= the export name "
                  "is part of the URI");
    return -1;
  }
  return 0;
}

/* Connects the pool, after nbdkit forked: sockets must not be shared
 * with a parent that goes away.
 */
static int
snapshotaccess_after_fork (void)
{
  char err[1024];
  struct ba_upstream_params p = {
    .uri = uri, .socket = socket_path, .export = export_name,
    .meta_context = LIBNBD_CONTEXT_BASE_ALLOCATION,
    .connections = connections, .piece = request_size,
  };

  upstream = ba_upstream_open (&p, err, sizeof err);
  if (upstream == NULL) {
    nbdkit_error ("%s", err);
    return -1;
  }
  handles = calloc (connections, sizeof (struct nbd_handle *));
  if (handles == NULL) {
    nbdkit_error ("calloc: %m");
    return -1;
  }
  for (unsigned i = 0; i < connections; i++)
    handles[i] = ba_upstream_handle (upstream, i);
  size = ba_upstream_size (upstream);
  can_trim_upstream = ba_upstream_can_trim (upstream);
  can_extents_upstream = ba_upstream_can_meta_context (upstream);
  qemu_minimum = nbd_get_block_size (handles[0], LIBNBD_SIZE_MINIMUM);
  qemu_preferred = nbd_get_block_size (handles[0], LIBNBD_SIZE_PREFERRED);
  qemu_maximum = nbd_get_block_size (handles[0], LIBNBD_SIZE_MAXIMUM);
  nbdkit_debug ("snapshotaccess: %u connections, size %" PRIi64
                ", trim %d, extents %d, reads in pieces of %" PRIu32,
                connections, size, can_trim_upstream, can_extents_upstream,
                request_size);
  return 0;
}

static unsigned
take_handle (void)
{
  return ba_upstream_take (upstream);
}

static void
give_back (unsigned i)
{
  ba_upstream_give_back (upstream, i);
}

static void *
snapshotaccess_open (int readonly)
{
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
snapshotaccess_get_size (void *handle)
{
  return size;
}

/* QEMU's own constraints, as nbdkit's nbd plugin passes them on, with
 * reads of up to 32 MiB (split here).  Not the cluster size: the
 * backupaccess filter, which knows the dirty bitmap, chooses the
 * preferred size that is safe for a copy (nbdcopy rounds its requests up
 * to it).
 */
static int
snapshotaccess_block_size (void *handle,
                           uint32_t *minimum, uint32_t *preferred,
                           uint32_t *maximum)
{
  *minimum = qemu_minimum > 0 ? qemu_minimum : 1;
  *preferred = qemu_preferred > 0 ? qemu_preferred : 4096;
  *maximum = MAX_REQUEST;
  if (*preferred < *minimum)
    *preferred = *minimum;
  return 0;
}

static int
snapshotaccess_thread_model (void)
{
  return NBDKIT_THREAD_MODEL_PARALLEL;
}

static int
snapshotaccess_can_multi_conn (void *handle)
{
  return 1;                     /* an immutable snapshot */
}

static int
snapshotaccess_can_write (void *handle)
{
  return can_trim_upstream;     /* only so that trims can be sent */
}

static int
snapshotaccess_can_trim (void *handle)
{
  return can_trim_upstream;
}

static int
snapshotaccess_can_zero (void *handle)
{
  return 0;
}

static int
snapshotaccess_can_flush (void *handle)
{
  return 0;
}

static int
snapshotaccess_can_extents (void *handle)
{
  return can_extents_upstream;
}

/* libnbd's errno for a failed command, as nbdkit clients can see it. */
static int
upstream_error (struct nbd_handle *h, const char *what, uint64_t offset,
                uint32_t count)
{
  char err[256];

  nbdkit_set_error (ba_upstream_error (h, nbd_get_errno (), what, offset,
                                       count, err, sizeof err));
  nbdkit_error ("%s", err);
  return -1;
}

static int
snapshotaccess_pread (void *handle, void *buf, uint32_t count,
                      uint64_t offset, uint32_t flags)
{
  char err[256];

  if (ba_upstream_pread (upstream, buf, count, offset, err, sizeof err)
      == -1) {
    nbdkit_set_error (errno);
    nbdkit_error ("%s", err);
    return -1;
  }
  return 0;
}

static int
snapshotaccess_pwrite (void *handle, const void *buf, uint32_t count,
                       uint64_t offset, uint32_t flags)
{
  nbdkit_error ("write [%" PRIu64 ", +%" PRIu32 ") refused: a snapshot is "
                "read-only", offset, count);
  nbdkit_set_error (EPERM);
  return -1;
}

/* Defence in depth: an unaligned trim aborts QEMU 7.0 to 9.0. */
static int
snapshotaccess_trim (void *handle, uint32_t count, uint64_t offset,
                     uint32_t flags)
{
  char err[256];

  if (offset % cluster_size != 0 ||
      (count % cluster_size != 0 && offset + count != (uint64_t) size)) {
    nbdkit_error ("trim [%" PRIu64 ", +%" PRIu32 ") refused: not aligned to "
                  "the cluster size %" PRIi64 " (an unaligned trim would "
                  "abort QEMU); use the backupaccess filter to collect "
                  "trims into whole clusters", offset, count, cluster_size);
    nbdkit_set_error (EINVAL);
    return -1;
  }
  if (ba_upstream_trim (upstream, count, offset, err, sizeof err) == -1) {
    nbdkit_set_error (errno);
    nbdkit_error ("%s", err);
    return -1;
  }
  return 0;
}

struct extents_ctx {
  struct nbdkit_extents *extents;
  int failed;
};

static int
extent_cb (void *opaque, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr_entries, int *error)
{
  struct extents_ctx *ctx = opaque;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    /* NBD_STATE_HOLE and _ZERO have the values of nbdkit's flags. */
    if (nbdkit_add_extent (ctx->extents, offset, entries[i],
                           entries[i + 1] & 3) == -1) {
      ctx->failed = 1;
      return -1;
    }
    offset += entries[i];
  }
  return 0;
}

static int
snapshotaccess_extents (void *handle, uint32_t count, uint64_t offset,
                        uint32_t flags, struct nbdkit_extents *extents)
{
  struct extents_ctx ctx = { .extents = extents };
  nbd_extent_callback cb = { .callback = extent_cb, .user_data = &ctx };
  unsigned i = take_handle ();
  int r = 0;

  if (nbd_block_status (handles[i], count, offset, cb,
                        flags & NBDKIT_FLAG_REQ_ONE ? LIBNBD_CMD_FLAG_REQ_ONE
                        : 0) == -1)
    r = ctx.failed ? -1 : upstream_error (handles[i], "block status",
                                          offset, count);
  give_back (i);
  return r;
}

static struct nbdkit_plugin plugin = {
  /* Its own name: -D backupaccess.* flags belong to the filter. */
  .name               = "snapshotaccess",
  .longname           = "nbdkit snapshotaccess plugin",
  .version            = PACKAGE_VERSION,
  .description        = "Reads a QEMU snapshot-access export",
  .unload             = snapshotaccess_unload,
  .config             = snapshotaccess_config,
  .config_complete    = snapshotaccess_config_complete,
  .config_help        = snapshotaccess_config_help,
  .magic_config_key   = "uri",
  .thread_model       = snapshotaccess_thread_model,
  .after_fork         = snapshotaccess_after_fork,
  .open               = snapshotaccess_open,
  .get_size           = snapshotaccess_get_size,
  .block_size         = snapshotaccess_block_size,
  .can_multi_conn     = snapshotaccess_can_multi_conn,
  .can_write          = snapshotaccess_can_write,
  .can_trim           = snapshotaccess_can_trim,
  .can_zero           = snapshotaccess_can_zero,
  .can_flush          = snapshotaccess_can_flush,
  .can_extents        = snapshotaccess_can_extents,
  .pread              = snapshotaccess_pread,
  .pwrite             = snapshotaccess_pwrite,
  .trim               = snapshotaccess_trim,
  .extents            = snapshotaccess_extents,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL
NBDKIT_REGISTER_PLUGIN (plugin)
