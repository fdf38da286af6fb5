/* SPDX-License-Identifier: BSD-3-Clause */
/* The copy of backupaccess-copy: worker threads, each with its own
 * connection to QEMU (from lib/upstream.c's pool) and to the
 * destination.  A worker takes chunks of the copy set from lib/copy.c,
 * asks QEMU which runs of a chunk read as zeroes (qemu.c), and keeps up to
 * --requests requests in flight with libnbd's aio calls, driven by poll
 * in its own thread as nbdcopy does: each read, once complete, is
 * written from the same buffer, and only once that write has completed
 * are its clusters discarded in QEMU.  Completion callbacks only queue
 * the request for the loop.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libnbd.h>

#include "program.h"

/* How long a worker waits for its requests in flight once the copy has
 * failed, before it leaves them.
 */
#define DRAIN_NS ((int64_t) 30 * 1000000000)
#define SECOND_NS ((int64_t) 1000000000)

volatile sig_atomic_t copy_interrupted;

enum cmd_state { CMD_FREE, CMD_READING, CMD_WRITING, CMD_READ, CMD_WRITTEN };

struct worker;

struct cmd {
  struct worker *w;
  struct ba_copy_req r;
  enum cmd_state state;
  enum ba_copy_write kind;
  int err;                      /* the completion's, 0: none */
  char *buf;
};

struct worker {
  struct job *job;
  pthread_t thread;
  struct nbd_handle *src, *dst; /* dst NULL: a raw file */
  struct cmd *cmds;
  unsigned *ready;              /* completed, for the loop */
  struct ba_copy_split split;
  struct ba_copy_req next;      /* from the plan, not issued yet */
  int64_t next_at;              /* when the bandwidth limit lets it go */
  int64_t stopped_at, last_flush;
  struct ba_regions zero, due;
  unsigned slot;                /* its connection in the pool */
  unsigned depth, busy, trims;  /* trims: in flight */
  unsigned nready;
  bool splitting, more, have_next;
  bool abandoned;               /* left requests in flight */
};

void
job_wake (struct job *job)
{
  uint64_t one = 1;

  if (write (job->wake_fd, &one, sizeof one) == -1) {
    /* Full: it is readable already. */
  }
}

static struct cmd *
take_cmd (struct worker *w)
{
  for (unsigned i = 0; i < w->depth; i++)
    if (w->cmds[i].state == CMD_FREE) {
      w->busy++;
      w->cmds[i].err = 0;
      return &w->cmds[i];
    }
  return NULL;
}

static void
free_cmd (struct worker *w, struct cmd *c)
{
  c->state = CMD_FREE;
  w->busy--;
}

static int
cmd_done (void *opaque, int *error)
{
  struct cmd *c = opaque;

  c->err = *error;
  c->state = c->state == CMD_READING ? CMD_READ : CMD_WRITTEN;
  c->w->ready[c->w->nready++] = (unsigned) (c - c->w->cmds);
  return 1;
}

static bool
stopping (struct worker *w)
{
  if (copy_interrupted)
    ba_copy_fail (w->job->copy, "interrupted by a signal");
  return ba_copy_failed (w->job->copy, NULL, 0);
}

/* A command on QEMU's connection failed (e: libnbd's errno). */
static void
source_failed (struct worker *w, int e, const char *what,
               const struct ba_copy_req *r)
{
  char msg[512];

  if (ba_upstream_error (w->src, e, what, r->offset, r->len, msg,
                         sizeof msg) == EPERM)
    ba_copy_read_refused (w->job->copy, r, what);
  else
    ba_copy_fail (w->job->copy, "QEMU: %s", msg);
  job_wake (w->job);
}

static void
dest_failed (struct worker *w, const struct ba_copy_req *r, const char *why)
{
  ba_copy_fail (w->job->copy, "writing %s at [%" PRIu64 ", +%" PRIu32
                "): %s", w->job->o->output, r->offset, r->len, why);
  job_wake (w->job);
}

