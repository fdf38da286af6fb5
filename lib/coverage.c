/* SPDX-License-Identifier: BSD-3-Clause */
/* ba_coverage: which bytes have been consumed, and which clusters are
 * complete and may be discarded.  This file is the discard rule.
 *
 * Memory: one bit per discarded cluster, in 4 KiB pages allocated on
 * first use (2 MiB per TiB at 64 KiB clusters when everything has been
 * discarded), plus an entry for each cluster that is only partly
 * consumed, which holds the consumed byte ranges of that cluster.
 * Whole-cluster reads never create such entries.  The entries are
 * limited to a budget (1/16 byte per cluster, at least 1 MiB: 1 MiB per
 * TiB at 64 KiB clusters): past it, partial consumption of further
 * clusters is not recorded, so those clusters are not discarded by
 * reads.  That costs fleecing space, never data, and keeps the memory
 * bounded whatever the clients do.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "coverage.h"

#define PAGE_WORDS UINT64_C (512)       /* 4 KiB of bitmap */
#define PAGE_BITS (PAGE_WORDS * 64)

/* Consumed bytes of one partly consumed cluster, relative to its start. */
struct partial {
  uint64_t key;                 /* cluster index + 1; 0 = empty slot */
  uint32_t n, cap;
  struct { uint32_t start, end; } *iv;   /* sorted, disjoint, not adjacent */
};

struct ba_coverage {
  uint64_t disk_size;
  uint64_t cluster_size;
  unsigned cluster_bits;
  uint64_t nclusters;
  const struct ba_regions *dirty;       /* NULL = whole disk */

  uint64_t **pages;                     /* discarded-cluster bitmap */
  uint64_t npages, pages_allocated;

  struct partial *table;                /* open addressing, linear probing */
  uint64_t table_size, table_used;      /* size is a power of two */
  uint64_t partial_heap;
  uint64_t partial_budget;              /* bytes for table + heap */
  uint64_t untracked_bytes;             /* consumed but over budget */

  uint64_t readable_total, readable_left, clusters_discarded;
};

struct ba_coverage *
ba_coverage_new (uint64_t disk_size, uint64_t cluster_size,
                 const struct ba_regions *dirty)
{
  struct ba_coverage *cov;

  /* Partial ranges are stored relative to the cluster in 32 bits. */
  if (cluster_size == 0 || (cluster_size & (cluster_size - 1)) != 0 ||
      cluster_size > (UINT64_C (1) << 30)) {
    errno = EINVAL;
    return NULL;
  }
  cov = calloc (1, sizeof *cov);
  if (cov == NULL)
    return NULL;
  cov->disk_size = disk_size;
  cov->cluster_size = cluster_size;
  while ((UINT64_C (1) << cov->cluster_bits) < cluster_size)
    cov->cluster_bits++;
  cov->nclusters = (disk_size >> cov->cluster_bits)
    + ((disk_size & (cluster_size - 1)) != 0);
  cov->dirty = dirty;
  cov->npages = (cov->nclusters + PAGE_BITS - 1) / PAGE_BITS;
  cov->pages = calloc (cov->npages ? cov->npages : 1, sizeof *cov->pages);
  if (cov->pages == NULL) {
    free (cov);
    return NULL;
  }
  cov->readable_total =
    dirty ? ba_regions_overlap (dirty, 0, disk_size) : disk_size;
  cov->readable_left = cov->readable_total;
  cov->partial_budget = cov->nclusters / 16;
  if (cov->partial_budget < (UINT64_C (1) << 20))
    cov->partial_budget = UINT64_C (1) << 20;
  return cov;
}

void
ba_coverage_free (struct ba_coverage *cov)
{
  if (cov == NULL)
    return;
  for (uint64_t i = 0; i < cov->npages; i++)
    free (cov->pages[i]);
  free (cov->pages);
  for (uint64_t i = 0; i < cov->table_size; i++)
    free (cov->table[i].iv);
  free (cov->table);
  free (cov);
}

/* The discarded-cluster bitmap. */

static bool
is_discarded (const struct ba_coverage *cov, uint64_t c)
{
  const uint64_t *page = cov->pages[c / PAGE_BITS];

  if (page == NULL)
    return false;
  c %= PAGE_BITS;
  return (page[c / 64] >> (c % 64)) & 1;
}

