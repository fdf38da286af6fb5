/* SPDX-License-Identifier: BSD-3-Clause */
/* The trims the filter sends upstream, and the flusher.  Only whole
 * clusters are trimmed (ba_trim_piece), and each trim is counted in the
 * view.
 *
 * The flusher thread sends the batch every second, so that the last
 * discards of a slow or idle client (a FUSE mount) do not wait for
 * its connection to end.  It sends them through the plugin context of
 * an open connection (there is a batch only while one is open): one of
 * its own would be one more connection to QEMU, and the nbd plugin
 * logs an error when opened outside a connection.  A connection waits
 * in .finalize until the flusher no longer uses its context.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "cluster.h"
#include "regions.h"
#include "view.h"

#include "config.h"
#include "flusher.h"
#include "startup.h"

static struct {
  /* Guards open_nexts, nr_open_nexts, flushing_via and stop; never held
   * across a call to the plugin.
   */
  pthread_mutex_t lock;
  nbdkit_next **open_nexts;     /* the open connections' contexts */
  size_t nr_open_nexts;
  nbdkit_next *flushing_via;    /* in use by the flusher */
  bool stop;
  pthread_cond_t cond;          /* wakes the thread to stop */
  pthread_cond_t flushed_cond;  /* flushing_via was given back */
  /* Set before clients come, cleared after the last one. */
  pthread_t thread;
  bool running;
} flusher = {
  .lock = PTHREAD_MUTEX_INITIALIZER,
  .cond = PTHREAD_COND_INITIALIZER,
  .flushed_cond = PTHREAD_COND_INITIALIZER,
};

/* Sends trims for whole clusters (clean: of clean clusters at
 * start-up), counted in the view.  Returns 0, or -1 with *err set after
 * trying every range.
 */
int
send_trims (nbdkit_next *next, const struct ba_regions *trims,
            bool clean, int *err)
{
  int r = 0;

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t start = trims->r[i].start, end = trims->r[i].end;
    while (start < end) {
      uint64_t len = ba_trim_piece (start, end, config.cluster_size,
                                    UINT32_MAX);
      int e = 0;
      if (next->trim (next, len, start, 0, &e) == -1) {
        nbdkit_error ("backupaccess: discarding [%" PRIu64 ", +%" PRIu64
                      ") upstream failed: %s", start, len, strerror (e));
        ba_view_trimmed (state.view, len, false, clean);
        *err = e ? e : EIO;
        r = -1;
      }
      else {
        if (backupaccess_debug_verbose)
          nbdkit_debug ("backupaccess: trim [%" PRIu64 ", +%" PRIu64 ")",
                        start, len);
        ba_view_trimmed (state.view, len, true, clean);
      }
      start += len;
    }
  }
  return r;
}

/* Sends the batch (at the end of a connection; the lag stays). */
void
flush_batch (nbdkit_next *next)
{
  struct ba_regions due;
  int err;

  ba_regions_init (&due);
  if (ba_view_flush (state.view, &due) == -1)
    nbdkit_error ("backupaccess: out of memory sending the last discards");
  send_trims (next, &due, false, &err);
  ba_regions_free (&due);
}

/* Opens a writable plugin context of our own, ready to trim, or
 * returns NULL (the plugin's errors are logged; a plugin that cannot
 * trim is left to the caller to report).
 */
static nbdkit_next *
open_trim_context (nbdkit_backend *backend)
{
  nbdkit_next *next;

  next = nbdkit_next_context_open (backend, 0,
                                   config.plugin_export ?
                                   config.plugin_export : "", 1);
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

/* Discards every cluster with no dirty byte, once, before clients come:
 * where copy-before-write has no bitmap (upstream QEMU's blockdev-backup
 * sync=none), it then stops copying them on guest writes, and the
 * fleecing image holds only what the backup reads.
 */
int
discard_clean_clusters (nbdkit_backend *backend)
{
  struct ba_regions clean;
  nbdkit_next *next;
  int err = 0, r = -1;

  ba_regions_init (&clean);
  if (ba_view_clean_clusters (state.view, &clean) == -1) {
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
  pthread_mutex_lock (&flusher.lock);
  while (!flusher.stop) {
    struct timespec ts;
    struct ba_regions due;
    int err;

    clock_gettime (CLOCK_REALTIME, &ts);
    ts.tv_sec++;
    pthread_cond_timedwait (&flusher.cond, &flusher.lock, &ts);
    if (flusher.stop || flusher.nr_open_nexts == 0)
      continue;
    ba_regions_init (&due);
    if (ba_view_flush (state.view, &due) == -1)
      nbdkit_error ("backupaccess: out of memory sending discards");
    if (due.n > 0) {
      flusher.flushing_via = flusher.open_nexts[0];
      pthread_mutex_unlock (&flusher.lock);
      send_trims (flusher.flushing_via, &due, false, &err);
      pthread_mutex_lock (&flusher.lock);
      flusher.flushing_via = NULL;
      pthread_cond_broadcast (&flusher.flushed_cond);
    }
    ba_regions_free (&due);
  }
  pthread_mutex_unlock (&flusher.lock);
  return NULL;
}

int
start_flusher (bool parallel_plugin)
{
  int e;

  if (!parallel_plugin) {
    nbdkit_debug ("backupaccess: the plugin is not parallel: a batch of "
                  "discards waits for its connection to fill it or end");
    return 0;
  }
  e = pthread_create (&flusher.thread, NULL, flush_loop, NULL);
  if (e != 0) {
    nbdkit_error ("backupaccess: pthread_create: %s", strerror (e));
    return -1;
  }
  flusher.running = true;
  return 0;
}
/* After the last connection, before the plugin goes. */
void
stop_flusher (void)
{
  if (flusher.running) {
    pthread_mutex_lock (&flusher.lock);
    flusher.stop = true;
    pthread_cond_signal (&flusher.cond);
    pthread_mutex_unlock (&flusher.lock);
    pthread_join (flusher.thread, NULL);
    flusher.running = false;
  }
  free (flusher.open_nexts);
  flusher.open_nexts = NULL;
}

bool
flusher_running (void)
{
  return flusher.running;
}

/* A connection's context becomes available to the flusher. */
int
offer_to_flusher (nbdkit_next *next)
{
  nbdkit_next **n;

  pthread_mutex_lock (&flusher.lock);
  n = realloc (flusher.open_nexts,
               (flusher.nr_open_nexts + 1) * sizeof (nbdkit_next *));
  if (n == NULL) {
    pthread_mutex_unlock (&flusher.lock);
    nbdkit_error ("realloc: %m");
    return -1;
  }
  flusher.open_nexts = n;
  flusher.open_nexts[flusher.nr_open_nexts++] = next;
  pthread_mutex_unlock (&flusher.lock);
  return 0;
}

/* ... or stops being so, once the flusher is done with it. */
void
withdraw_from_flusher (nbdkit_next *next)
{
  pthread_mutex_lock (&flusher.lock);
  for (size_t i = 0; i < flusher.nr_open_nexts; i++)
    if (flusher.open_nexts[i] == next) {
      flusher.open_nexts[i] = flusher.open_nexts[--flusher.nr_open_nexts];
      break;
    }
  while (flusher.flushing_via == next)
    pthread_cond_wait (&flusher.flushed_cond, &flusher.lock);
  pthread_mutex_unlock (&flusher.lock);
}

