/* SPDX-License-Identifier: BSD-3-Clause */
/* The export as backupaccess-mount reads it (disk.h): the I/O around the
 * readable view.  Reads go to QEMU in QEMU-sized pieces over the pool;
 * what the view says is due is trimmed in whole aligned clusters, at
 * the latest a second later (the flusher thread).  This file's lock
 * guards only the flusher's stop flag; the view and the pool lock
 * themselves, and no lock is held across I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitmap.h"
#include "disk.h"
#include "log.h"
#include "status.h"
#include "view.h"

struct disk {
  struct ba_upstream *up;
  struct ba_view *view;
  struct ba_regions dirty;
  uint64_t size, cluster;
  bool readonly, behind_filter;
  char *status_path;
  struct ba_status *status;
  pthread_t flusher;
  bool flusher_running;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stop;                    /* guarded by lock */
};

/* The dirty regions, and the size of the export they are of. */
static int
fetch_dirty (struct disk *d, const struct disk_config *c,
             char *errbuf, size_t errlen)
{
  const char *uri = c->bitmap_uri, *socket = c->bitmap_socket;
  const char *export = c->bitmap_export;
  uint64_t size;
  char err[1024];

  if (uri == NULL && socket == NULL) {
    uri = c->up.uri;
    socket = c->up.socket;
    export = c->up.export;
  }
  if (ba_bitmap_fetch (uri, socket, export ? export : "", c->bitmap,
                       &d->dirty, &size, err, sizeof err) == -1) {
    snprintf (errbuf, errlen, "bitmap %s: %s", c->bitmap, err);
    return -1;
  }
  if (size != d->size) {
    snprintf (errbuf, errlen, "bitmap %s: it is of an export of %" PRIu64
              " bytes, but the export read has %" PRIu64, c->bitmap, size,
              d->size);
    return -1;
  }
  log_info ("bitmap %s: %zu dirty regions, %" PRIu64 " dirty bytes of %"
            PRIu64, c->bitmap, d->dirty.n, ba_regions_total (&d->dirty),
            d->size);
  return 0;
}

/* Whether a trim of [start, end) covers whole clusters only (the last
 * one may end at the end of the disk): QEMU 7.0 to 9.0 abort on any
 * other.  The view never asks for another; this is defence in depth.
 */
static bool
aligned (const struct disk *d, uint64_t start, uint64_t end)
{
  return start % d->cluster == 0 &&
    (end % d->cluster == 0 || end == d->size);
}

/* Trims the ranges upstream (clean: clean clusters at start-up),
 * counted in the view.  Returns 0, or -1 if any failed.
 */
static int
send_trims (struct disk *d, const struct ba_regions *trims, bool clean)
{
  int r = 0;

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t start = trims->r[i].start, end = trims->r[i].end;
    while (start < end) {
      uint64_t len = ba_trim_piece (start, end, d->cluster, UINT32_MAX);
      char err[512];

      if (!aligned (d, start, start + len)) {
        log_error ("not discarding [%" PRIu64 ", +%" PRIu64 "): not whole "
                   "clusters of %" PRIu64 " bytes", start, len, d->cluster);
        ba_view_trimmed (d->view, len, false, clean);
        r = -1;
      }
      else if (ba_upstream_trim (d->up, len, start, err, sizeof err) == -1) {
        log_error ("discarding upstream failed: %s", err);
        ba_view_trimmed (d->view, len, false, clean);
        r = -1;
      }
      else {
        log_debug ("trim [%" PRIu64 ", +%" PRIu64 ")", start, len);
        ba_view_trimmed (d->view, len, true, clean);
      }
      start += len;
    }
  }
  return r;
}

/* Trims what the view made due (r: its return value). */
static void
discard_due (struct disk *d, int r, struct ba_regions *trims)
{
  if (r == -1)
    log_error ("out of memory recording discarded clusters: they stay in "
               "the fleecing image");
  send_trims (d, trims, false);
  ba_regions_free (trims);
}

/* Trims the clusters with no dirty byte, once: where copy-before-write
 * has no bitmap (upstream QEMU's blockdev-backup sync=none), it then
 * stops copying them on guest writes.
 */
static int
discard_clean (struct disk *d, char *errbuf, size_t errlen)
{
  struct ba_regions clean;
  int r;

  ba_regions_init (&clean);
  if (ba_view_clean_clusters (d->view, &clean) == -1) {
    snprintf (errbuf, errlen, "discarding the clean clusters: out of "
              "memory");
    return -1;
  }
  r = send_trims (d, &clean, true);
  log_info ("discarded %zu clean ranges, %" PRIu64 " bytes", clean.n,
            ba_regions_total (&clean));
  ba_regions_free (&clean);
  if (r == -1)
    snprintf (errbuf, errlen, "discarding the clean clusters failed");
  return r;
}

