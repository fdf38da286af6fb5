/* SPDX-License-Identifier: BSD-3-Clause */
/* Unit tests for lib/copy.c, the rules of a backup copy: fixed cases of
 * the chunks, the split and what to write, and a randomized run against
 * a byte-level model (random disks, dirty regions, zero runs, block
 * status answers, request orders and failures at any step): nothing is
 * discarded that was not read and written, discards are whole aligned
 * clusters, every byte of the copy set is written with the snapshot's
 * data (zeroes as zeroes where the destination is an overlay), nothing
 * outside it is written, and a failed copy is never complete.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "copy.h"

#define K ((uint64_t) 1024)
#define M (K * K)

static struct ba_copy *
make_copy (uint64_t size, const struct ba_regions *dirty, uint64_t cluster,
           uint32_t request, uint64_t chunk, bool dest_zero, uint64_t batch)
{
  struct ba_copy_config cfg = {
    .disk_size = size, .dirty = dirty, .cluster_size = cluster,
    .request_size = request, .chunk_size = chunk,
    .destination_is_zero = dest_zero, .discard = true, .trim_batch = batch,
  };
  struct ba_copy *c = ba_copy_new (&cfg);

  assert_non_null (c);
  return c;
}

static void
test_new_errors (void **state)
{
  struct ba_regions dirty;
  struct ba_copy_config cfg = {
    .disk_size = M, .cluster_size = 64 * K, .request_size = 3000,
  };

  errno = 0;
  assert_null (ba_copy_new (&cfg));         /* not a power of two */
  assert_int_equal (errno, EINVAL);
  cfg.request_size = 256 * K;
  cfg.chunk_size = 64 * K;                  /* smaller than a request */
  assert_null (ba_copy_new (&cfg));
  cfg.chunk_size = 0;
  cfg.cluster_size = 1000;
  assert_null (ba_copy_new (&cfg));
  cfg.cluster_size = 64 * K;
  ba_regions_init (&dirty);
  assert_int_equal (ba_regions_append (&dirty, M - 1, M + 1), 0);
  cfg.dirty = &dirty;
  errno = 0;
  assert_null (ba_copy_new (&cfg));         /* past the end */
  assert_int_equal (errno, EINVAL);
  ba_regions_free (&dirty);
}

/* Chunks stay inside a dirty region and do not cross a multiple of the
 * chunk size; a full copy is the whole disk.
 */
static void
test_chunks (void **state)
{
  struct ba_regions dirty;
  struct ba_copy *c;
  struct ba_range ch;
  const uint64_t want[][2] = {
    { 100, 64 * K }, { 64 * K, 100 * K }, { 200 * K, 256 * K },
    { 256 * K, 300 * K },
  };

  ba_regions_init (&dirty);
  assert_int_equal (ba_regions_append (&dirty, 100, 100 * K), 0);
  assert_int_equal (ba_regions_append (&dirty, 200 * K, 300 * K), 0);
  c = make_copy (M, &dirty, 64 * K, 4 * K, 64 * K, false, 0);
  ba_regions_free (&dirty);
  for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
    assert_true (ba_copy_next_chunk (c, &ch));
    assert_int_equal (ch.start, want[i][0]);
    assert_int_equal (ch.end, want[i][1]);
  }
  assert_false (ba_copy_next_chunk (c, &ch));
  ba_copy_free (c);

  c = make_copy (100 * M + 5, NULL, 64 * K, 256 * K, 0, true, 0);
  assert_true (ba_copy_next_chunk (c, &ch));
  assert_int_equal (ch.start, 0);
  assert_int_equal (ch.end, BA_COPY_CHUNK_DEFAULT);
  assert_true (ba_copy_next_chunk (c, &ch));
  assert_int_equal (ch.end, 100 * M + 5);
  assert_false (ba_copy_next_chunk (c, &ch));
  ba_copy_free (c);
}

