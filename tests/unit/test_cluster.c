/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the copy-before-write cluster's rules (lib/cluster.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cluster.h"

static void
test_valid (void **state)
{
  assert_true (ba_cluster_size_valid (BA_CLUSTER_DEFAULT));
  assert_true (ba_cluster_size_valid (512));
  assert_true (ba_cluster_size_valid (INT64_C (1) << 30));
  assert_false (ba_cluster_size_valid (256));
  assert_false (ba_cluster_size_valid (INT64_C (2) << 30));
  assert_false (ba_cluster_size_valid (65536 + 512));
  assert_false (ba_cluster_size_valid (0));
  assert_false (ba_cluster_size_valid (-65536));
}

static void
test_cbw_cluster (void **state)
{
  /* QEMU: MAX(64 KiB, the fleecing image's cluster). */
  assert_int_equal (ba_cbw_cluster (0), 65536);
  assert_int_equal (ba_cbw_cluster (-1), 65536);
  assert_int_equal (ba_cbw_cluster (4096), 65536);
  assert_int_equal (ba_cbw_cluster (65536), 65536);
  assert_int_equal (ba_cbw_cluster (131072), 131072);
  assert_int_equal (ba_cbw_cluster (2 << 20), 2 << 20);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_valid),
    cmocka_unit_test (test_cbw_cluster),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