static int
ignore_extents (void *user_data, const char *metacontext, uint64_t offset,
                uint32_t *entries, size_t nr_entries, int *error)
{
  return 0;
}

/* QEMU's NBD server allocates each read's buffer with memalign: until
 * it has once freed a larger block, glibc serves every read of 256K or
 * more with a fresh mmap and faults it in again (ten times the CPU per
 * byte: the cost of 1 MiB reads, but for every size).  A block status
 * request makes it allocate and free its 1 MiB extent array, which
 * raises glibc's mmap threshold above the reads' size for the rest of
 * its life.  Asked of a readable range (QEMU refuses others); harmless
 * if it fails.
 */
static void
warm_up (struct disk *d)
{
  char err[512];
  uint64_t len;

  if (d->dirty.n == 0 || !ba_upstream_can_meta_context (d->up))
    return;
  len = d->dirty.r[0].end - d->dirty.r[0].start;
  if (ba_upstream_block_status (d->up, len < 65536 ? len : 65536,
                                d->dirty.r[0].start,
                                (nbd_extent_callback) {
                                  .callback = ignore_extents },
                                0, err, sizeof err) == -1)
    log_debug ("block status: %s", err);
}

static int
open_view (struct disk *d, const struct disk_config *c, bool have_dirty,
           char *errbuf, size_t errlen)
{
  const struct ba_view_config vc = {
    .disk_size = d->size, .cluster_size = c->cluster,
    .dirty = have_dirty ? &d->dirty : NULL, .discard = !c->readonly,
    .trim_batch = c->trim_batch,
  };

  d->view = ba_view_new (&vc);
  if (d->view == NULL) {
    snprintf (errbuf, errlen, "cannot set up the view of the export: %s",
              strerror (errno));
    return -1;
  }
  return 0;
}

struct disk *
disk_open (const struct disk_config *c, char *errbuf, size_t errlen)
{
  struct disk *d = calloc (1, sizeof *d);
  struct ba_upstream_params up;

  if (d == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    return NULL;
  }
  ba_regions_init (&d->dirty);
  pthread_mutex_init (&d->lock, NULL);
  pthread_cond_init (&d->cond, NULL);
  d->cluster = c->cluster;
  d->readonly = c->readonly;
  d->behind_filter = c->behind_filter;
  if (c->status_path && (d->status_path = strdup (c->status_path)) == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    goto fail;
  }
  up = c->up;
  up.meta_context = LIBNBD_CONTEXT_BASE_ALLOCATION;
  d->up = ba_upstream_open (&up, errbuf, errlen);
  if (d->up == NULL)
    goto fail;
  d->size = (uint64_t) ba_upstream_size (d->up);
  if (!c->readonly && !ba_upstream_can_trim (d->up)) {
    snprintf (errbuf, errlen, "the export cannot trim, so nothing read could "
              "be discarded: export it writable, or use --readonly");
    goto fail;
  }
  if (c->bitmap && fetch_dirty (d, c, errbuf, errlen) == -1)
    goto fail;
  if (open_view (d, c, c->bitmap != NULL, errbuf, errlen) == -1)
    goto fail;
  if (c->bitmap == NULL && ba_regions_append (&d->dirty, 0, d->size) == -1) {
    snprintf (errbuf, errlen, "out of memory");
    goto fail;
  }
  if (c->discard_clean && c->bitmap && !c->readonly &&
      discard_clean (d, errbuf, errlen) == -1)
    goto fail;
  warm_up (d);
  return d;

 fail:
  disk_close (d);
  return NULL;
}

/* The flusher: once a second, the batch goes out, so that the last
 * discards of a slow or idle reader do not wait for the unmount.
 */
static void *
flush_loop (void *arg)
{
  struct disk *d = arg;

  pthread_mutex_lock (&d->lock);
  while (!d->stop) {
    struct timespec ts;
    struct ba_regions due;

    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec++;
    pthread_cond_timedwait (&d->cond, &d->lock, &ts);
    if (d->stop)
      break;
    pthread_mutex_unlock (&d->lock);
    ba_regions_init (&due);
    discard_due (d, ba_view_flush (d->view, &due), &due);
    pthread_mutex_lock (&d->lock);
  }
  pthread_mutex_unlock (&d->lock);
  return NULL;
}

