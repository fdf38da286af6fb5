/* SPDX-License-Identifier: BSD-3-Clause */
/* Reading QEMU's export over a pool of libnbd connections.  A request
 * takes idle connections for itself (never waiting for a second one
 * while it holds one), issues its pieces with nbd_aio_pread and drives
 * those connections itself with poll: no helper thread, no hand-off, one
 * wake-up per reply batch, as with a synchronous read.  The lock guards
 * only the idle flags and is never held across I/O.
 */
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitmap.h"
#include "upstream.h"

struct ba_upstream {
  pthread_mutex_t lock;
  pthread_cond_t idle_cond;
  struct nbd_handle **h;
  bool *busy;                   /* guarded by lock */
  unsigned n, nr_idle;          /* nr_idle guarded by lock */
  uint32_t piece;
  unsigned depth;
  int64_t size;
  bool can_trim, can_meta;
};

bool
ba_upstream_piece_valid (uint64_t piece)
{
  return piece >= BA_UPSTREAM_PIECE_MIN &&
    piece <= BA_UPSTREAM_MAX_REQUEST && (piece & (piece - 1)) == 0;
}

/* ---- the split plan ---- */

void
ba_split_init (struct ba_split *s, uint64_t offset, uint64_t count,
               uint32_t piece)
{
  s->pos = offset;
  s->end = offset + count;
  s->piece = piece;
}

bool
ba_split_next (struct ba_split *s, uint64_t *offset, uint32_t *len)
{
  uint64_t next;

  if (s->pos >= s->end)
    return false;
  if (s->end - s->pos <= s->piece)
    next = s->end;
  else
    next = (s->pos / s->piece + 1) * s->piece;
  *offset = s->pos;
  *len = next - s->pos;
  s->pos = next;
  return true;
}

uint64_t
ba_split_count (uint64_t offset, uint64_t count, uint32_t piece)
{
  uint64_t end = offset + count;

  if (count == 0)
    return 0;
  if (count <= piece)
    return 1;
  return (end - 1) / piece - offset / piece + 1;
}

/* ---- the pool ---- */

struct ba_upstream *
ba_upstream_open (const struct ba_upstream_params *p,
                  char *errbuf, size_t errlen)
{
  struct ba_upstream *u = calloc (1, sizeof *u);

  if (u == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    return NULL;
  }
  pthread_mutex_init (&u->lock, NULL);
  pthread_cond_init (&u->idle_cond, NULL);
  u->piece = p->piece ? p->piece : BA_UPSTREAM_PIECE_DEFAULT;
  u->depth = p->depth ? p->depth : BA_UPSTREAM_DEPTH_DEFAULT;
  if (!ba_upstream_piece_valid (u->piece) ||
      u->depth > BA_UPSTREAM_DEPTH_MAX || p->connections < 1 ||
      p->connections > BA_UPSTREAM_CONNECTIONS_MAX) {
    snprintf (errbuf, errlen, "piece %" PRIu32 ", depth %u or %u "
              "connections out of range", u->piece, u->depth, p->connections);
    goto fail;
  }
  u->h = calloc (p->connections, sizeof (struct nbd_handle *));
  u->busy = calloc (p->connections, sizeof *u->busy);
  if (u->h == NULL || u->busy == NULL) {
    snprintf (errbuf, errlen, "out of memory");
    goto fail;
  }
  for (; u->n < p->connections; u->n++) {
    struct nbd_handle *h = ba_nbd_connect (p->uri, p->socket, p->export,
                                           p->meta_context, errbuf, errlen);
    if (h == NULL)
      goto fail;
    u->h[u->n] = h;
    if (nbd_set_pread_initialize (h, false) == -1) {
      snprintf (errbuf, errlen, "%s", nbd_get_error ());
      u->n++;
      goto fail;
    }
  }
  u->nr_idle = u->n;
  u->size = nbd_get_size (u->h[0]);
  if (u->size == -1) {
    snprintf (errbuf, errlen, "%s", nbd_get_error ());
    goto fail;
  }
  u->can_trim = nbd_can_trim (u->h[0]) == 1;
  u->can_meta = p->meta_context &&
    nbd_can_meta_context (u->h[0], p->meta_context) == 1;
  return u;

 fail:
  ba_upstream_close (u);
  return NULL;
}

