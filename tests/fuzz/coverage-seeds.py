#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""Writes the seed inputs of fuzz_coverage into corpus/coverage, in the
input layout described at the top of fuzz_coverage.c.  Run from
tests/fuzz; the seeds are committed, this documents them."""
import os
import struct

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "corpus", "coverage")
READ, TRIM, CHECK, PIECES = 0, 1, 2, 3
CL = 4          # offset in clusters
BIG = 8         # length up to the whole disk
IN_CLUSTERS = 0x8000


def seed(name, cluster_bits, disk, ops, runs=None, clean_zero=False,
         budget_units=0):
    flags = (1 if runs is None else 0) | (2 if clean_zero else 0) \
        | (budget_units << 2)
    b = struct.pack(">BHBB", cluster_bits, disk, flags,
                    len(runs) if runs else 0)
    for gap, length in runs or []:
        b += struct.pack(">HH", gap, length)
    for kind, off, length in ops:
        b += struct.pack(">BHH", kind, off, length)
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(b)


os.makedirs(OUT, exist_ok=True)
C = IN_CLUSTERS
# A full backup read cluster by cluster, in order.
seed("full-sequential", 9, 16 * 512,
     [(READ | CL, c, 512) for c in range(16)])
# A full backup read in unaligned pieces, backwards, with checks.
seed("full-pieces-backwards", 9, 8 * 512,
     [(op, off, 100) for o in range(4096 - 100, -100, -100)
      for op, off in ((READ, max(o, 0)), (CHECK, max(o - 50, 0)))])
# An incremental: dirty runs, some cluster-aligned, read across them.
seed("incremental-runs", 10, 20 * 1024,
     [(READ, 0, 3000), (READ, 3000, 5000), (PIECES | CL, 9, 333),
      (READ | BIG, 0, 20 * 1024), (CHECK | BIG, 0, 20 * 1024)],
     runs=[(100, 900), (C | 2, C | 3), (10, 5000), (C | 1, 2048)])
# A short last cluster, finished by a read that ends at the disk end.
seed("tail-cluster", 12, 3 * 4096 + 777,
     [(READ | CL, 3, 500), (READ, 3 * 4096 + 500, 277), (CHECK | BIG, 0, 0),
      (READ | CL | BIG, 0, 3 * 4096)])
# Client trims mixed with reads.
seed("client-trims", 9, 10 * 512,
     [(TRIM, 100, 300), (READ, 0, 100), (READ, 400, 112), (TRIM | CL, 2, 1024),
      (READ | CL, 4, 512), (TRIM | BIG, 0, 5120)],
     runs=[(0, 1000), (500, 3000)])
# backupaccess-clean=zero: reads across clean and dirty bytes are refused.
seed("clean-zero-reads", 8, 32 * 256,
     [(READ | BIG, 0, 4000), (READ | BIG, 3000, 5192), (READ, 0, 10)],
     runs=[(10, 20), (300, 700), (C | 3, C | 2), (7, 1)], clean_zero=True)
# Over a small partial-cluster budget: many clusters partly read.
seed("budget-exceeded", 6, 1024 * 16,
     [(READ | CL, c, 7) for c in range(0, 256, 2)] +
     [(PIECES | CL, c, 5) for c in range(0, 256, 16)] +
     [(CHECK | BIG, 0, 16384)], budget_units=6)
# One-byte clusters, and a disk of one byte.
seed("one-byte-clusters", 0, 300,
     [(READ, 0, 2), (TRIM, 5, 1), (READ, 4, 3), (CHECK, 0, 10)],
     runs=[(1, 10), (20, 30)])
seed("one-byte-disk", 0, 1, [(READ, 0, 1)])
# Budget for the table and 16 two-range clusters: a third range in one
# of them no longer fits, and the cluster is forgotten (untracked).
seed("budget-forget-cluster", 9, 64 * 512,
     [(READ, c * 512 + o, 10) for c in range(17) for o in (0, 100)] +
     [(READ, 200, 10), (READ | BIG, 0, 32768), (CHECK | BIG, 0, 32768)],
     budget_units=7)
