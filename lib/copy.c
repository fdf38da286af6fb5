/* SPDX-License-Identifier: BSD-3-Clause */
/* The rules of a backup copy (copy.h): the copy set handed out in
 * chunks, chunks cut into requests, what to write, and what is done,
 * with the read and discard rules of lib/view.c behind one lock that is
 * only held inside these functions.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "copy.h"
#include "upstream.h"
#include "view.h"

struct ba_copy {
  pthread_mutex_t lock;
  uint64_t disk_size, chunk_size;
  uint32_t request_size;
  bool destination_is_zero;
  struct ba_regions set;        /* what is to be copied */
  size_t next_region;           /* where the next chunk starts */
  uint64_t next_pos;
  struct ba_regions done;       /* what the destination holds */
  struct ba_view *view;         /* the read and discard rules */
  bool failed;
  char msg[1024];               /* the first failure */
  struct ba_copy_stats st;      /* the counters kept here */
};

static bool
power_of_two (uint64_t x)
{
  return x != 0 && (x & (x - 1)) == 0;
}

/* The copy set: the dirty regions, or the whole disk. */
static int
copy_set (struct ba_copy *c, const struct ba_copy_config *config)
{
  if (config->dirty == NULL)
    return ba_regions_append (&c->set, 0, config->disk_size);
  for (size_t i = 0; i < config->dirty->n; i++)
    if (ba_regions_append (&c->set, config->dirty->r[i].start,
                           config->dirty->r[i].end) == -1)
      return -1;
  return 0;
}

struct ba_copy *
ba_copy_new (const struct ba_copy_config *config)
{
  struct ba_copy *c;
  uint64_t chunk = config->chunk_size ? config->chunk_size
    : BA_COPY_CHUNK_DEFAULT;
  const struct ba_view_config vc = {
    .disk_size = config->disk_size, .cluster_size = config->cluster_size,
    .dirty = config->dirty, .discard = config->discard,
    .trim_batch = config->trim_batch,
  };

  if (!ba_upstream_piece_valid (config->request_size) ||
      !power_of_two (chunk) || chunk < config->request_size) {
    errno = EINVAL;
    return NULL;
  }
  c = calloc (1, sizeof *c);
  if (c == NULL)
    return NULL;
  pthread_mutex_init (&c->lock, NULL);
  ba_regions_init (&c->set);
  ba_regions_init (&c->done);
  c->disk_size = config->disk_size;
  c->chunk_size = chunk;
  c->request_size = config->request_size;
  c->destination_is_zero = config->destination_is_zero;
  /* The view checks the cluster size and the regions against the disk. */
  c->view = ba_view_new (&vc);
  if (c->view == NULL || copy_set (c, config) == -1) {
    int e = errno;
    ba_copy_free (c);
    errno = e;
    return NULL;
  }
  c->st.total = ba_regions_total (&c->set);
  return c;
}

void
ba_copy_free (struct ba_copy *c)
{
  if (c == NULL)
    return;
  ba_view_free (c->view);
  ba_regions_free (&c->set);
  ba_regions_free (&c->done);
  pthread_mutex_destroy (&c->lock);
  free (c);
}

bool
ba_copy_next_chunk (struct ba_copy *c, struct ba_range *chunk)
{
  bool found = false;

  pthread_mutex_lock (&c->lock);
  while (!c->failed && c->next_region < c->set.n) {
    const struct ba_range *r = &c->set.r[c->next_region];
    uint64_t start = c->next_pos > r->start ? c->next_pos : r->start;
    uint64_t end = (start / c->chunk_size + 1) * c->chunk_size;

    if (start >= r->end) {
      c->next_region++;
      continue;
    }
    chunk->start = start;
    chunk->end = end < r->end ? end : r->end;
    c->next_pos = chunk->end;
    found = true;
    break;
  }
  pthread_mutex_unlock (&c->lock);
  return found;
}

void
ba_copy_split_init (struct ba_copy_split *s, const struct ba_copy *c,
                    const struct ba_range *chunk,
                    const struct ba_regions *zero)
{
  s->pos = chunk->start;
  s->end = chunk->end;
  s->request_size = c->request_size;
  s->zero = zero;
}

bool
ba_copy_split_next (struct ba_copy_split *s, struct ba_copy_req *r)
{
  bool data = true;
  uint64_t run_end = s->end, offset;
  uint32_t len;
  struct ba_split split;

  if (s->pos >= s->end)
    return false;
  if (s->zero)
    run_end = ba_regions_run (s->zero, s->pos, s->end, &data);
  ba_split_init (&split, s->pos, run_end - s->pos,
                 data ? s->request_size : BA_COPY_ZERO_MAX);
  ba_split_next (&split, &offset, &len);
  r->offset = offset;
  r->len = len;
  r->known_zero = !data;
  s->pos = offset + len;
  return true;
}

enum ba_copy_write
ba_copy_write_for (const struct ba_copy *c, bool is_zero)
{
  if (!is_zero)
    return BA_COPY_WRITE_DATA;
  return c->destination_is_zero ? BA_COPY_WRITE_NOTHING
    : BA_COPY_WRITE_ZEROES;
}

bool
ba_copy_is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  size_t head = len < 16 ? len : 16;

  /* The first bytes one by one, then the rest against them. */
  for (size_t i = 0; i < head; i++)
    if (p[i])
      return false;
  return len <= 16 || memcmp (p, p + 16, len - 16) == 0;
}

/* Records the first failure.  Called with the lock held. */
static void
fail_locked (struct ba_copy *c, const char *fmt, va_list ap)
{
  if (c->failed)
    return;
  c->failed = true;
  c->st.failed = true;
  vsnprintf (c->msg, sizeof c->msg, fmt, ap);
}

