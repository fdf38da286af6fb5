/* SPDX-License-Identifier: BSD-3-Clause */
/* The discard queue: when completed clusters are trimmed (batched into
 * fewer trims, and an optional lag of recent ones).  Not thread-safe:
 * callers hold their own lock.
 */
#ifndef BACKUPACCESS_DISCARDQ_H
#define BACKUPACCESS_DISCARDQ_H

#include <stdbool.h>
#include <stdint.h>
#include "regions.h"

/* The discard queue: completed clusters (from ba_coverage_consume) on
 * their way to the trims that discard them upstream.
 *
 * lag_size > 0 keeps at least the newest lag_size bytes (less than a
 * cluster more), in completion order, untrimmed: a client whose connection
 * dropped right after a read can read them again.  batch_size > 0
 * collects what leaves the lag into a merged set (reads complete out
 * of order): a range is handed out once it is batch_size long, all of
 * them once they hold 4 x batch_size bytes or are more than 1024 separate
 * ranges, or on ba_discard_queue_flush; with batch_size == 0 all is
 * handed out at once.  So at most lag_size + 4 x batch_size bytes (plus
 * a cluster) wait untrimmed.
 */
struct ba_discard_queue;
struct ba_discard_queue *ba_discard_queue_new (uint64_t batch_size,
                                               uint64_t lag_size,
                                               uint64_t cluster_size);
void ba_discard_queue_free (struct ba_discard_queue *q);

/* Adds the ranges just completed; inserts into *due what is to be
 * trimmed now.  Returns 0, or -1 with errno = ENOMEM when a range could
 * be neither queued nor handed out (it is then never trimmed: fleecing
 * space, not data).
 */
int ba_discard_queue_add (struct ba_discard_queue *q,
                          const struct ba_regions *completed,
                          struct ba_regions *due);

/* At the end of a connection: hands out the batch, keeps the lag. */
int ba_discard_queue_flush (struct ba_discard_queue *q,
                            struct ba_regions *due);

/* True if all of [start, end) is in the lag (so not trimmed yet, and
 * readable again).  What waits in the batch is not: a client reads a
 * range once, unless it asked for a lag.
 */
bool ba_discard_queue_lagging (const struct ba_discard_queue *q,
                               uint64_t start, uint64_t end);

/* Bytes waiting in the queue. */
uint64_t ba_discard_queue_bytes (const struct ba_discard_queue *q);

#endif /* BACKUPACCESS_DISCARDQ_H */
