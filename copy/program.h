/* SPDX-License-Identifier: BSD-3-Clause */
/* backupaccess-copy: what its units share.  main.c reads the options
 * and runs the copy, output.c makes the backup image, worker.c copies
 * (threads, each with a connection to QEMU and one to the destination),
 * qemu.c asks QEMU for zero runs and discards, rate.c is the bandwidth
 * limit, report.c tells how it goes.
 */
#ifndef BACKUPACCESS_COPY_PROGRAM_H
#define BACKUPACCESS_COPY_PROGRAM_H

#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "copy.h"
#include "upstream.h"

struct options {
  const char *uri;              /* QEMU's export: --uri, or */
  const char *socket;           /* --socket and */
  const char *export;           /* --export */
  const char *bitmap;           /* --bitmap: NULL for a full backup */
  const char *output;           /* OUTPUT */
  const char *format;           /* --format: qcow2, raw, or NULL */
  const char *backing;          /* --backing PREV */
  const char *backing_format;   /* --backing-format */
  uint64_t cluster;             /* --cluster */
  uint32_t request_size;        /* --request-size */
  unsigned connections;         /* --connections */
  unsigned requests;            /* --requests: in flight per connection */
  bool discard;                 /* --discard */
  bool discard_clean;           /* --discard-clean */
  bool extents;                 /* not --no-extents */
  bool progress;                /* --progress */
  uint64_t bandwidth;           /* --bandwidth-limit, bytes/s; 0: none */
  uint64_t trim_batch;          /* --trim-batch */
  const char *status;           /* --status FILE */
  bool check;                   /* --check: OUTPUT and PREV only */
};

extern const char *progname;

/* "backupaccess-copy: message" on stderr. */
void warn (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));

/* ---- output.c: the backup image ---- */

struct output;

/* Checks OUTPUT and PREV before anything is made: OUTPUT does not exist,
 * its directory does, its format (--format, else .qcow2 or .raw), PREV's
 * format (--backing-format, else by its name, checked by qemu-img) and
 * size (an incremental needs PREV of the disk's size).  Returns the
 * output, or NULL with a message in err: bad input, nothing made.
 */
struct output *output_check (const struct options *o, uint64_t disk_size,
                             bool incremental, char *err, size_t len);

/* Whether the destination reads as zeroes where nothing is written (a
 * new image without a backing file).
 */
bool output_is_zero (const struct output *out);

/* Makes OUTPUT.part (locked: one copy at a time) and opens it: a qcow2
 * image through qemu-nbd, started with socket activation and shared by
 * n connections, or a sparse raw file.  Returns 0, or -1 with a message.
 */
int output_open (struct output *out, unsigned n, char *err, size_t len);

/* Connection i to qemu-nbd, or NULL for a raw file (output_write). */
struct nbd_handle *output_handle (struct output *out, unsigned i);

/* Writes len bytes of buf at offset into the raw file (zeroes: a hole
 * instead).  Returns 0, or -1 with errno.
 */
int output_write (struct output *out, const char *buf, uint64_t len,
                  uint64_t offset, bool zeroes);

/* The image flushed to stable storage, qemu-nbd stopped, and OUTPUT.part
 * renamed to OUTPUT (never over a file that appeared meanwhile).
 * Returns 0, or -1 with a message (then output_abort).
 */
int output_commit (struct output *out, char *err, size_t len);

/* Stops qemu-nbd and removes OUTPUT.part: no half-written backup. */
void output_abort (struct output *out);

void output_free (struct output *out);

/* ---- rate.c: the bandwidth limit, shared by the workers ---- */

struct rate;
struct rate *rate_new (uint64_t bytes_per_second);
void rate_free (struct rate *r);

/* Reserves count bytes: the time (CLOCK_MONOTONIC, ns) from which they
 * may be read.
 */
int64_t rate_reserve (struct rate *r, uint64_t count);

/* CLOCK_MONOTONIC in ns. */
int64_t now_ns (void);

/* ---- worker.c: the copy ---- */

/* The most requests in flight per connection. */
#define COPY_REQUESTS_MAX 256

/* Set by SIGINT and SIGTERM: the workers stop, the copy fails. */
extern volatile sig_atomic_t copy_interrupted;

struct worker;

struct job {
  const struct options *o;
  struct ba_copy *copy;
  struct ba_upstream *src;
  struct output *out;
  struct rate *rate;            /* NULL: no limit */
  bool extents;                 /* ask QEMU for zero runs */
  bool incremental;             /* for the status file */
  int64_t t0;                   /* when the copy started */
  int wake_fd;                  /* eventfd: readable once all must stop */
  pthread_mutex_t lock;         /* guards running */
  pthread_cond_t cond;
  unsigned running;
  struct worker *workers;
  unsigned nworkers;
};

/* Runs the copy over o->connections workers, each with its own
 * connection to QEMU and to the destination, until every chunk is
 * copied or the copy fails (then in-flight requests end first).
 * progress is called about once a second from this thread.
 */
void run_workers (struct job *job, void (*progress) (struct job *job));

/* Whether a worker left requests in flight (their connections must be
 * closed before workers_free).
 */
bool workers_abandoned (const struct job *job);

/* Frees the workers. */
void workers_free (struct job *job);

/* Wakes every worker: the copy failed, or a signal came. */
void job_wake (struct job *job);

/* ---- report.c: what the copy tells ---- */

/* QEMU's export, for messages. */
const char *source_name (const struct options *o);

/* Once a second while the copy runs: --progress, --status FILE. */
void report_progress (struct job *job);

/* At the end: --status FILE, and the summary or why it failed. */
void report_end (struct job *job, bool ok);

/* ---- qemu.c: what the copy asks QEMU besides reads ---- */

/* The runs of chunk (all dirty) that read as zeroes, from block status
 * on h, into *zero (empty if QEMU does not say).  Returns 0, or -1 with
 * libnbd's errno in *err and the offset it failed at in *at.
 */
int zero_runs (struct nbd_handle *h, const struct ba_range *chunk,
               struct ba_regions *zero, int *err, uint64_t *at);

/* Sends QEMU the trims in *trims (whole clusters), and clears it: with
 * aio on h, counting them in *in_flight until they complete; or
 * synchronously on an idle connection of the pool (clean: discards of
 * clean clusters).
 */
void send_trims (struct job *job, struct nbd_handle *h,
                 struct ba_regions *trims, unsigned *in_flight);
void send_trims_sync (struct job *job, struct ba_regions *trims, bool clean);

#endif /* BACKUPACCESS_COPY_PROGRAM_H */
