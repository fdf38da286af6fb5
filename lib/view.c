/* SPDX-License-Identifier: BSD-3-Clause */
/* The readable view of one snapshot-access export (view.h): the read
 * rule, the discard rule through the coverage tracker and the discard
 * queue, extents, the safe preferred block size, broken-snapshot
 * classification and the counters, behind one lock that is only held
 * inside these functions.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "cluster.h"
#include "coverage.h"
#include "discardq.h"
#include "view.h"

/* base:allocation flags (NBD_STATE_HOLE, NBD_STATE_ZERO). */
#define HOLE 1
#define ZERO 2

struct ba_view {
  pthread_mutex_t lock;
  uint64_t disk_size, cluster_size;
  bool have_dirty;              /* else the whole disk is readable */
  struct ba_regions dirty;      /* the coverage tracker points here */
  bool discard, clean_is_zero;
  uint32_t preferred;
  bool preferred_safe;
  struct ba_coverage *cov;
  struct ba_discard_queue *queue;
  bool broken;                  /* the snapshot failed: refuse all reads */
  struct ba_view_stats st;      /* the counters kept here */
};

static uint32_t
preferred_for (const struct ba_view *v, uint64_t cluster_size, bool *safe)
{
  uint64_t p = cluster_size < (uint64_t) BA_PREFERRED_MAX ? cluster_size
    : (uint64_t) BA_PREFERRED_MAX;

  if (v->have_dirty)
    p = ba_regions_alignment (&v->dirty, v->disk_size, p);
  *safe = p >= (uint64_t) BA_PREFERRED_MIN;
  return *safe ? p : BA_PREFERRED_MIN;
}

struct ba_view *
ba_view_new (const struct ba_view_config *c)
{
  struct ba_view *v;
  struct ba_coverage_stats cs;

  if (!ba_cluster_size_valid (c->cluster_size) ||
      (c->dirty && c->dirty->n > 0 &&
       c->dirty->r[c->dirty->n - 1].end > c->disk_size)) {
    errno = EINVAL;
    return NULL;
  }
  v = calloc (1, sizeof *v);
  if (v == NULL)
    return NULL;
  pthread_mutex_init (&v->lock, NULL);
  v->disk_size = c->disk_size;
  v->cluster_size = c->cluster_size;
  v->have_dirty = c->dirty != NULL;
  v->discard = c->discard;
  v->clean_is_zero = c->clean_is_zero;
  ba_regions_init (&v->dirty);
  if (c->dirty != NULL)
    for (size_t i = 0; i < c->dirty->n; i++)
      if (ba_regions_append (&v->dirty, c->dirty->r[i].start,
                             c->dirty->r[i].end) == -1)
        goto fail;
  v->cov = ba_coverage_new (c->disk_size, c->cluster_size,
                            v->have_dirty ? &v->dirty : NULL);
  if (v->cov == NULL)
    goto fail;
  v->queue = ba_discard_queue_new (c->trim_batch, c->discard_lag,
                                   c->cluster_size);
  if (v->queue == NULL)
    goto fail;
  v->preferred = preferred_for (v, c->cluster_size, &v->preferred_safe);
  ba_coverage_get_stats (v->cov, &cs);
  v->st.peak_memory = cs.memory_bytes;
  return v;
 fail:
  ba_view_free (v);
  return NULL;
}

void
ba_view_free (struct ba_view *v)
{
  if (v == NULL)
    return;
  ba_discard_queue_free (v->queue);
  ba_coverage_free (v->cov);
  ba_regions_free (&v->dirty);
  pthread_mutex_destroy (&v->lock);
  free (v);
}

uint32_t
ba_view_preferred_size (const struct ba_view *v, bool *safe)
{
  if (safe)
    *safe = v->preferred_safe;
  return v->preferred;
}

/* Is every byte of [offset, end) dirty and either readable or in a
 * cluster that was completed but is still held back by the discard lag,
 * so not trimmed yet?  Called with the lock held.
 */
