/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the map file parser (ba_map_parse, ba_map_parse_file)
 * and ba_regions_check_size.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "mapfile.h"
#include "regions.h"

#define M UINT64_MAX

/* Parses text (a C string) and checks that it gives the n ranges. */
static void
parse_ok (const char *text, const struct ba_range *want, size_t n)
{
  struct ba_regions set;
  char err[256] = "";

  ba_regions_init (&set);
  if (ba_map_parse (text, strlen (text), &set, err, sizeof err) != 0)
    fail_msg ("unexpected parse error: %s", err);
  assert_int_equal (set.n, n);
  for (size_t i = 0; i < n; i++) {
    assert_int_equal (set.r[i].start, want[i].start);
    assert_int_equal (set.r[i].end, want[i].end);
  }
  ba_regions_free (&set);
}

/* Parses len bytes of text and checks that it fails with a message
 * naming line lineno (and containing what, unless NULL), leaving the
 * set empty.
 */
static void
parse_fails_len (const char *text, size_t len, size_t lineno,
                 const char *what)
{
  struct ba_regions set;
  char err[256] = "";
  char line[32];

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 0, 512), 0);
  errno = 0;
  assert_int_equal (ba_map_parse (text, len, &set, err, sizeof err), -1);
  assert_int_equal (errno, EINVAL);
  assert_int_equal (set.n, 0);
  snprintf (line, sizeof line, "line %zu:", lineno);
  if (strstr (err, line) == NULL)
    fail_msg ("message \"%s\" does not name \"%s\"", err, line);
  if (what && strstr (err, what) == NULL)
    fail_msg ("message \"%s\" does not contain \"%s\"", err, what);
  ba_regions_free (&set);
}

static void
parse_fails (const char *text, size_t lineno, const char *what)
{
  parse_fails_len (text, strlen (text), lineno, what);
}

static void
test_nbdinfo (void **state)
{
  /* Verbatim "nbdinfo --map=qemu:dirty-bitmap:NAME" output. */
  const struct ba_range one[] = { { 0, 4194304 } };
  parse_ok ("         0     4194304    1  dirty\n"
            "   4194304  1069547520    0  clean\n", one, 1);

  const struct ba_range three[] = {
    { 65536, 196608 }, { 1048576, 1114112 }, { 2097152, 3145728 }
  };
  parse_ok ("         0       65536    0  clean\n"
            "     65536      131072    1  dirty\n"
            "    196608      851968    0  clean\n"
            "   1048576       65536    1  dirty\n"
            "   1114112      983040    0  clean\n"
            "   2097152      524288    1  dirty\n"
            "   2621440      524288    1  dirty\n", three, 3);

  /* Without the description column, and other type bits ignored. */
  const struct ba_range bits[] = { { 0, 10 }, { 20, 30 } };
  parse_ok ("0 10 1\n10 10 0\n20 10 3 dirty\n30 5 2 clean\n", bits, 2);

  /* All clean: no region. */
  parse_ok ("0 1073741824 0 clean\n", NULL, 0);
}

static void
test_plain (void **state)
{
  const struct ba_range want[] = { { 0, 512 }, { 4096, 8192 } };
  parse_ok ("0 512\n4096 4096\n", want, 2);
  /* No final newline, tabs. */
  parse_ok ("0\t512\n\t4096 4096", want, 2);
  parse_ok ("", NULL, 0);
  parse_ok ("\n\n", NULL, 0);

  /* Up to the very end of the 64 bit range. */
  const struct ba_range top[] = { { M - 1, M } };
  parse_ok ("18446744073709551614 1\n", top, 1);
  const struct ba_range all[] = { { 0, M } };
  parse_ok ("0 18446744073709551615\n", all, 1);
}