void
ba_upstream_close (struct ba_upstream *u)
{
  if (u == NULL)
    return;
  for (unsigned i = 0; i < u->n; i++)
    nbd_close (u->h[i]);
  free (u->h);
  free (u->busy);
  pthread_cond_destroy (&u->idle_cond);
  pthread_mutex_destroy (&u->lock);
  free (u);
}

int64_t
ba_upstream_size (const struct ba_upstream *u)
{
  return u->size;
}

bool
ba_upstream_can_trim (const struct ba_upstream *u)
{
  return u->can_trim;
}

bool
ba_upstream_can_meta_context (const struct ba_upstream *u)
{
  return u->can_meta;
}

unsigned
ba_upstream_connections (const struct ba_upstream *u)
{
  return u->n;
}

/* Takes up to want idle connections (at least one, waiting for it) into
 * slots; returns how many.
 */
static unsigned
take_some (struct ba_upstream *u, unsigned want, unsigned *slots)
{
  unsigned got = 0;

  pthread_mutex_lock (&u->lock);
  while (u->nr_idle == 0)
    pthread_cond_wait (&u->idle_cond, &u->lock);
  for (unsigned i = 0; i < u->n && got < want; i++)
    if (!u->busy[i]) {
      u->busy[i] = true;
      slots[got++] = i;
    }
  u->nr_idle -= got;
  pthread_mutex_unlock (&u->lock);
  return got;
}

static void
give_back_some (struct ba_upstream *u, const unsigned *slots, unsigned nr)
{
  pthread_mutex_lock (&u->lock);
  for (unsigned i = 0; i < nr; i++)
    u->busy[slots[i]] = false;
  u->nr_idle += nr;
  if (nr == 1)
    pthread_cond_signal (&u->idle_cond);
  else
    pthread_cond_broadcast (&u->idle_cond);
  pthread_mutex_unlock (&u->lock);
}

unsigned
ba_upstream_take (struct ba_upstream *u)
{
  unsigned i = 0;

  take_some (u, 1, &i);
  return i;
}

struct nbd_handle *
ba_upstream_handle (struct ba_upstream *u, unsigned i)
{
  return u->h[i];
}

void
ba_upstream_give_back (struct ba_upstream *u, unsigned i)
{
  give_back_some (u, &i, 1);
}

int
ba_upstream_error (struct nbd_handle *h, int e, const char *what,
                   uint64_t offset, uint64_t count,
                   char *errbuf, size_t errlen)
{
  /* libnbd's EINVAL also means "this handle is no longer connected". */
  if (nbd_aio_is_dead (h) > 0 || nbd_aio_is_closed (h) > 0) {
    const char *why = nbd_get_error ();
    snprintf (errbuf, errlen, "%s [%" PRIu64 ", +%" PRIu64 "): the "
              "connection to QEMU is lost%s%s", what, offset, count,
              why ? ": " : "", why ? why : "");
    return EIO;
  }
  if (e == EINVAL) {
    /* QEMU's EACCES from snapshot-access arrives as EINVAL. */
    snprintf (errbuf, errlen, "%s [%" PRIu64 ", +%" PRIu64 "): QEMU "
              "refused it: the range is outside the dirty bitmap, already "
              "discarded, or the snapshot is broken", what, offset, count);
    return EPERM;
  }
  snprintf (errbuf, errlen, "%s [%" PRIu64 ", +%" PRIu64 "): %s", what,
            offset, count, strerror (e ? e : EIO));
  return e == ENOTCONN || e == ESHUTDOWN || e == 0 ? EIO : e;
}

/* ---- reads ---- */

struct read_req;

/* One piece, while libnbd may call its completion. */
struct piece {
  struct read_req *rq;
  unsigned slot;                /* index into read_req.slots */
  uint64_t offset;
  uint32_t len;
  bool in_flight;
};

