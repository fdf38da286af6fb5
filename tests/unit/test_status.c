/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for lib/status.c: the status file's keys and values, its
 * mode, and the thread's last write when it stops.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>
#include <json.h>

#include "status.h"

static char dir[] = "/tmp/test_status.XXXXXX";
static char path[64];

static int64_t
member (json_object *o, const char *key)
{
  json_object *v;

  assert_true (json_object_object_get_ex (o, key, &v));
  return json_object_get_int64 (v);
}

static void
test_write (void **state)
{
  struct ba_view_stats st = {
    .bytes_read = 5, .bytes_discarded = 4, .clean_discarded = 3,
    .readable_left = 2, .readable_total = 7, .refused = 1,
    .trim_errors = 6, .broken = true,
  };
  json_object *o, *b;
  struct stat sb;

  ba_status_write (path, &st);
  o = json_object_from_file (path);
  assert_non_null (o);
  assert_int_equal (member (o, "bytes-read"), 5);
  assert_int_equal (member (o, "bytes-discarded"), 4);
  assert_int_equal (member (o, "bytes-discarded-clean"), 3);
  assert_int_equal (member (o, "bytes-left"), 2);
  assert_int_equal (member (o, "bytes-total"), 7);
  assert_int_equal (member (o, "requests-refused"), 1);
  assert_int_equal (member (o, "trim-errors"), 6);
  assert_int_equal (member (o, "pid"), getpid ());
  assert_true (json_object_object_get_ex (o, "broken", &b));
  assert_true (json_object_get_boolean (b));
  json_object_put (o);
  assert_int_equal (stat (path, &sb), 0);
  assert_int_equal (sb.st_mode & 0777, 0600);
  unlink (path);
}

/* The thread writes at once, and the last counters when it stops. */
static void
test_thread (void **state)
{
  struct ba_regions trims;
  const struct ba_view_config c = {
    .disk_size = 1 << 20, .cluster_size = 65536, .discard = true,
  };
  struct ba_view *v = ba_view_new (&c);
  char err[256];
  struct ba_status *s;
  json_object *o;

  assert_non_null (v);
  s = ba_status_start (v, path, err, sizeof err);
  assert_non_null (s);
  ba_regions_init (&trims);
  assert_int_equal (ba_view_read_done (v, 0, 65536, &trims), 0);
  ba_regions_free (&trims);
  ba_status_stop (s);
  o = json_object_from_file (path);
  assert_non_null (o);
  assert_int_equal (member (o, "bytes-read"), 65536);
  assert_int_equal (member (o, "bytes-left"), (1 << 20) - 65536);
  json_object_put (o);
  ba_view_free (v);
  ba_status_stop (NULL);
  unlink (path);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_write),
    cmocka_unit_test (test_thread),
  };
  int r;

  if (mkdtemp (dir) == NULL)
    return 1;
  snprintf (path, sizeof path, "%s/status.json", dir);
  r = cmocka_run_group_tests (tests, NULL, NULL);
  rmdir (dir);
  return r;
}