static bool
readable_again (const struct ba_view *v, uint64_t offset, uint64_t end)
{
  struct ba_range bad;
  bool discarded;

  while (!ba_coverage_readable (v->cov, offset, end, &bad, &discarded)) {
    if (!discarded ||
        !ba_discard_queue_lagging (v->queue, bad.start, bad.end))
      return false;
    offset = bad.end;
  }
  return true;
}

enum ba_view_refusal
ba_view_check_read (struct ba_view *v, uint64_t offset, uint64_t count,
                    struct ba_range *bad)
{
  enum ba_view_refusal r = BA_VIEW_READABLE;
  uint64_t end = offset + count;
  bool discarded;

  pthread_mutex_lock (&v->lock);
  if (!ba_coverage_readable (v->cov, offset, end, bad, &discarded) &&
      !(discarded && readable_again (v, offset, end))) {
    if (discarded)
      r = BA_VIEW_DISCARDED;
    else if (ba_regions_overlap (&v->dirty, offset, end) > 0)
      r = BA_VIEW_MIXED;
    else
      r = BA_VIEW_CLEAN;
    v->st.refused++;
  }
  else if (v->broken) {
    r = BA_VIEW_BROKEN;
    bad->start = offset;
    bad->end = end;
  }
  pthread_mutex_unlock (&v->lock);
  return r;
}

void
ba_view_refusal_message (const struct ba_view *v, enum ba_view_refusal why,
                         const struct ba_range *bad, char *buf, size_t len)
{
  const char *clean = "is outside the dirty regions (clean, not in this "
    "backup)";

  switch (why) {
  case BA_VIEW_READABLE:
    snprintf (buf, len, "[%" PRIu64 ", %" PRIu64 ") is readable",
              bad->start, bad->end);
    break;
  case BA_VIEW_CLEAN:
    snprintf (buf, len, "[%" PRIu64 ", %" PRIu64 ") %s",
              bad->start, bad->end, clean);
    break;
  case BA_VIEW_MIXED:
    if (v->preferred_safe)
      snprintf (buf, len, "[%" PRIu64 ", %" PRIu64 ") %s; the read mixes "
                "clean and dirty bytes: read what extents report as data, "
                "in aligned requests of at most %" PRIu32 " bytes, the "
                "preferred block size (nbdcopy --request-size=%" PRIu32 ")",
                bad->start, bad->end, clean, v->preferred, v->preferred);
    else
      snprintf (buf, len, "[%" PRIu64 ", %" PRIu64 ") %s; the read mixes "
                "clean and dirty bytes: read only what extents report as "
                "data", bad->start, bad->end, clean);
    break;
  case BA_VIEW_DISCARDED:
    snprintf (buf, len, "[%" PRIu64 ", %" PRIu64 ") was already read and "
              "discarded", bad->start, bad->end);
    break;
  case BA_VIEW_BROKEN:
    snprintf (buf, len, "the snapshot is broken (see the first error)");
    break;
  }
}

/* Marks [offset, end) consumed and hands out what is due for trimming.
 * Called with the lock held.
 */
static int
consume (struct ba_view *v, uint64_t offset, uint64_t end,
         struct ba_regions *trims)
{
  struct ba_regions completed;
  struct ba_coverage_stats cs;
  int r;

  ba_regions_init (&completed);
  r = ba_coverage_consume (v->cov, offset, end, &completed);
  ba_coverage_get_stats (v->cov, &cs);
  if (cs.memory_bytes > v->st.peak_memory)
    v->st.peak_memory = cs.memory_bytes;
  if (ba_discard_queue_add (v->queue, &completed, trims) == -1)
    r = -1;
  ba_regions_free (&completed);
  if (r == -1)
    errno = ENOMEM;
  return r;
}

int
ba_view_read_done (struct ba_view *v, uint64_t offset, uint64_t count,
                   struct ba_regions *trims)
{
  int r = 0;

  pthread_mutex_lock (&v->lock);
  v->st.reads++;
  v->st.bytes_read += count;
  if (v->discard)
    r = consume (v, offset, offset + count, trims);
  pthread_mutex_unlock (&v->lock);
  return r;
}

int
ba_view_client_trim (struct ba_view *v, uint64_t offset, uint64_t count,
                     struct ba_regions *trims)
{
  int r;