static int
set_discarded (struct ba_coverage *cov, uint64_t c)
{
  uint64_t **page = &cov->pages[c / PAGE_BITS];

  if (*page == NULL) {
    *page = calloc (PAGE_WORDS, sizeof (uint64_t));
    if (*page == NULL)
      return -1;
    cov->pages_allocated++;
  }
  c %= PAGE_BITS;
  (*page)[c / 64] |= UINT64_C (1) << (c % 64);
  return 0;
}

/* First cluster in [c, limit) whose discarded bit equals want; limit if
 * none.  Scans a word (or an unallocated page) at a time.
 */
static uint64_t
find_cluster (const struct ba_coverage *cov, uint64_t c, uint64_t limit,
              bool want)
{
  while (c < limit) {
    const uint64_t *page = cov->pages[c / PAGE_BITS];
    uint64_t word;
    unsigned bit;

    if (page == NULL) {
      if (!want)
        return c;
      c = (c / PAGE_BITS + 1) * PAGE_BITS;
      continue;
    }
    bit = c % 64;
    word = page[(c % PAGE_BITS) / 64];
    if (!want)
      word = ~word;
    word >>= bit;
    if (word != 0) {
      c += __builtin_ctzll (word);
      return c < limit ? c : limit;
    }
    c += 64 - bit;
  }
  return limit;
}

/* The table of partly consumed clusters. */

static uint64_t
hash (uint64_t key)
{
  key ^= key >> 33;
  key *= UINT64_C (0xff51afd7ed558ccd);
  key ^= key >> 33;
  return key;
}

static struct partial *
lookup (const struct ba_coverage *cov, uint64_t c)
{
  uint64_t mask = cov->table_size - 1;

  if (cov->table_used == 0)
    return NULL;
  for (uint64_t i = hash (c + 1) & mask;; i = (i + 1) & mask) {
    if (cov->table[i].key == c + 1)
      return &cov->table[i];
    if (cov->table[i].key == 0)
      return NULL;
  }
}

static int
grow_table (struct ba_coverage *cov)
{
  uint64_t size = cov->table_size ? cov->table_size * 2 : 64;
  struct partial *table;

  if (size * sizeof *table + cov->partial_heap > cov->partial_budget)
    return -1;
  table = calloc (size, sizeof *table);
  if (table == NULL)
    return -1;
  for (uint64_t i = 0; i < cov->table_size; i++) {
    if (cov->table[i].key != 0) {
      uint64_t j = hash (cov->table[i].key) & (size - 1);
      while (table[j].key != 0)
        j = (j + 1) & (size - 1);
      table[j] = cov->table[i];
    }
  }
  free (cov->table);
  cov->table = table;
  cov->table_size = size;
  return 0;
}

static struct partial *
insert (struct ba_coverage *cov, uint64_t c)
{
  uint64_t mask, i;

  /* Keep the load factor under 1/2. */
  if ((cov->table_used + 1) * 2 > cov->table_size && grow_table (cov) == -1)
    return NULL;
  mask = cov->table_size - 1;
  for (i = hash (c + 1) & mask; cov->table[i].key != 0; i = (i + 1) & mask)
    ;
  cov->table[i].key = c + 1;
  cov->table_used++;
  return &cov->table[i];
}

/* Backward-shift deletion, so that no tombstones are needed. */
static void
remove_entry (struct ba_coverage *cov, struct partial *p)
{
  uint64_t mask = cov->table_size - 1;
  uint64_t i = p - cov->table;

  cov->partial_heap -= (uint64_t) p->cap * sizeof *p->iv;
  free (p->iv);
  memset (p, 0, sizeof *p);
  cov->table_used--;
  for (uint64_t j = (i + 1) & mask; cov->table[j].key != 0;
       j = (j + 1) & mask) {
    uint64_t home = hash (cov->table[j].key) & mask;
    /* Move entry j into the hole at i unless its home lies in (i, j]. */
    if ((j > i && (home <= i || home > j)) ||
        (j < i && (home <= i && home > j))) {
      cov->table[i] = cov->table[j];
      memset (&cov->table[j], 0, sizeof cov->table[j]);
      i = j;
    }
  }
}

/* Adds [s, e) to a partial cluster's ranges.  Returns the number of
 * consumed bytes now in the cluster, or -1 when over budget or out of
 * memory.
 */
