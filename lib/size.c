/* SPDX-License-Identifier: BSD-3-Clause */
/* Sizes on the command line (size.h). */
#include <ctype.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "size.h"

static const char units[] = "KMGT";

/* max as the reader would write it: "1G", "32M", "64". */
static void
format_max (char *buf, size_t len, uint64_t max)
{
  unsigned u = 0;

  while (u < sizeof units - 1 && max != 0 && (max & 1023) == 0) {
    max >>= 10;
    u++;
  }
  snprintf (buf, len, "%" PRIu64 "%.*s", max, u ? 1 : 0,
            u ? &units[u - 1] : "");
}

int
ba_parse_size (const char *s, uint64_t max, uint64_t *value,
               const char **why)
{
  static __thread char too_large[64];
  unsigned long long v;
  const char *unit = NULL;
  unsigned shift = 0;
  char *end, max_text[32];

  /* strtoull would take spaces and a sign first. */
  if (s[0] < '0' || s[0] > '9') {
    *why = "not a number";
    return -1;
  }
  errno = 0;
  v = strtoull (s, &end, 10);
  if (*end != '\0')
    unit = strchr (units, toupper ((unsigned char) *end));
  if (*end != '\0' && (unit == NULL || *unit == '\0' || end[1] != '\0')) {
    *why = "not a size (" BA_SIZE_RULE ")";
    return -1;
  }
  if (unit)
    shift = 10 * (unsigned) (unit - units + 1);
  if (errno == ERANGE || v > (max >> shift)) {
    format_max (max_text, sizeof max_text, max);
    snprintf (too_large, sizeof too_large, "too large (at most %s)",
              max_text);
    *why = too_large;
    return -1;
  }
  *value = (uint64_t) v << shift;
  return 0;
}
