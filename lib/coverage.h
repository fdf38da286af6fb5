/* SPDX-License-Identifier: BSD-3-Clause */
/* The discard rule: which bytes have been consumed (read or trimmed by
 * the client), and which clusters are therefore complete and may be
 * discarded upstream.  Not thread-safe: callers hold their own lock.
 */
#ifndef BACKUPACCESS_COVERAGE_H
#define BACKUPACCESS_COVERAGE_H

#include <stdbool.h>
#include <stdint.h>
#include "regions.h"

/* Coverage tracking: the discard rule.
 *
 * The disk is cut into clusters of cluster_size bytes (a power of two;
 * the last one may be shorter).  The readable bytes of a cluster are its
 * bytes inside the dirty set.  Bytes become "consumed" when a read of
 * them succeeded or the client trimmed them.  Once every readable byte of
 * a cluster is consumed the cluster is complete: it is marked discarded
 * and returned to the caller as a range to trim upstream.  A cluster with
 * no readable bytes is never discarded.  Discarded clusters are no
 * longer readable.
 *
 * Memory is bounded: clusters that are only partly consumed are
 * recorded within a budget (default 1/16 byte per cluster, at least
 * 1 MiB).  Past it, partial consumption of further clusters is dropped
 * (counted in untracked_bytes): they are then not discarded by reads,
 * which costs fleecing space but never data.
 */
struct ba_coverage;

/* cluster_size: a power of two up to 1 GiB, else NULL with EINVAL.
 * dirty == NULL means the whole disk is dirty (full backup).  The set
 * is not copied; it must outlive the tracker and not change.
 */
struct ba_coverage *ba_coverage_new (uint64_t disk_size, uint64_t cluster_size,
                                     const struct ba_regions *dirty);
void ba_coverage_free (struct ba_coverage *cov);

/* Is [start, end) readable, i.e. dirty and in no discarded cluster?
 * Returns true, or false and sets *bad to the first offending sub-range
 * and *discarded to whether it is unreadable because it was discarded
 * (else it is clean).
 */
bool ba_coverage_readable (const struct ba_coverage *cov,
                           uint64_t start, uint64_t end,
                           struct ba_range *bad, bool *discarded);

/* Mark [start, end) consumed.  Parts outside the dirty set and parts in
 * already discarded clusters are ignored.  The clusters this completes
 * are appended to *trims as cluster-aligned ranges (the last cluster of
 * the disk ends at disk_size), adjacent ones merged.  Returns 0, or -1
 * with errno = ENOMEM when a completed cluster could not be recorded
 * (the ranges already in *trims must still be trimmed).
 */
int ba_coverage_consume (struct ba_coverage *cov, uint64_t start, uint64_t end,
                         struct ba_regions *trims);

/* Length of the run starting at offset (and ending at or before end)
 * that is all readable or all unreadable; *readable says which.
 */
uint64_t ba_coverage_run (const struct ba_coverage *cov,
                          uint64_t offset, uint64_t end, bool *readable);

/* Changes the memory budget for partly consumed clusters (bytes). */
void ba_coverage_set_partial_budget (struct ba_coverage *cov, uint64_t bytes);

/* Figures for the summary and the benchmarks. */
struct ba_coverage_stats {
  uint64_t readable_total;    /* dirty bytes at the start */
  uint64_t readable_left;     /* dirty bytes in clusters not yet discarded */
  uint64_t clusters_discarded;
  uint64_t partial_clusters;  /* clusters with some bytes consumed */
  uint64_t untracked_bytes;   /* consumed bytes dropped by the budget */
  uint64_t memory_bytes;      /* heap used by the tracker */
};
void ba_coverage_get_stats (const struct ba_coverage *cov,
                            struct ba_coverage_stats *stats);

#endif /* BACKUPACCESS_COVERAGE_H */
