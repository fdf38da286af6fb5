/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for lib/view.c: the read rule, what reads and client
 * trims discard, extents, the preferred block size, broken snapshots
 * and the counters, as the filter, a copy program or a mount use them.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <cmocka.h>

#include "view.h"

#define K ((uint64_t) 1024)
#define M (K * K)

/* A view of a disk of `size` bytes with the dirty ranges given as
 * start, end pairs (n of them; n < 0: no dirty set, a full backup).
 */
static struct ba_view *
make_view (uint64_t size, uint64_t cluster, bool clean_is_zero,
           uint64_t batch, uint64_t lag, int n, ...)
{
  struct ba_regions dirty;
  struct ba_view_config c = {
    .disk_size = size, .cluster_size = cluster, .discard = true,
    .clean_is_zero = clean_is_zero, .trim_batch = batch, .discard_lag = lag,
  };
  struct ba_view *v;
  va_list ap;

  ba_regions_init (&dirty);
  va_start (ap, n);
  for (int i = 0; i < n; i++) {
    uint64_t s = va_arg (ap, uint64_t), e = va_arg (ap, uint64_t);
    assert_int_equal (ba_regions_append (&dirty, s, e), 0);
  }
  va_end (ap);
  c.dirty = n < 0 ? NULL : &dirty;
  v = ba_view_new (&c);
  assert_non_null (v);
  ba_regions_free (&dirty);     /* the view keeps a copy */
  return v;
}

static void
test_new_errors (void **state)
{
  struct ba_regions dirty;
  struct ba_view_config c = { .disk_size = M, .cluster_size = 3000 };

  errno = 0;
  assert_null (ba_view_new (&c));
  assert_int_equal (errno, EINVAL);
  ba_regions_init (&dirty);
  assert_int_equal (ba_regions_append (&dirty, 0, M + 1), 0);
  c.cluster_size = 64 * K;
  c.dirty = &dirty;
  errno = 0;
  assert_null (ba_view_new (&c));
  assert_int_equal (errno, EINVAL);
  ba_regions_free (&dirty);
}

static void
check_preferred (struct ba_view *v, uint32_t want, bool want_safe)
{
  bool safe;

  assert_int_equal (ba_view_preferred_size (v, &safe), want);
  assert_int_equal (safe, want_safe);
  ba_view_free (v);
}

/* The cluster, but never more than the dirty regions' alignment. */
static void
test_preferred_size (void **state)
{
  const uint64_t size = 64 * M + 777;

  check_preferred (make_view (size, 64 * K, false, 0, 0, -1), 64 * K, true);
  check_preferred (make_view (size, 1 << 30, false, 0, 0, -1), 32 * M, true);
  /* 64K granules under 128K and 1M clusters. */
  check_preferred (make_view (size, 128 * K, false, 0, 0, 2,
                              64 * K, 192 * K, 5 * M, 5 * M + 64 * K),
                   64 * K, true);
  check_preferred (make_view (size, M, false, 0, 0, 1, 64 * K, 128 * K),
                   64 * K, true);
  /* 4M granules, the last ending at the disk's odd end. */
  check_preferred (make_view (size, M, false, 0, 0, 2,
                              4 * M, 12 * M, 64 * M, size), M, true);
  check_preferred (make_view (size, 8 * M, false, 0, 0, 2,
                              4 * M, 12 * M, 64 * M, size), 4 * M, true);
  /* Not even aligned to 512: 512, and not safe. */
  check_preferred (make_view (size, 64 * K, false, 0, 0, 1,
                              (uint64_t) 1000, (uint64_t) 6000), 512, false);
  /* Nothing dirty: nothing to mix. */
  check_preferred (make_view (size, 64 * K, false, 0, 0, 0), 64 * K, true);
}

static void
expect_refusal (struct ba_view *v, uint64_t off, uint64_t len,
                enum ba_view_refusal want, uint64_t bad_start,
                uint64_t bad_end)
{
  struct ba_range bad;

  assert_int_equal (ba_view_check_read (v, off, len, &bad), want);
  if (want != BA_VIEW_READABLE) {
    assert_int_equal (bad.start, bad_start);
    assert_int_equal (bad.end, bad_end);
  }
}