static void
test_comments_blank (void **state)
{
  const struct ba_range want[] = { { 0, 10 }, { 20, 25 } };

  parse_ok ("# a comment\n"
            "\n"
            "   \n"
            "\t\n"
            "0 10   # trailing comment\n"
            "#20 30 commented out: not a region\n"
            "20 5\n"
            "# the end", want, 2);
  parse_ok ("# nbdinfo map\n"
            "         0          10    1  dirty  # first\n"
            "\n"
            "        10          10    0  clean\n"
            "        20           5    1  dirty\n", want, 2);
}

static void
test_crlf (void **state)
{
  const struct ba_range want[] = { { 0, 10 }, { 20, 25 } };

  parse_ok ("0 10\r\n20 5\r\n", want, 2);
  parse_ok ("# c\r\n\r\n0 10\r\n20 5", want, 2);
  parse_ok ("         0          10    1  dirty\r\n"
            "        10          10    0  clean\r\n"
            "        20           5    1  dirty\r\n", want, 2);
  /* Line numbers still count CRLF lines. */
  parse_fails ("0 10\r\n\r\nx 5\r\n", 3, NULL);
}

static void
test_plain_merge (void **state)
{
  const struct ba_range want[] = { { 0, 160 }, { 300, 310 } };

  parse_ok ("0 100\n"
            "50 100\n"          /* overlapping */
            "150 10\n"          /* adjacent */
            "150 5\n"           /* same offset, inside */
            "300 10\n"
            "300 10\n", want, 2);
  const struct ba_range same[] = { { 0, 20 } };
  parse_ok ("0 10\n0 20\n", same, 1);
}

/* The parse replaces what the set held before. */
static void
test_replaces (void **state)
{
  struct ba_regions set;
  char err[256];
  const char *text = "100 10\n";

  ba_regions_init (&set);
  assert_int_equal (ba_regions_append (&set, 500, 600), 0);
  assert_int_equal (ba_map_parse (text, strlen (text), &set,
                                  err, sizeof err), 0);
  assert_int_equal (set.n, 1);
  assert_int_equal (set.r[0].start, 100);
  assert_int_equal (set.r[0].end, 110);
  ba_regions_free (&set);
}

static void
test_err_unsorted (void **state)
{
  parse_fails ("100 10\n0 10\n", 2, "sorted");
  parse_fails ("# c\n100 10\n\n200 10\n150 10\n", 5, "sorted");
  parse_fails ("         0          10    1  dirty\n"
               "       100          10    0  clean\n"
               "        50          10    0  clean\n", 3, "sorted");
}

static void
test_err_numbers (void **state)
{
  parse_fails ("-1 10\n", 1, "offset");
  parse_fails ("0 10\n20 -5\n", 2, "length");
  parse_fails ("+1 10\n", 1, "offset");
  parse_fails ("abc 10\n", 1, "offset");
  parse_fails ("0 10x\n", 1, "length");
  parse_fails ("0x10 5\n", 1, "offset");
  parse_fails ("1e3 5\n", 1, "offset");
  parse_fails ("1.5 5\n", 1, "offset");
  parse_fails ("0 10 one dirty\n", 1, "type");
  parse_fails ("0 10 -1 dirty\n", 1, "type");
  parse_fails ("0 10 4294967296 dirty\n", 1, "type");
}

static void
test_err_overflow (void **state)
{
  /* UINT64_MAX + 1 in either column. */
  parse_fails ("18446744073709551616 1\n", 1, "offset");
  parse_fails ("0 18446744073709551616\n", 1, "length");
  parse_fails ("0 10\n99999999999999999999999 1\n", 2, "offset");
  /* offset + length past UINT64_MAX. */
  parse_fails ("18446744073709551615 1\n", 1, "overflows");
  parse_fails ("1 18446744073709551615\n", 1, "overflows");
  parse_fails ("0 1\n9223372036854775808 9223372036854775808\n", 2,
               "overflows");
  parse_fails ("18446744073709551615 1 1 dirty\n", 1, "overflows");
}

static void
test_err_zero_length (void **state)
{
  parse_fails ("0 0\n", 1, "length 0");
  parse_fails ("0 10\n\n10 0\n", 3, "length 0");
  parse_fails ("0 0 0 clean\n", 1, "length 0");
}

