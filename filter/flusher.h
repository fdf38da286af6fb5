/* SPDX-License-Identifier: BSD-3-Clause */
/* The trims the filter sends upstream: whole clusters only, counted in
 * the view.  The clean clusters at start-up (backupaccess-discard-clean),
 * a connection's batch at its end, and a background flusher that sends
 * the batch every second through the context of an open connection.
 */
#ifndef BACKUPACCESS_FILTER_FLUSHER_H
#define BACKUPACCESS_FILTER_FLUSHER_H

#include <stdbool.h>

#include <nbdkit-filter.h>

#include "regions.h"

/* Trims whole clusters upstream: 0, or -1 with *err set. */
int send_trims (nbdkit_next *next, const struct ba_regions *trims,
                bool clean, int *err);

/* Sends the batch now, through a connection's context. */
void flush_batch (nbdkit_next *next);

/* backupaccess-discard-clean: in .after_fork, a context of its own. */
int discard_clean_clusters (nbdkit_backend *backend);

/* The flusher thread, only beside a parallel plugin. */
int start_flusher (bool parallel_plugin);

/* In .cleanup. */
void stop_flusher (void);

/* Whether the thread runs: set before clients come, cleared after. */
bool flusher_running (void);

/* In .prepare and .finalize of a connection while the thread runs. */
int offer_to_flusher (nbdkit_next *next);
void withdraw_from_flusher (nbdkit_next *next);

#endif /* BACKUPACCESS_FILTER_FLUSHER_H */
