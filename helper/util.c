/* SPDX-License-Identifier: BSD-3-Clause */
/* Small utilities of the helper: its messages (warn, and die, which
 * first undoes a half-built setup when asked to), formatted strings,
 * the rule for names that go into QMP commands and file names, and
 * reading JSON values of QEMU's and the filter's.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <json.h>

#include "util.h"

const char *progname = "backupaccess-helper";

static void
vmessage (const char *fmt, va_list ap)
{
  fprintf (stderr, "%s: ", progname);
  vfprintf (stderr, fmt, ap);
  fputc ('\n', stderr);
}

void
warn (const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
}

/* Set while setup or run builds something: an error then undoes what
 * was built (teardown --failure) before exiting.
 */
static void (*roll_back_fn) (void);

void
on_die (void (*fn) (void))
{
  roll_back_fn = fn;
}

void
die (const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  vmessage (fmt, ap);
  va_end (ap);
  if (roll_back_fn) {
    void (*fn) (void) = roll_back_fn;
    roll_back_fn = NULL;                /* once: die may come back here */
    fn ();
  }
  exit (1);
}

char *
xasprintf (const char *fmt, ...)
{
  va_list ap;
  char *s;
  va_start (ap, fmt);
  if (vasprintf (&s, fmt, ap) == -1)
    die ("out of memory");
  va_end (ap);
  return s;
}

void
sleep_ms (long ms)
{
  struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
  nanosleep (&ts, NULL);
}

/* Names go into QMP commands and file names: keep them plain. */
void
check_name (const char *what, const char *s, bool colon_ok)
{
  size_t n = strlen (s);

  if (n == 0 || n > 128)
    die ("%s '%s': must be 1 to 128 characters", what, s);
  for (size_t i = 0; i < n; i++) {
    char c = s[i];
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
          (c >= '0' && c <= '9') || c == '-' || c == '_' ||
          (c == '.' && i > 0) || (c == ':' && colon_ok)))
      die ("%s '%s': only letters, digits, '-', '_', '.'%s are allowed",
           what, s, colon_ok ? " and ':'" : "");
  }
}

const char *
get_str (json_object *o, const char *key)
{
  json_object *v;
  if (o && json_object_object_get_ex (o, key, &v) &&
      json_object_is_type (v, json_type_string))
    return json_object_get_string (v);
  return NULL;
}

int64_t
get_int (json_object *o, const char *key, int64_t def)
{
  json_object *v;
  if (o && json_object_object_get_ex (o, key, &v) &&
      (json_object_is_type (v, json_type_int)))
    return json_object_get_int64 (v);
  return def;
}

bool
get_bool (json_object *o, const char *key)
{
  json_object *v;
  return o && json_object_object_get_ex (o, key, &v) &&
    json_object_get_boolean (v);
}

void
set_str (json_object *o, const char *key, const char *value)
{
  json_object_object_add (o, key, value ? json_object_new_string (value)
                          : NULL);
}

/* The length of a list QEMU (or the state file) gave us: 0 for
 * anything that is not a list (json-c aborts on those).
 */
size_t
alen (json_object *a)
{
  return json_object_is_type (a, json_type_array)
    ? json_object_array_length (a) : 0;
}

void
print_json (json_object *o)
{
  printf ("%s\n", json_object_to_json_string_ext (o, JSON_C_TO_STRING_PRETTY));
  fflush (stdout);
}
