/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for the reader of the helper's state file (lib/statefile.c). */
#include <errno.h>
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

#include "statefile.h"

static json_object *
parse (const char *text, char *err, size_t errlen)
{
  err[0] = '\0';
  return ba_state_parse (text, strlen (text), err, errlen);
}

static void
refused (const char *text, const char *want)
{
  char err[256];
  json_object *o = parse (text, err, sizeof err);

  if (o != NULL)
    fail_msg ("accepted: %s", text);
  if (strcmp (err, want) != 0)
    fail_msg ("for %s: message \"%s\", expected \"%s\"", text, err, want);
}

static void
test_accepts (void **state)
{
  char err[256];
  json_object *o, *d;

  o = parse ("{\n  \"backend\":\"upstream\",\n  \"devices\":[\n"
             "    { \"device\":\"drive-scsi0\", \"size\":8388608 }\n"
             "  ]\n}\n", err, sizeof err);
  assert_non_null (o);
  assert_true (json_object_object_get_ex (o, "devices", &d));
  assert_int_equal (json_object_array_length (d), 1);
  json_object_put (o);

  /* No devices yet (setup writes the state before any), none at all. */
  o = parse ("{\"backend\":\"proxmox\",\"devices\":[]}", err, sizeof err);
  assert_non_null (o);
  json_object_put (o);
  o = parse ("{\"backend\":\"upstream\",\"qmp\":\"/run/q\"}", err, sizeof err);
  assert_non_null (o);
  json_object_put (o);
}

static void
test_refuses (void **state)
{
  refused ("", "not a valid state file: it ends before its JSON value");
  refused ("{\"backend\":", "not a valid state file: it ends before its "
           "JSON value");
  refused ("{\"a\" 1}", "not a valid state file: object property name "
           "separator ':' expected");
  refused ("[1]", "not a valid state file: not a JSON object");
  refused ("\"state\"", "not a valid state file: not a JSON object");
  /* Shapes on which the helper's json-c calls would abort. */
  refused ("{\"devices\":{}}",
           "not a valid state file: \"devices\" is not an array");
  refused ("{\"devices\":null}",
           "not a valid state file: \"devices\" is not an array");
  refused ("{\"devices\":7}",
           "not a valid state file: \"devices\" is not an array");
  refused ("{\"devices\":[{}, [], {}]}",
           "not a valid state file: \"devices\" item 1 is not an object");
  refused ("{\"devices\":[null]}",
           "not a valid state file: \"devices\" item 0 is not an object");
}

static void
test_short_buffer (void **state)
{
  char *err = malloc (8);

  assert_non_null (err);
  assert_null (ba_state_parse ("[]", 2, err, 8));
  assert_string_equal (err, "not a v");
  assert_null (ba_state_parse ("[]", 2, err, 0));
  free (err);
}

static void
test_load (void **state)
{
  char dir[] = "/tmp/test_statefile.XXXXXX", path[64], err[512], want[512];
  json_object *o = (json_object *) 1;
  FILE *fp;

  assert_non_null (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/state.json", dir);

  /* No file: no state, no error. */
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), 0);
  assert_null (o);

  fp = fopen (path, "w");
  assert_non_null (fp);
  fputs ("{\"backend\":\"serve\",\"devices\":[{\"device\":\"d\"}]}\n", fp);
  fclose (fp);
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), 1);
  assert_non_null (o);
  json_object_put (o);

  /* Errors name the file. */
  fp = fopen (path, "w");
  assert_non_null (fp);
  fputs ("{\"devices\":{}}", fp);
  fclose (fp);
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), -1);
  assert_null (o);
  snprintf (want, sizeof want, "%s: not a valid state file: \"devices\" is "
            "not an array", path);
  assert_string_equal (err, want);

  /* Too large: refused before it is read. */
  assert_int_equal (truncate (path, (off_t) BA_STATE_MAX_SIZE + 1), 0);
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), -1);
  snprintf (want, sizeof want, "%s: too large to be a state file", path);
  assert_string_equal (err, want);

  /* A directory where the file should be. */
  assert_int_equal (unlink (path), 0);
  assert_int_equal (mkdir (path, 0700), 0);
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), -1);
  snprintf (want, sizeof want, "%s: not a regular file", path);
  assert_string_equal (err, want);
  assert_int_equal (rmdir (path), 0);

  /* Never read through a symlink (the state names files to delete). */
  assert_int_equal (symlink ("/etc/hostname", path), 0);
  assert_int_equal (ba_state_load (path, &o, err, sizeof err), -1);
  assert_null (o);
  assert_int_equal (unlink (path), 0);
  assert_int_equal (rmdir (dir), 0);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_accepts),
    cmocka_unit_test (test_refuses),
    cmocka_unit_test (test_short_buffer),
    cmocka_unit_test (test_load),
  };

  return cmocka_run_group_tests (tests, NULL, NULL);
}