/* The destination holds c now. */
static void
cmd_complete (struct worker *w, struct cmd *c)
{
  if (ba_copy_done (w->job->copy, &c->r, c->kind, &w->due) == -1)
    warn ("out of memory: some clusters will not be discarded");
  free_cmd (w, c);
  send_trims (w->job, w->src, &w->due, &w->trims);
}

/* Into the raw file, synchronously (as nbdcopy writes files). */
static void
write_file (struct worker *w, struct cmd *c)
{
  if (output_write (w->job->out, c->buf, c->r.len, c->r.offset,
                    c->kind == BA_COPY_WRITE_ZEROES) == -1) {
    dest_failed (w, &c->r, strerror (errno));
    free_cmd (w, c);
    return;
  }
  cmd_complete (w, c);
}

/* Writes c as its kind says. */
static void
write_cmd (struct worker *w, struct cmd *c)
{
  nbd_completion_callback cb = { .callback = cmd_done, .user_data = c };
  int64_t r;

  if (c->kind == BA_COPY_WRITE_NOTHING) {
    cmd_complete (w, c);
    return;
  }
  if (w->dst == NULL) {
    write_file (w, c);
    return;
  }
  c->state = CMD_WRITING;
  if (c->kind == BA_COPY_WRITE_DATA)
    r = nbd_aio_pwrite (w->dst, c->buf, c->r.len, c->r.offset, cb, 0);
  else
    r = nbd_aio_zero (w->dst, c->r.len, c->r.offset, cb, 0);
  if (r == -1) {                /* not queued: no callback */
    dest_failed (w, &c->r, nbd_get_error ());
    free_cmd (w, c);
  }
}

static void
read_cmd (struct worker *w, struct cmd *c)
{
  nbd_completion_callback cb = { .callback = cmd_done, .user_data = c };
  char msg[1024];

  if (ba_copy_check_read (w->job->copy, &c->r, msg, sizeof msg) == -1) {
    job_wake (w->job);
    free_cmd (w, c);
    return;
  }
  c->state = CMD_READING;
  if (nbd_aio_pread (w->src, c->buf, c->r.len, c->r.offset, cb, 0) == -1) {
    source_failed (w, nbd_get_errno (), "read", &c->r);
    free_cmd (w, c);
  }
}

/* The completed requests, in the loop (not in libnbd's callbacks). */
static void
handle_ready (struct worker *w)
{
  unsigned list[COPY_REQUESTS_MAX], n;

  while ((n = w->nready) > 0) {
    memcpy (list, w->ready, n * sizeof list[0]);
    w->nready = 0;
    for (unsigned i = 0; i < n; i++) {
      struct cmd *c = &w->cmds[list[i]];
      if (c->state == CMD_READ && c->err)
        source_failed (w, c->err, "read", &c->r);
      else if (c->state == CMD_WRITTEN && c->err)
        dest_failed (w, &c->r, strerror (c->err));
      if (c->err || stopping (w))
        free_cmd (w, c);
      else if (c->state == CMD_WRITTEN)
        cmd_complete (w, c);
      else {
        c->kind = ba_copy_write_for (w->job->copy,
                                     ba_copy_is_zero (c->buf, c->r.len));
        write_cmd (w, c);
      }
    }
  }
}

/* Which runs of chunk read as zeroes (one request is read whole:
 * asking would cost as much).  Returns 0, or -1 when the copy failed.
 */
static int
chunk_zero_runs (struct worker *w, const struct ba_range *chunk)
{
  uint64_t at;
  int e;

  ba_regions_clear (&w->zero);
  if (!w->job->extents || chunk->end - chunk->start <= w->job->o->request_size)
    return 0;
  if (zero_runs (w->src, chunk, &w->zero, &e, &at) == -1) {
    const struct ba_copy_req r = { .offset = at,
                                   .len = (uint32_t) (chunk->end - at) };
    source_failed (w, e, "block status", &r);
    return -1;
  }
  return 0;
}

