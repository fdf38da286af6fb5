/* SPDX-License-Identifier: BSD-3-Clause */
/* ba_discard_queue: completed clusters on their way to being trimmed.
 *
 * Two stages, both optional.  The lag keeps the newest clusters, in the
 * order they were completed, untrimmed (a client that lost its
 * connection right after a read can read them again); what falls out of
 * it goes to the batch, a merged set sent as a few long trims once it
 * holds batch bytes or too many separate ranges (one trim per client
 * read costs an upstream round trip per read).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "discardq.h"

/* Separate ranges in the batch before all of it is sent. */
#define MAX_BATCH_RANGES 1024
/* Bytes in the batch, in batch_size units, before all of it is sent. */
#define MAX_BATCH_UNITS 4

struct ba_discard_queue {
  uint64_t batch_size, lag_size, cluster_size;
  struct ba_regions batch;      /* sorted, merged */
  uint64_t batch_bytes;
  /* The lag: a FIFO in completion order, r[head..n) live. */
  struct ba_regions lag;
  size_t head;
  uint64_t lag_bytes;
};

struct ba_discard_queue *
ba_discard_queue_new (uint64_t batch_size, uint64_t lag_size,
                      uint64_t cluster_size)
{
  struct ba_discard_queue *q;

  if (cluster_size == 0) {
    errno = EINVAL;
    return NULL;
  }
  q = calloc (1, sizeof *q);
  if (q == NULL)
    return NULL;
  q->batch_size = batch_size;
  q->lag_size = lag_size;
  q->cluster_size = cluster_size;
  ba_regions_init (&q->batch);
  ba_regions_init (&q->lag);
  return q;
}

void
ba_discard_queue_free (struct ba_discard_queue *q)
{
  if (q == NULL)
    return;
  ba_regions_free (&q->batch);
  ba_regions_free (&q->lag);
  free (q);
}

/* Moves into *due the ranges of the batch at least min_len long (all
 * of them with 0).
 */
static int
take_batch (struct ba_discard_queue *q, uint64_t min_len,
            struct ba_regions *due)
{
  size_t keep = 0;
  int r = 0;

  for (size_t i = 0; i < q->batch.n; i++) {
    struct ba_range b = q->batch.r[i];
    if (b.end - b.start < min_len)
      q->batch.r[keep++] = b;
    else {
      if (ba_regions_insert (due, b.start, b.end) == -1)
        r = -1;
      q->batch_bytes -= b.end - b.start;
    }
  }
  q->batch.n = keep;
  return r;
}

/* Adds a range leaving the lag to the batch, or straight to *due when
 * there is no batch or it cannot be recorded (sending early costs a
 * round trip, not recording would cost the trim).
 */
static int
to_batch (struct ba_discard_queue *q, uint64_t start, uint64_t end,
          struct ba_regions *due)
{
  if (q->batch_size == 0 ||
      ba_regions_insert (&q->batch, start, end) == -1)
    return ba_regions_insert (due, start, end);
  q->batch_bytes += end - start;
  return 0;
}

/* Appends to the lag FIFO, merging with its newest range when they touch. */
static int
to_lag (struct ba_discard_queue *q, uint64_t start, uint64_t end)
{
  struct ba_regions *l = &q->lag;

  if (l->n > q->head && l->r[l->n - 1].end == start)
    l->r[l->n - 1].end = end;
  else {
    if (q->head > 0 && q->head * 2 >= l->n) {   /* compact */
      memmove (l->r, l->r + q->head, (l->n - q->head) * sizeof *l->r);
      l->n -= q->head;
      q->head = 0;
    }
    if (ba_regions_room_for_one (l) == -1)
      return -1;
    l->r[l->n].start = start;
    l->r[l->n].end = end;
    l->n++;
  }
  q->lag_bytes += end - start;
  return 0;
}

/* Moves the oldest clusters out of the lag until it holds at most
 * lag_size bytes (rounded up to a whole cluster).
 */
static int
trim_lag (struct ba_discard_queue *q, struct ba_regions *due)
{
  int r = 0;

  while (q->lag_bytes > q->lag_size && q->head < q->lag.n) {
    struct ba_range *old = &q->lag.r[q->head];
    uint64_t excess = q->lag_bytes - q->lag_size;
    uint64_t len = old->end - old->start;

    if (excess < len) {
      /* Part of the oldest range: whole clusters from its start, so
       * that at least lag_size bytes stay.
       */
      uint64_t cut = excess / q->cluster_size * q->cluster_size;
      if (cut > 0 && to_batch (q, old->start, old->start + cut, due) == -1)
        r = -1;
      old->start += cut;
      q->lag_bytes -= cut;
      break;
    }
    if (to_batch (q, old->start, old->end, due) == -1)
      r = -1;
    q->lag_bytes -= len;
    q->head++;
  }
  return r;
}

int
ba_discard_queue_add (struct ba_discard_queue *q,
                      const struct ba_regions *completed,
                      struct ba_regions *due)
{
  int r = 0;

  for (size_t i = 0; i < completed->n; i++) {
    uint64_t start = completed->r[i].start, end = completed->r[i].end;
    if (q->lag_size > 0) {
      if (to_lag (q, start, end) == -1 && to_batch (q, start, end, due) == -1)
        r = -1;
    }
    else if (to_batch (q, start, end, due) == -1)
      r = -1;
  }
  if (trim_lag (q, due) == -1)
    r = -1;
  if (q->batch_size > 0) {
    /* Reads complete out of order: a range is sent once it is long,
     * all of them when there are too many.
     */
    bool all = q->batch.n > MAX_BATCH_RANGES ||
      q->batch_bytes >= MAX_BATCH_UNITS * q->batch_size;
    if (take_batch (q, all ? 0 : q->batch_size, due) == -1)
      r = -1;
  }
  return r;
}

int
ba_discard_queue_flush (struct ba_discard_queue *q, struct ba_regions *due)
{
  return take_batch (q, 0, due);
}

bool
ba_discard_queue_lagging (const struct ba_discard_queue *q,
                          uint64_t start, uint64_t end)
{
  uint64_t held = 0;

  for (size_t i = q->head; i < q->lag.n && held < end - start; i++) {
    uint64_t s = q->lag.r[i].start, e = q->lag.r[i].end;
    if (s < end && e > start)
      held += (e < end ? e : end) - (s > start ? s : start);
  }
  return start < end && held == end - start;
}

uint64_t
ba_discard_queue_bytes (const struct ba_discard_queue *q)
{
  return q->batch_bytes + q->lag_bytes;
}
