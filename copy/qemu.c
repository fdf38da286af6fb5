/* SPDX-License-Identifier: BSD-3-Clause */
/* What backupaccess-copy asks QEMU besides reads: which runs of a chunk
 * read as zeroes (base:allocation block status, never outside the dirty
 * regions: QEMU refuses that), and discards, in whole clusters, with aio
 * on a worker's connection or synchronously on an idle one of the pool.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "program.h"

/* The longest trim sent (libnbd takes less than 4 GiB). */
#define TRIM_MAX ((uint64_t) 1 << 30)

struct extent_ctx {
  struct ba_regions *zero;
  uint64_t pos, end;
  bool oom;
};

static int
extent_cb (void *opaque, const char *context, uint64_t offset,
           uint32_t *entries, size_t nr, int *error)
{
  struct extent_ctx *x = opaque;

  if (strcmp (context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr && offset < x->end; i += 2) {
    uint64_t e = offset + entries[i] < x->end ? offset + entries[i] : x->end;
    if ((entries[i + 1] & LIBNBD_STATE_ZERO) && e > x->pos &&
        ba_regions_append (x->zero, offset > x->pos ? offset : x->pos,
                           e) == -1)
      x->oom = true;
    offset = e;
  }
  if (offset > x->pos)
    x->pos = offset;
  return 0;
}

int
zero_runs (struct nbd_handle *h, const struct ba_range *chunk,
           struct ba_regions *zero, int *err, uint64_t *at)
{
  struct extent_ctx x = { .zero = zero, .pos = chunk->start,
                          .end = chunk->end };
  nbd_extent_callback cb = { .callback = extent_cb, .user_data = &x };

  ba_regions_clear (zero);
  while (x.pos < chunk->end && !x.oom) {
    uint64_t before = x.pos;
    if (nbd_block_status (h, chunk->end - x.pos, x.pos, cb, 0) == -1) {
      *err = nbd_get_errno ();
      *at = x.pos;
      return -1;
    }
    if (x.pos == before)
      break;                    /* no answer: read it all */
  }
  if (x.oom)
    ba_regions_clear (zero);    /* read it all */
  return 0;
}

struct trim {
  struct job *job;
  unsigned *in_flight;
  uint64_t count;
};

static int
trim_done (void *opaque, int *error)
{
  struct trim *t = opaque;

  (*t->in_flight)--;
  ba_copy_trimmed (t->job->copy, t->count, *error == 0, false);
  if (*error)
    warn ("a discard of %" PRIu64 " bytes in QEMU failed: %s (the fleecing "
          "image keeps them)", t->count, strerror (*error));
  free (t);
  return 1;
}

void
send_trims (struct job *job, struct nbd_handle *h, struct ba_regions *trims,
            unsigned *in_flight)
{
  uint64_t cluster = job->o->cluster;

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t s = trims->r[i].start, e = trims->r[i].end, n;
    for (; s < e; s += n) {
      struct trim *t = malloc (sizeof *t);
      nbd_completion_callback cb = { .callback = trim_done, .user_data = t };

      n = ba_trim_piece (s, e, cluster, TRIM_MAX);
      if (t == NULL)
        break;                  /* fleecing space, never data */
      *t = (struct trim) { .job = job, .in_flight = in_flight, .count = n };
      (*in_flight)++;
      if (nbd_aio_trim (h, n, s, cb, 0) == -1) {     /* no callback */
        (*in_flight)--;
        ba_copy_trimmed (job->copy, n, false, false);
        free (t);
      }
    }
  }
  ba_regions_clear (trims);
}

void
send_trims_sync (struct job *job, struct ba_regions *trims, bool clean)
{
  char err[512];

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t s = trims->r[i].start, e = trims->r[i].end, n;
    for (; s < e; s += n) {
      bool ok;
      n = ba_trim_piece (s, e, job->o->cluster, TRIM_MAX);
      ok = ba_upstream_trim (job->src, n, s, err, sizeof err) == 0;
      if (!ok)
        warn ("a discard in QEMU failed: %s (the fleecing image keeps it)",
              err);
      ba_copy_trimmed (job->copy, n, ok, clean);
    }
  }
  ba_regions_clear (trims);
}
