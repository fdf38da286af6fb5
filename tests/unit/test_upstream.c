/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for what lib/upstream.c decides without a server: the split
 * plan of a read into QEMU-sized pieces (every byte once, in order, no
 * piece larger than the piece size or QEMU's limit, cut points on piece
 * boundaries, the count agreeing with the pieces), the piece size rule,
 * and that a pool to nowhere fails with a message.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "upstream.h"

#define K ((uint64_t) 1024)
#define M (K * K)

/* Walks the plan and checks every rule; returns the number of pieces. */
static uint64_t
check_plan (uint64_t offset, uint64_t count, uint32_t piece)
{
  struct ba_split s;
  uint64_t pos = offset, o, n = 0;
  uint32_t len;

  ba_split_init (&s, offset, count, piece);
  while (ba_split_next (&s, &o, &len)) {
    assert_int_equal (o, pos);                  /* in order, no gap */
    assert_true (len > 0);
    assert_true (len <= piece);
    assert_true (len <= BA_UPSTREAM_MAX_REQUEST);
    if (count > piece) {
      /* Cut on piece boundaries: only the first may start off one,
       * only the last may end off one.
       */
      if (n > 0)
        assert_int_equal (o % piece, 0);
      if (o + len < offset + count)
        assert_int_equal ((o + len) % piece, 0);
    }
    pos = o + len;
    n++;
  }
  assert_int_equal (pos, offset + count);       /* every byte */
  assert_false (ba_split_next (&s, &o, &len));  /* and stays done */
  assert_int_equal (ba_split_count (offset, count, piece), n);
  return n;
}

static void
test_aligned (void **state)
{
  uint32_t piece = BA_UPSTREAM_PIECE_DEFAULT;

  assert_int_equal (check_plan (0, 256 * K, piece), 1);
  assert_int_equal (check_plan (0, 1 * M, piece), 4);
  assert_int_equal (check_plan (4 * M, 4 * M, piece), 16);
  assert_int_equal (check_plan (0, 32 * M, piece), 128);
}

static void
test_small_is_one_piece (void **state)
{
  uint32_t piece = 256 * K;

  /* Up to a piece: as it is, even across a boundary. */
  assert_int_equal (check_plan (100, 1, piece), 1);
  assert_int_equal (check_plan (128 * K, 256 * K, piece), 1);
  assert_int_equal (check_plan (256 * K - 1, 2, piece), 1);
}

static void
test_unaligned (void **state)
{
  uint32_t piece = 256 * K;
  struct ba_split s;
  uint64_t o;
  uint32_t len;

  /* A 40 MiB read at 4 KiB: 252 KiB, then 159 whole pieces, then 4 KiB. */
  assert_int_equal (check_plan (4096, 40 * M, piece), 161);
  ba_split_init (&s, 4096, 40 * M, piece);
  assert_true (ba_split_next (&s, &o, &len));
  assert_int_equal (o, 4096);
  assert_int_equal (len, 256 * K - 4096);
  assert_true (ba_split_next (&s, &o, &len));
  assert_int_equal (o, 256 * K);
  assert_int_equal (len, 256 * K);

  assert_int_equal (check_plan (256 * K + 1, 256 * K + 1, piece), 2);
  assert_int_equal (check_plan (1, 512 * K, piece), 3);
  assert_int_equal (check_plan (3 * M + 17, 5 * M + 123, 64 * K), 81);
}

static void
test_edges (void **state)
{
  struct ba_split s;
  uint64_t o;
  uint32_t len;

  assert_int_equal (check_plan (12345, 0, 256 * K), 0);
  ba_split_init (&s, 0, 0, 256 * K);
  assert_false (ba_split_next (&s, &o, &len));
  /* Near the end of the offset range. */
  assert_int_equal (check_plan (UINT64_MAX - 3 * M, 3 * M, M), 4);
  /* The largest piece QEMU allows. */
  assert_int_equal (check_plan (0, 64 * M, BA_UPSTREAM_MAX_REQUEST), 2);
}

static void
test_exhaustive_small (void **state)
{
  /* Every offset and count of up to 5 pieces of 4 KiB, in 512-byte
   * steps, against the rules.
   */
  for (uint64_t off = 0; off < 20 * K; off += 512)
    for (uint64_t count = 0; count <= 20 * K; count += 512)
      check_plan (off, count, 4096);
}

static void
test_piece_valid (void **state)
{
  assert_true (ba_upstream_piece_valid (BA_UPSTREAM_PIECE_DEFAULT));
  assert_true (ba_upstream_piece_valid (4096));
  assert_true (ba_upstream_piece_valid (32 * M));
  assert_false (ba_upstream_piece_valid (2048));
  assert_false (ba_upstream_piece_valid (64 * M));
  assert_false (ba_upstream_piece_valid (256 * K + 4096));
  assert_false (ba_upstream_piece_valid (0));
}

static void
test_open_fails (void **state)
{
  char err[256] = "";
  struct ba_upstream_params p = {
    .socket = "/nonexistent/backupaccess-test.sock", .export = "x",
    .connections = 2,
  };

  assert_null (ba_upstream_open (&p, err, sizeof err));
  assert_non_null (strstr (err, "/nonexistent/backupaccess-test.sock"));
  p.connections = 0;
  err[0] = '\0';
  assert_null (ba_upstream_open (&p, err, sizeof err));
  assert_non_null (strstr (err, "out of range"));
  p.connections = 1;
  p.piece = 3000;
  err[0] = '\0';
  assert_null (ba_upstream_open (&p, err, sizeof err));
  assert_non_null (strstr (err, "out of range"));
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_aligned),
    cmocka_unit_test (test_small_is_one_piece),
    cmocka_unit_test (test_unaligned),
    cmocka_unit_test (test_edges),
    cmocka_unit_test (test_exhaustive_small),
    cmocka_unit_test (test_piece_valid),
    cmocka_unit_test (test_open_fails),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