/* Reads of at most the request size cut at its multiples; zero runs as
 * requests of their own.
 */
static void
test_split (void **state)
{
  struct ba_copy *c = make_copy (128 * M, NULL, 64 * K, 64 * K, 0, false, 0);
  struct ba_regions zero;
  struct ba_copy_split s;
  struct ba_copy_req r;
  const struct ba_range chunk = { 10 * K, 40 * M };
  const struct { uint64_t off, len; bool z; } want[] = {
    { 10 * K, 54 * K, false }, { 64 * K, 36 * K, false },
    { 100 * K, 32 * M - 100 * K, true }, { 32 * M, 1 * M, true },
    { 33 * M, 64 * K, false }, { 33 * M + 64 * K, 64 * K, false },
  };
  size_t i = 0;

  ba_regions_init (&zero);
  assert_int_equal (ba_regions_append (&zero, 100 * K, 33 * M), 0);
  ba_copy_split_init (&s, c, &chunk, &zero);
  while (ba_copy_split_next (&s, &r)) {
    if (i < sizeof want / sizeof want[0]) {
      assert_int_equal (r.offset, want[i].off);
      assert_int_equal (r.len, want[i].len);
      assert_int_equal (r.known_zero, want[i].z);
    }
    else {
      assert_false (r.known_zero);
      assert_int_equal (r.len, 64 * K);
    }
    i++;
  }
  assert_int_equal (r.offset + r.len, 40 * M);
  ba_regions_free (&zero);
  ba_copy_free (c);
}

static void
test_write_for (void **state)
{
  struct ba_copy *fresh = make_copy (M, NULL, 64 * K, 64 * K, 0, true, 0);
  struct ba_copy *overlay = make_copy (M, NULL, 64 * K, 64 * K, 0, false, 0);
  char buf[100] = { 0 };

  assert_int_equal (ba_copy_write_for (fresh, false), BA_COPY_WRITE_DATA);
  assert_int_equal (ba_copy_write_for (fresh, true), BA_COPY_WRITE_NOTHING);
  assert_int_equal (ba_copy_write_for (overlay, false), BA_COPY_WRITE_DATA);
  assert_int_equal (ba_copy_write_for (overlay, true),
                    BA_COPY_WRITE_ZEROES);
  assert_true (ba_copy_is_zero (buf, sizeof buf));
  assert_true (ba_copy_is_zero (buf, 3));
  for (size_t i = 0; i < sizeof buf; i++) {
    buf[i] = 1;
    assert_false (ba_copy_is_zero (buf, sizeof buf));
    buf[i] = 0;
  }
  ba_copy_free (fresh);
  ba_copy_free (overlay);
}

/* ---- the byte-level model ---- */

static uint64_t rng_state;

/* What the randomized runs went through, so that a run that never
 * reaches a case fails instead of passing.
 */
static struct {
  unsigned trims, known_zero, zeroes, skipped, failures, complete;
} seen;

static uint64_t
rnd (uint64_t n)
{
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return n ? rng_state % n : 0;
}

struct model {
  uint64_t size, cluster;
  bool dest_zero, discard;
  unsigned fail_rate;           /* one in fail_rate steps fails; 0: none */
  uint8_t *src;                 /* the snapshot */
  uint8_t *dst, *prev;          /* the destination, now and at the start */
  uint8_t *in_set, *read_ok, *held, *trimmed;
  bool failed;
};

struct op {
  struct ba_copy_req r;
  bool to_write;
  enum ba_copy_write kind;
};

