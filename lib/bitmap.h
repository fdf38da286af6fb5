/* SPDX-License-Identifier: BSD-3-Clause */
/* libnbd helpers: connecting to an export, and reading its dirty bitmap.
 */
#ifndef BACKUPACCESS_BITMAP_H
#define BACKUPACCESS_BITMAP_H

#include <stddef.h>
#include <stdint.h>
#include "regions.h"

/* Connects with libnbd to an export named by uri, or by a unix socket
 * path and an export name, asking for meta_context (may be NULL).
 * Returns the handle, or NULL with a message in errbuf.
 */
struct nbd_handle;
struct nbd_handle *ba_nbd_connect (const char *uri, const char *socket,
                                   const char *export,
                                   const char *meta_context,
                                   char *errbuf, size_t errlen);

/* Reads the dirty regions of the meta context qemu:dirty-bitmap:BITMAP
 * of an NBD export (QEMU's block-export-add ... bitmaps) into *dirty,
 * and the export's size into *size.  The export is named by uri, or by
 * a unix socket path and an export name.  Pages through the disk; asks
 * for no other context.  With bitmap == NULL only the size is read.
 * Returns 0, or -1 with a message in errbuf.
 */
int ba_bitmap_fetch (const char *uri, const char *socket, const char *export,
                     const char *bitmap, struct ba_regions *dirty,
                     uint64_t *size, char *errbuf, size_t errlen);

#endif /* BACKUPACCESS_BITMAP_H */