/* The next request of the plan into w->next; false when none is left. */
static bool
next_request (struct worker *w)
{
  struct ba_copy *copy = w->job->copy;
  struct ba_range chunk;

  while (!w->splitting || !ba_copy_split_next (&w->split, &w->next)) {
    w->splitting = false;
    if (!ba_copy_next_chunk (copy, &chunk) || chunk_zero_runs (w, &chunk) == -1)
      return false;
    ba_copy_split_init (&w->split, copy, &chunk, &w->zero);
    w->splitting = true;
  }
  w->next_at = w->job->rate && !w->next.known_zero
    ? rate_reserve (w->job->rate, w->next.len) : 0;
  return true;
}

/* Issues requests until depth is reached, the plan is done, or the
 * bandwidth limit says wait.
 */
static void
fill (struct worker *w)
{
  while (w->busy < w->depth && !stopping (w)) {
    struct cmd *c;

    if (!w->have_next && !(w->have_next = next_request (w))) {
      w->more = false;
      return;
    }
    if (w->next_at > now_ns ())
      return;
    c = take_cmd (w);
    c->r = w->next;
    w->have_next = false;
    if (c->r.known_zero) {
      c->kind = ba_copy_write_for (w->job->copy, true);
      write_cmd (w, c);
    }
    else
      read_cmd (w, c);
  }
}

static short
events_of (struct nbd_handle *h)
{
  unsigned dir = nbd_aio_get_direction (h);

  return ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
    ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
}

static void
notify (struct nbd_handle *h, short revents)
{
  /* One notification: the first may change what the second means. */
  if (revents & (POLLIN | POLLHUP | POLLERR))
    nbd_aio_notify_read (h);
  else if (revents & POLLOUT)
    nbd_aio_notify_write (h);
}

/* Waits for the connections (and, until the copy stops, the wake-up),
 * at most until the bandwidth limit lets the next request go or a
 * second.  Returns -1, the copy failed, when a connection has no socket
 * any more.
 */
static int
wait_events (struct worker *w)
{
  struct pollfd fds[3];
  struct nbd_handle *hs[2] = { w->src, w->dst };
  int n = 0, timeout = 1000;
  int64_t now = now_ns ();

  for (int i = 0; i < 2 && hs[i]; i++) {
    int fd = nbd_aio_get_fd (hs[i]);
    if (fd == -1) {
      ba_copy_fail (w->job->copy, "the connection to %s is lost: %s",
                    i == 0 ? "QEMU" : "qemu-nbd", nbd_get_error ());
      return -1;
    }
    fds[n++] = (struct pollfd) { .fd = fd, .events = events_of (hs[i]) };
  }
  if (!stopping (w))
    fds[n++] = (struct pollfd) { .fd = w->job->wake_fd, .events = POLLIN };
  if (w->have_next && w->next_at > now &&
      (w->next_at - now) / 1000000 < timeout)
    timeout = (int) ((w->next_at - now) / 1000000) + 1;
  if (poll (fds, n, timeout) == -1)
    return 0;                   /* EINTR: the loop looks again */
  for (int i = 0; i < 2 && hs[i]; i++)
    notify (hs[i], fds[i].revents);
  return 0;
}

/* Once a second, what waits in the discard batch goes. */
static void
flush_batch (struct worker *w)
{
  int64_t now = now_ns ();

  if (now - w->last_flush < SECOND_NS)
    return;
  w->last_flush = now;
  ba_copy_flush_trims (w->job->copy, &w->due);
  send_trims (w->job, w->src, &w->due, &w->trims);
}

