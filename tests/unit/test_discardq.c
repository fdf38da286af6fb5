/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for ba_discard_queue: batching and the discard lag. */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "discardq.h"
#include "regions.h"

#define C 65536                 /* cluster size */

/* Adds the clusters [first, last) as one completed range; returns what
 * is due now in *due (initialised here).
 */
static void
add (struct ba_discard_queue *q, uint64_t first, uint64_t last,
     struct ba_regions *due)
{
  struct ba_regions done;

  ba_regions_init (&done);
  ba_regions_init (due);
  assert_int_equal (ba_regions_append (&done, first * C, last * C), 0);
  assert_int_equal (ba_discard_queue_add (q, &done, due), 0);
  ba_regions_free (&done);
}

static void
check_due (struct ba_regions *due, uint64_t first, uint64_t last)
{
  if (first == last)
    assert_int_equal (due->n, 0);
  else {
    assert_int_equal (due->n, 1);
    assert_int_equal (due->r[0].start, first * C);
    assert_int_equal (due->r[0].end, last * C);
  }
  ba_regions_free (due);
}

static void
test_no_batch_no_lag (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (0, 0, C);
  struct ba_regions due;

  add (q, 3, 5, &due);
  check_due (&due, 3, 5);
  assert_int_equal (ba_discard_queue_bytes (q), 0);
  assert_false (ba_discard_queue_lagging (q, 3 * C, 4 * C));
  ba_discard_queue_free (q);
}

static void
test_batch_fills (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (4 * C, 0, C);
  struct ba_regions due;

  /* Out of order, merged into one trim once 4 clusters are in. */
  add (q, 2, 3, &due);
  check_due (&due, 0, 0);
  add (q, 0, 1, &due);
  check_due (&due, 0, 0);
  add (q, 1, 2, &due);
  check_due (&due, 0, 0);
  /* Waiting in the batch is not readable again. */
  assert_false (ba_discard_queue_lagging (q, 0, C));
  assert_int_equal (ba_discard_queue_bytes (q), 3 * C);
  add (q, 3, 4, &due);
  check_due (&due, 0, 4);
  assert_int_equal (ba_discard_queue_bytes (q), 0);
  assert_false (ba_discard_queue_lagging (q, 0, C));
  ba_discard_queue_free (q);
}

static void
test_batch_short_ranges_wait (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (2 * C, 0, C);
  struct ba_regions due;

  /* Separate single clusters wait until 4 x batch bytes are in... */
  for (uint64_t i = 0; i < 7; i++) {
    add (q, 2 * i, 2 * i + 1, &due);
    check_due (&due, 0, 0);
  }
  add (q, 14, 15, &due);
  assert_int_equal (due.n, 8);
  ba_regions_free (&due);
  /* ...while a range as long as the batch goes at once. */
  add (q, 20, 21, &due);
  check_due (&due, 0, 0);
  add (q, 30, 32, &due);
  check_due (&due, 30, 32);
  assert_int_equal (ba_discard_queue_bytes (q), C);
  ba_discard_queue_free (q);
}

static void
test_batch_too_many_ranges (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (1 << 30, 0, C);
  struct ba_regions due;

  for (uint64_t i = 0; i < 1024; i++) {
    add (q, 2 * i, 2 * i + 1, &due);
    check_due (&due, 0, 0);
  }
  add (q, 5000, 5001, &due);
  assert_int_equal (due.n, 1025);
  ba_regions_free (&due);
  ba_discard_queue_free (q);
}

static void
test_flush_sends_batch (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (8 * C, 0, C);
  struct ba_regions due;

  add (q, 5, 7, &due);
  check_due (&due, 0, 0);
  ba_regions_init (&due);
  assert_int_equal (ba_discard_queue_flush (q, &due), 0);
  check_due (&due, 5, 7);
  ba_regions_init (&due);
  assert_int_equal (ba_discard_queue_flush (q, &due), 0);
  check_due (&due, 0, 0);
  ba_discard_queue_free (q);
}

