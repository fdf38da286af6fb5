/* SPDX-License-Identifier: BSD-3-Clause */
/* Sets of byte ranges (the dirty regions, the clusters to trim).
 * Not thread-safe: callers hold their own lock.
 */
#ifndef BACKUPACCESS_REGIONS_H
#define BACKUPACCESS_REGIONS_H

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

/* The end of the run starting at start (at most end) that is all
 * outside the set (*outside true) or all inside it.
 */
uint64_t ba_regions_run (const struct ba_regions *set, uint64_t start,
                         uint64_t end, bool *outside);

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

/* The largest power of two, at most cap (a power of two), that divides
 * the start and the end of every range, except an end at disk_size:
 * aligned requests of that size lie each wholly inside or wholly
 * outside the set.  An empty set gives cap.
 */
uint64_t ba_regions_alignment (const struct ba_regions *set,
                               uint64_t disk_size, uint64_t cap);

/* Checks that every region ends at or before disk_size. */
int ba_regions_check_size (const struct ba_regions *dirty, uint64_t disk_size,
                           char *errbuf, size_t errlen);

/* Splits a trim range into requests of at most max_len bytes each,
 * every piece but the last a multiple of cluster_size.  Returns the
 * length of the first piece.
 */
uint64_t ba_trim_piece (uint64_t start, uint64_t end, uint64_t cluster_size,
                        uint64_t max_len);

#endif /* BACKUPACCESS_REGIONS_H */
