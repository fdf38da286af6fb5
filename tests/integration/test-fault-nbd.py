#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Fault injection on the NBD side of a backup made with backupaccess-helper
(upstream back end, real qemu-storage-daemon, guest writing meanwhile):

- nbdkit killed (SIGKILL) mid-backup: the client fails at once
  (ENOTCONN or ECONNRESET), `serve` refuses to start a new nbdkit for the half-read
  backup and says why, teardown --failure cleans up;
- backupaccess-mount killed mid-read of the mounted file, while another
  process still holds the file open: the reader fails (ECONNABORTED or
  ENOTCONN), teardown unmounts lazily, says so, and leaves no mount;
- a client killed with reads in flight (aio_pread): QEMU lives on, and
  nbdkit serves the next client, what was served to the dead one being
  gone (nbdkit 1.32.5 itself aborts now and then in that case: its own
  bug, reported; the backup then fails and nothing is lost);
- a client that reconnects after its connection dropped right after a
  read: what it can still read is measured and checked against the rule
  (every cluster whose dirty bytes were all read is discarded: EPERM
  "already read and discarded"; the rest, a partly read cluster included,
  still reads correctly).

Teardown reports the filter's summary and nbdkit's last errors before it
removes the log.  After each fault: no process, mount, run-directory file, QEMU export,
block node or job is left, and the next incremental through the helper
holds every change (the chain equals the guest disk byte for byte)."""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import check, run_helper
from fault_fixture import (HelperSetup, PausedReader, UpstreamVm,
                           helper_backup, kill_mount_mid_read, no_leftovers)

SIZE = 32 << 20
CLUSTER = 65536
rng = random.Random(77)
faults = []


def next_incremental(vm, rd, fl, tmp, chain, what):
    """The backup after a failed one: an incremental with every change."""
    out = os.path.join(tmp, "backup%d.raw" % len(chain))
    helper_backup(vm, rd, fl, tmp, chain[-1], out,
                  "incremental after " + what, "reuse")
    chain.append(out)


def teardown_failure(s, rd, vm, fl, what):
    t0 = time.monotonic()
    r = s.teardown(False)
    no_leftovers(vm, rd, fl)
    check(vm.alive(), "%s: qemu-storage-daemon died" % what)
    return r, time.monotonic() - t0


# A client that sends reads and is killed with them in flight.
INFLIGHT = r'''
import json, sys, time, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
for off, n in json.loads(sys.argv[2]):
    h.aio_pread(nbd.Buffer(n), off)
print("submitted", flush=True)
time.sleep(600)
'''


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
    rd = vm.run_dir(os.path.join(tmp, "run"))
    fl = os.path.join(tmp, "fleecing")
    os.mkdir(fl)
    vm.guest_write(0, rng.randbytes(SIZE))
    chain = [os.path.join(tmp, "backup0.raw")]
    helper_backup(vm, rd, fl, tmp, None, chain[0], "the full backup", "new")

    # --- nbdkit killed mid-backup -------------------------------------
    vm.random_writes(rng, 12)
    s = HelperSetup(vm, rd, fl)
    regions = s.regions(SIZE)
    reader = PausedReader(s.uri, regions,
                          sum(e - b for b, e in regions) // 3, 65536)
    try:
        vm.random_writes(rng, 4)
        os.kill(s.nbdkit_pid(), signal.SIGKILL)
        rc, out, err = reader.go()
    finally:
        reader.kill()
    check(rc == 3 and any("read error: " + e in err for e in
                          ("ENOTCONN", "ECONNRESET", "EPIPE", "ESHUTDOWN")),
          "client after nbdkit was killed: exit %d %r" % (rc, err))
    r = run_helper("serve", "--run-dir", rd, ok=False)
    check(r.returncode == 1 and "its nbdkit has gone" in r.stderr and
          "tear it down with --failure" in r.stderr,
          "serve after nbdkit died: exit %d: %s" % (r.returncode, r.stderr))
    _, secs = teardown_failure(s, rd, vm, fl, "nbdkit killed")
    faults.append("nbdkit SIGKILL mid-backup: client %s; teardown %.1f s"
                  % (err.strip(), secs))
    next_incremental(vm, rd, fl, tmp, chain, "nbdkit was killed")

    # --- the mount killed mid-read, the file still open elsewhere -----
    vm.random_writes(rng, 12)
    s = HelperSetup(vm, rd, fl)
    m = json.loads(run_helper("mount", "--run-dir", rd).stdout)["mounts"][0]
    regions = [(o, o + n) for o, n in m["dirty-regions"]]
    check(regions == s.regions(SIZE), "mount's regions %s" % regions)
    t0 = time.monotonic()
    err, r = kill_mount_mid_read(vm, rd, m, lambda: teardown_failure(
        s, rd, vm, fl, "the mount killed")[0])
    secs = time.monotonic() - t0
    faults.append("backupaccess-mount SIGKILL mid-read (file held open): "
                  "reader %s; "
                  "teardown %.1f s: %s" % (err.strip(), secs,
                                           r.stderr.strip()))
    next_incremental(vm, rd, fl, tmp, chain, "the mount was killed")

    # --- a client killed with reads in flight -------------------------
    vm.random_writes(rng, 12, max_len=600 << 10)
    at_setup = vm.disk_read()
    s = HelperSetup(vm, rd, fl)
    regions = s.regions(SIZE)
    vm.random_writes(rng, 4)
    inflight = [(b, e - b) for b, e in regions[:3]]
    nbdkit_pid = s.nbdkit_pid()
    p = subprocess.Popen(["/usr/bin/python3", "-c", INFLIGHT, s.uri,
                          json.dumps(inflight)], stdout=subprocess.PIPE,
                         text=True)
    try:
        check(p.stdout.readline().startswith("submitted"),
              "the client did not submit")
    finally:
        p.kill()
        p.wait()
    time.sleep(0.5)         # not a condition: give a crash time to show
    alive = os.path.exists("/proc/%d" % nbdkit_pid) and \
        open("/proc/%d/stat" % nbdkit_pid).read().rsplit(")", 1)[1].split()[0] \
        not in ("Z", "X")
    check(vm.alive(), "QEMU died with the client")
    if alive:
        h = nbd.NBD()
        h.connect_uri(s.uri)
        lost = readable = 0
        for off, n in inflight:
            for pos in range(off, off + n, CLUSTER):
                k = min(CLUSTER, off + n - pos)
                try:
                    data = h.pread(k, pos)
                    check(data == at_setup[pos:pos + k],
                          "wrong data at %d after the client died" % pos)
                    readable += k
                except nbd.Error as e:
                    check(e.errno == "EPERM", "after the client died: %s" % e)
                    lost += k
        h.shutdown()
        faults.append("client SIGKILLed with %d reads (%d bytes) in flight: "
                      "nbdkit lives on; of those bytes %d had been served "
                      "(discarded: EPERM on a new connection), %d still "
                      "readable" % (len(inflight),
                                    sum(n for _, n in inflight), lost,
                                    readable))
    else:
        # nbdkit 1.32.5 itself aborts here, now and then: "connections.c:
        # raw_send_socket: Assertion `sock >= 0' failed" when a client
        # goes away with replies still to send (plain `nbdkit memory`
        # does the same).  The backup cannot go on; nothing is lost.
        r = run_helper("serve", "--run-dir", rd, ok=False)
        check(r.returncode == 1 and "its nbdkit has gone" in r.stderr,
              r.stderr)
        faults.append("client SIGKILLed with %d reads in flight: nbdkit "
                      "1.32.5 ABORTED (its own bug: raw_send_socket "
                      "assertion); the backup fails, nothing is lost"
                      % len(inflight))
    teardown_failure(s, rd, vm, fl, "a client went away")
    next_incremental(vm, rd, fl, tmp, chain, "a client went away")

    # --- a reconnect after the connection dropped right after a read --
    vm.random_writes(rng, 12, max_len=600 << 10)
    at_setup = vm.disk_read()
    s = HelperSetup(vm, rd, fl)
    regions = s.regions(SIZE)
    big = [(b, e) for b, e in regions if e - b >= 3 * CLUSTER]
    check(big, "no dirty region of 3 clusters: %s" % regions)
    start = big[0][0]
    check(start % CLUSTER == 0, "region not cluster-aligned: %d" % start)
    part = 2 * CLUSTER + CLUSTER // 2           # 2.5 clusters
    p = subprocess.Popen(["/usr/bin/python3", "-c", r'''
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pread(int(sys.argv[3]), int(sys.argv[2]))
print("read", flush=True)
sys.stdin.readline()
''', s.uri, str(start), str(part)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        check(p.stdout.readline().startswith("read"), "first read failed")
    finally:
        p.kill()                        # the connection drops
        p.wait()
    # What the reconnecting client can still read, per 4 KiB.
    h = nbd.NBD()
    h.connect_uri(s.uri)
    gone, ok_bytes = [], 0
    for pos in range(start, start + 3 * CLUSTER, 4096):
        try:
            check(h.pread(4096, pos) == at_setup[pos:pos + 4096],
                  "wrong data at %d after the reconnect" % pos)
            ok_bytes += 4096
        except nbd.Error as e:
            check(e.errno == "EPERM", "after the reconnect: %s" % e)
            gone.append(pos)
    h.shutdown()
    check(gone == list(range(start, start + 2 * CLUSTER, 4096)),
          "after a reconnect, refused at %s; expected exactly the 2 "
          "clusters read whole" % ["+%d" % (g - start) for g in gone])
    faults.append("reconnect after the connection dropped right after a "
                  "read of 2.5 clusters: the 2 whole clusters (%d bytes) "
                  "are gone (EPERM: already read and discarded); the "
                  "half-read cluster and the rest (%d bytes checked) still "
                  "read correctly" % (len(gone) * 4096, ok_bytes))
    r, _ = teardown_failure(s, rd, vm, fl, "a reconnect")
    # What nbdkit logged is reported before its log goes.
    check("backupaccess: summary:" in r.stderr and "nbdkit logged" in
          r.stderr and "was already read and discarded" in r.stderr,
          "teardown did not report nbdkit's log: %s" % r.stderr)
    next_incremental(vm, rd, fl, tmp, chain, "a reconnect")

for f in faults:
    print(f)
print("ok: %d NBD-side faults, %d backups in the chain, no change lost"
      % (len(faults), len(chain)))