static int64_t
partial_add (struct ba_coverage *cov, struct partial *p,
             uint32_t s, uint32_t e)
{
  uint32_t i = 0, j, n = p->n;
  int64_t sum = 0;

  /* Ranges [i, j) touch [s, e) and are merged into it. */
  while (i < n && p->iv[i].end < s)
    i++;
  for (j = i; j < n && p->iv[j].start <= e; j++) {
    if (p->iv[j].start < s) s = p->iv[j].start;
    if (p->iv[j].end > e) e = p->iv[j].end;
  }
  if (i == j) {                 /* insert a new range at i */
    if (n == p->cap) {
      uint32_t cap = p->cap ? p->cap * 2 : 2;
      uint64_t more = (uint64_t) (cap - p->cap) * sizeof *p->iv;
      void *iv;
      if (cov->table_size * sizeof *cov->table + cov->partial_heap + more
          > cov->partial_budget)
        return -1;
      iv = realloc (p->iv, cap * sizeof *p->iv);
      if (iv == NULL)
        return -1;
      cov->partial_heap += (uint64_t) (cap - p->cap) * sizeof *p->iv;
      p->iv = iv;
      p->cap = cap;
    }
    memmove (&p->iv[i + 1], &p->iv[i], (n - i) * sizeof *p->iv);
    p->n = ++n;
  }
  else if (j > i + 1) {         /* ranges i+1 .. j-1 are absorbed */
    memmove (&p->iv[i + 1], &p->iv[j], (n - j) * sizeof *p->iv);
    p->n = n = n - (j - i - 1);
  }
  p->iv[i].start = s;
  p->iv[i].end = e;
  for (i = 0; i < n; i++)
    sum += p->iv[i].end - p->iv[i].start;
  return sum;
}

static uint64_t
cluster_end (const struct ba_coverage *cov, uint64_t c)
{
  uint64_t end = (c + 1) << cov->cluster_bits;
  return end < cov->disk_size ? end : cov->disk_size;
}

static uint64_t
readable_bytes (const struct ba_coverage *cov, uint64_t c)
{
  uint64_t start = c << cov->cluster_bits;

  if (cov->dirty == NULL)
    return cluster_end (cov, c) - start;
  return ba_regions_overlap (cov->dirty, start, cluster_end (cov, c));
}

static int
complete (struct ba_coverage *cov, uint64_t c, uint64_t readable,
          struct ba_regions *trims)
{
  if (set_discarded (cov, c) == -1)
    return -1;
  if (ba_regions_append (trims, c << cov->cluster_bits,
                         cluster_end (cov, c)) == -1) {
    /* Not trimmed, but it is complete: keep it discarded, nothing lost. */
    return -1;
  }
  cov->readable_left -= readable;
  cov->clusters_discarded++;
  return 0;
}

/* Consumes [a, b), which lies inside the dirty set. */
static int
consume_dirty (struct ba_coverage *cov, uint64_t a, uint64_t b,
               struct ba_regions *trims)
{
  for (uint64_t c = a >> cov->cluster_bits; c << cov->cluster_bits < b; c++) {
    uint64_t c0 = c << cov->cluster_bits, c1 = cluster_end (cov, c);
    uint64_t s = a > c0 ? a : c0, e = b < c1 ? b : c1;
    struct partial *p;
    uint64_t readable;
    int64_t sum;

    if (is_discarded (cov, c))
      continue;
    p = lookup (cov, c);
    if (s == c0 && e == c1) {   /* the whole cluster, all of it dirty */
      if (p)
        remove_entry (cov, p);
      if (complete (cov, c, c1 - c0, trims) == -1)
        return -1;
      continue;
    }
    readable = readable_bytes (cov, c);
    if (p == NULL) {
      if (e - s == readable) {
        if (complete (cov, c, readable, trims) == -1)
          return -1;
        continue;
      }
      p = insert (cov, c);
      if (p == NULL) {          /* over budget: not recorded */
        cov->untracked_bytes += e - s;
        continue;
      }
    }
    sum = partial_add (cov, p, s - c0, e - c0);
    if (sum == -1) {            /* over budget: forget this cluster */
      for (uint32_t i = 0; i < p->n; i++)
        cov->untracked_bytes += p->iv[i].end - p->iv[i].start;
      cov->untracked_bytes += e - s;
      remove_entry (cov, p);
      continue;
    }
    if ((uint64_t) sum == readable) {
      remove_entry (cov, p);
      if (complete (cov, c, readable, trims) == -1)
        return -1;
    }
  }
  return 0;
}