static void
model_init (struct model *m)
{
  uint64_t n = m->size;

  m->src = malloc (n);
  m->dst = malloc (n);
  m->prev = malloc (n);
  m->in_set = calloc (n, 1);
  m->read_ok = calloc (n, 1);
  m->held = calloc (n, 1);
  m->trimmed = calloc (n, 1);
  assert_non_null (m->trimmed);
  for (uint64_t i = 0; i < n; i++) {
    m->src[i] = (uint8_t) rnd (256);
    m->prev[i] = m->dest_zero ? 0 : (uint8_t) (1 + rnd (255));
  }
  /* Zeroes in the snapshot: over the previous backup's data. */
  for (int z = rnd (6); z > 0; z--) {
    uint64_t s = rnd (n), l = rnd (n / 3);
    memset (m->src + s, 0, s + l > n ? n - s : l);
  }
  memcpy (m->dst, m->prev, n);
}

static void
model_free (struct model *m)
{
  free (m->src);
  free (m->dst);
  free (m->prev);
  free (m->in_set);
  free (m->read_ok);
  free (m->held);
  free (m->trimmed);
}

/* Random dirty regions (NULL: a full copy), marked in m->in_set. */
static bool
random_dirty (struct model *m, struct ba_regions *dirty)
{
  static const uint64_t grains[] = { 1, 512, 4 * K, 64 * K };
  uint64_t g = grains[rnd (4)];

  ba_regions_init (dirty);
  if (rnd (4) == 0) {
    memset (m->in_set, 1, m->size);
    return false;
  }
  for (int n = rnd (9); n > 0; n--) {
    uint64_t s = rnd (m->size) / g * g, e = s + (1 + rnd (m->size / 4));
    e = (e + g - 1) / g * g;
    if (e > m->size)
      e = m->size;
    assert_int_equal (ba_regions_insert (dirty, s, e), 0);
  }
  for (size_t i = 0; i < dirty->n; i++)
    memset (m->in_set + dirty->r[i].start, 1,
            dirty->r[i].end - dirty->r[i].start);
  return true;
}

/* Every trim: whole aligned clusters, each with a dirty byte, every
 * dirty byte of them read and held by the destination, never twice.
 */
static void
check_trims (struct model *m, struct ba_regions *trims)
{
  for (size_t i = 0; i < trims->n; i++) {
    uint64_t s = trims->r[i].start, e = trims->r[i].end;

    assert_int_equal (s % m->cluster, 0);
    assert_true (e % m->cluster == 0 || e == m->size);
    for (uint64_t c = s; c < e; c += m->cluster) {
      uint64_t ce = c + m->cluster < m->size ? c + m->cluster : m->size;
      bool any = false;
      for (uint64_t b = c; b < ce; b++) {
        assert_false (m->trimmed[b]);
        m->trimmed[b] = 1;
        if (m->in_set[b]) {
          any = true;
          assert_true (m->read_ok[b] && m->held[b]);
        }
      }
      assert_true (any);
    }
  }
  ba_regions_clear (trims);
}

/* Block status: some of the chunk's truly zero runs (a server need not
 * report every one, and may report less than the whole run).
 */
static void
block_status (const struct model *m, const struct ba_range *ch,
              struct ba_regions *zero)
{
  uint64_t b = ch->start;

  ba_regions_clear (zero);
  while (b < ch->end) {
    uint64_t e = b;
    while (e < ch->end && m->src[e] == 0)
      e++;
    if (e > b && rnd (2))
      assert_int_equal (ba_regions_append (zero, b + rnd (e - b), e), 0);
    b = e + 1;
  }
}

static bool
fails (struct model *m)
{
  return m->fail_rate && rnd (m->fail_rate) == 0;
}

/* A read completes (or fails); it was checked when it was issued. */
static void
do_read (struct model *m, struct ba_copy *c, struct op *o, bool *drop)
{
  if (fails (m)) {
    if (rnd (2))
      ba_copy_read_refused (c, &o->r, "read");
    else
      ba_copy_fail (c, "read failed");
    m->failed = true;
    *drop = true;
    return;
  }
  memset (m->read_ok + o->r.offset, 1, o->r.len);
  o->kind = ba_copy_write_for (c, ba_copy_is_zero (m->src + o->r.offset,
                                                   o->r.len));
  o->to_write = true;
}

