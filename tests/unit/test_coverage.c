/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the coverage tracker (the discard rule), including a
 * randomized comparison with a trivially correct byte-level model.
 */
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "coverage.h"
#include "regions.h"

#define C 4096                  /* cluster size of the fixed cases */

/* Consumes [start, end) into a cleared *trims. */
static void
consume (struct ba_coverage *cov, uint64_t start, uint64_t end,
         struct ba_regions *trims)
{
  ba_regions_clear (trims);
  assert_int_equal (ba_coverage_consume (cov, start, end, trims), 0);
}

/* Asserts that trims holds exactly the n ranges in want. */
static void
check_trims (const struct ba_regions *trims,
             const struct ba_range *want, size_t n)
{
  if (trims->n != n)
    fail_msg ("%zu trim ranges, expected %zu (first [%" PRIu64 ", %" PRIu64
              "))", trims->n, n, trims->n ? trims->r[0].start : 0,
              trims->n ? trims->r[0].end : 0);
  for (size_t i = 0; i < n; i++) {
    assert_int_equal (trims->r[i].start, want[i].start);
    assert_int_equal (trims->r[i].end, want[i].end);
  }
}

#define TRIMS(...) \
  check_trims (&trims, (const struct ba_range[]) { __VA_ARGS__ }, \
               sizeof ((const struct ba_range[]) { __VA_ARGS__ }) \
               / sizeof (struct ba_range))
#define NO_TRIMS() check_trims (&trims, NULL, 0)

static struct ba_coverage_stats
stats_of (const struct ba_coverage *cov)
{
  struct ba_coverage_stats st;

  ba_coverage_get_stats (cov, &st);
  return st;
}

static void
test_new (void **state)
{
  struct ba_coverage *cov;
  struct ba_regions trims;

  errno = 0;
  assert_null (ba_coverage_new (C, 0, NULL));
  assert_int_equal (errno, EINVAL);
  errno = 0;
  assert_null (ba_coverage_new (C, 3000, NULL));   /* not a power of 2 */
  assert_int_equal (errno, EINVAL);

  /* An empty disk: nothing to read, nothing to trim. */
  ba_regions_init (&trims);
  cov = ba_coverage_new (0, C, NULL);
  assert_non_null (cov);
  consume (cov, 0, C, &trims);
  NO_TRIMS ();
  assert_int_equal (stats_of (cov).readable_total, 0);
  ba_coverage_free (cov);
  ba_coverage_free (NULL);
  ba_regions_free (&trims);
}

