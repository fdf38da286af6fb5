/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the command line's sizes (lib/size.c): the forms taken,
 * the ones refused and why, overflow and the caller's maximum.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "size.h"

#define ANY UINT64_MAX

static uint64_t
good (const char *s, uint64_t max)
{
  uint64_t v = 12345;
  const char *why = NULL;

  if (ba_parse_size (s, max, &v, &why) != 0)
    fail_msg ("'%s' refused: %s", s, why);
  return v;
}

/* s refused, with a reason starting with want; *value untouched. */
static void
bad (const char *s, uint64_t max, const char *want)
{
  uint64_t v = 12345;
  const char *why = NULL;

  if (ba_parse_size (s, max, &v, &why) != -1)
    fail_msg ("'%s' taken as %llu", s, (unsigned long long) v);
  assert_non_null (why);
  if (strncmp (why, want, strlen (want)) != 0)
    fail_msg ("'%s': '%s', wanted '%s'", s, why, want);
  assert_int_equal (v, 12345);
}

static void
test_good (void **state)
{
  assert_int_equal (good ("0", ANY), 0);
  assert_int_equal (good ("512", ANY), 512);
  assert_int_equal (good ("64K", ANY), 65536);
  assert_int_equal (good ("64k", ANY), 65536);
  assert_int_equal (good ("4M", ANY), 4 << 20);
  assert_int_equal (good ("4m", ANY), 4 << 20);
  assert_int_equal (good ("1G", ANY), UINT64_C (1) << 30);
  assert_int_equal (good ("1g", ANY), UINT64_C (1) << 30);
  assert_int_equal (good ("2T", ANY), UINT64_C (2) << 40);
  assert_int_equal (good ("2t", ANY), UINT64_C (2) << 40);
  assert_int_equal (good ("0K", ANY), 0);
  assert_int_equal (good ("007", ANY), 7);
  assert_true (good ("18446744073709551615", ANY) == UINT64_MAX);
  assert_true (good ("16777215T", ANY) ==
               UINT64_MAX - ((UINT64_C (1) << 40) - 1));
}

static void
test_max (void **state)
{
  /* Exactly max is taken, one more is not, with or without a unit. */
  assert_int_equal (good ("1G", UINT64_C (1) << 30), UINT64_C (1) << 30);
  assert_int_equal (good ("1073741824", UINT64_C (1) << 30),
                    UINT64_C (1) << 30);
  assert_int_equal (good ("64", 64), 64);
  assert_int_equal (good ("0", 0), 0);
  bad ("1073741825", UINT64_C (1) << 30, "too large (at most 1G)");
  bad ("1025M", UINT64_C (1) << 30, "too large (at most 1G)");
  bad ("2G", UINT64_C (1) << 30, "too large (at most 1G)");
  bad ("65", 64, "too large (at most 64)");
  bad ("1K", 64, "too large (at most 64)");
  bad ("33M", UINT64_C (32) << 20, "too large (at most 32M)");
  bad ("1", 0, "too large (at most 0)");
  bad ("9223372036854775808", INT64_MAX,
       "too large (at most 9223372036854775807)");
  bad ("8388608T", INT64_MAX, "too large");
}

static void
test_bad (void **state)
{
  const char *nan = "not a number";
  const char *nas = "not a size (a number, optionally with K, M, G or T)";

  bad ("", ANY, nan);
  bad ("-1", ANY, nan);
  bad ("+5", ANY, nan);
  bad (" 5", ANY, nan);
  bad ("K", ANY, nan);
  bad ("0x10", ANY, nas);
  bad ("1.5M", ANY, nas);
  bad ("12X", ANY, nas);
  bad ("1KB", ANY, nas);
  bad ("1KiB", ANY, nas);
  bad ("5 ", ANY, nas);
  bad ("1 K", ANY, nas);
  bad ("1P", ANY, nas);
  bad ("1b", ANY, nas);
}

static void
test_overflow (void **state)
{
  bad ("99999999999999999999", ANY, "too large");
  bad ("18446744073709551616", ANY, "too large");
  bad ("16777216T", ANY, "too large");
  bad ("17179869184G", ANY, "too large");
  bad ("17592186044416M", ANY, "too large");
  bad ("18014398509481984K", ANY, "too large");
  /* A bad form says so before any overflow. */
  bad ("99999999999999999999X", ANY, "not a size");
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_good),
    cmocka_unit_test (test_max),
    cmocka_unit_test (test_bad),
    cmocka_unit_test (test_overflow),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
