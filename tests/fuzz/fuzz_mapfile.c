/* SPDX-License-Identifier: BSD-3-Clause */
/* Fuzzes the map file parser, ba_map_parse (lib/mapfile.c).
 *
 * Properties: an accepted map is a proper region set (sorted, disjoint,
 * never adjacent, no empty range) that reads back the same when written
 * out in either form; a refused map leaves the set empty and names the
 * line in a message that fits any buffer, however short.
 */
#include <inttypes.h>
#include <stdbool.h>
#include <string.h>

#include "mapfile.h"
#include "regions.h"
#include "fuzz.h"

/* The set as a map of one form: plain "OFFSET LENGTH" lines, or
 * nbdinfo --map lines with the clean gaps between the dirty ranges.
 */
static char *
write_map (const struct ba_regions *set, bool nbdinfo, size_t *len)
{
  char *text = NULL;
  FILE *fp = open_memstream (&text, len);
  uint64_t pos = 0;

  CHECK (fp != NULL);
  fprintf (fp, "# written back by fuzz_mapfile\n");
  for (size_t i = 0; i < set->n; i++) {
    const struct ba_range *r = &set->r[i];
    if (!nbdinfo)
      fprintf (fp, "%" PRIu64 " %" PRIu64 "\n", r->start, r->end - r->start);
    else {
      if (r->start > pos)
        fprintf (fp, "%" PRIu64 "  %" PRIu64 "    0  clean\n",
                 pos, r->start - pos);
      fprintf (fp, "%" PRIu64 "  %" PRIu64 "    1  dirty\n",
               r->start, r->end - r->start);
      pos = r->end;
    }
  }
  CHECK (fclose (fp) == 0);
  return text;
}

static void
check_reads_back (const struct ba_regions *set, bool nbdinfo)
{
  struct ba_regions again;
  char err[256];
  size_t len;
  char *text = write_map (set, nbdinfo, &len);

  ba_regions_init (&again);
  if (ba_map_parse (text, len, &again, err, sizeof err) != 0) {
    fprintf (stderr, "written back:\n%s\nrefused: %s\n", text, err);
    CHECK (!"the map written back is refused");
  }
  CHECK (again.n == set->n);
  for (size_t i = 0; i < set->n; i++) {
    CHECK (again.r[i].start == set->r[i].start);
    CHECK (again.r[i].end == set->r[i].end);
  }
  ba_regions_free (&again);
  free (text);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  const char *text = (const char *) data;
  struct ba_regions dirty;
  char err[256];
  char *small;
  size_t smalllen;
  int r;

  /* Left-overs from a previous parse must go. */
  ba_regions_init (&dirty);
  CHECK (ba_regions_append (&dirty, 0, 1) == 0);
  err[0] = '\0';
  r = ba_map_parse (text, size, &dirty, err, sizeof err);
  CHECK (r == 0 || r == -1);
  if (r == 0) {
    for (size_t i = 0; i < dirty.n; i++) {
      CHECK (dirty.r[i].start < dirty.r[i].end);
      CHECK (i == 0 || dirty.r[i - 1].end < dirty.r[i].start);
    }
    check_reads_back (&dirty, false);
    check_reads_back (&dirty, true);
  }
  else {
    CHECK (dirty.n == 0);
    CHECK (memchr (err, '\0', sizeof err) != NULL);
    CHECK (strncmp (err, "line ", 5) == 0);
  }

  /* The same with a buffer of exactly smalllen bytes, so that ASan
   * sees any write past it.
   */
  smalllen = size > 0 ? data[0] % 24 : 0;
  small = smalllen > 0 ? malloc (smalllen) : NULL;    /* NULL, 0: allowed */
  CHECK (small != NULL || smalllen == 0);
  CHECK (ba_map_parse (text, size, &dirty, small, smalllen) == r);
  if (r == -1 && smalllen > 0) {
    CHECK (memchr (small, '\0', smalllen) != NULL);
    CHECK (strncmp (small, err, strlen (small)) == 0);
  }
  free (small);
  ba_regions_free (&dirty);
  return 0;
}
