/* SPDX-License-Identifier: BSD-3-Clause */
/* Fuzzes the discard rule, ba_coverage (lib/coverage.c), against a
 * trivially correct model: a byte array (clean, readable or discarded;
 * consumed or not, per byte).  The input is decoded into a small disk,
 * a dirty set, a memory budget, and a sequence of client reads and
 * trims, handled as the readable view handles them (lib/view.c):
 * a read consumes its bytes only if it succeeds, a trim always does.
 *
 * Checked after every step, as in tests/unit/test_coverage.c:
 *  (a) nothing is ever discarded that holds a byte neither consumed
 *      nor clean, and no cluster is discarded twice;
 *  (b) every cluster whose dirty bytes are all consumed is discarded,
 *      strictly as long as the partial-cluster budget was never
 *      exceeded (untracked_bytes == 0; past it a cluster may stay);
 *  (c) discards are whole clusters, the last one ending at the end of
 *      the disk, merged and sorted;
 * and that readability, runs and the statistics agree with the model.
 *
 * Input layout (bytes; missing bytes read as 0):
 *   0     cluster size 2^(b % 13): 1 byte to 4 KiB
 *   1-2   disk size, at most MAX_DISK bytes and MAX_CLUSTERS clusters
 *   3     bit 0: whole disk dirty; bit 1: backupaccess-clean=zero
 *         (reads are refused as without it); bits 2-7: budget in 256 byte
 *         units (0: the default, never reached on these disks)
 *   4     number of dirty runs (% 64), then per run two 16 bit
 *         values, the gap before it and its length; bit 15 set means
 *         in clusters, else in bytes
 *   then  operations of 5 bytes: kind, 16 bit offset, 16 bit length
 *         kind % 4: 0 read, 1 trim, 2 check readability and runs,
 *         3 read one cluster in pieces of the given length;
 *         kind bit 2: offset in clusters; bit 3: length up to the
 *         whole disk (else up to two clusters)
 * At the end every byte is read, in whole clusters.
 */
#include <stdbool.h>
#include <string.h>

#include "coverage.h"
#include "regions.h"
#include "fuzz.h"

#define MAX_DISK 16384
#define MAX_CLUSTERS 1024
#define MAX_OPS 400

enum { K_CLEAN, K_READABLE, K_DISCARDED };

struct input { const uint8_t *p; size_t n; };

static unsigned
u8 (struct input *in)
{
  unsigned v = 0;

  if (in->n > 0) {
    v = *in->p++;
    in->n--;
  }
  return v;
}

static unsigned
u16 (struct input *in)
{
  unsigned hi = u8 (in);
  return (hi << 8) | u8 (in);
}

struct model {
  uint64_t disk, cs, ncl;
  uint8_t kind[MAX_DISK];       /* per byte: K_* */
  bool consumed[MAX_DISK];      /* per byte: consumed and dirty */
  uint64_t dirty_in[MAX_CLUSTERS];
  uint64_t consumed_in[MAX_CLUSTERS];
  bool trimmed[MAX_CLUSTERS];
};

static struct model m;

static struct ba_coverage_stats
stats_of (const struct ba_coverage *cov)
{
  struct ba_coverage_stats st;

  ba_coverage_get_stats (cov, &st);
  return st;
}

/* Consumes [s, e) in the tracker and in the model; checks (a), (c). */
static void
consume (struct ba_coverage *cov, struct ba_regions *trims,
         uint64_t s, uint64_t e)
{
  ba_regions_clear (trims);
  CHECK (ba_coverage_consume (cov, s, e, trims) == 0);

  for (uint64_t b = s; b < e; b++) {
    if (m.kind[b] == K_READABLE && !m.consumed[b]) {
      m.consumed[b] = true;
      m.consumed_in[b / m.cs]++;
    }
  }
  for (size_t i = 0; i < trims->n; i++) {
    uint64_t ts = trims->r[i].start, te = trims->r[i].end;

    /* (c) */
    CHECK (ts < te);
    CHECK (te <= m.disk);
    CHECK (ts % m.cs == 0);
    CHECK (te % m.cs == 0 || te == m.disk);
    CHECK (i == 0 || trims->r[i - 1].end < ts);
    /* (a) */
    for (uint64_t b = ts; b < te; b++)
      CHECK (m.kind[b] == K_CLEAN || m.consumed[b]);
    for (uint64_t c = ts / m.cs; c * m.cs < te; c++) {
      CHECK (!m.trimmed[c]);
      CHECK (m.dirty_in[c] > 0);
      m.trimmed[c] = true;
    }
    for (uint64_t b = ts; b < te; b++)
      if (m.kind[b] == K_READABLE)
        m.kind[b] = K_DISCARDED;
  }
}

/* (b), and the statistics. */
static void
check_clusters (const struct ba_coverage *cov)
{
  struct ba_coverage_stats st = stats_of (cov);
  bool strict = st.untracked_bytes == 0;
  uint64_t left = 0, discarded = 0, partial = 0;

  for (uint64_t c = 0; c < m.ncl; c++) {
    bool complete = m.dirty_in[c] > 0 && m.consumed_in[c] == m.dirty_in[c];

    if (strict)
      CHECK (m.trimmed[c] == complete);
    else if (m.trimmed[c])
      CHECK (complete);
    if (m.trimmed[c])
      discarded++;
    else {
      left += m.dirty_in[c];
      partial += m.consumed_in[c] > 0;
    }
  }
  CHECK (st.readable_left == left);
  CHECK (st.clusters_discarded == discarded);
  if (strict)
    CHECK (st.partial_clusters == partial);
  else
    CHECK (st.partial_clusters <= partial);
}

static uint64_t
kind_run_end (uint64_t b, uint64_t e)
{
  uint8_t k = m.kind[b];

  while (b < e && m.kind[b] == k)
    b++;
  return b;
}

