/* SPDX-License-Identifier: BSD-3-Clause */
/* Memory of the filter's state (the coverage tracker) for a 1 TiB disk
 * at 64 KiB clusters, read in several orders.  Prints one row per
 * order: peak tracker memory, clusters discarded, time.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "coverage.h"
#include "regions.h"

#define TIB (UINT64_C (1) << 40)
#define CLUSTER (UINT64_C (64) << 10)

static uint64_t rng_state = 0x9e3779b97f4a7c15;

static uint64_t
rnd (void)
{
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

/* Reads of req bytes tiling the disk from offset 0, in the order given
 * by shuffle (0 = forwards, 1 = random, 2 = backwards).
 */
static void
run (const char *name, uint64_t size, uint64_t req, int order)
{
  uint64_t n = (size + req - 1) / req, peak = 0;
  uint32_t *idx = malloc (n * sizeof *idx);
  struct ba_coverage *cov = ba_coverage_new (size, CLUSTER, NULL);
  struct ba_regions trims;
  struct ba_coverage_stats st;
  struct timespec t0, t1;

  if (idx == NULL || cov == NULL) {
    perror ("bench");
    exit (1);
  }
  for (uint64_t i = 0; i < n; i++)
    idx[i] = order == 2 ? n - 1 - i : i;
  if (order == 1)
    for (uint64_t i = n - 1; i > 0; i--) {
      uint64_t j = rnd () % (i + 1);
      uint32_t t = idx[i]; idx[i] = idx[j]; idx[j] = t;
    }
  ba_regions_init (&trims);
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (uint64_t i = 0; i < n; i++) {
    uint64_t off = idx[i] * req, end = off + req < size ? off + req : size;
    ba_regions_clear (&trims);
    if (ba_coverage_consume (cov, off, end, &trims) == -1) {
      perror ("consume");
      exit (1);
    }
    if ((i & 1023) == 0 || i == n / 2) {
      ba_coverage_get_stats (cov, &st);
      if (st.memory_bytes > peak)
        peak = st.memory_bytes;
    }
  }
  clock_gettime (CLOCK_MONOTONIC, &t1);
  ba_coverage_get_stats (cov, &st);
  printf ("| %-32s | %8.2f MiB | %6.2f%% | %10" PRIu64 " | %6.2f s |\n",
          name, peak / 1048576.0,
          100.0 * st.clusters_discarded / ((size + CLUSTER - 1) / CLUSTER),
          st.untracked_bytes,
          (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
  fflush (stdout);
  ba_regions_free (&trims);
  ba_coverage_free (cov);
  free (idx);
}

int
main (void)
{
  printf ("Filter state for a 1 TiB disk, 64 KiB clusters, full backup\n");
  printf ("| %-32s | %12s | %7s | %10s | %8s |\n", "read order",
          "peak memory", "discard", "untracked", "time");
  printf ("|----------------------------------|--------------|---------|------------|----------|\n");
  run ("sequential 256 KiB", TIB, 256 << 10, 0);
  run ("backwards 1 MiB", TIB, 1 << 20, 2);
  run ("random order 64 KiB (aligned)", TIB, 64 << 10, 1);
  run ("random order 2 MiB", TIB, 2 << 20, 1);
  run ("sequential 48 KiB (unaligned)", TIB, 48 << 10, 0);
  run ("random order 48 KiB (unaligned)", TIB, 48 << 10, 1);
  return 0;
}