  pthread_mutex_lock (&v->lock);
  v->st.client_trims++;
  r = consume (v, offset, offset + count, trims);
  pthread_mutex_unlock (&v->lock);
  return r;
}

int
ba_view_flush (struct ba_view *v, struct ba_regions *trims)
{
  int r;

  pthread_mutex_lock (&v->lock);
  r = ba_discard_queue_flush (v->queue, trims);
  pthread_mutex_unlock (&v->lock);
  return r;
}

void
ba_view_trimmed (struct ba_view *v, uint64_t count, bool ok, bool clean)
{
  pthread_mutex_lock (&v->lock);
  if (!ok)
    v->st.trim_errors++;
  else if (clean)
    v->st.clean_discarded += count;
  else {
    v->st.trims_sent++;
    v->st.bytes_discarded += count;
  }
  pthread_mutex_unlock (&v->lock);
}

enum ba_view_refusal
ba_view_upstream_refused (struct ba_view *v, uint64_t offset, uint64_t count,
                          struct ba_range *bad)
{
  bool discarded, ok;

  pthread_mutex_lock (&v->lock);
  ok = ba_coverage_readable (v->cov, offset, offset + count, bad,
                             &discarded);
  if (ok)
    v->broken = true;
  pthread_mutex_unlock (&v->lock);
  return ok ? BA_VIEW_BROKEN : BA_VIEW_DISCARDED;
}

uint64_t
ba_view_extent_run (struct ba_view *v, uint64_t offset, uint64_t end,
                    enum ba_view_extent *kind)
{
  bool readable, clean = false;
  uint64_t len;

  pthread_mutex_lock (&v->lock);
  len = ba_coverage_run (v->cov, offset, end, &readable);
  if (!readable && len > 0 && v->have_dirty)
    len = ba_regions_run (&v->dirty, offset, offset + len, &clean) - offset;
  pthread_mutex_unlock (&v->lock);
  *kind = readable ? BA_VIEW_EXTENT_READABLE
    : clean ? BA_VIEW_EXTENT_CLEAN : BA_VIEW_EXTENT_DISCARDED;
  return len;
}

uint32_t
ba_view_unreadable_flags (const struct ba_view *v, enum ba_view_extent kind)
{
  if (kind == BA_VIEW_EXTENT_CLEAN && v->clean_is_zero)
    return HOLE | ZERO;
  return HOLE;
}

uint32_t
ba_view_readable_flags (const struct ba_view *v, uint32_t upstream)
{
  if (v->clean_is_zero || !(upstream & ZERO))
    return 0;
  return upstream;
}

int
ba_view_clean_clusters (struct ba_view *v, struct ba_regions *out)
{
  if (!v->have_dirty)
    return 0;
  return ba_regions_clean_clusters (&v->dirty, v->disk_size,
                                    v->cluster_size, out);
}

void
ba_view_get_stats (struct ba_view *v, struct ba_view_stats *stats)
{
  struct ba_coverage_stats cs;

  pthread_mutex_lock (&v->lock);
  ba_coverage_get_stats (v->cov, &cs);
  *stats = v->st;
  stats->readable_total = cs.readable_total;
  stats->readable_left = cs.readable_left;
  stats->untracked_bytes = cs.untracked_bytes;
  stats->broken = v->broken;
  pthread_mutex_unlock (&v->lock);
}

void
ba_view_summary (struct ba_view *v, char *buf, size_t len)
{
  struct ba_view_stats s;

  ba_view_get_stats (v, &s);
  snprintf (buf, len,
            "%" PRIu64 " bytes read in %" PRIu64 " reads, %" PRIu64
            " bytes discarded in %" PRIu64 " trims, %" PRIu64
            " trim errors, %" PRIu64 " requests refused, %" PRIu64
            " of %" PRIu64 " readable bytes left, %" PRIu64
            " bytes of tracking memory at peak, %" PRIu64
            " consumed bytes not tracked (memory budget)",
            s.bytes_read, s.reads, s.bytes_discarded, s.trims_sent,
            s.trim_errors, s.refused, s.readable_left, s.readable_total,
            s.peak_memory, s.untracked_bytes);
}