int
ba_coverage_consume (struct ba_coverage *cov, uint64_t start, uint64_t end,
                     struct ba_regions *trims)
{
  if (end > cov->disk_size)
    end = cov->disk_size;
  if (start >= end)
    return 0;
  if (cov->dirty == NULL)
    return consume_dirty (cov, start, end, trims);
  for (size_t i = ba_regions_find (cov->dirty, start);
       i < cov->dirty->n && cov->dirty->r[i].start < end; i++) {
    uint64_t s = cov->dirty->r[i].start > start ? cov->dirty->r[i].start : start;
    uint64_t e = cov->dirty->r[i].end < end ? cov->dirty->r[i].end : end;
    if (consume_dirty (cov, s, e, trims) == -1)
      return -1;
  }
  return 0;
}

bool
ba_coverage_readable (const struct ba_coverage *cov,
                      uint64_t start, uint64_t end,
                      struct ba_range *bad, bool *discarded)
{
  uint64_t c, limit;

  if (start >= end)
    return true;
  if (end > cov->disk_size) {
    bad->start = start > cov->disk_size ? start : cov->disk_size;
    bad->end = end;
    *discarded = false;
    return false;
  }
  if (cov->dirty != NULL && !ba_regions_contains (cov->dirty, start, end)) {
    const struct ba_regions *d = cov->dirty;
    size_t i = ba_regions_find (d, start);
    if (i < d->n && d->r[i].start <= start) {       /* clean after r[i] */
      bad->start = d->r[i].end;
      i++;
    }
    else
      bad->start = start;
    bad->end = i < d->n && d->r[i].start < end ? d->r[i].start : end;
    *discarded = false;
    /* A discarded cluster in the dirty bytes before it comes first. */
    if (bad->start > start) {
      struct ba_range first;
      bool d2;
      if (!ba_coverage_readable (cov, start, bad->start, &first, &d2)) {
        *bad = first;
        *discarded = d2;
      }
    }
    return false;
  }
  limit = ((end - 1) >> cov->cluster_bits) + 1;
  c = find_cluster (cov, start >> cov->cluster_bits, limit, true);
  if (c == limit)
    return true;
  bad->start = c << cov->cluster_bits;
  if (bad->start < start)
    bad->start = start;
  c = find_cluster (cov, c, limit, false);
  bad->end = c << cov->cluster_bits;
  if (bad->end > end)
    bad->end = end;
  *discarded = true;
  return false;
}

uint64_t
ba_coverage_run (const struct ba_coverage *cov,
                 uint64_t offset, uint64_t end, bool *readable)
{
  uint64_t dirty_end = end, c, limit, run_end;

  if (end > cov->disk_size)
    end = dirty_end = cov->disk_size;
  if (offset >= end) {
    *readable = false;
    return 0;
  }
  if (cov->dirty != NULL) {
    const struct ba_regions *d = cov->dirty;
    size_t i = ba_regions_find (d, offset);
    if (i == d->n || d->r[i].start > offset) {      /* clean */
      *readable = false;
      return (i < d->n && d->r[i].start < end ? d->r[i].start : end) - offset;
    }
    if (d->r[i].end < end)
      dirty_end = d->r[i].end;
  }
  c = offset >> cov->cluster_bits;
  limit = ((dirty_end - 1) >> cov->cluster_bits) + 1;
  *readable = !is_discarded (cov, c);
  run_end = find_cluster (cov, c, limit, *readable) << cov->cluster_bits;
  if (run_end > dirty_end)
    run_end = dirty_end;
  return run_end - offset;
}

void
ba_coverage_set_partial_budget (struct ba_coverage *cov, uint64_t bytes)
{
  cov->partial_budget = bytes;
}

void
ba_coverage_get_stats (const struct ba_coverage *cov,
                       struct ba_coverage_stats *stats)
{
  stats->readable_total = cov->readable_total;
  stats->readable_left = cov->readable_left;
  stats->clusters_discarded = cov->clusters_discarded;
  stats->partial_clusters = cov->table_used;
  stats->untracked_bytes = cov->untracked_bytes;
  stats->memory_bytes = sizeof *cov
    + cov->npages * sizeof *cov->pages
    + cov->pages_allocated * PAGE_WORDS * sizeof (uint64_t)
    + cov->table_size * sizeof *cov->table
    + cov->partial_heap;
}
