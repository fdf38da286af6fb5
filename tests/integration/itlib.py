# SPDX-License-Identifier: BSD-3-Clause
"""Python helpers for the integration tests (tests/integration/test-*).

Run with /usr/bin/python3 (the one with the nbd module); functions.sh
puts this directory on PYTHONPATH.

- make_disk: deterministic random disks;
- region arithmetic on lists of half-open (start, end) ranges;
- the discard rule, computed independently of the filter;
- a parser for nbdkit's log filter (what reached the plugin, in order);
- the filter's summary line.
"""
import random
import re
import sys

import nbd


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def fail(msg):
    raise TestFailure(msg)


def run(main):
    """Runs main(); a TestFailure or any exception fails with status 1."""
    try:
        main()
    except TestFailure as e:
        print("FAIL: %s" % e, file=sys.stderr)
        sys.exit(1)


# Disks.

def make_disk(path, size, seed):
    rng = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(left, 1 << 20)
            f.write(rng.randbytes(n))
            left -= n


def make_sparse_disk(path, size, seed, chunk=1 << 20, every=16 << 20):
    """A sparse disk: chunk random bytes at the start of every `every`
    bytes (and at the very end), holes elsewhere.  Quick to make and copy
    even when large."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in list(range(0, size, every)) + [max(0, size - chunk)]:
            f.seek(off)
            f.write(rng.randbytes(min(chunk, size - off)))


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


# Region arithmetic.  A region list is a list of (start, end) pairs.

def merge(ranges):
    """Sorted, disjoint, non-adjacent union of ranges (empty ones dropped)."""
    out = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def total(ranges):
    return sum(e - s for s, e in merge(ranges))


def intersect(a, b):
    a, b = merge(a), merge(b)
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def subtract(a, b):
    """a minus b."""
    out = []
    b = merge(b)
    for s, e in merge(a):
        pos = s
        for bs, be in b:
            if be <= pos or bs >= e:
                continue
            if bs > pos:
                out.append((pos, bs))
            pos = max(pos, be)
        if pos < e:
            out.append((pos, e))
    return out


def covers(ranges, s, e):
    """True if [s, e) lies inside the union of ranges."""
    return not subtract([(s, e)], ranges)


def complement(ranges, size):
    return subtract([(0, size)], ranges)


# The discard rule, computed here from first principles.

def cluster_ranges(size, cluster):
    c = 0
    while c < size:
        yield c, min(c + cluster, size)
        c += cluster


def dirty_clusters(dirty, size, cluster):
    """Clusters with at least one dirty byte, the last ending at size."""
    return merge((s, e) for s, e in cluster_ranges(size, cluster)
                 if intersect([(s, e)], dirty))


def complete_clusters(dirty, consumed, size, cluster):
    """Clusters with a dirty byte all of whose dirty bytes are consumed."""
    consumed = merge(consumed)
    out = []
    for s, e in cluster_ranges(size, cluster):
        d = intersect([(s, e)], dirty)
        if d and not subtract(d, consumed):
            out.append((s, e))
    return merge(out)


def first_unreadable(dirty, done, s, e):
    """The range a refused read [s, e) is reported with: the first run, in
    offset order, of clean bytes (kind "clean") or of dirty bytes in
    discarded clusters (kind "discarded"); None if all is readable.
    done: the discarded clusters."""
    clean = subtract([(s, e)], dirty)
    gone = intersect(intersect([(s, e)], dirty), done)
    runs = sorted([(a, b, "clean") for a, b in clean] +
                  [(a, b, "discarded") for a, b in gone])
    return runs[0] if runs else None


def refusal_message(what, bad):
    """The nbdkit error for a refused request, from first_unreadable."""
    return "backupaccess: %s refused: [%d, %d) %s" % (
        what, bad[0], bad[1],
        "is outside the dirty regions (clean, not in this backup)"
        if bad[2] == "clean" else "was already read and discarded")


def check_trims(trims, expected, size, cluster, what="trims"):
    """trims: (offset, count) pairs sent to the plugin.  Each must be
    cluster-aligned (the end may be the end of the disk), no byte may be
    trimmed twice, and together they must cover exactly expected."""
    seen = []
    for off, cnt in trims:
        check(cnt > 0, "%s: empty trim at %d" % (what, off))
        check(off % cluster == 0,
              "%s: trim [%d, +%d) starts off a %d cluster boundary"
              % (what, off, cnt, cluster))
        end = off + cnt
        check(end % cluster == 0 or end == size,
              "%s: trim [%d, +%d) ends off a cluster boundary and not at "
              "the end of the disk (%d)" % (what, off, cnt, size))
        check(end <= size, "%s: trim [%d, +%d) past the end of the disk"
              % (what, off, cnt))
        check(not intersect(seen, [(off, end)]),
              "%s: [%d, +%d) trimmed twice" % (what, off, cnt))
        seen = merge(seen + [(off, end)])
    check(seen == merge(expected),
          "%s: trimmed %s, expected %s (missing %s, extra %s)"
          % (what, fmt(seen), fmt(expected), fmt(subtract(expected, seen)),
             fmt(subtract(seen, expected))))


def fmt(ranges, limit=12):
    ranges = merge(ranges)
    s = ", ".join("[%d, %d)" % r for r in ranges[:limit])
    if len(ranges) > limit:
        s += ", ... (%d ranges)" % len(ranges)
    return "{" + s + "}"


# Random pieces.

def split_random(ranges, rng, min_len=1, max_len=70000):
    """Cuts every range into pieces of random length."""
    pieces = []
    for s, e in merge(ranges):
        pos = s
        while pos < e:
            n = min(e - pos, rng.randint(min_len, max_len))
            pieces.append((pos, pos + n))
            pos += n
    return pieces


def random_regions(rng, size, n, max_len):
    """n disjoint, non-adjacent, unaligned regions inside [0, size)."""
    while True:
        starts = sorted(rng.sample(range(1, size - 1), 2 * n))
        regions = []
        for i in range(n):
            s, lim = starts[2 * i], starts[2 * i + 1]
            e = min(lim, s + rng.randint(1, max_len))
            regions.append((s, e))
        if len(merge(regions)) == n:
            return regions


def write_map(path, regions):
    """Writes a plain map file: one "OFFSET LENGTH" line per region."""
    with open(path, "w") as f:
        for s, e in merge(regions):
            f.write("%d %d\n" % (s, e - s))


def read_map(path):
    """The dirty regions of a plain map file written by write_map."""
    with open(path) as f:
        return merge((int(o), int(o) + int(n))
                     for o, n in (l.split() for l in f if l.strip()))


def write_bitmap_map(path, regions, size):
    """The same regions as nbdinfo --map=qemu:dirty-bitmap:NAME prints."""
    regions = merge(regions)
    with open(path, "w") as f:
        f.write("# nbdinfo --map=qemu:dirty-bitmap:backup-drive0\n\n")
        pos = 0
        for s, e in regions + [(size, size)]:
            if s > pos:
                f.write("%10d  %10d    0  clean\n" % (pos, s - pos))
            if e > s:
                f.write("%10d  %10d    1  dirty\n" % (s, e - s))
            pos = e


# nbdkit's log filter.

LOG_RE = re.compile(r"^\S+ \S+ connection=(\d+) (\.\.\.)?(\w+) id=(\d+) ?(.*)$")
FIELD_RE = re.compile(r"(\w+)=(\S+)")


class Event:
    def __init__(self, pos, conn, end, kind, rid, rest):
        self.pos = pos
        self.conn = conn
        self.end = end          # True for the "...Kind id=N return=..." line
        self.kind = kind
        self.id = rid
        fields = dict(FIELD_RE.findall(rest))
        self.offset = int(fields["offset"], 0) if "offset" in fields else None
        self.count = int(fields["count"], 0) if "count" in fields else None
        self.ret = fields.get("return")
        self.rest = rest

    @property
    def ok(self):
        return self.ret == "0"

    def __repr__(self):
        return "<%s%s c%d id%d off=%s cnt=%s ret=%s>" % (
            "..." if self.end else "", self.kind, self.conn, self.id,
            self.offset, self.count, self.ret)


class Log:
    """What reached the plugin, from nbdkit's log filter stacked below
    the backupaccess filter.  Reads the file incrementally."""

    def __init__(self, path):
        self.path = path
        self.events = []
        self._offset = 0
        self._partial = ""
        self.refresh()

    def refresh(self):
        try:
            with open(self.path) as f:
                f.seek(self._offset)
                data = f.read()
                self._offset = f.tell()
        except FileNotFoundError:
            return self
        data = self._partial + data
        lines = data.split("\n")
        self._partial = lines.pop()
        for line in lines:
            m = LOG_RE.match(line)
            if m:
                self.events.append(Event(len(self.events), int(m.group(1)),
                                         m.group(2) is not None, m.group(3),
                                         int(m.group(4)), m.group(5)))
        return self

    def starts(self, kind):
        return [e for e in self.events if e.kind == kind and not e.end]

    def ranges(self, kind):
        """(offset, count) of every request of this kind, in order."""
        return [(e.offset, e.count) for e in self.starts(kind)]

    def trims(self):
        return self.ranges("Trim")

    def check_all_ok(self):
        bad = [e for e in self.events if e.end and not e.ok]
        check(not bad, "requests failed in the plugin: %r" % bad)

    def check_trim_order(self, dirty, cluster, size):
        """Every trim comes after successful reads (returned before the
        trim started) that covered every dirty byte of its clusters."""
        starts = {}
        done = []
        for e in self.events:
            key = (e.conn, e.id)
            if not e.end:
                starts[key] = e
                if e.kind == "Trim":
                    s = e.offset - e.offset % cluster
                    need = intersect([(s, e.offset + e.count)], dirty)
                    missing = subtract(need, done)
                    check(not missing,
                          "trim [%d, +%d) sent before %s had been read "
                          "(log line %d)" % (e.offset, e.count,
                                             fmt(missing), e.pos))
            elif e.kind == "Read" and e.ok and key in starts:
                st = starts[key]
                done = merge(done + [(st.offset, st.offset + st.count)])


# Extents.

def typed_runs(pieces):
    """Sorted (start, end, type) pieces, adjacent runs of one type merged."""
    out = []
    for s, e, t in sorted(p for p in pieces if p[1] > p[0]):
        if out and out[-1][1] == s and out[-1][2] == t:
            out[-1] = (out[-1][0], e, t)
        else:
            check(not out or out[-1][1] == s,
                  "extents not contiguous at %d: %s" % (s, out[-1:]))
            out.append((s, e, t))
    return out


def nbdinfo_map(uri, context=None):
    """nbdinfo --map output as merged (start, end, type) runs."""
    import subprocess
    cmd = ["nbdinfo", "--map" + ("=" + context if context else ""), uri]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    pieces = []
    for line in out.splitlines():
        f = line.split()
        pieces.append((int(f[0]), int(f[0]) + int(f[1]), int(f[2])))
    return typed_runs(pieces)


def fmt_runs(runs):
    return "\n".join("  %10d %10d  %d" % (s, e - s, t) for s, e, t in runs)


def check_runs(got, want, what):
    check(got == want, "%s:\ngot\n%s\nexpected\n%s"
          % (what, fmt_runs(got), fmt_runs(want)))


# The filter's summary line.

SUMMARY_RE = re.compile(
    r"nbdkit: backupaccess: summary: (\d+) bytes read in (\d+) reads, "
    r"(\d+) bytes discarded in (\d+) trims, (\d+) trim errors, "
    r"(\d+) requests refused, (\d+) of (\d+) readable bytes left")
SUMMARY_KEYS = ("bytes_read", "reads", "bytes_discarded", "trims",
                "trim_errors", "refused", "readable_left", "readable_total")


def summary(path):
    with open(path) as f:
        found = SUMMARY_RE.findall(f.read())
    check(len(found) == 1, "%s: expected one summary line, found %d"
          % (path, len(found)))
    return dict(zip(SUMMARY_KEYS, map(int, found[0])))


# NBD client helpers.

def connect(sock):
    h = nbd.NBD()
    h.connect_unix(sock)
    return h


def expect_error(fn, want="EPERM", what="request"):
    """fn() must fail with errno name want (any error if want is None)."""
    try:
        fn()
    except nbd.Error as e:
        check(want is None or e.errno == want,
              "%s: failed with %s (%s), expected %s"
              % (what, e.errno, e.string, want))
        return e
    fail("%s succeeded, expected %s" % (what, want))


def grep(path, text):
    with open(path) as f:
        return text in f.read()


def expect_message(path, text):
    check(grep(path, text), "%s does not contain: %s" % (path, text))