int
disk_start (struct disk *d, char *errbuf, size_t errlen)
{
  if (!d->readonly) {
    int e = pthread_create (&d->flusher, NULL, flush_loop, d);
    if (e != 0) {
      snprintf (errbuf, errlen, "pthread_create: %s", strerror (e));
      return -1;
    }
    d->flusher_running = true;
  }
  if (d->status_path) {
    d->status = ba_status_start (d->view, d->status_path, errbuf, errlen);
    if (d->status == NULL)
      return -1;
  }
  return 0;
}

void
disk_close (struct disk *d)
{
  if (d == NULL)
    return;
  if (d->flusher_running) {
    pthread_mutex_lock (&d->lock);
    d->stop = true;
    pthread_cond_signal (&d->cond);
    pthread_mutex_unlock (&d->lock);
    pthread_join (d->flusher, NULL);
  }
  if (d->view && d->up) {
    struct ba_regions due;
    char summary[512];

    ba_regions_init (&due);
    discard_due (d, ba_view_flush (d->view, &due), &due);
    ba_status_stop (d->status);
    ba_view_summary (d->view, summary, sizeof summary);
    log_info ("summary: %s", summary);
  }
  ba_view_free (d->view);
  ba_upstream_close (d->up);
  ba_regions_free (&d->dirty);
  pthread_cond_destroy (&d->cond);
  pthread_mutex_destroy (&d->lock);
  free (d->status_path);
  free (d);
}

uint64_t
disk_size (const struct disk *d)
{
  return d->size;
}

bool
disk_readonly (const struct disk *d)
{
  return d->readonly;
}

const struct ba_regions *
disk_dirty (const struct disk *d)
{
  return &d->dirty;
}

/* QEMU refused a read that the view allowed: unless another request
 * discarded part of it meanwhile, the snapshot is broken.
 */
static int
upstream_refused (struct disk *d, uint64_t offset, uint64_t count)
{
  struct ba_range bad;

  if (ba_view_upstream_refused (d->view, offset, count, &bad)
      == BA_VIEW_DISCARDED) {
    log_error ("read [%" PRIu64 ", +%" PRIu64 ") failed: [%" PRIu64 ", %"
               PRIu64 ") was discarded by another request while this one "
               "was in flight", offset, count, bad.start, bad.end);
    return EPERM;
  }
  log_error ("read [%" PRIu64 ", +%" PRIu64 ") refused by QEMU although it "
             "is dirty and was never discarded: the snapshot is broken "
             "(copy-before-write failed: fleecing image full or "
             "cbw-timeout?); this backup must fail, and every further read "
             "fails", offset, count);
  return EIO;
}

int
disk_read (struct disk *d, void *buf, uint64_t count, uint64_t offset)
{
  struct ba_range bad;
  enum ba_view_refusal why;
  char err[1024];

  why = ba_view_check_read (d->view, offset, count, &bad);
  if (why != BA_VIEW_READABLE) {
    ba_view_refusal_message (d->view, why, &bad, err, sizeof err);
    log_error ("read [%" PRIu64 ", +%" PRIu64 ") refused: %s", offset, count,
               err);
    return why == BA_VIEW_BROKEN ? EIO : EPERM;
  }
  if (ba_upstream_pread (d->up, buf, count, offset, err, sizeof err) == -1) {
    int e = errno;
    log_error ("%s", err);
    if (e == EPERM && !d->behind_filter)
      return upstream_refused (d, offset, count);
    return e ? e : EIO;
  }
  log_debug ("read [%" PRIu64 ", +%" PRIu64 ")", offset, count);
  return 0;
}

void
disk_read_done (struct disk *d, uint64_t offset, uint64_t count)
{
  struct ba_regions trims;

  ba_regions_init (&trims);
  discard_due (d, ba_view_read_done (d->view, offset, count, &trims),
               &trims);
}

int
disk_punch (struct disk *d, uint64_t offset, uint64_t count)
{
  struct ba_regions trims;

  if (d->readonly)
    return EOPNOTSUPP;
  log_debug ("punch [%" PRIu64 ", +%" PRIu64 ")", offset, count);
  ba_regions_init (&trims);
  discard_due (d, ba_view_client_trim (d->view, offset, count, &trims),
               &trims);
  return 0;
}

int64_t
disk_seek (struct disk *d, uint64_t offset, bool data)
{
  uint64_t pos = offset;

  if (offset >= d->size)
    return -ENXIO;
  while (pos < d->size) {
    enum ba_view_extent kind;
    uint64_t len = ba_view_extent_run (d->view, pos, d->size, &kind);

    if (len == 0)
      break;
    if ((kind == BA_VIEW_EXTENT_READABLE) == data)
      return (int64_t) pos;
    pos += len;
  }
  return data ? -ENXIO : (int64_t) d->size;
}
