/* SPDX-License-Identifier: BSD-3-Clause */
/* Map file parser: "nbdinfo --map=qemu:dirty-bitmap:NAME" output, or
 * plain "OFFSET LENGTH" lines.  See mapfile.h for the rules.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mapfile.h"

enum form { FORM_UNKNOWN, FORM_PLAIN, FORM_NBDINFO };

static int __attribute__ ((format (printf, 4, 5)))
fail (char *errbuf, size_t errlen, size_t lineno, const char *fmt, ...)
{
  va_list ap;
  int n = 0;

  if (errlen > 0 && lineno > 0)
    n = snprintf (errbuf, errlen, "line %zu: ", lineno);
  if (n >= 0 && (size_t) n < errlen) {
    va_start (ap, fmt);
    vsnprintf (errbuf + n, errlen - n, fmt, ap);
    va_end (ap);
  }
  errno = EINVAL;
  return -1;
}

/* Parses an unsigned decimal number: digits only, no sign, no overflow. */
static int
parse_u64 (const char *tok, uint64_t *out)
{
  char *end;

  if (tok[0] < '0' || tok[0] > '9')
    return -1;
  errno = 0;
  *out = strtoull (tok, &end, 10);
  if (errno != 0 || *end != '\0')
    return -1;
  return 0;
}

static int
parse_line (char *line, size_t lineno, enum form *form,
            struct ba_regions *dirty, uint64_t *prev_start,
            uint64_t *clean_end, char *errbuf, size_t errlen)
{
  char *tok[5];
  size_t ntok = 0;
  char *save = NULL;
  uint64_t offset, length, type = 1;
  enum form this;

  for (char *t = strtok_r (line, " \t\r", &save);
       t != NULL && ntok < 5; t = strtok_r (NULL, " \t\r", &save))
    tok[ntok++] = t;
  if (ntok == 0)
    return 0;
  if (ntok == 1 || ntok == 5)
    return fail (errbuf, errlen, lineno,
                 "expected \"OFFSET LENGTH\" or a line of "
                 "\"nbdinfo --map=qemu:dirty-bitmap:NAME\"");
  this = ntok == 2 ? FORM_PLAIN : FORM_NBDINFO;
  if (*form != FORM_UNKNOWN && *form != this)
    return fail (errbuf, errlen, lineno,
                 "mixes plain \"OFFSET LENGTH\" lines with nbdinfo --map lines");
  *form = this;

  if (parse_u64 (tok[0], &offset) == -1)
    return fail (errbuf, errlen, lineno,
                 "offset \"%s\" is not an unsigned decimal number "
                 "that fits in 64 bits", tok[0]);
  if (parse_u64 (tok[1], &length) == -1)
    return fail (errbuf, errlen, lineno,
                 "length \"%s\" is not an unsigned decimal number "
                 "that fits in 64 bits", tok[1]);
  if (length == 0)
    return fail (errbuf, errlen, lineno, "region has length 0");
  if (offset > UINT64_MAX - length)
    return fail (errbuf, errlen, lineno,
                 "offset %" PRIu64 " + length %" PRIu64 " overflows",
                 offset, length);
  if (this == FORM_NBDINFO) {
    if (parse_u64 (tok[2], &type) == -1 || type > UINT32_MAX)
      return fail (errbuf, errlen, lineno,
                   "type \"%s\" is not a 32 bit unsigned number", tok[2]);
    if (ntok == 4) {
      const char *want = (type & 1) ? "dirty" : "clean";
      if (strcmp (tok[3], want) != 0)
        return fail (errbuf, errlen, lineno,
                     "description \"%s\" with type %" PRIu64 " (expected "
                     "\"%s\"): is this a map of qemu:dirty-bitmap:NAME? "
                     "A base:allocation map cannot be used",
                     tok[3], type, want);
    }
  }
  if (offset < *prev_start)
    return fail (errbuf, errlen, lineno,
                 "offset %" PRIu64 " is lower than the previous line's "
                 "offset %" PRIu64 ": the map must be sorted",
                 offset, *prev_start);
  *prev_start = offset;

  if (type & 1) {
    if (offset < *clean_end)
      return fail (errbuf, errlen, lineno,
                   "dirty region at %" PRIu64 " overlaps a clean region "
                   "that ends at %" PRIu64, offset, *clean_end);
  }
  else {
    if (dirty->n > 0 && offset < dirty->r[dirty->n - 1].end)
      return fail (errbuf, errlen, lineno,
                   "clean region at %" PRIu64 " overlaps a dirty region "
                   "that ends at %" PRIu64,
                   offset, dirty->r[dirty->n - 1].end);
    if (offset + length > *clean_end)
      *clean_end = offset + length;
    return 0;
  }
  if (ba_regions_append (dirty, offset, offset + length) == -1)
    return fail (errbuf, errlen, 0, "out of memory");
  return 0;
}

int
ba_map_parse (const char *text, size_t len, struct ba_regions *dirty,
              char *errbuf, size_t errlen)
{
  enum form form = FORM_UNKNOWN;
  uint64_t prev_start = 0, clean_end = 0;
  size_t lineno = 0;
  const char *p = text, *end = text + len;
  const char *nul = memchr (text, '\0', len);

  ba_regions_clear (dirty);
  if (nul != NULL) {
    /* Name the line that holds it, like every other error. */
    for (lineno = 1; p < nul; p++)
      lineno += *p == '\n';
    return fail (errbuf, errlen, lineno, "the map contains a NUL byte");
  }
  while (p < end) {
    const char *nl = memchr (p, '\n', end - p);
    size_t linelen = nl ? (size_t) (nl - p) : (size_t) (end - p);
    char *line = strndup (p, linelen);
    char *hash;
    int r;

    lineno++;
    if (line == NULL)
      return fail (errbuf, errlen, 0, "out of memory");
    hash = strchr (line, '#');
    if (hash)
      *hash = '\0';
    r = parse_line (line, lineno, &form, dirty, &prev_start, &clean_end,
                    errbuf, errlen);
    free (line);
    if (r == -1) {
      ba_regions_clear (dirty);
      return -1;
    }
    p += linelen + 1;
  }
  return 0;
}

int
ba_map_parse_file (const char *path, struct ba_regions *dirty,
                   char *errbuf, size_t errlen)
{
  FILE *fp = fopen (path, "r");
  char *text = NULL;
  size_t len = 0, cap = 0;
  int r;

  if (fp == NULL) {
    snprintf (errbuf, errlen, "%s: %s", path, strerror (errno));
    return -1;
  }
  for (;;) {
    size_t got;
    if (len == cap) {
      char *t;
      cap = cap ? cap * 2 : 65536;
      t = realloc (text, cap);
      if (t == NULL) {
        free (text);
        fclose (fp);
        snprintf (errbuf, errlen, "%s: out of memory", path);
        return -1;
      }
      text = t;
    }
    got = fread (text + len, 1, cap - len, fp);
    len += got;
    if (got == 0)
      break;
  }
  if (ferror (fp)) {
    snprintf (errbuf, errlen, "%s: read error", path);
    free (text);
    fclose (fp);
    return -1;
  }
  fclose (fp);

  r = ba_map_parse (text ? text : "", len, dirty, errbuf, errlen);
  free (text);
  if (r == -1) {
    /* Prefix the file name to the message. */
    char *msg = strdup (errbuf);
    if (msg) {
      snprintf (errbuf, errlen, "%s: %s", path, msg);
      free (msg);
    }
  }
  return r;
}