static void
test_err_mixed (void **state)
{
  parse_fails ("0 10\n20 10 1 dirty\n", 2, "mixes");
  parse_fails ("0 10 1 dirty\n20 10\n", 2, "mixes");
  parse_fails ("0 10 1\n# c\n20 10\n", 3, "mixes");
}

/* A map of base:allocation instead of qemu:dirty-bitmap:NAME. */
static void
test_err_base_allocation (void **state)
{
  parse_fails ("         0       65536    3  hole,zero\n"
               "     65536      131072    0  data\n", 1, "base:allocation");
  parse_fails ("0 65536 0 data\n", 1, "base:allocation");
  parse_fails ("0 65536 1 dirty\n65536 65536 0 data\n", 2,
               "base:allocation");
  parse_fails ("0 65536 1 clean\n", 1, NULL);
  parse_fails ("0 65536 0 dirty\n", 1, NULL);
}

static void
test_err_dirty_clean_overlap (void **state)
{
  /* A dirty line starting inside a clean one... */
  parse_fails ("0 100 0 clean\n50 100 1 dirty\n", 2, "overlaps");
  /* ...a clean line starting inside a dirty one... */
  parse_fails ("0 100 1 dirty\n50 10 0 clean\n", 2, "overlaps");
  /* ...and at the same offset. */
  parse_fails ("0 100 1 dirty\n0 10 0 clean\n", 2, "overlaps");
  parse_fails ("0 100 0 clean\n0 10 1 dirty\n", 2, "overlaps");
  /* Touching is fine. */
  const struct ba_range want[] = { { 100, 110 } };
  parse_ok ("0 100 0 clean\n100 10 1 dirty\n110 10 0 clean\n", want, 1);
}

static void
test_err_columns (void **state)
{
  parse_fails ("0\n", 1, NULL);
  parse_fails ("0 10\n20\n", 2, NULL);
  parse_fails ("0 10 1 dirty extra\n", 1, NULL);
  parse_fails ("0 10 1 dirty a b c d\n", 1, NULL);
  parse_fails ("# c\n\n0 10 1 dirty\n10 10 0 clean # ok\n20 1 1 dirty x\n",
               5, NULL);
}

static void
test_err_nul (void **state)
{
  static const char text[] = "0 10\n20\0 10\n";
  static const char first[] = "\0" "0 10\n";

  parse_fails_len (text, sizeof text - 1, 2, "NUL");
  parse_fails_len (first, sizeof first - 1, 1, "NUL");
}

/* A small errbuf is truncated, never overrun. */
static void
test_err_small_buffer (void **state)
{
  struct ba_regions set;
  char err[16];
  const char *text = "0 10\nnot a number\n";

  memset (err, 'X', sizeof err);
  ba_regions_init (&set);
  assert_int_equal (ba_map_parse (text, strlen (text), &set, err, 8), -1);
  assert_string_equal (err, "line 2:");
  assert_int_equal (err[8], 'X');
  ba_regions_free (&set);
}

/* Writes text to a new temporary file; returns its name (to free). */
static char *
write_temp (const char *text)
{
  char *path = strdup ("/tmp/test_mapfile.XXXXXX");
  int fd;
  size_t len = strlen (text);

  assert_non_null (path);
  fd = mkstemp (path);
  assert_true (fd >= 0);
  assert_int_equal (write (fd, text, len), len);
  assert_int_equal (close (fd), 0);
  return path;
}

