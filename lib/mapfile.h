/* SPDX-License-Identifier: BSD-3-Clause */
/* The map file parser: dirty regions from nbdinfo --map output or
 * plain "OFFSET LENGTH" lines.
 */
#ifndef BACKUPACCESS_MAPFILE_H
#define BACKUPACCESS_MAPFILE_H

#include <stddef.h>
#include "regions.h"

/* Map files.
 *
 * Accepted forms, one region per line, '#' comments and blank lines
 * ignored; a file must use one form only:
 *   - "OFFSET LENGTH": a dirty region (plain form);
 *   - "OFFSET LENGTH TYPE [DESCRIPTION]": a line of
 *     "nbdinfo --map=qemu:dirty-bitmap:NAME", dirty when bit 0 of TYPE is
 *     set; DESCRIPTION, when present, must be "dirty" or "clean".
 * Numbers are unsigned decimal.  Lines must be sorted by offset.
 * Overlapping or adjacent dirty regions are merged; a dirty line that
 * overlaps a clean line is an error.
 *
 * On success returns 0 and fills *dirty (which must be initialised).
 * On error returns -1, leaves *dirty empty and writes a message naming
 * the line into errbuf.
 */
int ba_map_parse (const char *text, size_t len, struct ba_regions *dirty,
                  char *errbuf, size_t errlen);
int ba_map_parse_file (const char *path, struct ba_regions *dirty,
                       char *errbuf, size_t errlen);

#endif /* BACKUPACCESS_MAPFILE_H */