/* ba_coverage_readable against the model; returns its answer. */
static bool
check_readable (const struct ba_coverage *cov, uint64_t s, uint64_t e)
{
  struct ba_range bad = { 0, 0 };
  bool discarded = false;
  bool ok = ba_coverage_readable (cov, s, e, &bad, &discarded);
  uint64_t b = s;

  while (b < e && m.kind[b] == K_READABLE)
    b++;
  if (b == e) {
    CHECK (ok);
    return ok;
  }
  CHECK (!ok);
  CHECK (bad.start == b);
  CHECK (discarded == (m.kind[b] == K_DISCARDED));
  CHECK (bad.end == kind_run_end (b, e));
  return ok;
}

static void
check_run (const struct ba_coverage *cov, uint64_t s, uint64_t e)
{
  bool readable;
  uint64_t len = ba_coverage_run (cov, s, e, &readable);

  if (s >= e) {
    CHECK (len == 0);
    return;
  }
  CHECK (len > 0 && len <= e - s);
  for (uint64_t b = s; b < s + len; b++)
    CHECK ((m.kind[b] == K_READABLE) == readable);
  if (readable)
    CHECK (s + len == e || m.kind[s + len] != K_READABLE);
}

/* A client read of [s, e), as backupaccess_pread does it. */
static void
client_read (struct ba_coverage *cov, struct ba_regions *trims,
             uint64_t s, uint64_t e)
{
  bool ok;

  if (s >= e)
    return;
  /* As ba_view_check_read: with backupaccess-clean=zero too, a read
   * that touches a clean byte is refused and consumes nothing.
   */
  ok = check_readable (cov, s, e);
  if (ok)
    consume (cov, trims, s, e);
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct input in = { data, size };
  struct ba_regions dirty, trims;
  struct ba_coverage *cov;
  unsigned flags, nruns;
  uint64_t budget;
  bool full;

  memset (&m, 0, sizeof m);
  m.cs = UINT64_C (1) << (u8 (&in) % 13);
  m.disk = u16 (&in) % (MAX_DISK + 1);
  if (m.disk > m.cs * MAX_CLUSTERS)
    m.disk = m.cs * MAX_CLUSTERS;
  m.ncl = (m.disk + m.cs - 1) / m.cs;
  flags = u8 (&in);
  full = flags & 1;
  budget = (uint64_t) (flags >> 2) * 256;

  ba_regions_init (&dirty);
  ba_regions_init (&trims);
  nruns = u8 (&in) % 64;
  if (!full) {
    uint64_t off = 0;
    for (unsigned i = 0; i < nruns && off < m.disk; i++) {
      unsigned g = u16 (&in), l = u16 (&in);
      uint64_t gap = g & 0x8000 ? (g & 0x7fff) * m.cs : g;
      uint64_t len = l & 0x8000 ? (l & 0x7fff) * m.cs : l;
      uint64_t end;
      if (gap > m.disk - off)
        break;
      off += gap;
      end = len < m.disk - off ? off + len : m.disk;
      CHECK (ba_regions_append (&dirty, off, end) == 0);
      off = end;
    }
  }

  cov = ba_coverage_new (m.disk, m.cs, full ? NULL : &dirty);
  CHECK (cov != NULL);
  if (budget)
    ba_coverage_set_partial_budget (cov, budget);
  if (full)
    memset (m.kind, K_READABLE, m.disk);
  else
    for (size_t i = 0; i < dirty.n; i++)
      memset (m.kind + dirty.r[i].start, K_READABLE,
              dirty.r[i].end - dirty.r[i].start);
  for (uint64_t b = 0; b < m.disk; b++)
    m.dirty_in[b / m.cs] += m.kind[b] != K_CLEAN;
  CHECK (stats_of (cov).readable_total
         == (full ? m.disk : ba_regions_total (&dirty)));
  check_clusters (cov);

  for (unsigned op = 0; op < MAX_OPS && in.n > 0; op++) {
    unsigned kind = u8 (&in), o = u16 (&in), l = u16 (&in);
    uint64_t s, len, e;

    if (m.disk == 0)
      break;
    s = kind & 4 ? (o % m.ncl) * m.cs : o % m.disk;
    len = kind & 8 ? l % (m.disk + 1) : l % (2 * m.cs + 1);
    e = len < m.disk - s ? s + len : m.disk;
    switch (kind % 4) {
    case 0:
      client_read (cov, &trims, s, e);
      break;
    case 1:                     /* backupaccess_trim */
      consume (cov, &trims, s, e);
      break;
    case 2:
      check_readable (cov, s, e);
      check_run (cov, s, e);
      break;
    default: {                  /* one cluster, in pieces of len */
      uint64_t c0 = s - s % m.cs;
      uint64_t c1 = c0 + m.cs < m.disk ? c0 + m.cs : m.disk;
      if (len == 0)
        len = 1;
      for (uint64_t b = c0; b < c1; b += len)
        client_read (cov, &trims, b, b + len < c1 ? b + len : c1);
      break;
    }
    }
    check_clusters (cov);
  }

  /* Read the rest: (b) strictly leaves no dirty cluster behind. */
  for (uint64_t s = 0; s < m.disk; s += m.cs) {
    consume (cov, &trims, s, s + m.cs < m.disk ? s + m.cs : m.disk);
  }
  check_clusters (cov);
  if (stats_of (cov).untracked_bytes == 0)
    for (uint64_t c = 0; c < m.ncl; c++)
      CHECK (m.trimmed[c] == (m.dirty_in[c] > 0));

  ba_coverage_free (cov);
  ba_regions_free (&dirty);
  ba_regions_free (&trims);
  return 0;
}
