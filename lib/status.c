/* SPDX-License-Identifier: BSD-3-Clause */
/* The status file (status.h): the counters as JSON, written atomically,
 * and the thread that keeps the file up to date.  The lock guards only
 * the stop flag and is never held across a write.
 */
#define _GNU_SOURCE             /* asprintf, mkostemp */
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <json.h>

#include "status.h"

struct ba_status {
  struct ba_view *v;
  char *path;
  pthread_t thread;
  pthread_mutex_t lock;
  pthread_cond_t cond;
  bool stop;                    /* guarded by lock */
};

static json_object *
counters (const struct ba_view_stats *st)
{
  json_object *o = json_object_new_object ();

  json_object_object_add (o, "bytes-read",
                          json_object_new_uint64 (st->bytes_read));
  json_object_object_add (o, "bytes-discarded",
                          json_object_new_uint64 (st->bytes_discarded));
  json_object_object_add (o, "bytes-discarded-clean",
                          json_object_new_uint64 (st->clean_discarded));
  json_object_object_add (o, "bytes-left",
                          json_object_new_uint64 (st->readable_left));
  json_object_object_add (o, "bytes-total",
                          json_object_new_uint64 (st->readable_total));
  json_object_object_add (o, "requests-refused",
                          json_object_new_uint64 (st->refused));
  json_object_object_add (o, "trim-errors",
                          json_object_new_uint64 (st->trim_errors));
  json_object_object_add (o, "broken", json_object_new_boolean (st->broken));
  json_object_object_add (o, "pid", json_object_new_int (getpid ()));
  json_object_object_add (o, "time", json_object_new_int64 (time (NULL)));
  return o;
}

void
ba_status_write (const char *path, const struct ba_view_stats *st)
{
  json_object *o = counters (st);
  char *tmp = NULL;

  /* mkostemp: O_EXCL and mode 0600, whatever the umask. */
  if (asprintf (&tmp, "%s.XXXXXX", path) != -1) {
    int fd = mkostemp (tmp, O_CLOEXEC);
    if (fd != -1) {
      FILE *fp = fdopen (fd, "w");
      if (fp == NULL)
        close (fd);
      else
        fprintf (fp, "%s\n", json_object_to_json_string_ext
                 (o, JSON_C_TO_STRING_PLAIN));
      if (fp == NULL || fclose (fp) != 0 || rename (tmp, path) == -1)
        unlink (tmp);
    }
  }
  free (tmp);
  json_object_put (o);
}

/* Something counted changed since the last write. */
static uint64_t
activity (const struct ba_view_stats *st)
{
  return st->reads + st->refused + st->trims_sent + st->trim_errors +
    st->client_trims + st->broken;
}

static void *
status_loop (void *arg)
{
  struct ba_status *s = arg;
  struct ba_view_stats st;
  uint64_t last = UINT64_MAX;
  bool stop = false;

  while (!stop) {
    struct timespec ts;

    ba_view_get_stats (s->v, &st);
    if (activity (&st) != last) {
      ba_status_write (s->path, &st);
      last = activity (&st);
    }
    pthread_mutex_lock (&s->lock);
    if (!s->stop) {
      clock_gettime (CLOCK_REALTIME, &ts);
      ts.tv_sec++;
      pthread_cond_timedwait (&s->cond, &s->lock, &ts);
    }
    stop = s->stop;
    pthread_mutex_unlock (&s->lock);
  }
  ba_view_get_stats (s->v, &st);
  ba_status_write (s->path, &st);
  return NULL;
}

struct ba_status *
ba_status_start (struct ba_view *v, const char *path,
                 char *errbuf, size_t errlen)
{
  struct ba_status *s = calloc (1, sizeof *s);
  int e;

  if (s == NULL || (s->path = strdup (path)) == NULL) {
    free (s);
    snprintf (errbuf, errlen, "out of memory");
    return NULL;
  }
  s->v = v;
  pthread_mutex_init (&s->lock, NULL);
  pthread_cond_init (&s->cond, NULL);
  e = pthread_create (&s->thread, NULL, status_loop, s);
  if (e != 0) {
    snprintf (errbuf, errlen, "pthread_create: %s", strerror (e));
    pthread_cond_destroy (&s->cond);
    pthread_mutex_destroy (&s->lock);
    free (s->path);
    free (s);
    return NULL;
  }
  return s;
}

void
ba_status_stop (struct ba_status *s)
{
  if (s == NULL)
    return;
  pthread_mutex_lock (&s->lock);
  s->stop = true;
  pthread_cond_signal (&s->cond);
  pthread_mutex_unlock (&s->lock);
  pthread_join (s->thread, NULL);
  pthread_cond_destroy (&s->cond);
  pthread_mutex_destroy (&s->lock);
  free (s->path);
  free (s);
}
