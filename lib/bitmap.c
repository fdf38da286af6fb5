/* SPDX-License-Identifier: BSD-3-Clause */
/* Fetching a dirty bitmap from QEMU: the regions of the meta context
 * qemu:dirty-bitmap:NAME of an NBD export, over libnbd.
 */
#define _GNU_SOURCE             /* asprintf */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "bitmap.h"

/* libnbd 1.14 block status takes at most 4 GiB - 1 a call; ask for
 * an aligned 2 GiB so that servers need not split odd lengths.
 */
#define BLOCK_STATUS_CHUNK (UINT64_C (1) << 31)

/* Bit 0 of a qemu:dirty-bitmap extent: dirty (libnbd has no constant). */
#define DIRTY_FLAG 1

struct fetch {
  const char *context;
  struct ba_regions *dirty;
  uint64_t end;                 /* what has been covered so far */
  uint64_t limit;               /* the end of this request */
  int failed;
};

static int
extent_cb (void *opaque, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr_entries, int *error)
{
  struct fetch *f = opaque;

  if (strcmp (metacontext, f->context) != 0)
    return 0;
  for (size_t i = 0; i + 1 < nr_entries; i += 2) {
    uint64_t end = offset + entries[i];
    if (end > f->limit)
      end = f->limit;
    if (offset >= end)
      break;
    if ((entries[i + 1] & DIRTY_FLAG) &&
        ba_regions_append (f->dirty, offset, end) == -1) {
      f->failed = errno ? errno : ENOMEM;
      return -1;
    }
    offset = end;
  }
  if (offset > f->end)
    f->end = offset;
  return 0;
}

struct nbd_handle *
ba_nbd_connect (const char *uri, const char *socket, const char *export,
                const char *meta_context, char *errbuf, size_t errlen)
{
  struct nbd_handle *h = nbd_create ();

  if (h == NULL) {
    snprintf (errbuf, errlen, "%s", nbd_get_error ());
    return NULL;
  }
  if ((meta_context && nbd_add_meta_context (h, meta_context) == -1) ||
      (uri == NULL && nbd_set_export_name (h, export ? export : "") == -1)) {
    snprintf (errbuf, errlen, "%s", nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  if ((uri ? nbd_connect_uri (h, uri) : nbd_connect_unix (h, socket)) == -1) {
    snprintf (errbuf, errlen, "cannot connect to %s: %s",
              uri ? uri : socket, nbd_get_error ());
    nbd_close (h);
    return NULL;
  }
  return h;
}

int
ba_bitmap_fetch (const char *uri, const char *socket, const char *export,
                 const char *bitmap, struct ba_regions *dirty,
                 uint64_t *size, char *errbuf, size_t errlen)
{
  struct nbd_handle *h = NULL;
  char *context = NULL;
  const char *where = uri ? uri : socket;
  struct fetch f = { .dirty = dirty };
  int64_t s;
  int r = -1;

  ba_regions_clear (dirty);
  if (bitmap && asprintf (&context, "qemu:dirty-bitmap:%s", bitmap) == -1) {
    context = NULL;
    snprintf (errbuf, errlen, "out of memory");
    goto out;
  }
  f.context = context;
  /* Only the bitmap: QEMU fails base:allocation queries that touch
   * unreadable areas of a snapshot-access export.
   */
  h = ba_nbd_connect (uri, socket, export, context, errbuf, errlen);
  if (h == NULL)
    goto out;
  switch (context ? nbd_can_meta_context (h, context) : 1) {
  case 1:
    break;
  case 0:
    snprintf (errbuf, errlen,
              "%s does not offer %s: is the bitmap named right, and "
              "exported with block-export-add bitmaps: [{node, name}]?",
              where, context);
    goto out;
  default:
    snprintf (errbuf, errlen, "%s: %s", where, nbd_get_error ());
    goto out;
  }
  s = nbd_get_size (h);
  if (s == -1) {
    snprintf (errbuf, errlen, "%s: %s", where, nbd_get_error ());
    goto out;
  }
  *size = s;
  if (context == NULL)          /* only the size was asked for */
    f.end = *size;

  while (f.end < *size) {
    uint64_t start = f.end;
    uint64_t count = *size - start < BLOCK_STATUS_CHUNK
      ? *size - start : BLOCK_STATUS_CHUNK;
    nbd_extent_callback cb = { .callback = extent_cb, .user_data = &f };

    f.limit = start + count;
    if (nbd_block_status (h, count, start, cb, 0) == -1) {
      if (f.failed)
        snprintf (errbuf, errlen, "out of memory for the dirty regions");
      else
        snprintf (errbuf, errlen, "reading %s from %s at offset %" PRIu64
                  ": %s", context, where, start, nbd_get_error ());
      goto out;
    }
    if (f.end <= start) {
      snprintf (errbuf, errlen, "%s at offset %" PRIu64 ": the server "
                "answered block status without progress", where, start);
      goto out;
    }
  }
  r = 0;

 out:
  if (h) {
    if (r == 0)
      nbd_shutdown (h, 0);
    nbd_close (h);
  }
  free (context);
  if (r == -1)
    ba_regions_clear (dirty);
  return r;
}