static void
test_lag_keeps_newest (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (0, 2 * C, C);
  struct ba_regions due;

  add (q, 10, 11, &due);
  check_due (&due, 0, 0);
  add (q, 4, 5, &due);          /* completion order, not offset order */
  check_due (&due, 0, 0);
  add (q, 0, 1, &due);
  check_due (&due, 10, 11);     /* the oldest leaves */
  assert_true (ba_discard_queue_lagging (q, 4 * C, 5 * C));
  assert_true (ba_discard_queue_lagging (q, 0, C));
  assert_false (ba_discard_queue_lagging (q, 10 * C, 11 * C));
  /* The flush at the end of a connection keeps the lag. */
  ba_regions_init (&due);
  assert_int_equal (ba_discard_queue_flush (q, &due), 0);
  check_due (&due, 0, 0);
  assert_int_equal (ba_discard_queue_bytes (q), 2 * C);
  ba_discard_queue_free (q);
}

static void
test_lag_splits_long_range (void **state)
{
  /* 2.5 clusters of lag keep 3 whole clusters. */
  struct ba_discard_queue *q = ba_discard_queue_new (0, 2 * C + C / 2, C);
  struct ba_regions due;

  add (q, 0, 10, &due);
  check_due (&due, 0, 7);
  assert_true (ba_discard_queue_lagging (q, 7 * C, 10 * C));
  assert_false (ba_discard_queue_lagging (q, 6 * C, 7 * C + 1));
  /* Contiguous ranges merge in the lag. */
  add (q, 10, 11, &due);
  check_due (&due, 7, 8);
  assert_true (ba_discard_queue_lagging (q, 8 * C, 11 * C));
  ba_discard_queue_free (q);
}

static void
test_lag_then_batch (void **state)
{
  struct ba_discard_queue *q = ba_discard_queue_new (3 * C, C, C);
  struct ba_regions due;

  for (uint64_t i = 0; i < 3; i++) {
    add (q, i, i + 1, &due);
    check_due (&due, 0, 0);
  }
  add (q, 3, 4, &due);          /* 0..3 left the lag: a batch of 3 */
  check_due (&due, 0, 3);
  assert_true (ba_discard_queue_lagging (q, 3 * C, 4 * C));
  ba_discard_queue_free (q);
}

/* Random completions: every cluster is handed out exactly once (or is
 * still waits), never one that was not completed, at most
 * lag + 4 x batch + a cluster wait, and without a batch all that waits is
 * in the lag.
 */
static void
test_random_model (void **state)
{
  enum { N = 512 };
  for (unsigned seed = 1; seed <= 20; seed++) {
    uint64_t batch = (seed % 4) * 3 * C, lag = (seed % 3) * 5 * C / 2;
    struct ba_discard_queue *q = ba_discard_queue_new (batch, lag, C);
    unsigned char state_of[N] = { 0 };  /* 0 new, 1 completed, 2 trimmed */
    unsigned order[N];

    srand (seed);
    for (unsigned i = 0; i < N; i++)
      order[i] = i;
    for (unsigned i = N - 1; i > 0; i--) {
      unsigned j = rand () % (i + 1), t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    for (unsigned k = 0; k < N; k++) {
      struct ba_regions due;
      uint64_t waiting = 0;

      state_of[order[k]] = 1;
      add (q, order[k], order[k] + 1, &due);
      for (size_t i = 0; i < due.n; i++)
        for (uint64_t c = due.r[i].start / C; c < due.r[i].end / C; c++) {
          assert_int_equal (state_of[c], 1);
          state_of[c] = 2;
        }
      ba_regions_free (&due);
      for (unsigned c = 0; c < N; c++)
        if (state_of[c] == 1) {
          waiting += C;
          if (batch == 0)
            assert_true (ba_discard_queue_lagging (q, (uint64_t) c * C,
                                                   (uint64_t) (c + 1) * C));
        }
      assert_int_equal (waiting, ba_discard_queue_bytes (q));
      assert_true (waiting <= lag + 4 * batch + C);
    }
    ba_discard_queue_free (q);
  }
}

static void
test_bad_cluster (void **state)
{
  errno = 0;
  assert_null (ba_discard_queue_new (0, 0, 0));
  assert_int_equal (errno, EINVAL);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_no_batch_no_lag),
    cmocka_unit_test (test_batch_fills),
    cmocka_unit_test (test_batch_short_ranges_wait),
    cmocka_unit_test (test_batch_too_many_ranges),
    cmocka_unit_test (test_flush_sends_batch),
    cmocka_unit_test (test_lag_keeps_newest),
    cmocka_unit_test (test_lag_splits_long_range),
    cmocka_unit_test (test_lag_then_batch),
    cmocka_unit_test (test_random_model),
    cmocka_unit_test (test_bad_cluster),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