/* Clean bytes are refused, with clean_is_zero too; mixed reads say so. */
static void
test_read_rule (void **state)
{
  for (int zero = 0; zero <= 1; zero++) {
    struct ba_view *v = make_view (M, 64 * K, zero, 0, 0, 2,
                                   64 * K, 192 * K, 512 * K, 576 * K);
    struct ba_view_stats st;
    char msg[512];
    struct ba_range bad = { 0, 64 * K };

    expect_refusal (v, 64 * K, 128 * K, BA_VIEW_READABLE, 0, 0);
    expect_refusal (v, 0, 4096, BA_VIEW_CLEAN, 0, 4096);
    expect_refusal (v, 0, 128 * K, BA_VIEW_MIXED, 0, 64 * K);
    expect_refusal (v, 128 * K, 128 * K, BA_VIEW_MIXED, 192 * K, 256 * K);
    ba_view_refusal_message (v, BA_VIEW_MIXED, &bad, msg, sizeof msg);
    assert_non_null (strstr (msg, "[0, 65536) is outside the dirty regions "
                             "(clean, not in this backup); the read mixes "
                             "clean and dirty bytes"));
    assert_non_null (strstr (msg, "nbdcopy --request-size=65536"));
    ba_view_get_stats (v, &st);
    assert_int_equal (st.refused, 3);
    assert_int_equal (st.reads, 0);
    ba_view_free (v);
  }
}

/* Reads consume; a complete cluster is handed out to trim, whole, once,
 * and refused afterwards.
 */
static void
test_discard (void **state)
{
  struct ba_view *v = make_view (M, 64 * K, false, 0, 0, 1,
                                 (uint64_t) 1000, 100 * K);
  struct ba_regions trims;
  struct ba_view_stats st;

  ba_regions_init (&trims);
  /* Clusters 0 and 1 hold dirty bytes [1000, 64K) and [64K, 100K). */
  assert_int_equal (ba_view_read_done (v, 1000, 10000, &trims), 0);
  assert_int_equal (trims.n, 0);
  assert_int_equal (ba_view_read_done (v, 11000, 100 * K - 11000,
                                       &trims), 0);
  assert_int_equal (trims.n, 1);
  assert_int_equal (trims.r[0].start, 0);
  assert_int_equal (trims.r[0].end, 128 * K);
  ba_regions_clear (&trims);
  ba_view_free (v);

  v = make_view (M, 64 * K, false, 0, 0, 1, (uint64_t) 1000, 100 * K);
  assert_int_equal (ba_view_read_done (v, 1000, 64 * K - 1000, &trims), 0);
  assert_int_equal (trims.n, 1);
  assert_int_equal (trims.r[0].start, 0);
  assert_int_equal (trims.r[0].end, 64 * K);
  ba_view_trimmed (v, 64 * K, true, false);
  expect_refusal (v, 2000, 10, BA_VIEW_DISCARDED, 2000, 2010);
  ba_regions_clear (&trims);
  /* A client trim completes cluster 1. */
  assert_int_equal (ba_view_client_trim (v, 64 * K, 64 * K, &trims), 0);
  assert_int_equal (trims.n, 1);
  assert_int_equal (trims.r[0].start, 64 * K);
  ba_view_trimmed (v, 64 * K, false, false);
  ba_view_get_stats (v, &st);
  assert_int_equal (st.reads, 1);
  assert_int_equal (st.bytes_read, 64 * K - 1000);
  assert_int_equal (st.client_trims, 1);
  assert_int_equal (st.trims_sent, 1);
  assert_int_equal (st.bytes_discarded, 64 * K);
  assert_int_equal (st.trim_errors, 1);
  assert_int_equal (st.readable_left, 0);
  assert_int_equal (st.readable_total, 100 * K - 1000);
  assert_int_equal (st.refused, 1);
  ba_regions_free (&trims);
  ba_view_free (v);
}

