/* SPDX-License-Identifier: BSD-3-Clause */
/* QEMU's export as a reader sees it: a pool of libnbd connections shared
 * by many threads, and reads split into pieces of the size QEMU serves
 * best, issued in parallel over the pool.  Independent of nbdkit (errors
 * are an errno and a message), for the plugin and for any program that
 * reads QEMU's export in-process.
 */
#ifndef BACKUPACCESS_UPSTREAM_H
#define BACKUPACCESS_UPSTREAM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libnbd.h>

/* QEMU serves at most 32 MiB per read. */
#define BA_UPSTREAM_MAX_REQUEST ((uint32_t) 32 << 20)

/* Reads of 1 MiB and more cost QEMU up to ten times the CPU per byte of
 * 256 KiB ones (its buffers are given back to the kernel and fault in
 * again every time); 256 KiB was cheap in every case measured.
 */
#define BA_UPSTREAM_PIECE_DEFAULT ((uint32_t) 256 << 10)
#define BA_UPSTREAM_PIECE_MIN ((uint32_t) 4096)
#define BA_UPSTREAM_PIECE_RULE "a power of two between 4K and 32M"

/* Pieces in flight per connection (QEMU serves 16 at a time per
 * connection and leaves the rest in the socket).
 */
#define BA_UPSTREAM_DEPTH_DEFAULT 4
#define BA_UPSTREAM_DEPTH_MAX 64

#define BA_UPSTREAM_CONNECTIONS_MAX 64

/* A power of two between BA_UPSTREAM_PIECE_MIN and _MAX_REQUEST. */
bool ba_upstream_piece_valid (uint64_t piece);

/* The split plan: [offset, offset + count) in pieces of at most piece
 * bytes.  A request of up to piece bytes is one piece, as it is; a
 * larger one is cut at multiples of piece, so that every piece but the
 * first starts on a piece boundary.
 */
struct ba_split {
  uint64_t pos, end;
  uint32_t piece;
};
void ba_split_init (struct ba_split *s, uint64_t offset, uint64_t count,
                    uint32_t piece);
/* The next piece into *offset and *len; false when there is none. */
bool ba_split_next (struct ba_split *s, uint64_t *offset, uint32_t *len);
/* How many pieces ba_split_next gives. */
uint64_t ba_split_count (uint64_t offset, uint64_t count, uint32_t piece);

/* Where the export is and how to read it.  uri, or socket + export
 * name; meta_context (may be NULL) is asked for on every connection.
 * piece and depth 0 take the defaults.
 */
struct ba_upstream_params {
  const char *uri;
  const char *socket;
  const char *export;
  const char *meta_context;
  unsigned connections;
  uint32_t piece;
  unsigned depth;
};

struct ba_upstream;

/* Opens every connection (with nbd_set_pread_initialize false: a failed
 * read never reaches the caller).  Returns the pool, or NULL with a
 * message in errbuf.
 */
struct ba_upstream *ba_upstream_open (const struct ba_upstream_params *p,
                                      char *errbuf, size_t errlen);
void ba_upstream_close (struct ba_upstream *u);

int64_t ba_upstream_size (const struct ba_upstream *u);
bool ba_upstream_can_trim (const struct ba_upstream *u);
/* Did QEMU agree to the meta context asked for? */
bool ba_upstream_can_meta_context (const struct ba_upstream *u);
unsigned ba_upstream_connections (const struct ba_upstream *u);

/* Reads [offset, offset + count) into buf: the pieces of the split plan
 * over as many idle connections as there are pieces (waiting for one if
 * none is idle), at most depth in flight on each.  Returns when every
 * piece has completed: 0, or -1 if any failed (then no more are issued,
 * and the contents of buf are undefined), with errno:
 *   EPERM  QEMU refused a piece (outside the dirty bitmap, already
 *          discarded, or the snapshot is broken);
 *   EIO    a connection to QEMU is lost (QEMU has gone away);
 *   other  as libnbd reported it;
 * and a message naming the piece in errbuf.  Thread-safe.
 */
int ba_upstream_pread (struct ba_upstream *u, void *buf, uint64_t count,
                       uint64_t offset, char *errbuf, size_t errlen);

/* Sends one trim on an idle connection (the caller checks alignment).
 * Returns 0, or -1 with errno and errbuf as for ba_upstream_pread.
 */
int ba_upstream_trim (struct ba_upstream *u, uint64_t count, uint64_t offset,
                      char *errbuf, size_t errlen);

/* nbd_block_status on an idle connection, the same way. */
int ba_upstream_block_status (struct ba_upstream *u, uint64_t count,
                              uint64_t offset, nbd_extent_callback cb,
                              uint32_t flags, char *errbuf, size_t errlen);

/* One connection for a call of the caller's own: ba_upstream_take waits
 * for an idle one and returns its index, which must be given back.
 */
unsigned ba_upstream_take (struct ba_upstream *u);
struct nbd_handle *ba_upstream_handle (struct ba_upstream *u, unsigned i);
void ba_upstream_give_back (struct ba_upstream *u, unsigned i);

/* The errno (EPERM, EIO or another, as above) for a failed command of
 * kind what ("read", "trim") on [offset, +count) of h, whose libnbd
 * error (the completion's or nbd_get_errno) is e, with a message in
 * errbuf.  Call it in the thread that saw the failure.
 */
int ba_upstream_error (struct nbd_handle *h, int e, const char *what,
                       uint64_t offset, uint64_t count,
                       char *errbuf, size_t errlen);

#endif /* BACKUPACCESS_UPSTREAM_H */
