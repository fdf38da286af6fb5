/* nbdkit-backupaccess: logic shared by the filter, the plugin and the helper.
 *
 * Four pieces, all independent of nbdkit so that they can be unit-tested:
 *  - ba_regions: a sorted set of disjoint byte ranges (the dirty regions);
 *  - ba_map_parse: the map file parser (nbdinfo --map output, or plain
 *    "offset length" lines);
 *  - ba_coverage: which bytes have been consumed (read or trimmed by the
 *    client), and which clusters are therefore complete and may be
 *    discarded upstream.  This is the discard rule;
 *  - ba_discard_queue: when the clusters so completed are trimmed
 *    (batched into fewer trims, and an optional lag of recent ones).
 *
 * None of this is thread-safe: callers hold their own lock.
 */
#ifndef BACKUPACCESS_H
#define BACKUPACCESS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A half-open byte range [start, end). */
struct ba_range {
  uint64_t start;
  uint64_t end;
};

/* A growable array of ranges.  In a ba_regions set the ranges are sorted,
 * disjoint and never adjacent (adjacent ranges are merged).
 */
struct ba_regions {
  struct ba_range *r;
  size_t n;
  size_t cap;
};

void ba_regions_init (struct ba_regions *set);
void ba_regions_free (struct ba_regions *set);
void ba_regions_clear (struct ba_regions *set);

/* Append [start, end) to a set whose last range starts at or before
 * start: merges with the last range when they touch or overlap.
 * Returns 0, or -1 with errno = EINVAL (start > end or out of order)
 * or ENOMEM.  Empty ranges are ignored.
 */
int ba_regions_append (struct ba_regions *set, uint64_t start, uint64_t end);

/* Adds [start, end) anywhere in the set, merging with the ranges it
 * overlaps or touches.  Returns 0, or -1 with errno = EINVAL or ENOMEM.
 */
int ba_regions_insert (struct ba_regions *set, uint64_t start, uint64_t end);

/* Makes room for one more range in set->r (for arrays of ranges kept
 * in another order, such as the discard queue's lag).  Returns 0, or -1
 * with errno = ENOMEM.
 */
int ba_regions_room_for_one (struct ba_regions *set);

/* Total number of bytes in the set. */
uint64_t ba_regions_total (const struct ba_regions *set);

/* Index of the first range whose end is > offset (set->n if none). */
size_t ba_regions_find (const struct ba_regions *set, uint64_t offset);

/* True if [start, end) lies entirely inside one range of the set. */
bool ba_regions_contains (const struct ba_regions *set,
                          uint64_t start, uint64_t end);

/* Number of bytes of [start, end) that are inside the set. */
uint64_t ba_regions_overlap (const struct ba_regions *set,
                             uint64_t start, uint64_t end);

/* Appends to *out the whole clusters that hold no byte of dirty
 * (which must end at or before disk_size), merged; the last cluster of
 * the disk may be shorter.  Returns 0, or -1 with errno = ENOMEM.
 */
int ba_regions_clean_clusters (const struct ba_regions *dirty,
                               uint64_t disk_size, uint64_t cluster_size,
                               struct ba_regions *out);

/* Map files.
 *
 * Accepted forms, one region per line, '#' comments and blank lines
 * ignored; a file must use one form only:
 *   - "OFFSET LENGTH": a dirty region (plain form);
 *   - "OFFSET LENGTH TYPE [DESCRIPTION]": a line of
 *     "nbdinfo --map=qemu:dirty-bitmap:NAME", dirty when bit 0 of TYPE is
 *     set; DESCRIPTION, when present, must be "dirty" or "clean".
 * Numbers are unsigned decimal.  Lines must be sorted by offset.
 * Overlapping or adjacent dirty regions are merged; a dirty line that
 * overlaps a clean line is an error.
 *
 * On success returns 0 and fills *dirty (which must be initialised).
 * On error returns -1, leaves *dirty empty and writes a message naming
 * the line into errbuf.
 */
int ba_map_parse (const char *text, size_t len, struct ba_regions *dirty,
                  char *errbuf, size_t errlen);
int ba_map_parse_file (const char *path, struct ba_regions *dirty,
                       char *errbuf, size_t errlen);

/* Connects with libnbd to an export named by uri, or by a unix socket
 * path and an export name, asking for meta_context (may be NULL).
 * Returns the handle, or NULL with a message in errbuf.
 */
struct nbd_handle;
struct nbd_handle *ba_nbd_connect (const char *uri, const char *socket,
                                   const char *export,
                                   const char *meta_context,
                                   char *errbuf, size_t errlen);

/* Reads the dirty regions of the meta context qemu:dirty-bitmap:BITMAP
 * of an NBD export (QEMU's block-export-add ... bitmaps) into *dirty,
 * and the export's size into *size.  The export is named by uri, or by
 * a unix socket path and an export name.  Pages through the disk; asks
 * for no other context.  With bitmap == NULL only the size is read.
 * Returns 0, or -1 with a message in errbuf.
 */
int ba_bitmap_fetch (const char *uri, const char *socket, const char *export,
                     const char *bitmap, struct ba_regions *dirty,
                     uint64_t *size, char *errbuf, size_t errlen);

/* Checks that every region ends at or before disk_size. */
int ba_regions_check_size (const struct ba_regions *dirty, uint64_t disk_size,
                           char *errbuf, size_t errlen);

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

/* Splits a trim range into requests of at most max_len bytes each,
 * every piece but the last a multiple of cluster_size.  Returns the
 * length of the first piece.
 */
uint64_t ba_trim_piece (uint64_t start, uint64_t end, uint64_t cluster_size,
                        uint64_t max_len);

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

#endif /* BACKUPACCESS_H */