/* Without discard, reads consume nothing; client trims still do. */
static void
test_no_discard (void **state)
{
  struct ba_regions d, trims;
  struct ba_view_config c = {
    .disk_size = M, .cluster_size = 64 * K, .dirty = &d, .discard = false,
  };
  struct ba_view *v;

  ba_regions_init (&d);
  ba_regions_init (&trims);
  assert_int_equal (ba_regions_append (&d, 0, M), 0);
  v = ba_view_new (&c);
  assert_non_null (v);
  assert_int_equal (ba_view_read_done (v, 0, M, &trims), 0);
  assert_int_equal (trims.n, 0);
  expect_refusal (v, 0, M, BA_VIEW_READABLE, 0, 0);
  assert_int_equal (ba_view_client_trim (v, 0, 64 * K, &trims), 0);
  assert_int_equal (trims.n, 1);
  ba_regions_free (&trims);
  ba_regions_free (&d);
  ba_view_free (v);
}

/* A batch waits for ba_view_flush; the lag stays readable. */
static void
test_batch_and_lag (void **state)
{
  struct ba_view *v = make_view (4 * M, 64 * K, false, M, 128 * K, -1);
  struct ba_regions trims;

  ba_regions_init (&trims);
  assert_int_equal (ba_view_read_done (v, 0, 256 * K, &trims), 0);
  assert_int_equal (trims.n, 0);
  /* The newest 128K are in the lag: readable again; older ones wait
   * in the batch and are not.
   */
  expect_refusal (v, 128 * K, 128 * K, BA_VIEW_READABLE, 0, 0);
  expect_refusal (v, 0, 64 * K, BA_VIEW_DISCARDED, 0, 64 * K);
  assert_int_equal (ba_view_flush (v, &trims), 0);
  assert_int_equal (trims.n, 1);
  assert_int_equal (trims.r[0].start, 0);
  assert_int_equal (trims.r[0].end, 128 * K);
  ba_regions_free (&trims);
  ba_view_free (v);
}

/* QEMU refusing a readable range means a broken snapshot; a range
 * discarded meanwhile does not.
 */
static void
test_upstream_refused (void **state)
{
  struct ba_view *v = make_view (M, 64 * K, false, 0, 0, -1);
  struct ba_regions trims;
  struct ba_range bad;
  struct ba_view_stats st;
  char msg[256];

  ba_regions_init (&trims);
  assert_int_equal (ba_view_read_done (v, 0, 64 * K, &trims), 0);
  assert_int_equal (ba_view_upstream_refused (v, 0, 4096, &bad),
                    BA_VIEW_DISCARDED);
  assert_int_equal (bad.start, 0);
  assert_int_equal (bad.end, 4096);
  ba_view_get_stats (v, &st);
  assert_false (st.broken);
  assert_int_equal (ba_view_upstream_refused (v, 64 * K, 4096, &bad),
                    BA_VIEW_BROKEN);
  expect_refusal (v, 128 * K, 4096, BA_VIEW_BROKEN, 128 * K, 132 * K);
  /* Refusals by the read rule still come first. */
  expect_refusal (v, 0, 4096, BA_VIEW_DISCARDED, 0, 4096);
  ba_view_get_stats (v, &st);
  assert_true (st.broken);
  assert_int_equal (st.refused, 1);
  ba_view_refusal_message (v, BA_VIEW_BROKEN, &bad, msg, sizeof msg);
  assert_string_equal (msg, "the snapshot is broken (see the first error)");
  ba_regions_free (&trims);
  ba_view_free (v);
}

static void
expect_run (struct ba_view *v, uint64_t off, uint64_t end, uint64_t len,
            enum ba_view_extent want, uint32_t flags)
{
  enum ba_view_extent kind;

  assert_int_equal (ba_view_extent_run (v, off, end, &kind), len);
  assert_int_equal (kind, want);
  if (want != BA_VIEW_EXTENT_READABLE)
    assert_int_equal (ba_view_unreadable_flags (v, kind), flags);
}