/* A write completes (or fails). */
static void
do_write (struct model *m, struct ba_copy *c, struct op *o,
          struct ba_regions *trims)
{
  uint64_t off = o->r.offset, len = o->r.len;

  if (fails (m)) {
    ba_copy_fail (c, "write failed");
    m->failed = true;
    return;
  }
  if (o->kind == BA_COPY_WRITE_DATA)
    memcpy (m->dst + off, m->src + off, len);
  else if (o->kind == BA_COPY_WRITE_ZEROES)
    memset (m->dst + off, 0, len);
  memset (m->held + off, 1, len);
  seen.known_zero += o->r.known_zero;
  seen.zeroes += o->kind == BA_COPY_WRITE_ZEROES;
  seen.skipped += o->kind == BA_COPY_WRITE_NOTHING;
  assert_int_equal (ba_copy_done (c, &o->r, o->kind, trims), 0);
  seen.trims += trims->n > 0;
  check_trims (m, trims);
}

/* The next request: from the split of the current chunk, or of the next
 * chunk after block status.  Checks what the plan makes.
 */
static bool
next_request (struct model *m, struct ba_copy *c, struct ba_copy_split *s,
              bool *have_split, struct ba_regions *zero, uint32_t request,
              struct op *o)
{
  struct ba_range ch;

  while (!*have_split || !ba_copy_split_next (s, &o->r)) {
    if (!ba_copy_next_chunk (c, &ch))
      return false;
    for (uint64_t b = ch.start; b < ch.end; b++)
      assert_true (m->in_set[b]);
    block_status (m, &ch, zero);
    ba_copy_split_init (s, c, &ch, zero);
    *have_split = true;
  }
  assert_true (o->r.len > 0);
  assert_true (o->r.len <= (o->r.known_zero ? BA_COPY_ZERO_MAX : request));
  for (uint64_t b = o->r.offset; b < o->r.offset + o->r.len; b++)
    assert_true (m->in_set[b] && (!o->r.known_zero || m->src[b] == 0));
  if (!o->r.known_zero) {
    char msg[256];
    assert_int_equal (ba_copy_check_read (c, &o->r, msg, sizeof msg), 0);
  }
  o->to_write = o->r.known_zero;
  o->kind = o->r.known_zero ? ba_copy_write_for (c, true) : 0;
  return true;
}

/* One random copy: requests in flight completed in random order. */
static void
run_model (struct model *m, struct ba_copy *c, uint32_t request)
{
  struct op ops[16];
  size_t n = 0, depth = 1 + rnd (16);
  bool more = true, have_split = false;
  struct ba_copy_split s;
  struct ba_regions zero, trims;

  ba_regions_init (&zero);
  ba_regions_init (&trims);
  while (more || n > 0) {
    more = more && !m->failed;          /* nothing new after a failure */
    while (more && n < depth)
      if ((more = next_request (m, c, &s, &have_split, &zero, request,
                                &ops[n])))
        n++;
    if (n > 0) {
      size_t i = rnd (n);
      bool drop = false;
      if (ops[i].to_write) {
        do_write (m, c, &ops[i], &trims);
        drop = true;
      }
      else
        do_read (m, c, &ops[i], &drop);
      if (drop)
        ops[i] = ops[--n];
    }
  }
  assert_int_equal (ba_copy_flush_trims (c, &trims), 0);
  check_trims (m, &trims);
  ba_regions_free (&zero);
  ba_regions_free (&trims);
}