static void *
worker_main (void *arg)
{
  struct worker *w = arg;

  w->last_flush = now_ns ();
  for (;;) {
    bool stop;

    handle_ready (w);
    fill (w);
    stop = stopping (w);
    if (w->busy == 0 && w->trims == 0 &&
        (stop || (!w->more && !w->have_next)))
      break;
    if (stop && w->stopped_at == 0)
      w->stopped_at = now_ns ();
    if (stop && now_ns () - w->stopped_at > DRAIN_NS)
      warn ("requests to QEMU or qemu-nbd did not end in %d s: left",
            (int) (DRAIN_NS / SECOND_NS));
    if ((stop && now_ns () - w->stopped_at > DRAIN_NS) ||
        wait_events (w) == -1) {
      w->abandoned = true;
      break;
    }
    if (!stop)
      flush_batch (w);
  }
  pthread_mutex_lock (&w->job->lock);
  w->job->running--;
  pthread_cond_signal (&w->job->cond);
  pthread_mutex_unlock (&w->job->lock);
  return NULL;
}

static int
worker_init (struct worker *w, struct job *job, unsigned i)
{
  const struct options *o = job->o;

  w->job = job;
  w->more = true;
  w->depth = o->requests;
  w->slot = ba_upstream_take (job->src);
  w->src = ba_upstream_handle (job->src, w->slot);
  w->dst = output_handle (job->out, i);
  ba_regions_init (&w->zero);
  ba_regions_init (&w->due);
  w->cmds = calloc (w->depth, sizeof *w->cmds);
  w->ready = calloc (w->depth, sizeof *w->ready);
  if (w->cmds == NULL || w->ready == NULL)
    return -1;
  for (unsigned j = 0; j < w->depth; j++) {
    w->cmds[j].w = w;
    w->cmds[j].buf = malloc (o->request_size);
    if (w->cmds[j].buf == NULL)
      return -1;
  }
  return 0;
}

void
run_workers (struct job *job, void (*progress) (struct job *job))
{
  unsigned n = job->o->connections;

  job->workers = calloc (n, sizeof *job->workers);
  if (job->workers == NULL) {
    ba_copy_fail (job->copy, "out of memory");
    return;
  }
  for (; job->nworkers < n; job->nworkers++) {
    struct worker *w = &job->workers[job->nworkers];
    int e;
    if (worker_init (w, job, job->nworkers) == -1) {
      ba_copy_fail (job->copy, "out of memory");
      break;
    }
    pthread_mutex_lock (&job->lock);
    job->running++;
    pthread_mutex_unlock (&job->lock);
    e = pthread_create (&w->thread, NULL, worker_main, w);
    if (e != 0) {
      ba_copy_fail (job->copy, "pthread_create: %s", strerror (e));
      pthread_mutex_lock (&job->lock);
      job->running--;
      pthread_mutex_unlock (&job->lock);
      break;
    }
  }
  pthread_mutex_lock (&job->lock);
  while (job->running > 0) {
    struct timespec ts;
    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec++;
    if (pthread_cond_timedwait (&job->cond, &job->lock, &ts) == ETIMEDOUT &&
        progress) {
      pthread_mutex_unlock (&job->lock);
      progress (job);
      pthread_mutex_lock (&job->lock);
    }
  }
  pthread_mutex_unlock (&job->lock);
  /* Connections with nothing in flight go back to the pool (for the
   * last discards); one a worker left requests on is only closed.
   */
  for (unsigned i = 0; i < job->nworkers; i++) {
    struct worker *w = &job->workers[i];
    pthread_join (w->thread, NULL);
    if (!w->abandoned)
      ba_upstream_give_back (job->src, w->slot);
  }
}

bool
workers_abandoned (const struct job *job)
{
  for (unsigned i = 0; i < job->nworkers; i++)
    if (job->workers[i].abandoned)
      return true;
  return false;
}

void
workers_free (struct job *job)
{
  /* Those started, and one whose start failed half-way. */
  for (unsigned i = 0; job->workers && i < job->o->connections; i++) {
    struct worker *w = &job->workers[i];
    if (w->job == NULL)
      continue;
    for (unsigned j = 0; w->cmds && j < w->depth; j++)
      free (w->cmds[j].buf);
    free (w->cmds);
    free (w->ready);
    ba_regions_free (&w->zero);
    ba_regions_free (&w->due);
  }
  free (job->workers);
  job->workers = NULL;
}