void
ba_copy_fail (struct ba_copy *c, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  pthread_mutex_lock (&c->lock);
  fail_locked (c, fmt, ap);
  pthread_mutex_unlock (&c->lock);
  va_end (ap);
}

static void
fail (struct ba_copy *c, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* The same, with the lock held. */
static void
fail (struct ba_copy *c, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  fail_locked (c, fmt, ap);
  va_end (ap);
}

bool
ba_copy_failed (struct ba_copy *c, char *msg, size_t len)
{
  bool failed;

  pthread_mutex_lock (&c->lock);
  failed = c->failed;
  if (failed && msg)
    snprintf (msg, len, "%s", c->msg);
  pthread_mutex_unlock (&c->lock);
  return failed;
}

int
ba_copy_check_read (struct ba_copy *c, const struct ba_copy_req *r,
                    char *msg, size_t len)
{
  struct ba_range bad;
  enum ba_view_refusal why = ba_view_check_read (c->view, r->offset, r->len,
                                                 &bad);
  char reason[512];

  if (why == BA_VIEW_READABLE)
    return 0;
  ba_view_refusal_message (c->view, why, &bad, reason, sizeof reason);
  snprintf (msg, len, "read [%" PRIu64 ", +%" PRIu32 "): %s", r->offset,
            r->len, reason);
  ba_copy_fail (c, "%s", msg);
  return -1;
}

void
ba_copy_read_refused (struct ba_copy *c, const struct ba_copy_req *r,
                      const char *what)
{
  struct ba_range bad;
  enum ba_view_refusal why;

  pthread_mutex_lock (&c->lock);
  why = ba_view_upstream_refused (c->view, r->offset, r->len, &bad);
  if (why == BA_VIEW_BROKEN) {
    c->st.broken = true;
    fail (c, "QEMU refused the %s of [%" PRIu64 ", +%" PRIu32 "), which "
          "is in the backup and was never discarded: the snapshot is "
          "broken (copy-before-write failed: the fleecing image is full, "
          "or a guest write waited longer than cbw-timeout)",
          what, r->offset, r->len);
  }
  else
    fail (c, "QEMU refused the %s of [%" PRIu64 ", +%" PRIu32 "): [%"
          PRIu64 ", %" PRIu64 ") was already discarded", what, r->offset,
          r->len, bad.start, bad.end);
  pthread_mutex_unlock (&c->lock);
}

/* Counts r as written.  Called with the lock held. */
static void
count (struct ba_copy *c, const struct ba_copy_req *r,
       enum ba_copy_write written)
{
  c->st.done += r->len;
  if (!r->known_zero)
    c->st.bytes_read += r->len;
  switch (written) {
  case BA_COPY_WRITE_DATA: c->st.bytes_data += r->len; break;
  case BA_COPY_WRITE_ZEROES: c->st.bytes_zeroes += r->len; break;
  case BA_COPY_WRITE_NOTHING: c->st.bytes_skipped += r->len; break;
  }
}

int
ba_copy_done (struct ba_copy *c, const struct ba_copy_req *r,
              enum ba_copy_write written, struct ba_regions *trims)
{
  uint64_t end = r->offset + r->len;
  int ret = 0;

  pthread_mutex_lock (&c->lock);
  if (c->failed)
    goto out;
  if (written == BA_COPY_WRITE_NOTHING && !c->destination_is_zero) {
    fail (c, "[%" PRIu64 ", +%" PRIu32 ") left unwritten in a "
          "destination that does not read as zeroes", r->offset, r->len);
    goto out;
  }
  if (!ba_regions_contains (&c->set, r->offset, end) ||
      ba_regions_overlap (&c->done, r->offset, end) > 0) {
    fail (c, "[%" PRIu64 ", +%" PRIu32 ") is not in the backup or was "
          "written twice", r->offset, r->len);
    goto out;
  }
  if (ba_regions_insert (&c->done, r->offset, end) == -1) {
    fail (c, "out of memory");
    goto out;
  }
  count (c, r, written);
  /* Read, and its destination written: complete clusters may go. */
  if (!r->known_zero)
    ret = ba_view_read_done (c->view, r->offset, r->len, trims);
 out:
  pthread_mutex_unlock (&c->lock);
  return ret;
}

int
ba_copy_flush_trims (struct ba_copy *c, struct ba_regions *trims)
{
  return ba_view_flush (c->view, trims);
}

void
ba_copy_trimmed (struct ba_copy *c, uint64_t count, bool ok, bool clean)
{
  ba_view_trimmed (c->view, count, ok, clean);
}

int
ba_copy_clean_clusters (struct ba_copy *c, struct ba_regions *out)
{
  return ba_view_clean_clusters (c->view, out);
}

bool
ba_copy_complete (struct ba_copy *c)
{
  bool complete;

  pthread_mutex_lock (&c->lock);
  complete = !c->failed &&
    ba_regions_total (&c->done) == ba_regions_total (&c->set);
  pthread_mutex_unlock (&c->lock);
  return complete;
}

void
ba_copy_get_stats (struct ba_copy *c, struct ba_copy_stats *stats)
{
  struct ba_view_stats vs;

  ba_view_get_stats (c->view, &vs);
  pthread_mutex_lock (&c->lock);
  *stats = c->st;
  pthread_mutex_unlock (&c->lock);
  stats->bytes_discarded = vs.bytes_discarded;
  stats->trims_sent = vs.trims_sent;
  stats->trim_errors = vs.trim_errors;
  stats->clean_discarded = vs.clean_discarded;
}
