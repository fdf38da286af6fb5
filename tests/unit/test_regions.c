/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for ba_regions and ba_trim_piece. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "regions.h"

/* Asserts that set holds exactly the n ranges in want. */
static void
check_set (const struct ba_regions *set, const struct ba_range *want, size_t n)
{
  assert_int_equal (set->n, n);
  for (size_t i = 0; i < n; i++) {
    assert_int_equal (set->r[i].start, want[i].start);
    assert_int_equal (set->r[i].end, want[i].end);
  }
}

static void
test_append_disjoint (void **state)
{
  struct ba_regions set;
  const struct ba_range want[] = { { 0, 10 }, { 20, 30 }, { 100, 200 } };

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 0, 10), 0);
  assert_int_equal (ba_regions_append (&set, 20, 30), 0);
  assert_int_equal (ba_regions_append (&set, 100, 200), 0);
  check_set (&set, want, 3);
  ba_regions_free (&set);
  assert_null (set.r);
  assert_int_equal (set.n, 0);
}

static void
test_append_merge (void **state)
{
  struct ba_regions set;
  const struct ba_range want[] = { { 0, 40 }, { 50, 60 } };

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 0, 10), 0);
  assert_int_equal (ba_regions_append (&set, 10, 20), 0);   /* adjacent */
  assert_int_equal (ba_regions_append (&set, 15, 30), 0);   /* overlapping */
  assert_int_equal (ba_regions_append (&set, 0, 5), 0);     /* inside */
  assert_int_equal (ba_regions_append (&set, 5, 40), 0);    /* same start... */
  assert_int_equal (ba_regions_append (&set, 50, 60), 0);
  assert_int_equal (ba_regions_append (&set, 50, 55), 0);   /* ...contained */
  check_set (&set, want, 2);
  ba_regions_free (&set);
}

/* Past the first allocation: the array must grow and keep its contents. */
static void
test_append_many (void **state)
{
  struct ba_regions set;

  ba_regions_init (&set);
  for (uint64_t i = 0; i < 1000; i++)
    assert_int_equal (ba_regions_append (&set, i * 10, i * 10 + 5), 0);
  assert_int_equal (set.n, 1000);
  for (uint64_t i = 0; i < 1000; i++) {
    assert_int_equal (set.r[i].start, i * 10);
    assert_int_equal (set.r[i].end, i * 10 + 5);
  }
  assert_int_equal (ba_regions_total (&set), 5000);
  ba_regions_clear (&set);
  assert_int_equal (set.n, 0);
  assert_int_equal (ba_regions_total (&set), 0);
  /* After clear an earlier start is accepted again. */
  assert_int_equal (ba_regions_append (&set, 0, 1), 0);
  assert_int_equal (set.n, 1);
  ba_regions_free (&set);
}

static void
test_append_empty (void **state)
{
  struct ba_regions set;
  const struct ba_range want[] = { { 10, 20 } };

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 5, 5), 0);
  assert_int_equal (set.n, 0);
  assert_int_equal (ba_regions_append (&set, 10, 20), 0);
  /* Empty ranges are ignored even where a range would be out of order. */
  assert_int_equal (ba_regions_append (&set, 0, 0), 0);
  assert_int_equal (ba_regions_append (&set, 30, 30), 0);
  check_set (&set, want, 1);
  ba_regions_free (&set);
}

static void
test_append_errors (void **state)
{
  struct ba_regions set;
  const struct ba_range want[] = { { 10, 20 } };

  ba_regions_init (&set);
  errno = 0;
  assert_int_equal (ba_regions_append (&set, 20, 10), -1);
  assert_int_equal (errno, EINVAL);
  assert_int_equal (set.n, 0);

  assert_int_equal (ba_regions_append (&set, 10, 20), 0);
  errno = 0;
  assert_int_equal (ba_regions_append (&set, 9, 30), -1);   /* out of order */
  assert_int_equal (errno, EINVAL);
  errno = 0;
  assert_int_equal (ba_regions_append (&set, 0, 5), -1);
  assert_int_equal (errno, EINVAL);
  errno = 0;
  assert_int_equal (ba_regions_append (&set, 40, 30), -1);
  assert_int_equal (errno, EINVAL);
  /* A failed append leaves the set alone. */
  check_set (&set, want, 1);
  ba_regions_free (&set);
}