/* One read; only the thread that runs it touches it (the completions
 * run in the libnbd calls of that thread).
 */
struct read_req {
  struct ba_upstream *u;
  char *buf;
  uint64_t offset;              /* where buf starts */
  struct ba_split split;
  unsigned nr_slots;
  unsigned slots[BA_UPSTREAM_CONNECTIONS_MAX];
  unsigned in_flight[BA_UPSTREAM_CONNECTIONS_MAX];
  unsigned total;               /* pieces in flight */
  struct piece *pieces;         /* depth per slot */
  /* The first failure: */
  int err;                      /* libnbd's errno, 0: none */
  int result;                   /* its classification, 0: not yet */
  unsigned err_slot;
  uint64_t err_offset;
  uint32_t err_len;
};

static void
failed (struct read_req *rq, int err, unsigned slot, uint64_t offset,
        uint32_t len)
{
  if (rq->err)
    return;
  rq->err = err ? err : EIO;
  rq->err_slot = slot;
  rq->err_offset = offset;
  rq->err_len = len;
}

static int
piece_done (void *opaque, int *error)
{
  struct piece *p = opaque;
  struct read_req *rq = p->rq;

  if (p->in_flight) {
    p->in_flight = false;
    rq->in_flight[p->slot]--;
    rq->total--;
    if (*error)
      failed (rq, *error, p->slot, p->offset, p->len);
  }
  return 1;                     /* retire it */
}

static struct nbd_handle *
slot_handle (const struct read_req *rq, unsigned slot)
{
  return rq->u->h[rq->slots[slot]];
}

/* The classification of the first failure, made in this thread right
 * after the libnbd call that saw it, while nbd_get_error is about it.
 */
static void
classify (struct read_req *rq, char *errbuf, size_t errlen)
{
  if (rq->err && !rq->result)
    rq->result = ba_upstream_error (slot_handle (rq, rq->err_slot), rq->err,
                                    "read", rq->err_offset, rq->err_len,
                                    errbuf, errlen);
}

/* Issues one piece on slot s.  Returns false when there is nothing more
 * to issue (all issued, or a failure).
 */
static bool
issue_one (struct read_req *rq, unsigned s, char *errbuf, size_t errlen)
{
  unsigned depth = rq->u->depth;
  struct piece *p = &rq->pieces[(size_t) s * depth];
  uint64_t offset;
  uint32_t len;
  nbd_completion_callback cb = { .callback = piece_done };

  if (rq->err || !ba_split_next (&rq->split, &offset, &len))
    return false;
  while (p->in_flight)
    p++;                        /* in_flight[s] < depth: one is free */
  *p = (struct piece) { .rq = rq, .slot = s, .offset = offset, .len = len,
                        .in_flight = true };
  rq->in_flight[s]++;
  rq->total++;
  cb.user_data = p;
  if (nbd_aio_pread (slot_handle (rq, s), rq->buf + (offset - rq->offset),
                     len, offset, cb, 0) == -1) {
    int e = nbd_get_errno ();
    if (p->in_flight) {         /* libnbd did not complete it */
      p->in_flight = false;
      rq->in_flight[s]--;
      rq->total--;
    }
    failed (rq, e, s, offset, len);
    classify (rq, errbuf, errlen);
    return false;
  }
  return true;
}

/* Fills every slot up to depth, round robin. */
static void
issue (struct read_req *rq, char *errbuf, size_t errlen)
{
  bool more = true;

  while (more) {
    more = false;
    for (unsigned s = 0; s < rq->nr_slots; s++)
      if (rq->in_flight[s] < rq->u->depth) {
        if (!issue_one (rq, s, errbuf, errlen))
          return;
        more = true;
      }
  }
}