/* After the run: what the destination holds, and what was discarded. */
static void
check_result (struct model *m, struct ba_copy *c)
{
  struct ba_copy_stats st;
  struct ba_range ch;

  ba_copy_get_stats (c, &st);
  for (uint64_t b = 0; b < m->size; b++) {
    if (!m->in_set[b]) {
      assert_false (m->held[b]);
      assert_int_equal (m->dst[b], m->prev[b]);
    }
    else if (!m->failed)
      assert_int_equal (m->dst[b], m->src[b]);
  }
  assert_int_equal (ba_copy_complete (c), !m->failed);
  assert_int_equal (st.failed, m->failed);
  seen.failures += m->failed;
  seen.complete += !m->failed;
  if (m->failed) {
    assert_false (ba_copy_next_chunk (c, &ch));
    return;
  }
  assert_int_equal (st.done, st.total);
  assert_int_equal (st.bytes_data + st.bytes_zeroes + st.bytes_skipped,
                    st.total);
  assert_true (m->dest_zero || st.bytes_skipped == 0);
  /* Every cluster all of whose dirty bytes were read is discarded. */
  for (uint64_t cl = 0; m->discard && cl < m->size; cl += m->cluster) {
    uint64_t ce = cl + m->cluster < m->size ? cl + m->cluster : m->size;
    bool any = false, all = true;
    for (uint64_t b = cl; b < ce; b++)
      if (m->in_set[b]) {
        any = true;
        all = all && m->read_ok[b];
      }
    assert_int_equal (m->trimmed[cl], any && all);
  }
}

static void
model_iteration (unsigned fail_rate)
{
  struct model m = { .fail_rate = fail_rate };
  struct ba_regions dirty;
  struct ba_copy *c;
  uint32_t request = (uint32_t) (4 * K) << rnd (3);
  uint64_t chunk = (uint64_t) request << rnd (4);
  bool have_dirty;

  m.cluster = (4 * K) << rnd (4);
  m.size = (8 + rnd (64)) * 4 * K + (rnd (2) ? rnd (4 * K) : 0);
  m.dest_zero = rnd (2);
  m.discard = rnd (4) != 0;
  model_init (&m);
  have_dirty = random_dirty (&m, &dirty);
  {
    struct ba_copy_config cfg = {
      .disk_size = m.size, .dirty = have_dirty ? &dirty : NULL,
      .cluster_size = m.cluster, .request_size = request,
      .chunk_size = chunk, .destination_is_zero = m.dest_zero,
      .discard = m.discard, .trim_batch = rnd (2) ? m.cluster << rnd (3) : 0,
    };
    c = ba_copy_new (&cfg);
  }
  assert_non_null (c);
  ba_regions_free (&dirty);
  run_model (&m, c, request);
  check_result (&m, c);
  ba_copy_free (c);
  model_free (&m);
}

static void
test_model (void **state)
{
  rng_state = 0x2545F4914F6CDD1DULL;
  memset (&seen, 0, sizeof seen);
  for (int i = 0; i < 300; i++)
    model_iteration (0);
  assert_int_equal (seen.failures, 0);
  assert_true (seen.trims > 100 && seen.known_zero > 100 &&
               seen.zeroes > 100 && seen.skipped > 100);
}

static void
test_model_failures (void **state)
{
  rng_state = 0x9E3779B97F4A7C15ULL;
  memset (&seen, 0, sizeof seen);
  for (int i = 0; i < 400; i++)
    model_iteration (2 + rnd (200));
  assert_true (seen.failures > 100 && seen.complete > 20 && seen.trims > 40);
}

/* A refused read of a range never discarded is a broken snapshot. */
static void
test_refused_is_broken (void **state)
{
  struct ba_copy *c = make_copy (M, NULL, 64 * K, 64 * K, 0, true, 0);
  const struct ba_copy_req r = { .offset = 0, .len = 64 * K };
  struct ba_copy_stats st;
  struct ba_range ch;
  char msg[1024];

  ba_copy_read_refused (c, &r, "read");
  assert_true (ba_copy_failed (c, msg, sizeof msg));
  assert_non_null (strstr (msg, "the snapshot is broken"));
  ba_copy_get_stats (c, &st);
  assert_true (st.broken);
  assert_false (ba_copy_next_chunk (c, &ch));
  assert_false (ba_copy_complete (c));
  ba_copy_free (c);
}