static void
test_file (void **state)
{
  struct ba_regions set;
  char err[512] = "";
  char *path;

  ba_regions_init (&set);

  path = write_temp ("         0     4194304    1  dirty\n"
                     "   4194304  1069547520    0  clean\n"
                     "1073741824       65536    1  dirty\n");
  if (ba_map_parse_file (path, &set, err, sizeof err) != 0)
    fail_msg ("unexpected error: %s", err);
  assert_int_equal (set.n, 2);
  assert_int_equal (set.r[0].start, 0);
  assert_int_equal (set.r[0].end, 4194304);
  assert_int_equal (set.r[1].start, 1073741824);
  assert_int_equal (set.r[1].end, 1073741824 + 65536);
  unlink (path);
  free (path);

  /* Empty file. */
  path = write_temp ("");
  assert_int_equal (ba_map_parse_file (path, &set, err, sizeof err), 0);
  assert_int_equal (set.n, 0);
  unlink (path);
  free (path);

  /* Errors name the file and the line. */
  path = write_temp ("10 10\n\n5 10\n");
  assert_int_equal (ba_map_parse_file (path, &set, err, sizeof err), -1);
  assert_non_null (strstr (err, path));
  assert_non_null (strstr (err, "line 3:"));
  unlink (path);
  free (path);

  ba_regions_free (&set);
}

/* Larger than the reader's first 64 KiB buffer. */
static void
test_file_large (void **state)
{
  struct ba_regions set;
  char err[512] = "";
  char *text, *path;
  size_t n = 20000, len = 0;

  text = malloc (n * 32);
  assert_non_null (text);
  for (size_t i = 0; i < n; i++)
    len += sprintf (text + len, "%zu 512\n", i * 1024);
  path = write_temp (text);
  ba_regions_init (&set);
  if (ba_map_parse_file (path, &set, err, sizeof err) != 0)
    fail_msg ("unexpected error: %s", err);
  assert_int_equal (set.n, n);
  assert_int_equal (set.r[n - 1].start, (n - 1) * 1024);
  assert_int_equal (ba_regions_total (&set), n * 512);
  ba_regions_free (&set);
  unlink (path);
  free (path);
  free (text);
}

static void
test_file_missing (void **state)
{
  struct ba_regions set;
  char err[512] = "";
  const char *path = "/nonexistent/dir/test_mapfile.map";

  ba_regions_init (&set);
  assert_int_equal (ba_map_parse_file (path, &set, err, sizeof err), -1);
  assert_non_null (strstr (err, path));
  assert_non_null (strstr (err, strerror (ENOENT)));
  ba_regions_free (&set);
}

static void
test_check_size (void **state)
{
  struct ba_regions set;
  char err[256] = "";

  ba_regions_init (&set);
  assert_int_equal (ba_regions_check_size (&set, 0, err, sizeof err), 0);
  assert_int_equal (ba_regions_append (&set, 0, 512), 0);
  assert_int_equal (ba_regions_append (&set, 4096, 8192), 0);
  assert_int_equal (ba_regions_check_size (&set, 8192, err, sizeof err), 0);
  assert_int_equal (ba_regions_check_size (&set, M, err, sizeof err), 0);
  errno = 0;
  assert_int_equal (ba_regions_check_size (&set, 8191, err, sizeof err), -1);
  assert_int_equal (errno, EINVAL);
  assert_non_null (strstr (err, "8192"));
  assert_non_null (strstr (err, "8191"));
  assert_int_equal (ba_regions_check_size (&set, 0, err, sizeof err), -1);
  ba_regions_free (&set);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_nbdinfo),
    cmocka_unit_test (test_plain),
    cmocka_unit_test (test_comments_blank),
    cmocka_unit_test (test_crlf),
    cmocka_unit_test (test_plain_merge),
    cmocka_unit_test (test_replaces),
    cmocka_unit_test (test_err_unsorted),
    cmocka_unit_test (test_err_numbers),
    cmocka_unit_test (test_err_overflow),
    cmocka_unit_test (test_err_zero_length),
    cmocka_unit_test (test_err_mixed),
    cmocka_unit_test (test_err_base_allocation),
    cmocka_unit_test (test_err_dirty_clean_overlap),
    cmocka_unit_test (test_err_columns),
    cmocka_unit_test (test_err_nul),
    cmocka_unit_test (test_err_small_buffer),
    cmocka_unit_test (test_file),
    cmocka_unit_test (test_file_large),
    cmocka_unit_test (test_file_missing),
    cmocka_unit_test (test_check_size),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