/* Clean runs read as zeroes with clean_is_zero; discarded runs never. */
static void
test_extents (void **state)
{
  for (int zero = 0; zero <= 1; zero++) {
    struct ba_view *v = make_view (M, 64 * K, zero, 0, 0, 2,
                                   (uint64_t) 1000, (uint64_t) 6000,
                                   64 * K, 256 * K);
    struct ba_regions trims;
    const uint32_t clean = zero ? 3 : 1;

    ba_regions_init (&trims);
    expect_run (v, 0, M, 1000, BA_VIEW_EXTENT_CLEAN, clean);
    expect_run (v, 1000, M, 5000, BA_VIEW_EXTENT_READABLE, 0);
    expect_run (v, 6000, M, 64 * K - 6000, BA_VIEW_EXTENT_CLEAN, clean);
    expect_run (v, 64 * K, 100 * K, 36 * K, BA_VIEW_EXTENT_READABLE, 0);
    /* Cluster 0 read: its dirty bytes are discarded, the rest clean. */
    assert_int_equal (ba_view_read_done (v, 1000, 5000, &trims), 0);
    expect_run (v, 0, M, 1000, BA_VIEW_EXTENT_CLEAN, clean);
    expect_run (v, 1000, M, 5000, BA_VIEW_EXTENT_DISCARDED, 1);
    expect_run (v, 6000, M, 64 * K - 6000, BA_VIEW_EXTENT_CLEAN, clean);
    /* Readable runs: upstream's flags, never type 1; always data with
     * clean_is_zero.
     */
    assert_int_equal (ba_view_readable_flags (v, 1), 0);
    assert_int_equal (ba_view_readable_flags (v, 0), 0);
    assert_int_equal (ba_view_readable_flags (v, 2), zero ? 0 : 2);
    assert_int_equal (ba_view_readable_flags (v, 3), zero ? 0 : 3);
    ba_regions_free (&trims);
    ba_view_free (v);
  }
}

static void
test_clean_clusters_and_summary (void **state)
{
  struct ba_view *v = make_view (4 * 64 * K, 64 * K, false, 0, 0, 1,
                                 70 * K, 80 * K);
  struct ba_regions out;
  char buf[512];

  ba_regions_init (&out);
  assert_int_equal (ba_view_clean_clusters (v, &out), 0);
  assert_int_equal (out.n, 2);
  assert_int_equal (out.r[0].end, 64 * K);
  assert_int_equal (out.r[1].start, 128 * K);
  ba_view_trimmed (v, 192 * K, true, true);
  ba_view_summary (v, buf, sizeof buf);
  assert_string_equal (buf, "0 bytes read in 0 reads, 0 bytes discarded in "
                       "0 trims, 0 trim errors, 0 requests refused, 10240 "
                       "of 10240 readable bytes left, 144 bytes of tracking "
                       "memory at peak, 0 consumed bytes not tracked "
                       "(memory budget)");
  ba_regions_free (&out);
  ba_view_free (v);
}

/* Several threads read disjoint pieces: every cluster is handed out
 * exactly once.
 */
struct reader {
  struct ba_view *v;
  int id;
  struct ba_regions trims;
};

static void *
read_pieces (void *arg)
{
  struct reader *r = arg;

  for (uint64_t off = r->id * 4096; off < 8 * M; off += 4 * 4096)
    assert_int_equal (ba_view_read_done (r->v, off, 4096, &r->trims), 0);
  return NULL;
}

static void
test_threads (void **state)
{
  struct ba_view *v = make_view (8 * M, 64 * K, false, 0, 0, -1);
  struct reader r[4];
  pthread_t t[4];
  uint64_t total = 0;

  for (int i = 0; i < 4; i++) {
    r[i].v = v;
    r[i].id = i;
    ba_regions_init (&r[i].trims);
    assert_int_equal (pthread_create (&t[i], NULL, read_pieces, &r[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    pthread_join (t[i], NULL);
    total += ba_regions_total (&r[i].trims);
    for (int j = 0; j < i; j++)
      for (size_t a = 0; a < r[i].trims.n; a++)
        assert_int_equal (ba_regions_overlap (&r[j].trims,
                                              r[i].trims.r[a].start,
                                              r[i].trims.r[a].end), 0);
  }
  assert_int_equal (total, 8 * M);
  for (int i = 0; i < 4; i++)
    ba_regions_free (&r[i].trims);
  ba_view_free (v);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_new_errors),
    cmocka_unit_test (test_preferred_size),
    cmocka_unit_test (test_read_rule),
    cmocka_unit_test (test_discard),
    cmocka_unit_test (test_no_discard),
    cmocka_unit_test (test_batch_and_lag),
    cmocka_unit_test (test_upstream_refused),
    cmocka_unit_test (test_extents),
    cmocka_unit_test (test_clean_clusters_and_summary),
    cmocka_unit_test (test_threads),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
