/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the handling of QMP output, ba_qmp_parse_reply
 * (lib/qmp.c).  The lines are QEMU 7.2's own.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "qmp.h"

static int
parse (const char *line, json_object **result, char *err, size_t errlen)
{
  err[0] = '\0';
  return ba_qmp_parse_reply (line, strlen (line), result, err, errlen);
}

static void
test_reply (void **state)
{
  json_object *r, *v;
  char err[256];

  assert_int_equal (parse ("{\"return\": {}}", &r, err, sizeof err), 1);
  assert_non_null (r);
  assert_true (json_object_is_type (r, json_type_object));
  json_object_put (r);

  assert_int_equal (parse ("{\"return\": [{\"id\": \"drive-scsi0\", "
                           "\"node-name\": \"ba-1-snapshot\", "
                           "\"shutting-down\": false, \"type\": \"nbd\"}]}",
                           &r, err, sizeof err), 1);
  assert_int_equal (json_object_array_length (r), 1);
  assert_true (json_object_object_get_ex (json_object_array_get_idx (r, 0),
                                          "id", &v));
  assert_string_equal (json_object_get_string (v), "drive-scsi0");
  /* The value outlives the parsed line: the caller holds the only ref. */
  assert_int_equal (json_object_put (r), 1);

  /* A null return would read as an error without a message. */
  assert_int_equal (parse ("{\"return\": null}", &r, err, sizeof err), -1);
  assert_null (r);
  assert_string_equal (err, "QMP reply with a null return value");
}

static void
test_error (void **state)
{
  json_object *r = (json_object *) 1;
  char err[256];

  assert_int_equal (parse ("{\"error\": {\"class\": \"GenericError\", "
                           "\"desc\": \"Failed to find node with "
                           "node-name='nosuch'\"}}", &r, err, sizeof err), 1);
  assert_null (r);
  assert_string_equal (err, "Failed to find node with node-name='nosuch'");

  assert_int_equal (parse ("{\"error\": {\"class\": \"GenericError\"}}",
                           &r, err, sizeof err), 1);
  assert_null (r);
  assert_string_equal (err, "unknown QMP error");
  assert_int_equal (parse ("{\"error\": {\"desc\": 17}}", &r, err,
                           sizeof err), 1);
  assert_string_equal (err, "unknown QMP error");
  assert_int_equal (parse ("{\"error\": {\"desc\": \"\"}}", &r, err,
                           sizeof err), 1);
  assert_string_equal (err, "unknown QMP error");

  /* Cut to the buffer. */
  assert_int_equal (parse ("{\"error\": {\"class\": \"GenericError\", "
                           "\"desc\": \"NBD server not running\"}}",
                           &r, err, 4), 1);
  assert_string_equal (err, "NBD");
}

static void
test_ignored (void **state)
{
  json_object *r = (json_object *) 1;
  char err[256];

  assert_int_equal (parse ("{\"QMP\": {\"version\": {\"qemu\": {\"micro\": "
                           "22, \"minor\": 2, \"major\": 7}, \"package\": "
                           "\"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, "
                           "\"capabilities\": [\"oob\"]}}",
                           &r, err, sizeof err), 0);
  assert_null (r);
  assert_int_equal (parse ("{\"timestamp\": {\"seconds\": 1795651859, "
                           "\"microseconds\": 644508}, \"event\": "
                           "\"JOB_STATUS_CHANGE\", \"data\": {\"status\": "
                           "\"created\", \"id\": \"ba-b1f9ae-0\"}}",
                           &r, err, sizeof err), 0);
  assert_null (r);
}

static void
test_malformed (void **state)
{
  json_object *r = (json_object *) 1;
  char err[256];

  assert_int_equal (parse ("", &r, err, sizeof err), -1);
  assert_null (r);
  assert_string_equal (err, "malformed QMP output");
  assert_int_equal (parse ("{\"return\": {}", &r, err, sizeof err), -1);
  assert_int_equal (parse ("[{\"return\": {}}]", &r, err, sizeof err), -1);
  assert_string_equal (err, "malformed QMP output");
  assert_int_equal (parse ("SSH-2.0-OpenSSH", &r, err, sizeof err), -1);
  assert_int_equal (parse ("{\"id\": 1}", &r, err, sizeof err), -1);
  assert_null (r);
  assert_string_equal (err, "unexpected QMP output");
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_reply),
    cmocka_unit_test (test_error),
    cmocka_unit_test (test_ignored),
    cmocka_unit_test (test_malformed),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
