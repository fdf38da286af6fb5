/* SPDX-License-Identifier: BSD-3-Clause */
/* The readable view of one snapshot-access export: which reads may go
 * to QEMU (the read rule), what reading and client trims complete and
 * so discard (the discard rule, lib/coverage.c, through the discard
 * queue, lib/discardq.c), what extents say, which preferred block size
 * is safe, when a refusal from QEMU means a broken snapshot, and the
 * counters of the summary and the status file.  Shared by every
 * program that reads such an export (the nbdkit filter, a copy program
 * reading QEMU with libnbd, a FUSE mount): the caller does the I/O and
 * tells the view what happened.  Thread-safe; its lock is never held
 * across a call into the caller.
 */
#ifndef BACKUPACCESS_VIEW_H
#define BACKUPACCESS_VIEW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "regions.h"

struct ba_view;

struct ba_view_config {
  uint64_t disk_size;
  uint64_t cluster_size;        /* the copy-before-write cluster */
  /* The dirty regions (ending within the disk), or NULL: the whole
   * disk is readable (a full backup).  Copied.
   */
  const struct ba_regions *dirty;
  /* Reads consume what they read, so that complete clusters are
   * discarded (else only client trims do).
   */
  bool discard;
  /* Clean regions are reported as reading as zeroes (for a copy into
   * an overlay of the previous backup); they are never readable.
   */
  bool clean_is_zero;
  uint64_t trim_batch;          /* see ba_discard_queue_new */
  uint64_t discard_lag;
};

/* Returns the view, or NULL with errno (EINVAL: a bad cluster size or
 * a dirty region past the end of the disk; ENOMEM).
 */
struct ba_view *ba_view_new (const struct ba_view_config *config);
void ba_view_free (struct ba_view *v);

/* The preferred block size for clients: the cluster (whole aligned
 * clusters are discarded at once), at most 32 MiB, but never more than
 * the alignment of the dirty regions, so that aligned requests of that
 * size are all dirty or all clean (nbdcopy rounds its requests up to
 * it).  At least 512; *safe is false when the dirty regions are aligned
 * to less than that (then such requests can mix, and are refused).
 */
uint32_t ba_view_preferred_size (const struct ba_view *v, bool *safe);

/* Why a read is refused. */
enum ba_view_refusal {
  BA_VIEW_READABLE = 0,         /* not refused: read it upstream */
  BA_VIEW_CLEAN,                /* touches clean bytes only... */
  BA_VIEW_MIXED,                /* ...or clean and dirty bytes */
  BA_VIEW_DISCARDED,            /* touches a discarded cluster */
  BA_VIEW_BROKEN,               /* the snapshot is broken */
};

/* The read rule: may [offset, +count) be read upstream?  Every byte
 * must be dirty and in no discarded cluster (or held back by the
 * discard lag); clean bytes are refused with clean_is_zero too.
 * Refusals other than BA_VIEW_BROKEN are counted; *bad is the first
 * offending range (for BA_VIEW_BROKEN, the read).
 */
enum ba_view_refusal ba_view_check_read (struct ba_view *v, uint64_t offset,
                                         uint64_t count,
                                         struct ba_range *bad);

/* The message for a refusal (without a prefix), e.g. "[5, 10) was
 * already read and discarded".
 */
void ba_view_refusal_message (const struct ba_view *v,
                              enum ba_view_refusal why,
                              const struct ba_range *bad,
                              char *buf, size_t len);

/* A read of [offset, +count) that ba_view_check_read allowed succeeded
 * upstream: counts it and, with discard, consumes it.  The ranges to
 * trim upstream now (whole clusters) are inserted into *trims.  Returns
 * 0, or -1 with errno = ENOMEM (what is in *trims must still be
 * trimmed; the cost is fleecing space, never data).
 */
int ba_view_read_done (struct ba_view *v, uint64_t offset, uint64_t count,
                       struct ba_regions *trims);

/* A client trim of [offset, +count): consumed like a read. */
int ba_view_client_trim (struct ba_view *v, uint64_t offset, uint64_t count,
                         struct ba_regions *trims);

/* What is waiting in the batch, to trim now (a connection ends, or a
 * second has passed).  The lag stays.
 */
int ba_view_flush (struct ba_view *v, struct ba_regions *trims);

/* The caller trimmed [offset, +count) upstream, or failed to.  clean:
 * a start-up discard of clean clusters (counted apart).
 */
void ba_view_trimmed (struct ba_view *v, uint64_t count, bool ok,
                      bool clean);

/* QEMU refused a read that ba_view_check_read allowed.  If another
 * request discarded part of it meanwhile, returns BA_VIEW_DISCARDED
 * with *bad set; else the snapshot is broken (copy-before-write
 * failed): the view marks it so, refuses every further read with
 * BA_VIEW_BROKEN, and returns BA_VIEW_BROKEN.
 */
enum ba_view_refusal ba_view_upstream_refused (struct ba_view *v,
                                               uint64_t offset,
                                               uint64_t count,
                                               struct ba_range *bad);

/* What extents say about a run. */
enum ba_view_extent {
  BA_VIEW_EXTENT_READABLE,      /* ask upstream; see ba_view_readable_type */
  BA_VIEW_EXTENT_CLEAN,
  BA_VIEW_EXTENT_DISCARDED,
};

/* The run starting at offset (ending at or before end) of one kind:
 * returns its length, and its kind in *kind.
 */
uint64_t ba_view_extent_run (struct ba_view *v, uint64_t offset,
                             uint64_t end, enum ba_view_extent *kind);

/* The base:allocation flags (NBD_STATE_HOLE 1, NBD_STATE_ZERO 2) of an
 * unreadable run: clean ones are holes that read as zeroes with
 * clean_is_zero (a zero-skipping copy skips them), else holes that do
 * not; discarded ones are always holes that do not (a client that
 * comes back must read them and be refused, not skip them).
 */
uint32_t ba_view_unreadable_flags (const struct ba_view *v,
                                   enum ba_view_extent kind);

/* The flags of a readable run, from upstream's: never a hole that is
 * not zero (that means unreadable), and with clean_is_zero always data
 * (a dirty region that reads as zeroes must still be copied).
 */
uint32_t ba_view_readable_flags (const struct ba_view *v, uint32_t upstream);

/* The clusters with no dirty byte, to discard once at start-up where
 * copy-before-write has no bitmap of its own.  Returns 0, or -1 with
 * errno = ENOMEM.
 */
int ba_view_clean_clusters (struct ba_view *v, struct ba_regions *out);

struct ba_view_stats {
  uint64_t bytes_read, reads, refused, client_trims;
  uint64_t trims_sent, bytes_discarded, trim_errors, clean_discarded;
  uint64_t readable_total, readable_left;
  uint64_t peak_memory, untracked_bytes;
  bool broken;
};
void ba_view_get_stats (struct ba_view *v, struct ba_view_stats *stats);

/* The summary line's text: "N bytes read in N reads, ...". */
void ba_view_summary (struct ba_view *v, char *buf, size_t len);

#endif /* BACKUPACCESS_VIEW_H */