/* Written twice, outside the set, or nothing in an overlay: failures. */
static void
test_done_misuse (void **state)
{
  struct ba_copy *c = make_copy (M, NULL, 64 * K, 64 * K, 0, false, 0);
  struct ba_copy_req r = { .offset = 0, .len = 64 * K };
  struct ba_regions trims;
  char msg[1024];

  ba_regions_init (&trims);
  assert_int_equal (ba_copy_done (c, &r, BA_COPY_WRITE_NOTHING, &trims), 0);
  assert_true (ba_copy_failed (c, msg, sizeof msg));
  assert_non_null (strstr (msg, "does not read as zeroes"));
  ba_copy_free (c);

  /* Complete, until something (a flush) fails. */
  c = make_copy (64 * K, NULL, 64 * K, 64 * K, 0, true, 0);
  assert_int_equal (ba_copy_done (c, &r, BA_COPY_WRITE_DATA, &trims), 0);
  assert_true (ba_copy_complete (c));
  ba_copy_fail (c, "flush failed");
  assert_false (ba_copy_complete (c));
  ba_copy_free (c);
  ba_regions_clear (&trims);

  c = make_copy (M, NULL, 64 * K, 64 * K, 0, true, 0);
  assert_int_equal (ba_copy_done (c, &r, BA_COPY_WRITE_DATA, &trims), 0);
  assert_int_equal (trims.n, 1);
  assert_false (ba_copy_failed (c, NULL, 0));
  assert_int_equal (ba_copy_done (c, &r, BA_COPY_WRITE_DATA, &trims), 0);
  assert_true (ba_copy_failed (c, msg, sizeof msg));
  assert_non_null (strstr (msg, "written twice"));
  ba_copy_free (c);
  ba_regions_free (&trims);
}

/* Several threads taking chunks: each byte once. */
struct worker {
  struct ba_copy *c;
  uint64_t bytes;
};

static void *
worker (void *arg)
{
  struct worker *w = arg;
  struct ba_range ch;
  struct ba_copy_split s;
  struct ba_copy_req r;
  struct ba_regions trims;

  ba_regions_init (&trims);
  while (ba_copy_next_chunk (w->c, &ch)) {
    ba_copy_split_init (&s, w->c, &ch, NULL);
    while (ba_copy_split_next (&s, &r)) {
      if (ba_copy_done (w->c, &r, BA_COPY_WRITE_DATA, &trims) == -1)
        return NULL;
      w->bytes += r.len;
    }
  }
  ba_regions_free (&trims);
  return w;
}

static void
test_threads (void **state)
{
  struct ba_copy *c = make_copy (64 * M + 3, NULL, 64 * K, 4 * K, 256 * K,
                                 true, 4 * M);
  struct worker w[4];
  pthread_t t[4];
  uint64_t total = 0;

  for (int i = 0; i < 4; i++) {
    w[i] = (struct worker) { .c = c };
    assert_int_equal (pthread_create (&t[i], NULL, worker, &w[i]), 0);
  }
  for (int i = 0; i < 4; i++) {
    void *ret;
    assert_int_equal (pthread_join (t[i], &ret), 0);
    assert_non_null (ret);
    total += w[i].bytes;
  }
  assert_int_equal (total, 64 * M + 3);
  assert_true (ba_copy_complete (c));
  ba_copy_free (c);
}

int
main (void)
{
  const struct CMUnitTest tests[] = {
    cmocka_unit_test (test_new_errors),
    cmocka_unit_test (test_chunks),
    cmocka_unit_test (test_split),
    cmocka_unit_test (test_write_for),
    cmocka_unit_test (test_model),
    cmocka_unit_test (test_model_failures),
    cmocka_unit_test (test_refused_is_broken),
    cmocka_unit_test (test_done_misuse),
    cmocka_unit_test (test_threads),
  };
  return cmocka_run_group_tests (tests, NULL, NULL);
}
