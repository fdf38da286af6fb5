/* SPDX-License-Identifier: BSD-3-Clause */
/* The export as backupaccess-mount reads it: QEMU's export (a pool of
 * libnbd connections, lib/upstream.c) behind the readable view
 * (lib/view.c), which holds the rules: reads only inside the dirty
 * regions, whole aligned clusters discarded once read or punched out,
 * a broken snapshot failing every read.  Independent of FUSE: fs.c is
 * the glue.  Thread-safe.
 */
#ifndef BACKUPACCESS_MOUNT_DISK_H
#define BACKUPACCESS_MOUNT_DISK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "regions.h"
#include "upstream.h"

struct disk_config {
  struct ba_upstream_params up;  /* where the data is read */
  const char *bitmap;           /* NULL: the whole disk is readable */
  /* Where the bitmap is read (NULL: where the data is): uri, or
   * socket + export.
   */
  const char *bitmap_uri, *bitmap_socket, *bitmap_export;
  uint64_t cluster;             /* the copy-before-write cluster */
  uint64_t trim_batch;          /* discards sent in batches of this */
  bool readonly;                /* never trim upstream */
  /* The export is served through the backupaccess filter, which may
   * have read and discarded data for other clients: its refusals are
   * passed on as they are (it tells a broken snapshot itself).
   */
  bool behind_filter;
  bool discard_clean;           /* trim the clean clusters at start-up */
  const char *status_path;      /* NULL: no status file */
};

struct disk;

/* Reads the bitmap, connects, and sets up the view (and, with
 * discard_clean, trims the clean clusters).  Returns the disk, or NULL
 * with a message in errbuf.  No thread is started yet (the caller may
 * still fork).
 */
struct disk *disk_open (const struct disk_config *c,
                        char *errbuf, size_t errlen);

/* Starts the threads: the once-a-second flush of batched discards, and
 * the status file.  Returns 0, or -1 with a message in errbuf.
 */
int disk_start (struct disk *d, char *errbuf, size_t errlen);

/* Sends the last discards, stops the threads, logs the summary and
 * closes the connections.
 */
void disk_close (struct disk *d);

uint64_t disk_size (const struct disk *d);
bool disk_readonly (const struct disk *d);

/* The dirty regions read at start-up (the whole disk without a bitmap):
 * what this backup holds.
 */
const struct ba_regions *disk_dirty (const struct disk *d);

/* Reads [offset, +count) (within the disk) into buf, if the read rule
 * allows it.  Returns 0, or an errno: EPERM (refused: outside the dirty
 * regions, or already discarded), EIO (the snapshot is broken, or QEMU
 * is gone), as logged.  Consumes nothing: call disk_read_done once the
 * data has reached the reader.
 */
int disk_read (struct disk *d, void *buf, uint64_t count, uint64_t offset);

/* The data of a successful disk_read reached the reader: consumed, and
 * the clusters it completes discarded.
 */
void disk_read_done (struct disk *d, uint64_t offset, uint64_t count);

/* The reader punched [offset, +count) out (it is backed up): consumed
 * like a read.  Returns 0, or an errno (EOPNOTSUPP when read-only).
 */
int disk_punch (struct disk *d, uint64_t offset, uint64_t count);

/* SEEK_DATA (data true) or SEEK_HOLE from offset: data is what may
 * still be read, holes are clean or already discarded.  Returns the
 * offset, or -ENXIO (past the end, or no data after offset).
 */
int64_t disk_seek (struct disk *d, uint64_t offset, bool data);

#endif /* BACKUPACCESS_MOUNT_DISK_H */