static void
test_find (void **state)
{
  struct ba_regions set;

  ba_regions_init (&set);
  assert_int_equal (ba_regions_find (&set, 0), 0);
  assert_int_equal (ba_regions_append (&set, 10, 20), 0);
  assert_int_equal (ba_regions_append (&set, 30, 40), 0);
  assert_int_equal (ba_regions_append (&set, 50, 60), 0);

  assert_int_equal (ba_regions_find (&set, 0), 0);
  assert_int_equal (ba_regions_find (&set, 10), 0);
  assert_int_equal (ba_regions_find (&set, 19), 0);
  assert_int_equal (ba_regions_find (&set, 20), 1);  /* end is exclusive */
  assert_int_equal (ba_regions_find (&set, 25), 1);
  assert_int_equal (ba_regions_find (&set, 39), 1);
  assert_int_equal (ba_regions_find (&set, 40), 2);
  assert_int_equal (ba_regions_find (&set, 59), 2);
  assert_int_equal (ba_regions_find (&set, 60), 3);
  assert_int_equal (ba_regions_find (&set, UINT64_MAX), 3);
  ba_regions_free (&set);
}

static void
test_contains (void **state)
{
  struct ba_regions set;

  ba_regions_init (&set);
  assert_false (ba_regions_contains (&set, 0, 1));
  assert_true (ba_regions_contains (&set, 5, 5));     /* empty: trivially */
  assert_int_equal (ba_regions_append (&set, 10, 20), 0);
  assert_int_equal (ba_regions_append (&set, 30, 40), 0);

  assert_true (ba_regions_contains (&set, 10, 20));
  assert_true (ba_regions_contains (&set, 12, 18));
  assert_true (ba_regions_contains (&set, 30, 31));
  assert_true (ba_regions_contains (&set, 39, 40));
  assert_false (ba_regions_contains (&set, 9, 20));
  assert_false (ba_regions_contains (&set, 10, 21));
  assert_false (ba_regions_contains (&set, 15, 35));  /* spans a gap */
  assert_false (ba_regions_contains (&set, 20, 30));
  assert_false (ba_regions_contains (&set, 0, 5));
  assert_false (ba_regions_contains (&set, 40, 41));
  assert_false (ba_regions_contains (&set, 0, UINT64_MAX));
  ba_regions_free (&set);
}

static void
test_overlap_total (void **state)
{
  struct ba_regions set;

  ba_regions_init (&set);
  assert_int_equal (ba_regions_overlap (&set, 0, 100), 0);
  assert_int_equal (ba_regions_append (&set, 10, 20), 0);
  assert_int_equal (ba_regions_append (&set, 30, 40), 0);
  assert_int_equal (ba_regions_append (&set, 50, 60), 0);
  assert_int_equal (ba_regions_total (&set), 30);

  assert_int_equal (ba_regions_overlap (&set, 0, 100), 30);
  assert_int_equal (ba_regions_overlap (&set, 0, 10), 0);
  assert_int_equal (ba_regions_overlap (&set, 20, 30), 0);
  assert_int_equal (ba_regions_overlap (&set, 15, 35), 10);
  assert_int_equal (ba_regions_overlap (&set, 12, 13), 1);
  assert_int_equal (ba_regions_overlap (&set, 19, 51), 12);
  assert_int_equal (ba_regions_overlap (&set, 60, UINT64_MAX), 0);
  assert_int_equal (ba_regions_overlap (&set, 30, 30), 0);
  ba_regions_free (&set);
}

/* Ranges that end at UINT64_MAX: no wrap-around in any function. */
static void
test_edge_values (void **state)
{
  struct ba_regions set;
  const uint64_t M = UINT64_MAX;

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 0, M - 10), 0);
  assert_int_equal (ba_regions_append (&set, M - 10, M - 5), 0);  /* merges */
  assert_int_equal (ba_regions_append (&set, M - 2, M), 0);
  assert_int_equal (set.n, 2);
  assert_int_equal (set.r[0].end, M - 5);
  assert_int_equal (ba_regions_total (&set), M - 3);
  assert_int_equal (ba_regions_find (&set, M - 1), 1);
  assert_int_equal (ba_regions_find (&set, M), 2);
  assert_true (ba_regions_contains (&set, M - 2, M));
  assert_false (ba_regions_contains (&set, M - 3, M));
  assert_int_equal (ba_regions_overlap (&set, M - 6, M), 3);
  assert_int_equal (ba_regions_overlap (&set, 0, M), M - 3);
  assert_int_equal (ba_regions_append (&set, M, M), 0);
  errno = 0;
  assert_int_equal (ba_regions_append (&set, M, M - 1), -1);
  assert_int_equal (errno, EINVAL);
  ba_regions_free (&set);

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 0, M), 0);
  assert_int_equal (ba_regions_total (&set), M);
  assert_int_equal (ba_regions_overlap (&set, 0, M), M);
  ba_regions_free (&set);
}

