/* SPDX-License-Identifier: BSD-3-Clause */
/* The bandwidth limit of backupaccess-copy: every read from QEMU
 * reserves its bytes on one clock shared by all workers, which then
 * issue it no earlier than the time it got.  No burst: the limit holds
 * over any second of the copy.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "program.h"

struct rate {
  pthread_mutex_t lock;
  uint64_t bytes_per_second;
  int64_t next;                 /* when the next bytes may go; guarded */
};

int64_t
now_ns (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct rate *
rate_new (uint64_t bytes_per_second)
{
  struct rate *r = calloc (1, sizeof *r);

  if (r == NULL)
    return NULL;
  pthread_mutex_init (&r->lock, NULL);
  r->bytes_per_second = bytes_per_second;
  r->next = now_ns ();
  return r;
}

void
rate_free (struct rate *r)
{
  if (r == NULL)
    return;
  pthread_mutex_destroy (&r->lock);
  free (r);
}

int64_t
rate_reserve (struct rate *r, uint64_t count)
{
  int64_t now = now_ns (), at;

  pthread_mutex_lock (&r->lock);
  /* Time not used is not saved up. */
  if (r->next < now)
    r->next = now;
  at = r->next;
  r->next += (int64_t) ((double) count * 1e9 / (double) r->bytes_per_second);
  pthread_mutex_unlock (&r->lock);
  return at;
}