static void
test_whole_clusters (void **state)
{
  struct ba_coverage *cov = ba_coverage_new (4 * C, C, NULL);
  struct ba_regions trims;
  struct ba_coverage_stats st;

  assert_non_null (cov);
  ba_regions_init (&trims);
  consume (cov, C, 2 * C, &trims);
  TRIMS ({ C, 2 * C });
  st = stats_of (cov);
  assert_int_equal (st.clusters_discarded, 1);
  assert_int_equal (st.readable_left, 3 * C);
  assert_int_equal (st.partial_clusters, 0);

  /* The already discarded cluster is skipped, the others merged. */
  consume (cov, 0, 4 * C, &trims);
  TRIMS ({ 0, C }, { 2 * C, 4 * C });
  consume (cov, 0, 4 * C, &trims);
  NO_TRIMS ();
  st = stats_of (cov);
  assert_int_equal (st.clusters_discarded, 4);
  assert_int_equal (st.readable_left, 0);
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* Partial reads: the cluster completes with its last byte, whatever
 * the order of the reads and however much they overlap.
 */
static void
test_partial_any_order (void **state)
{
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (2 * C, C, NULL);
  /* Pieces of cluster 1, all overlapping or repeated except the last. */
  static const uint64_t pieces[][2] = {
    { 100, 200 }, { 3000, C }, { 0, 50 }, { 0, 50 }, { 40, 150 },
    { 2000, 3500 }, { 150, 1000 }, { 1999, 2001 }, { 990, 1500 },
    { 1500, 1999 },
  };
  size_t n = sizeof pieces / sizeof pieces[0];

  assert_non_null (cov);
  ba_regions_init (&trims);
  for (size_t i = 0; i < n; i++) {
    consume (cov, C + pieces[i][0], C + pieces[i][1], &trims);
    if (i < n - 1) {
      NO_TRIMS ();
      assert_int_equal (stats_of (cov).partial_clusters, 1);
      assert_int_equal (stats_of (cov).readable_left, 2 * C);
    }
  }
  TRIMS ({ C, 2 * C });
  assert_int_equal (stats_of (cov).partial_clusters, 0);
  assert_int_equal (stats_of (cov).readable_left, C);

  /* Byte by byte, backwards. */
  for (uint64_t b = C; b-- > 0;) {
    consume (cov, b, b + 1, &trims);
    if (b > 0)
      NO_TRIMS ();
  }
  TRIMS ({ 0, C });
  assert_int_equal (stats_of (cov).readable_left, 0);
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* Sequential small reads keep one merged range per cluster: memory must
 * not grow with the number of reads.
 */
static void
test_partial_memory (void **state)
{
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (2 * C, C, NULL);
  uint64_t base;

  assert_non_null (cov);
  ba_regions_init (&trims);
  consume (cov, 0, 1, &trims);
  consume (cov, 2 * C - 1, 2 * C, &trims);
  base = stats_of (cov).memory_bytes;
  for (uint64_t b = 1; b < C - 1; b++)
    consume (cov, b, b + 1, &trims);
  for (uint64_t b = 2 * C - 1; b-- > C + 1;)
    consume (cov, b, b + 1, &trims);
  NO_TRIMS ();
  assert_int_equal (stats_of (cov).partial_clusters, 2);
  assert_true (stats_of (cov).memory_bytes <= base + 64);
  consume (cov, C - 1, C + 1, &trims);
  TRIMS ({ 0, 2 * C });
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* Reads crossing cluster boundaries complete each cluster separately. */
static void
test_crossing (void **state)
{
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (3 * C, C, NULL);

  assert_non_null (cov);
  ba_regions_init (&trims);
  consume (cov, C - 100, 2 * C + 100, &trims);   /* completes cluster 1 */
  TRIMS ({ C, 2 * C });
  assert_int_equal (stats_of (cov).partial_clusters, 2);
  consume (cov, 100, C - 50, &trims);
  NO_TRIMS ();
  consume (cov, 2 * C + 50, 3 * C, &trims);
  TRIMS ({ 2 * C, 3 * C });
  consume (cov, 0, 3 * C, &trims);
  TRIMS ({ 0, C });
  assert_int_equal (stats_of (cov).partial_clusters, 0);
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* The last cluster is short: its trim ends at the disk size. */
static void
test_tail_cluster (void **state)
{
  const uint64_t size = 3 * C + 1000;
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (size, C, NULL);

  assert_non_null (cov);
  ba_regions_init (&trims);
  consume (cov, 3 * C + 500, size, &trims);
  NO_TRIMS ();
  consume (cov, 3 * C, 3 * C + 500, &trims);
  TRIMS ({ 3 * C, size });
  consume (cov, 0, size, &trims);
  TRIMS ({ 0, 3 * C });
  assert_int_equal (stats_of (cov).readable_left, 0);
  assert_int_equal (stats_of (cov).clusters_discarded, 4);
  ba_coverage_free (cov);

  /* In one read, and merged with the cluster before it. */
  cov = ba_coverage_new (size, C, NULL);
  consume (cov, 2 * C, size, &trims);
  TRIMS ({ 2 * C, size });
  ba_coverage_free (cov);

  /* A disk smaller than one cluster. */
  cov = ba_coverage_new (100, C, NULL);
  consume (cov, 0, 99, &trims);
  NO_TRIMS ();
  consume (cov, 99, 100, &trims);
  TRIMS ({ 0, 100 });
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* Clusters partly outside the dirty set complete when their dirty
 * bytes are consumed, and the trim is still the whole cluster.
 */
static void
test_partly_dirty (void **state)
{
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  struct ba_range bad;
  bool discarded;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  assert_int_equal (ba_regions_append (&dirty, 100, 200), 0);
  assert_int_equal (ba_regions_append (&dirty, 300, 400), 0);
  assert_int_equal (ba_regions_append (&dirty, C + C / 2, 3 * C + 10), 0);
  assert_int_equal (ba_regions_append (&dirty, 5 * C + 1, 5 * C + 2), 0);
  assert_int_equal (ba_regions_append (&dirty, 6 * C + 10, 6 * C + 500), 0);
  cov = ba_coverage_new (6 * C + 600, C, &dirty);
  assert_non_null (cov);
  assert_int_equal (stats_of (cov).readable_total,
                    200 + (3 * C + 10 - C - C / 2) + 1 + 490);

  /* Cluster 0: two dirty pieces; consuming clean bytes does nothing. */
  consume (cov, 0, 100, &trims);
  NO_TRIMS ();
  assert_int_equal (stats_of (cov).partial_clusters, 0);
  consume (cov, 150, 350, &trims);
  NO_TRIMS ();
  consume (cov, 0, 150, &trims);
  NO_TRIMS ();
  consume (cov, 350, C, &trims);
  TRIMS ({ 0, C });

  /* Clusters 1 and 3 are partly dirty, cluster 2 wholly. */
  consume (cov, C, 2 * C, &trims);
  TRIMS ({ C, 2 * C });
  consume (cov, 3 * C, 3 * C + 10, &trims);
  TRIMS ({ 3 * C, 4 * C });
  consume (cov, 2 * C, 2 * C + 1, &trims);
  NO_TRIMS ();
  consume (cov, 2 * C + 1, 3 * C, &trims);
  TRIMS ({ 2 * C, 3 * C });

  /* Cluster 4 has no dirty byte: never trimmed.  Cluster 5 has one. */
  consume (cov, 4 * C, 6 * C, &trims);
  TRIMS ({ 5 * C, 6 * C });
  assert_false (ba_coverage_readable (cov, 4 * C, 4 * C + 1,
                                      &bad, &discarded));
  assert_false (discarded);

  /* The short tail cluster, partly dirty: trimmed to the disk size. */
  consume (cov, 6 * C + 400, 6 * C + 600, &trims);
  NO_TRIMS ();
  consume (cov, 6 * C, 6 * C + 400, &trims);
  TRIMS ({ 6 * C, 6 * C + 600 });
  assert_int_equal (stats_of (cov).readable_left, 0);
  assert_int_equal (stats_of (cov).clusters_discarded, 6);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

static void
test_no_dirty (void **state)
{
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  struct ba_range bad;
  bool discarded = true;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  cov = ba_coverage_new (4 * C, C, &dirty);
  assert_non_null (cov);
  consume (cov, 0, 4 * C, &trims);
  NO_TRIMS ();
  assert_int_equal (stats_of (cov).readable_total, 0);
  assert_int_equal (stats_of (cov).clusters_discarded, 0);
  assert_false (ba_coverage_readable (cov, 0, 4 * C, &bad, &discarded));
  assert_false (discarded);
  assert_int_equal (bad.start, 0);
  assert_int_equal (bad.end, 4 * C);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

/* Clusters completed by one call come back as one merged range. */
static void
test_merge_trims (void **state)
{
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (8 * C, C, NULL);

  assert_non_null (cov);
  ba_regions_init (&trims);
  for (uint64_t c = 1; c <= 4; c++) {
    consume (cov, c * C, c * C + C / 2, &trims);
    NO_TRIMS ();
  }
  consume (cov, 6 * C, 7 * C, &trims);
  TRIMS ({ 6 * C, 7 * C });
  /* Completes 1-4, not 0 nor 5 (half read each). */
  consume (cov, C / 2, 5 * C + C / 2, &trims);
  TRIMS ({ C, 5 * C });
  consume (cov, 0, 8 * C, &trims);
  TRIMS ({ 0, C }, { 5 * C, 6 * C }, { 7 * C, 8 * C });
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

/* Many partly consumed clusters at once, completed in another order. */
static void
test_many_partial (void **state)
{
  const uint64_t n = 3000, cs = 512;
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (n * cs, cs, NULL);

  assert_non_null (cov);
  ba_regions_init (&trims);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t c = (i * 7919) % n;
    consume (cov, c * cs + 1, c * cs + cs, &trims);
    NO_TRIMS ();
  }
  assert_int_equal (stats_of (cov).partial_clusters, n);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t c = (i * 104729) % n;
    consume (cov, c * cs, c * cs + 1, &trims);
    TRIMS ({ c * cs, c * cs + cs });
    assert_int_equal (stats_of (cov).partial_clusters, n - i - 1);
  }
  assert_int_equal (stats_of (cov).readable_left, 0);
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

static void
test_readable (void **state)
{
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  struct ba_range bad;
  bool discarded;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  assert_int_equal (ba_regions_append (&dirty, 0, 2 * C), 0);
  assert_int_equal (ba_regions_append (&dirty, 3 * C, 3 * C + 100), 0);
  assert_int_equal (ba_regions_append (&dirty, 4 * C, 8 * C), 0);
  cov = ba_coverage_new (8 * C, C, &dirty);
  assert_non_null (cov);

  assert_true (ba_coverage_readable (cov, 0, 2 * C, &bad, &discarded));
  assert_true (ba_coverage_readable (cov, 3 * C, 3 * C + 100,
                                     &bad, &discarded));
  assert_true (ba_coverage_readable (cov, 5, 5, &bad, &discarded));

  /* Clean. */
  assert_false (ba_coverage_readable (cov, C, 3 * C, &bad, &discarded));
  assert_false (discarded);
  assert_int_equal (bad.start, 2 * C);
  assert_int_equal (bad.end, 3 * C);
  assert_false (ba_coverage_readable (cov, 3 * C + 50, 3 * C + 200,
                                      &bad, &discarded));
  assert_false (discarded);
  assert_int_equal (bad.start, 3 * C + 100);
  assert_int_equal (bad.end, 3 * C + 200);
  assert_false (ba_coverage_readable (cov, 2 * C + 10, 5 * C,
                                      &bad, &discarded));
  assert_false (discarded);
  assert_int_equal (bad.start, 2 * C + 10);
  assert_int_equal (bad.end, 3 * C);

  /* Discarded. */
  consume (cov, 4 * C, 6 * C, &trims);
  TRIMS ({ 4 * C, 6 * C });
  assert_false (ba_coverage_readable (cov, 5 * C, 7 * C, &bad, &discarded));
  assert_true (discarded);
  assert_int_equal (bad.start, 5 * C);
  assert_int_equal (bad.end, 6 * C);
  assert_false (ba_coverage_readable (cov, 3 * C + 100, 5 * C,
                                      &bad, &discarded));
  assert_false (discarded);             /* the clean gap comes first */
  assert_int_equal (bad.start, 3 * C + 100);
  assert_int_equal (bad.end, 4 * C);
  assert_false (ba_coverage_readable (cov, 4 * C + 10, 4 * C + 20,
                                      &bad, &discarded));
  assert_true (discarded);
  assert_int_equal (bad.start, 4 * C + 10);
  assert_int_equal (bad.end, 4 * C + 20);
  assert_true (ba_coverage_readable (cov, 6 * C, 8 * C, &bad, &discarded));

  /* A discarded cluster before a clean gap is the first offender. */
  consume (cov, 0, C, &trims);
  TRIMS ({ 0, C });
  assert_false (ba_coverage_readable (cov, C / 2, 2 * C + 10,
                                      &bad, &discarded));
  assert_true (discarded);
  assert_int_equal (bad.start, C / 2);
  assert_int_equal (bad.end, C);

  /* Past the end of the disk. */
  assert_false (ba_coverage_readable (cov, 7 * C, 9 * C, &bad, &discarded));
  assert_false (discarded);
  assert_int_equal (bad.end, 9 * C);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

/* Walks [offset, end) with ba_coverage_run and checks the runs, with
 * adjacent runs of the same kind joined, against want (lengths, the
 * first readable when first_readable).
 */
static void
check_runs (const struct ba_coverage *cov, uint64_t offset, uint64_t end,
            bool first_readable, const uint64_t *want, size_t n)
{
  size_t i = 0;
  bool expect = first_readable;
  uint64_t joined = 0;

  while (offset < end) {
    bool readable;
    uint64_t len = ba_coverage_run (cov, offset, end, &readable);

    assert_true (len > 0);
    assert_true (len <= end - offset);
    if (readable != expect) {
      assert_true (i < n);
      assert_int_equal (joined, want[i]);
      i++;
      expect = readable;
      joined = 0;
    }
    joined += len;
    offset += len;
  }
  assert_int_equal (i, n - 1);
  assert_int_equal (joined, want[i]);
}

static void
test_run (void **state)
{
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  bool readable;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  assert_int_equal (ba_regions_append (&dirty, 0, 2 * C), 0);
  assert_int_equal (ba_regions_append (&dirty, 3 * C, 3 * C + 100), 0);
  assert_int_equal (ba_regions_append (&dirty, 4 * C, 8 * C), 0);
  cov = ba_coverage_new (8 * C, C, &dirty);
  assert_non_null (cov);

  check_runs (cov, 0, 8 * C, true,
              (const uint64_t[]) { 2 * C, C, 100, C - 100, 4 * C }, 5);
  check_runs (cov, 2 * C + 1, 3 * C + 50, false,
              (const uint64_t[]) { C - 1, 50 }, 2);

  consume (cov, C, 2 * C, &trims);
  consume (cov, 5 * C, 6 * C, &trims);
  consume (cov, 7 * C, 8 * C, &trims);
  check_runs (cov, 0, 8 * C, true,
              (const uint64_t[]) { C, 2 * C, 100, C - 100, C, C, C, C }, 8);
  check_runs (cov, 10, 5 * C + 10, true,
              (const uint64_t[]) { C - 10, 2 * C, 100, C - 100, C, 10 }, 6);

  assert_int_equal (ba_coverage_run (cov, 4 * C, 4 * C, &readable), 0);
  assert_int_equal (ba_coverage_run (cov, 5 * C, 4 * C, &readable), 0);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

/* dirty == NULL: the whole disk is readable. */
static void
test_full_disk (void **state)
{
  const uint64_t size = 10 * C + 7;
  struct ba_regions trims;
  struct ba_coverage *cov = ba_coverage_new (size, C, NULL);
  struct ba_range bad;
  bool discarded, readable;

  assert_non_null (cov);
  ba_regions_init (&trims);
  assert_int_equal (stats_of (cov).readable_total, size);
  assert_true (ba_coverage_readable (cov, 0, size, &bad, &discarded));
  assert_int_equal (ba_coverage_run (cov, 0, size, &readable), size);
  assert_true (readable);
  consume (cov, 3 * C, 4 * C, &trims);
  check_runs (cov, 0, size, true,
              (const uint64_t[]) { 3 * C, C, 6 * C + 7 }, 3);
  assert_false (ba_coverage_readable (cov, 0, size, &bad, &discarded));
  assert_true (discarded);
  assert_int_equal (bad.start, 3 * C);
  assert_int_equal (bad.end, 4 * C);
  ba_coverage_free (cov);
  ba_regions_free (&trims);
}

static void
test_stats (void **state)
{
  const uint64_t size = 4 * C + 1000;
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  struct ba_coverage_stats st;
  uint64_t total = C / 2 + 2 * C + 1000;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  assert_int_equal (ba_regions_append (&dirty, 0, C / 2), 0);
  assert_int_equal (ba_regions_append (&dirty, C, 3 * C), 0);
  assert_int_equal (ba_regions_append (&dirty, 4 * C, size), 0);
  cov = ba_coverage_new (size, C, &dirty);
  assert_non_null (cov);
  st = stats_of (cov);
  assert_int_equal (st.readable_total, total);
  assert_int_equal (st.readable_left, total);
  assert_int_equal (st.clusters_discarded, 0);
  assert_int_equal (st.partial_clusters, 0);
  assert_true (st.memory_bytes > 0);

  consume (cov, 0, 100, &trims);
  st = stats_of (cov);
  assert_int_equal (st.readable_left, total);
  assert_int_equal (st.partial_clusters, 1);

  consume (cov, 100, C, &trims);        /* only C / 2 - 100 are dirty */
  st = stats_of (cov);
  assert_int_equal (st.readable_left, total - C / 2);
  assert_int_equal (st.partial_clusters, 0);
  assert_int_equal (st.clusters_discarded, 1);

  consume (cov, C + 1, 2 * C + 1, &trims);
  NO_TRIMS ();
  st = stats_of (cov);
  assert_int_equal (st.partial_clusters, 2);
  assert_int_equal (st.readable_left, total - C / 2);

  consume (cov, C, C + 1, &trims);
  st = stats_of (cov);
  assert_int_equal (st.partial_clusters, 1);
  assert_int_equal (st.readable_left, total - C / 2 - C);

  consume (cov, 3 * C, size, &trims);   /* cluster 3 is clean */
  TRIMS ({ 4 * C, size });
  st = stats_of (cov);
  assert_int_equal (st.readable_left, C);      /* cluster 2 */
  assert_int_equal (st.clusters_discarded, 3);
  assert_int_equal (st.readable_total, total);

  consume (cov, 0, size, &trims);
  TRIMS ({ 2 * C, 3 * C });
  st = stats_of (cov);
  assert_int_equal (st.readable_left, 0);
  assert_int_equal (st.partial_clusters, 0);
  assert_int_equal (st.clusters_discarded, 4);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

/* The randomized model test. */

struct rng { uint64_t s; };

static uint64_t
rnd64 (struct rng *rng)
{
  /* splitmix64: fixed and portable, so every run is the same. */
  uint64_t z = (rng->s += UINT64_C (0x9e3779b97f4a7c15));
  z = (z ^ (z >> 30)) * UINT64_C (0xbf58476d1ce4e5b9);
  z = (z ^ (z >> 27)) * UINT64_C (0x94d049bb133111eb);
  return z ^ (z >> 31);
}

/* Uniform-enough in [0, n); n > 0. */
static uint64_t
rnd (struct rng *rng, uint64_t n)
{
  return rnd64 (rng) % n;
}

enum { K_CLEAN, K_READABLE, K_DISCARDED };

struct model {
  unsigned seed, step;
  uint64_t disk, cs, ncl;
  bool strict;                  /* every complete cluster must be trimmed */
  uint8_t *kind;                /* per byte: K_* */
  uint8_t *consumed;            /* per byte: a consumed dirty byte */
  uint64_t *dirty_in;           /* per cluster: dirty bytes */
  uint64_t *consumed_in;        /* per cluster: consumed dirty bytes */
  bool *trimmed;                /* per cluster */
};

#define model_assert(m, cond)                                            \
  do {                                                                   \
    if (!(cond))                                                         \
      fail_msg ("seed %u, cluster size %" PRIu64 ", disk %" PRIu64       \
                ", step %u: %s", (m)->seed, (m)->cs, (m)->disk,          \
                (m)->step, #cond);                                       \
  } while (0)

/* A random dirty set: runs of every scale, some cluster-aligned. */
static void
random_dirty (struct rng *rng, uint64_t disk, uint64_t cs,
              struct ba_regions *set)
{
  uint64_t off = 0;
  bool dirty = rnd (rng, 2);

  while (off < disk) {
    uint64_t len;

    switch (rnd (rng, 5)) {
    case 0: len = 1 + rnd (rng, cs / 4); break;
    case 1: len = 1 + rnd (rng, 2 * cs); break;
    case 2: len = cs * (1 + rnd (rng, 3)); break;
    case 3: len = (off / cs + 1) * cs - off; break;  /* to a boundary */
    default: len = 1 + rnd (rng, 8 * cs); break;
    }
    if (len > disk - off)
      len = disk - off;
    if (dirty)
      assert_int_equal (ba_regions_append (set, off, off + len), 0);
    off += len;
    dirty = !dirty;
  }
}

static void
model_init (struct model *m, unsigned seed, uint64_t disk, uint64_t cs,
            const struct ba_regions *dirty, bool strict)
{
  m->seed = seed;
  m->step = 0;
  m->disk = disk;
  m->cs = cs;
  m->ncl = (disk + cs - 1) / cs;
  m->strict = strict;
  m->kind = calloc (disk, 1);
  m->consumed = calloc (disk, 1);
  m->dirty_in = calloc (m->ncl, sizeof *m->dirty_in);
  m->consumed_in = calloc (m->ncl, sizeof *m->consumed_in);
  m->trimmed = calloc (m->ncl, sizeof *m->trimmed);
  assert_non_null (m->kind);
  assert_non_null (m->consumed);
  assert_non_null (m->dirty_in);
  assert_non_null (m->consumed_in);
  assert_non_null (m->trimmed);
  if (dirty == NULL)
    memset (m->kind, K_READABLE, disk);
  else
    for (size_t i = 0; i < dirty->n; i++)
      memset (m->kind + dirty->r[i].start, K_READABLE,
              dirty->r[i].end - dirty->r[i].start);
  for (uint64_t b = 0; b < disk; b++)
    m->dirty_in[b / cs] += m->kind[b] != K_CLEAN;
}

static void
model_free (struct model *m)
{
  free (m->kind);
  free (m->consumed);
  free (m->dirty_in);
  free (m->consumed_in);
  free (m->trimmed);
}

/* Consumes [s, e) in the tracker and in the model, and checks the trims
 * against the model.
 */
static void
model_consume (struct model *m, struct ba_coverage *cov,
               struct ba_regions *trims, uint64_t s, uint64_t e)
{
  ba_regions_clear (trims);
  model_assert (m, ba_coverage_consume (cov, s, e, trims) == 0);

  for (uint64_t b = s; b < e; b++) {
    if (m->kind[b] == K_READABLE && !m->consumed[b]) {
      m->consumed[b] = 1;
      m->consumed_in[b / m->cs]++;
    }
  }

  for (size_t i = 0; i < trims->n; i++) {
    uint64_t ts = trims->r[i].start, te = trims->r[i].end;

    model_assert (m, ts < te);
    model_assert (m, te <= m->disk);
    model_assert (m, ts % m->cs == 0);
    model_assert (m, te % m->cs == 0 || te == m->disk);
    /* Merged: never adjacent to the previous range. */
    model_assert (m, i == 0 || trims->r[i - 1].end < ts);
    for (uint64_t c = ts / m->cs; c * m->cs < te; c++) {
      model_assert (m, !m->trimmed[c]);
      model_assert (m, m->dirty_in[c] > 0);
      model_assert (m, m->consumed_in[c] == m->dirty_in[c]);
      m->trimmed[c] = true;
      for (uint64_t b = c * m->cs; b < (c + 1) * m->cs && b < m->disk; b++)
        if (m->kind[b] == K_READABLE)
          m->kind[b] = K_DISCARDED;
    }
  }
}

/* Checks the per-cluster state and the statistics. */
static void
model_check_clusters (struct model *m, const struct ba_coverage *cov)
{
  struct ba_coverage_stats st;
  uint64_t left = 0, discarded = 0, partial = 0;

  for (uint64_t c = 0; c < m->ncl; c++) {
    bool complete = m->dirty_in[c] > 0
      && m->consumed_in[c] == m->dirty_in[c];

    if (m->strict)
      model_assert (m, m->trimmed[c] == complete);
    if (m->trimmed[c])
      discarded++;
    else {
      left += m->dirty_in[c];
      partial += m->consumed_in[c] > 0;
    }
  }
  ba_coverage_get_stats (cov, &st);
  model_assert (m, st.readable_left == left);
  model_assert (m, st.clusters_discarded == discarded);
  if (m->strict)
    model_assert (m, st.partial_clusters == partial);
  else
    model_assert (m, st.partial_clusters <= partial);
}

/* End of the run of bytes of the same kind as b, at most e. */
static uint64_t
kind_run_end (const struct model *m, uint64_t b, uint64_t e)
{
  uint8_t k = m->kind[b];

  while (b < e && m->kind[b] == k)
    b++;
  return b;
}

static void
model_check_readable (struct model *m, const struct ba_coverage *cov,
                      uint64_t s, uint64_t e)
{
  struct ba_range bad = { 0, 0 };
  bool discarded = false;
  bool ok = ba_coverage_readable (cov, s, e, &bad, &discarded);
  uint64_t b = s;

  while (b < e && m->kind[b] == K_READABLE)
    b++;
  if (b == e) {
    model_assert (m, ok);
    return;
  }
  model_assert (m, !ok);
  model_assert (m, bad.start == b);
  model_assert (m, discarded == (m->kind[b] == K_DISCARDED));
  model_assert (m, bad.end == kind_run_end (m, b, e));
}

static void
model_check_run (struct model *m, const struct ba_coverage *cov,
                 uint64_t s, uint64_t e)
{
  bool readable;
  uint64_t len = ba_coverage_run (cov, s, e, &readable);

  if (s >= e) {
    model_assert (m, len == 0);
    return;
  }
  model_assert (m, len > 0 && len <= e - s);
  for (uint64_t b = s; b < s + len; b++)
    model_assert (m, (m->kind[b] == K_READABLE) == readable);
  /* Readable runs are never cut short. */
  if (readable)
    model_assert (m, s + len == e || m->kind[s + len] != K_READABLE);
}

/* A random range to check, of at most about three clusters. */
static void
random_check_range (struct rng *rng, const struct model *m,
                    uint64_t *s, uint64_t *e)
{
  uint64_t len = rnd (rng, 2) ? 1 + rnd (rng, 2048) : 1 + rnd (rng, 3 * m->cs);

  *s = rnd (rng, m->disk);
  *e = *s + len < m->disk ? *s + len : m->disk;
}

/* The first dirty byte not yet consumed in a random untrimmed cluster
 * that has one, so that the random reads also finish clusters.
 */
static bool
random_unconsumed (struct rng *rng, const struct model *m, uint64_t *out)
{
  uint64_t start = rnd (rng, m->ncl);

  for (uint64_t i = 0; i < m->ncl; i++) {
    uint64_t c = (start + i) % m->ncl;
    if (m->trimmed[c] || m->dirty_in[c] == 0)
      continue;
    for (uint64_t b = c * m->cs; b < (c + 1) * m->cs && b < m->disk; b++) {
      if (m->kind[b] == K_READABLE && !m->consumed[b]) {
        *out = b;
        return true;
      }
    }
  }
  return false;
}

static void
model_run (unsigned seed, uint64_t cs, uint64_t min_cl, uint64_t max_cl,
           unsigned steps, uint64_t budget)
{
  struct rng rng = { seed * UINT64_C (1000003) + cs };
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  struct model m;
  uint64_t disk, s, e;
  bool full = seed % 4 == 0;    /* some runs with dirty == NULL */

  disk = (min_cl + rnd (&rng, max_cl - min_cl + 1)) * cs;
  if (rnd (&rng, 3) != 0)
    disk += 1 + rnd (&rng, cs - 1);       /* a short tail cluster */
  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  if (!full)
    random_dirty (&rng, disk, cs, &dirty);
  cov = ba_coverage_new (disk, cs, full ? NULL : &dirty);
  assert_non_null (cov);
  if (budget)
    ba_coverage_set_partial_budget (cov, budget);
  model_init (&m, seed, disk, cs, full ? NULL : &dirty, budget == 0);
  model_assert (&m, stats_of (cov).readable_total
                == (full ? disk : ba_regions_total (&dirty)));

  for (m.step = 0; m.step < steps; m.step++) {
    /* Mostly small reads first, so that many clusters are partly
     * consumed at once; then also large reads and reads that finish
     * clusters.
     */
    bool late = m.step >= steps / 2;
    uint64_t len;

    s = rnd (&rng, disk);
    switch (rnd (&rng, 10)) {
    case 0: case 1: case 2: case 3: len = 1 + rnd (&rng, cs / 4); break;
    case 4: case 5: len = 1 + rnd (&rng, 2 * cs); break;
    case 6:                     /* whole clusters */
      s -= s % cs;
      len = cs * (1 + rnd (&rng, 3));
      break;
    case 7:
      len = late ? 1 + rnd (&rng, disk / 4 + 1) : 1 + rnd (&rng, 64);
      break;
    case 8: len = 1 + rnd (&rng, 64); break;
    default:                    /* around an unconsumed dirty byte */
      if (late && random_unconsumed (&rng, &m, &s))
        s -= rnd (&rng, s % cs + 1);
      len = 1 + rnd (&rng, cs);
      break;
    }
    e = s + len < disk ? s + len : disk;
    model_consume (&m, cov, &trims, s, e);
    model_check_clusters (&m, cov);
    random_check_range (&rng, &m, &s, &e);
    model_check_readable (&m, cov, s, e);
    random_check_range (&rng, &m, &s, &e);
    model_check_run (&m, cov, s, e);
  }

  /* Read everything that is left: every dirty cluster goes. */
  for (s = 0; s < disk; s = e) {
    e = s + 1 + rnd (&rng, 2 * cs);
    if (e > disk)
      e = disk;
    model_consume (&m, cov, &trims, s, e);
  }
  model_check_clusters (&m, cov);
  if (budget)                   /* the test did go over the budget */
    model_assert (&m, stats_of (cov).untracked_bytes > 0);
  if (m.strict) {
    struct ba_coverage_stats st = stats_of (cov);
    model_assert (&m, st.readable_left == 0);
    model_assert (&m, st.partial_clusters == 0);
    for (uint64_t c = 0; c < m.ncl; c++)
      model_assert (&m, m.trimmed[c] == (m.dirty_in[c] > 0));
  }

  model_free (&m);
  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
}

static const unsigned seeds[] = { 1, 2, 3, 4, 5, 6, 7, 8 };
#define NSEEDS (sizeof seeds / sizeof seeds[0])

static void
test_model_512 (void **state)
{
  for (size_t i = 0; i < NSEEDS; i++)
    model_run (seeds[i], 512, 1, 2000, 3000, 0);
}

static void
test_model_4096 (void **state)
{
  for (size_t i = 0; i < NSEEDS; i++)
    model_run (seeds[i], 4096, 1, 150, 3000, 0);
}

static void
test_model_65536 (void **state)
{
  for (size_t i = 0; i < NSEEDS; i++)
    model_run (seeds[i], 65536, 1, 32, 2000, 0);
}

/* Over the partial-cluster memory budget reads may no longer complete
 * clusters, but a cluster with an unconsumed dirty byte is still never
 * trimmed.
 */
static void
test_model_budget (void **state)
{
  for (size_t i = 0; i < NSEEDS; i++)
    model_run (seeds[i], 512, 200, 600, 3000, 2048);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_new),
    cmocka_unit_test (test_whole_clusters),
    cmocka_unit_test (test_partial_any_order),
    cmocka_unit_test (test_partial_memory),
    cmocka_unit_test (test_crossing),
    cmocka_unit_test (test_tail_cluster),
    cmocka_unit_test (test_partly_dirty),
    cmocka_unit_test (test_no_dirty),
    cmocka_unit_test (test_merge_trims),
    cmocka_unit_test (test_many_partial),
    cmocka_unit_test (test_readable),
    cmocka_unit_test (test_run),
    cmocka_unit_test (test_full_disk),
    cmocka_unit_test (test_stats),
    cmocka_unit_test (test_model_512),
    cmocka_unit_test (test_model_4096),
    cmocka_unit_test (test_model_65536),
    cmocka_unit_test (test_model_budget),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