/* Splits [start, end) with ba_trim_piece and checks every piece. */
static void
check_pieces (uint64_t start, uint64_t end, uint64_t cluster,
              uint64_t max_len, uint64_t want_pieces)
{
  uint64_t pieces = 0;

  while (start < end) {
    uint64_t len = ba_trim_piece (start, end, cluster, max_len);
    assert_true (len > 0);
    assert_true (len <= max_len);
    assert_true (len <= end - start);
    if (len < end - start)
      assert_int_equal (len % cluster, 0);
    start += len;
    pieces++;
  }
  assert_int_equal (start, end);
  assert_int_equal (pieces, want_pieces);
}

static void
test_trim_piece (void **state)
{
  const uint64_t K = 65536, M = UINT64_MAX;

  /* Short enough: one piece, whatever its alignment. */
  assert_int_equal (ba_trim_piece (0, 100, 512, 4096), 100);
  assert_int_equal (ba_trim_piece (4096, 8192, 4096, 4096), 4096);
  /* Longer: the largest cluster multiple that fits. */
  assert_int_equal (ba_trim_piece (0, 10 * K, K, 3 * K + 100), 3 * K);
  assert_int_equal (ba_trim_piece (0, 10 * K, K, 3 * K), 3 * K);
  assert_int_equal (ba_trim_piece (0, 10 * K, K, UINT32_MAX),
                    10 * K);
  assert_int_equal (ba_trim_piece (0, UINT64_C (1) << 40, K, UINT32_MAX),
                    UINT32_MAX - (UINT32_MAX % K));

  check_pieces (0, 10 * K, K, 3 * K + 100, 4);
  check_pieces (0, 10 * K + 123, K, 3 * K, 4);     /* short tail cluster */
  check_pieces (K, 2 * K, K, K, 1);
  check_pieces (0, UINT64_C (1) << 40, K, UINT32_MAX, 257);
  check_pieces (0, 7 * 512 + 1, 512, 1000, 7);

  /* Near UINT64_MAX: len = end - start must not wrap. */
  assert_int_equal (ba_trim_piece (M - 4 * K, M, K, 2 * K + 1), 2 * K);
  assert_int_equal (ba_trim_piece (M - 4 * K, M, K, M), 4 * K);
  assert_int_equal (ba_trim_piece (0, M, K, M), M);
  assert_int_equal (ba_trim_piece (0, M, K, M - 1), M - K + 1);
  check_pieces (M - 5 * K, M, K, 2 * K, 3);
}

/* Clean clusters: whole clusters without a dirty byte, rounded inward,
 * the last one may end at the end of the disk.
 */
static void
test_clean_clusters (void **state)
{
  struct ba_regions dirty, out;
  const uint64_t C = 65536;

  ba_regions_init (&dirty);
  ba_regions_init (&out);
  /* Dirty [100000, 200000) and [5C, 6C + 1); disk 10C + 4096. */
  assert_int_equal (ba_regions_append (&dirty, 100000, 200000), 0);
  assert_int_equal (ba_regions_append (&dirty, 5 * C, 6 * C + 1), 0);
  assert_int_equal (ba_regions_clean_clusters (&dirty, 10 * C + 4096, C,
                                               &out), 0);
  assert_int_equal (out.n, 3);
  /* Cluster 0 holds no dirty byte (100000 > C). */
  assert_int_equal (out.r[0].start, 0);
  assert_int_equal (out.r[0].end, C);
  /* 200000 is in cluster 3: clean from cluster 4 up to cluster 5. */
  assert_int_equal (out.r[1].start, 4 * C);
  assert_int_equal (out.r[1].end, 5 * C);
  /* 6C + 1 is in cluster 6: clean from 7C to the end of the disk. */
  assert_int_equal (out.r[2].start, 7 * C);
  assert_int_equal (out.r[2].end, 10 * C + 4096);

  /* Nothing dirty: the whole disk; all dirty: nothing. */
  ba_regions_clear (&dirty);
  ba_regions_clear (&out);
  assert_int_equal (ba_regions_clean_clusters (&dirty, 3 * C, C, &out), 0);
  assert_int_equal (out.n, 1);
  assert_int_equal (out.r[0].end, 3 * C);
  ba_regions_clear (&out);
  assert_int_equal (ba_regions_append (&dirty, 0, 3 * C), 0);
  assert_int_equal (ba_regions_clean_clusters (&dirty, 3 * C, C, &out), 0);
  assert_int_equal (out.n, 0);
  ba_regions_free (&dirty);
  ba_regions_free (&out);
}