/* Waits for the slots with pieces in flight and lets libnbd work. */
static void
drive (struct read_req *rq, char *errbuf, size_t errlen)
{
  struct pollfd fds[BA_UPSTREAM_CONNECTIONS_MAX];
  unsigned which[BA_UPSTREAM_CONNECTIONS_MAX], n = 0;

  for (unsigned s = 0; s < rq->nr_slots; s++) {
    struct nbd_handle *h = slot_handle (rq, s);
    int fd, dir;

    if (rq->in_flight[s] == 0)
      continue;
    fd = nbd_aio_get_fd (h);
    if (fd == -1) {
      /* No socket, so libnbd has failed every command on it already. */
      failed (rq, ENOTCONN, s, rq->offset, 0);
      classify (rq, errbuf, errlen);
      rq->total -= rq->in_flight[s];
      rq->in_flight[s] = 0;
      continue;
    }
    dir = nbd_aio_get_direction (h);
    fds[n] = (struct pollfd) { .fd = fd, .events =
      ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
      ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0) };
    which[n++] = s;
  }
  if (n == 0 || poll (fds, n, -1) == -1)
    return;                     /* EINTR: the caller comes back */
  for (unsigned i = 0; i < n; i++) {
    struct nbd_handle *h = slot_handle (rq, which[i]);

    /* One notification: the first may change what the second means. */
    if (fds[i].revents & (POLLIN | POLLHUP | POLLERR))
      nbd_aio_notify_read (h);
    else if (fds[i].revents & POLLOUT)
      nbd_aio_notify_write (h);
    classify (rq, errbuf, errlen);
  }
}

int
ba_upstream_pread (struct ba_upstream *u, void *buf, uint64_t count,
                   uint64_t offset, char *errbuf, size_t errlen)
{
  uint64_t nr = ba_split_count (offset, count, u->piece);
  uint64_t want = (nr + u->depth - 1) / u->depth;
  struct read_req rq = { .u = u, .buf = buf, .offset = offset };

  if (count == 0)
    return 0;
  ba_split_init (&rq.split, offset, count, u->piece);
  rq.nr_slots = take_some (u, want < u->n ? want : u->n, rq.slots);
  rq.pieces = calloc ((size_t) rq.nr_slots * u->depth, sizeof *rq.pieces);
  if (rq.pieces == NULL) {
    give_back_some (u, rq.slots, rq.nr_slots);
    snprintf (errbuf, errlen, "read [%" PRIu64 ", +%" PRIu64 "): out of "
              "memory", offset, count);
    errno = ENOMEM;
    return -1;
  }
  issue (&rq, errbuf, errlen);
  while (rq.total > 0) {
    drive (&rq, errbuf, errlen);
    issue (&rq, errbuf, errlen);
  }
  /* A lost connection says more than what it made fail. */
  for (unsigned s = 0; rq.err && rq.result != EIO && s < rq.nr_slots; s++)
    if (nbd_aio_is_dead (slot_handle (&rq, s)) > 0) {
      rq.result = ba_upstream_error (slot_handle (&rq, s), ENOTCONN, "read",
                                     offset, count, errbuf, errlen);
    }
  give_back_some (u, rq.slots, rq.nr_slots);
  free (rq.pieces);
  if (rq.err) {
    errno = rq.result;
    return -1;
  }
  return 0;
}

/* ---- other commands, on one connection ---- */

int
ba_upstream_trim (struct ba_upstream *u, uint64_t count, uint64_t offset,
                  char *errbuf, size_t errlen)
{
  unsigned i = ba_upstream_take (u);
  int e = 0;

  if (nbd_trim (u->h[i], count, offset, 0) == -1)
    e = ba_upstream_error (u->h[i], nbd_get_errno (), "trim", offset, count,
                           errbuf, errlen);
  ba_upstream_give_back (u, i);
  errno = e;
  return e ? -1 : 0;
}

int
ba_upstream_block_status (struct ba_upstream *u, uint64_t count,
                          uint64_t offset, nbd_extent_callback cb,
                          uint32_t flags, char *errbuf, size_t errlen)
{
  unsigned i = ba_upstream_take (u);
  int e = 0;

  if (nbd_block_status (u->h[i], count, offset, cb, flags) == -1)
    e = ba_upstream_error (u->h[i], nbd_get_errno (), "block status",
                           offset, count, errbuf, errlen);
  ba_upstream_give_back (u, i);
  errno = e;
  return e ? -1 : 0;
}
