/* SPDX-License-Identifier: BSD-3-Clause */
/* ba_regions: a sorted set of disjoint byte ranges. */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "regions.h"

void
ba_regions_init (struct ba_regions *set)
{
  set->r = NULL;
  set->n = set->cap = 0;
}

void
ba_regions_free (struct ba_regions *set)
{
  free (set->r);
  ba_regions_init (set);
}

void
ba_regions_clear (struct ba_regions *set)
{
  set->n = 0;
}

int
ba_regions_room_for_one (struct ba_regions *set)
{
  if (set->n == set->cap) {
    size_t cap = set->cap ? set->cap * 2 : 16;
    struct ba_range *r = realloc (set->r, cap * sizeof *r);
    if (r == NULL)
      return -1;
    set->r = r;
    set->cap = cap;
  }
  return 0;
}

int
ba_regions_append (struct ba_regions *set, uint64_t start, uint64_t end)
{
  if (start > end) {
    errno = EINVAL;
    return -1;
  }
  if (start == end)
    return 0;
  if (set->n > 0) {
    struct ba_range *last = &set->r[set->n - 1];
    if (start < last->start) {
      errno = EINVAL;
      return -1;
    }
    if (start <= last->end) {
      if (end > last->end)
        last->end = end;
      return 0;
    }
  }
  if (ba_regions_room_for_one (set) == -1)
    return -1;
  set->r[set->n].start = start;
  set->r[set->n].end = end;
  set->n++;
  return 0;
}

uint64_t
ba_regions_total (const struct ba_regions *set)
{
  uint64_t total = 0;

  for (size_t i = 0; i < set->n; i++)
    total += set->r[i].end - set->r[i].start;
  return total;
}

size_t
ba_regions_find (const struct ba_regions *set, uint64_t offset)
{
  size_t lo = 0, hi = set->n;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    if (set->r[mid].end > offset)
      hi = mid;
    else
      lo = mid + 1;
  }
  return lo;
}

bool
ba_regions_contains (const struct ba_regions *set,
                     uint64_t start, uint64_t end)
{
  size_t i;

  if (start >= end)
    return true;
  i = ba_regions_find (set, start);
  return i < set->n && set->r[i].start <= start && end <= set->r[i].end;
}

uint64_t
ba_regions_overlap (const struct ba_regions *set,
                    uint64_t start, uint64_t end)
{
  uint64_t total = 0;

  for (size_t i = ba_regions_find (set, start);
       i < set->n && set->r[i].start < end; i++) {
    uint64_t s = set->r[i].start > start ? set->r[i].start : start;
    uint64_t e = set->r[i].end < end ? set->r[i].end : end;
    total += e - s;
  }
  return total;
}

uint64_t
ba_trim_piece (uint64_t start, uint64_t end, uint64_t cluster_size,
               uint64_t max_len)
{
  uint64_t len = end - start;

  if (len <= max_len)
    return len;
  /* Largest multiple of the cluster size that fits. */
  return max_len - max_len % cluster_size;
}

int
ba_regions_clean_clusters (const struct ba_regions *dirty, uint64_t disk_size,
                           uint64_t cluster_size, struct ba_regions *out)
{
  uint64_t prev_end = 0;

  for (size_t i = 0; i <= dirty->n; i++) {
    uint64_t next = i < dirty->n ? dirty->r[i].start : disk_size;
    /* Inward to whole clusters; the last one may end at disk_size. */
    uint64_t start = (prev_end + cluster_size - 1) / cluster_size
      * cluster_size;
    uint64_t end = next == disk_size ? disk_size
      : next / cluster_size * cluster_size;

    if (start < end && ba_regions_append (out, start, end) == -1)
      return -1;
    if (i < dirty->n)
      prev_end = dirty->r[i].end;
  }
  return 0;
}

uint64_t
ba_regions_run (const struct ba_regions *set, uint64_t start, uint64_t end,
                bool *outside)
{
  size_t i = ba_regions_find (set, start);

  *outside = i == set->n || set->r[i].start > start;
  if (*outside)
    return i == set->n || set->r[i].start > end ? end : set->r[i].start;
  return set->r[i].end < end ? set->r[i].end : end;
}

uint64_t
ba_regions_alignment (const struct ba_regions *set, uint64_t disk_size,
                      uint64_t cap)
{
  uint64_t bits = cap;          /* every boundary ORed: its lowest bit */

  for (size_t i = 0; i < set->n; i++) {
    bits |= set->r[i].start;
    if (set->r[i].end != disk_size)
      bits |= set->r[i].end;
  }
  return bits & -bits;
}

int
ba_regions_insert (struct ba_regions *set, uint64_t start, uint64_t end)
{
  size_t i, j;

  if (start > end) {
    errno = EINVAL;
    return -1;
  }
  if (start == end)
    return 0;
  /* Ranges [i, j) touch [start, end) and are merged into it. */
  i = ba_regions_find (set, start);
  if (i > 0 && set->r[i - 1].end == start)
    i--;
  for (j = i; j < set->n && set->r[j].start <= end; j++) {
    if (set->r[j].start < start) start = set->r[j].start;
    if (set->r[j].end > end) end = set->r[j].end;
  }
  if (i == j) {
    if (ba_regions_room_for_one (set) == -1)
      return -1;
    memmove (&set->r[i + 1], &set->r[i], (set->n - i) * sizeof *set->r);
    set->n++;
  }
  else if (j > i + 1) {
    memmove (&set->r[i + 1], &set->r[j], (set->n - j) * sizeof *set->r);
    set->n -= j - i - 1;
  }
  set->r[i].start = start;
  set->r[i].end = end;
  return 0;
}

int
ba_regions_check_size (const struct ba_regions *dirty, uint64_t disk_size,
                       char *errbuf, size_t errlen)
{
  if (dirty->n > 0 && dirty->r[dirty->n - 1].end > disk_size) {
    snprintf (errbuf, errlen,
              "dirty region [%" PRIu64 ", %" PRIu64 ") ends past the end "
              "of the disk (size %" PRIu64 ")",
              dirty->r[dirty->n - 1].start, dirty->r[dirty->n - 1].end,
              disk_size);
    errno = EINVAL;
    return -1;
  }
  return 0;
}
