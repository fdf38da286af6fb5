/* SPDX-License-Identifier: BSD-3-Clause */
/* The rules of a backup copy that reads QEMU's snapshot-access export
 * itself and writes the backup image: what to read (the dirty regions,
 * or the whole disk), cut into chunks of work and QEMU-sized requests
 * that never cross from dirty into clean; what to write for each (data,
 * zeroes, or nothing where the destination is known to read as zeroes);
 * when a cluster may be discarded in QEMU (once every dirty byte of it
 * has been read and written to the destination, through lib/view.c);
 * and whether every byte was written.  The caller does the I/O and tells
 * the copy what happened.  Thread-safe; its lock is never held across a
 * call into the caller.
 */
#ifndef BACKUPACCESS_COPY_H
#define BACKUPACCESS_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "regions.h"

/* A chunk of work (one block status, then its requests). */
#define BA_COPY_CHUNK_DEFAULT ((uint64_t) 64 << 20)
/* The largest write of zeroes, for a run known to read as zeroes. */
#define BA_COPY_ZERO_MAX ((uint32_t) 32 << 20)

struct ba_copy_config {
  uint64_t disk_size;
  /* The dirty regions (an incremental backup), or NULL: the whole disk.
   * Copied.
   */
  const struct ba_regions *dirty;
  uint64_t cluster_size;        /* the copy-before-write cluster */
  uint32_t request_size;        /* the largest read: a power of two */
  uint64_t chunk_size;          /* 0: BA_COPY_CHUNK_DEFAULT */
  /* The destination reads as zeroes where nothing is written (a new
   * image without a backing file): zeroes need not be written.  Not so
   * for an overlay of the previous backup: there, a dirty region that
   * now reads as zeroes must be written as zeroes.
   */
  bool destination_is_zero;
  bool discard;                 /* discard what was copied, in QEMU */
  uint64_t trim_batch;          /* see ba_discard_queue_new */
};

struct ba_copy;

/* Returns the copy, or NULL with errno (EINVAL: a bad cluster or request
 * size, a dirty region past the end of the disk; ENOMEM).
 */
struct ba_copy *ba_copy_new (const struct ba_copy_config *config);
void ba_copy_free (struct ba_copy *c);

/* The next chunk of work into *chunk: a run of the copy set inside one
 * dirty region, at most chunk_size long, not crossing a multiple of
 * chunk_size.  Readable as a whole, so that block status may be asked
 * for it.  false when nothing is left, or once the copy has failed.
 */
bool ba_copy_next_chunk (struct ba_copy *c, struct ba_range *chunk);

/* One request: read [offset, +len) from QEMU and write it, or, when
 * known_zero (block status said so), write zeroes without reading.
 */
struct ba_copy_req {
  uint64_t offset;
  uint32_t len;
  bool known_zero;
};

/* A chunk cut into requests: reads of at most request_size bytes, cut at
 * multiples of it (lib/upstream.h's split plan), and runs known to read
 * as zeroes, of at most BA_COPY_ZERO_MAX; never crossing the boundary of
 * a zero run.  zero: the runs of the chunk that read as zeroes (sorted;
 * may be NULL; must outlive the split).
 */
struct ba_copy_split {
  uint64_t pos, end;
  uint32_t request_size;
  const struct ba_regions *zero;
};
void ba_copy_split_init (struct ba_copy_split *s, const struct ba_copy *c,
                         const struct ba_range *chunk,
                         const struct ba_regions *zero);
bool ba_copy_split_next (struct ba_copy_split *s, struct ba_copy_req *r);

/* What to write for a request whose data is all zeroes (is_zero) or
 * not.
 */
enum ba_copy_write {
  BA_COPY_WRITE_DATA,
  BA_COPY_WRITE_ZEROES,
  BA_COPY_WRITE_NOTHING,        /* the destination reads as zeroes there */
};
enum ba_copy_write ba_copy_write_for (const struct ba_copy *c, bool is_zero);

/* Whether len bytes at buf are all zero. */
bool ba_copy_is_zero (const void *buf, size_t len);

/* Before a read: may it go to QEMU?  Returns 0, or -1 with the reason in
 * msg (the copy has then failed: a request the plan should never make).
 */
int ba_copy_check_read (struct ba_copy *c, const struct ba_copy_req *r,
                        char *msg, size_t len);

/* QEMU refused a read, or the block status, of r (EPERM from
 * lib/upstream.c; what: "read", "block status"): fails the copy with the
 * reason, which is a broken snapshot (copy-before-write failed) unless r
 * had been discarded.
 */
void ba_copy_read_refused (struct ba_copy *c, const struct ba_copy_req *r,
                           const char *what);

/* Another failure (a read that failed otherwise, a write, a flush): the
 * copy has failed; the first message is kept.  Nothing more is handed
 * out and nothing more is discarded.
 */
void ba_copy_fail (struct ba_copy *c, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

/* Whether the copy has failed, with the first message into msg. */
bool ba_copy_failed (struct ba_copy *c, char *msg, size_t len);

/* The destination holds r now (its write completed, or it needed none).
 * Counts it by what was written; a read request is consumed, so that
 * the clusters this completes are inserted into *trims, to trim in QEMU
 * now (whole aligned clusters).  Fails the copy if r had been done
 * already.  Returns 0, or -1 with errno = ENOMEM (what is in *trims must
 * still be trimmed).
 */
int ba_copy_done (struct ba_copy *c, const struct ba_copy_req *r,
                  enum ba_copy_write written, struct ba_regions *trims);

/* The clusters waiting in the batch, to trim now. */
int ba_copy_flush_trims (struct ba_copy *c, struct ba_regions *trims);

/* The caller trimmed count bytes in QEMU, or failed to.  clean: a
 * discard of clean clusters (ba_copy_clean_clusters).
 */
void ba_copy_trimmed (struct ba_copy *c, uint64_t count, bool ok, bool clean);

/* The clusters that hold no dirty byte (none for a full copy): where
 * copy-before-write has no bitmap of its own, discarding them once at
 * the start keeps QEMU from copying them.  Returns 0, or -1 with errno.
 */
int ba_copy_clean_clusters (struct ba_copy *c, struct ba_regions *out);

/* True when every byte of the copy set is done and nothing failed. */
bool ba_copy_complete (struct ba_copy *c);

struct ba_copy_stats {
  uint64_t total;               /* bytes in the copy set */
  uint64_t done;                /* bytes the destination holds */
  uint64_t bytes_read;          /* read from QEMU */
  uint64_t bytes_data;          /* written as data */
  uint64_t bytes_zeroes;        /* written as zeroes */
  uint64_t bytes_skipped;       /* zeroes left to a zero destination */
  uint64_t bytes_discarded, trims_sent, trim_errors, clean_discarded;
  bool broken;                  /* QEMU refused a dirty read */
  bool failed;
};
void ba_copy_get_stats (struct ba_copy *c, struct ba_copy_stats *stats);

#endif /* BACKUPACCESS_COPY_H */
