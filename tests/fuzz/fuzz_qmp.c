/* SPDX-License-Identifier: BSD-3-Clause */
/* Fuzzes the handling of QMP output, ba_qmp_parse_reply (lib/qmp.c).
 *
 * The input is what QEMU would send: lines, each handled as ba_qmp_cmd
 * handles a line it read (up to a NUL, like strlen), and also the raw
 * line with its NULs.  Properties: the result is a reply (1), an event
 * or greeting (0) or malformed (-1); only a reply has a value, and one
 * without a value has QEMU's error message; every failure has a
 * message, which fits any buffer, however short; the value is a whole
 * JSON value that serialises.
 */
#include <string.h>

#include "qmp.h"
#include "fuzz.h"

static void
check_line (const char *line, size_t len, size_t smalllen)
{
  json_object *result = (json_object *) 1;
  char err[256], *small;
  int r;

  err[0] = '\0';
  r = ba_qmp_parse_reply (line, len, &result, err, sizeof err);
  CHECK (r == 1 || r == 0 || r == -1);
  if (r != 1)
    CHECK (result == NULL);
  if (r == -1 || (r == 1 && result == NULL)) {
    CHECK (memchr (err, '\0', sizeof err) != NULL);
    CHECK (err[0] != '\0');
  }
  if (result) {
    const char *text = json_object_to_json_string_ext (result,
                                                       JSON_C_TO_STRING_PLAIN);
    CHECK (text != NULL);
    CHECK (json_object_put (result) == 1);      /* it was the last ref */
  }

  /* A buffer of exactly smalllen bytes, so that ASan sees any write
   * past it.
   */
  small = smalllen > 0 ? malloc (smalllen) : NULL;    /* NULL, 0: allowed */
  CHECK (small != NULL || smalllen == 0);
  CHECK (ba_qmp_parse_reply (line, len, &result, small, smalllen) == r);
  json_object_put (result);
  if (smalllen > 0 && (r == -1 || (r == 1 && result == NULL))) {
    CHECK (memchr (small, '\0', smalllen) != NULL);
    CHECK (strncmp (small, err, strlen (small)) == 0);
  }
  free (small);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const char *p = (const char *) data, *end = p + size;
  size_t smalllen = size > 0 ? data[0] % 32 : 0;

  while (p < end) {
    const char *nl = memchr (p, '\n', end - p);
    size_t len = nl ? (size_t) (nl - p) : (size_t) (end - p);
    char *line = strndup (p, len);

    CHECK (line != NULL);
    check_line (line, strlen (line), smalllen);
    if (strlen (line) != len) {
      /* The raw bytes, NULs and all, in a buffer of their own size. */
      char *raw = malloc (len);
      CHECK (raw != NULL);
      memcpy (raw, p, len);
      check_line (raw, len, smalllen);
      free (raw);
    }
    free (line);
    p += len + 1;
  }
  return 0;
}