/* The alignment of a set: what requests of one size never straddle. */
static void
test_alignment (void **state)
{
  struct ba_regions set;
  const uint64_t K = 1024, M = 1024 * 1024, cap = 32 * M;

  ba_regions_init (&set);
  /* Empty: anything up to the cap. */
  assert_int_equal (ba_regions_alignment (&set, 100 * M, cap), cap);
  /* 64 KiB granules: [64K, 192K) and [1M, 1M + 64K). */
  assert_int_equal (ba_regions_append (&set, 64 * K, 192 * K), 0);
  assert_int_equal (ba_regions_append (&set, M, M + 64 * K), 0);
  assert_int_equal (ba_regions_alignment (&set, 100 * M, cap), 64 * K);
  /* 4 MiB granules, the last one ending at an odd end of the disk. */
  ba_regions_clear (&set);
  assert_int_equal (ba_regions_append (&set, 4 * M, 12 * M), 0);
  assert_int_equal (ba_regions_append (&set, 16 * M, 20 * M + 512), 0);
  assert_int_equal (ba_regions_alignment (&set, 20 * M + 512, cap), 4 * M);
  /* The same end anywhere else counts. */
  assert_int_equal (ba_regions_alignment (&set, 21 * M, cap), 512);
  /* The cap, and a region from 0 to the end of the disk. */
  assert_int_equal (ba_regions_alignment (&set, 20 * M + 512, M), M);
  ba_regions_clear (&set);
  assert_int_equal (ba_regions_append (&set, 0, 7 * M + 1), 0);
  assert_int_equal (ba_regions_alignment (&set, 7 * M + 1, cap), cap);
  /* An odd start. */
  assert_int_equal (ba_regions_append (&set, 8 * M + 3, 9 * M), 0);
  assert_int_equal (ba_regions_alignment (&set, 10 * M, cap), 1);
  ba_regions_free (&set);
}

/* Insertion anywhere: ranges arriving out of order are merged. */
static void
test_insert (void **state)
{
  struct ba_regions set;

  ba_regions_init (&set);
  assert_int_equal (ba_regions_insert (&set, 100, 200), 0);
  assert_int_equal (ba_regions_insert (&set, 0, 50), 0);
  assert_int_equal (ba_regions_insert (&set, 300, 400), 0);
  assert_int_equal (set.n, 3);
  assert_int_equal (set.r[0].start, 0);
  assert_int_equal (set.r[1].start, 100);
  /* Touching on both sides: three become one. */
  assert_int_equal (ba_regions_insert (&set, 50, 100), 0);
  assert_int_equal (set.n, 2);
  assert_int_equal (set.r[0].end, 200);
  /* Overlapping several. */
  assert_int_equal (ba_regions_insert (&set, 150, 350), 0);
  assert_int_equal (set.n, 1);
  assert_int_equal (set.r[0].start, 0);
  assert_int_equal (set.r[0].end, 400);
  /* Empty, inside, and bad. */
  assert_int_equal (ba_regions_insert (&set, 10, 10), 0);
  assert_int_equal (ba_regions_insert (&set, 10, 20), 0);
  assert_int_equal (set.n, 1);
  assert_int_equal (ba_regions_insert (&set, 20, 10), -1);
  /* Many out of order. */
  ba_regions_clear (&set);
  for (uint64_t k = 0; k < 1000; k++) {
    uint64_t c = (k * 7919) % 1000;
    assert_int_equal (ba_regions_insert (&set, c * 10, c * 10 + 10), 0);
  }
  assert_int_equal (set.n, 1);
  assert_int_equal (set.r[0].end, 10000);
  ba_regions_free (&set);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_append_disjoint),
    cmocka_unit_test (test_append_merge),
    cmocka_unit_test (test_append_many),
    cmocka_unit_test (test_append_empty),
    cmocka_unit_test (test_append_errors),
    cmocka_unit_test (test_find),
    cmocka_unit_test (test_contains),
    cmocka_unit_test (test_overlap_total),
    cmocka_unit_test (test_edge_values),
    cmocka_unit_test (test_trim_piece),
    cmocka_unit_test (test_clean_clusters),
    cmocka_unit_test (test_insert),
    cmocka_unit_test (test_alignment),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
