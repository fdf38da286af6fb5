/* SPDX-License-Identifier: BSD-3-Clause */
/* Small utilities of the helper: messages, die (with the roll-back of a
 * half-built setup), formatted strings, the rule for names, and JSON
 * values read from QEMU's answers and the filter's files.
 */
#ifndef BACKUPACCESS_HELPER_UTIL_H
#define BACKUPACCESS_HELPER_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json.h>

/* How long the helper waits for a process or QEMU to get somewhere. */
#define WAIT_SECONDS 20

extern const char *progname;

/* "progname: message" on stderr. */
void warn (const char *fmt, ...) __attribute__ ((format (printf, 1, 2)));

/* The same, then exit 1; first, once, what on_die set (if anything). */
void die (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2), noreturn));

/* What die does before it exits, or NULL for nothing: set while setup
 * or run builds something, so that an error undoes what was built.
 */
void on_die (void (*fn) (void));

/* asprintf that dies when out of memory. */
char *xasprintf (const char *fmt, ...)
  __attribute__ ((format (printf, 1, 2)));

void sleep_ms (long ms);

/* Dies unless s is a plain name (1 to 128 letters, digits, '-', '_',
 * '.' not first, and ':' when colon_ok): names go into QMP commands
 * and file names.
 */
void check_name (const char *what, const char *s, bool colon_ok);

/* A member of a JSON object: a string (NULL if not one), an integer
 * (def if not one), a truth value (json-c's conversion).
 */
const char *get_str (json_object *o, const char *key);
int64_t get_int (json_object *o, const char *key, int64_t def);
bool get_bool (json_object *o, const char *key);
/* Sets a string member, or null for NULL. */
void set_str (json_object *o, const char *key, const char *value);
/* The length of a list, 0 for anything that is not one. */
size_t alen (json_object *a);

/* Prints o on stdout, pretty, with a newline, and flushes. */
void print_json (json_object *o);

#endif /* BACKUPACCESS_HELPER_UTIL_H */
