#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""Self-test of tests/lib/pve_vm.py, the Proxmox VE VM on the real
pve-qemu: in each device style (VE 9 -blockdev, VE 9 with a throttle
node, VE 8 -drive with its fleecing images attached by HMP drive_add), two
disks (one with 128 KiB fleecing clusters) go through what vzdump does
for a backup provider, with the test playing the provider on the
program-under-test QMP socket: fleecing images, backup-access-setup
(full: bitmap-mode new), NBD exports with the bitmap, a read of every
disk equal to the guest's disk at setup while the guest writes (its
writes land: read back through the device), a discard that shrinks the
fleecing image, teardown; then an incremental (use) whose exported
bitmap holds exactly the clusters written since, and whose dirty regions
read as the disk at its setup.  During the backup leftovers() sees the
backup's nodes, exports and bitmaps; after teardown and detaching the
fleecing images it sees nothing; QEMU quits with exit 0.  And the
fixture catches an abort at quit: a backup-access-setup that names a
device twice leaves nodes behind and pve-qemu aborts when told to quit
(its README), which the fixture reports as ABORTED."""
import os
import random
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import check, dirty_regions                   # noqa: E402
from pve_vm import STYLES, PveVm                           # noqa: E402
from qemu_fixture import QMPError, wait_for                # noqa: E402

TARGET = "snapshot-access:local"        # vzdump's target id and bitmap
GRAN = 4 << 20                          # Proxmox's bitmap granularity
DEVICES = {"drive-scsi0": 16 << 20, "drive-virtio1": 8 << 20}
FLEECE_CLUSTER = {"drive-scsi0": 64 << 10, "drive-virtio1": 128 << 10}
rng = random.Random(7)


def read_all(uri, size, regions=None):
    h = nbd.NBD()
    h.connect_uri(uri)
    out = bytearray(size)
    for start, end in regions or [(0, size)]:
        for off in range(start, end, 4 << 20):
            n = min(4 << 20, end - off)
            out[off:off + n] = h.pread(n, off)
    h.shutdown()
    return bytes(out)


def clusters_of(writes, gran):
    """The merged [start, end) ranges of gran-sized clusters writes touch."""
    out = []
    for c in sorted({c for off, n in writes
                     for c in range(off // gran, (off + n - 1) // gran + 1)}):
        if out and out[-1][1] == c * gran:
            out[-1][1] += gran
        else:
            out.append([c * gran, (c + 1) * gran])
    return [tuple(r) for r in out]


def guest_writes(vm, n):
    """n random guest writes over the disks; {device: [(off, len)]}."""
    done = {d: [] for d in DEVICES}
    for _ in range(n):
        d = rng.choice(list(DEVICES))
        length = rng.randrange(1, 96) * 1024
        off = rng.randrange(0, DEVICES[d] - length)
        vm.guest_write(off, rng.randbytes(length), d)
        done[d].append((off, length))
    return done


def backup(vm, tmp, mode, expect_action, readable=None):
    """One backup as vzdump drives it for a provider; returns the guest
    writes made during it.  readable(dev): the regions to read (all of
    the disk when None)."""
    qmp = vm.connect()
    try:
        info = qmp.cmd("backup-access-setup", **{
            "target-id": TARGET,
            "devices": [{"device": d, "bitmap-mode": mode}
                        for d in DEVICES]})
        snap = {d: vm.disk(d) for d in DEVICES}
        check(sorted(i["device"] for i in info) == sorted(DEVICES),
              "setup reply: %s" % info)
        for i in info:
            d = i["device"]
            check(i["size"] == DEVICES[d] and i["bitmap-name"] == TARGET and
                  i["bitmap-node-name"] == vm.bitmap_node(d) and
                  i["bitmap-action"] == expect_action,
                  "%s: setup reply %s (bitmap node %s)"
                  % (vm.style, i, vm.bitmap_node(d)))
            check(TARGET in vm.bitmaps(d), "%s: no bitmap %s on %s: %s"
                  % (vm.style, TARGET, vm.bitmap_node(d), vm.bitmaps(d)))
        sock = os.path.join(tmp, "nbd.sock")
        qmp.cmd("nbd-server-start",
                addr={"type": "unix", "data": {"path": sock}})
        for i in info:
            qmp.cmd("block-export-add", type="nbd", id=i["device"],
                    name=i["device"], writable=True,
                    **{"node-name": i["node-name"]},
                    bitmaps=[{"node": i["bitmap-node-name"],
                              "name": i["bitmap-name"]}])
        left = vm.leftovers(bitmaps=(TARGET,))
        check(sorted(left.get("exports", [])) == sorted(DEVICES) and
              len(left.get("nodes", [])) >= 2 * len(DEVICES) and
              any(b == "backup-access-background-bitmap"
                  for _, b in left.get("bitmaps", [])),
              "%s: leftovers() does not see the backup: %s"
              % (vm.style, left))

        # The guest writes while the backup reads.
        grown = {d: vm.fleecing_allocated(d) for d in DEVICES}
        during = guest_writes(vm, 12)
        for d in DEVICES:
            for off, n in during[d][:2]:
                check(vm.disk_read(off, min(n, 4096), d) ==
                      vm.disk(d)[off:off + min(n, 4096)],
                      "%s: a guest write did not land" % vm.style)
        check(any(vm.fleecing_allocated(d) > grown[d] for d in DEVICES),
              "%s: copy-before-write copied nothing" % vm.style)
        for d in DEVICES:
            uri = "nbd+unix:///%s?socket=%s" % (d, sock)
            regions = readable(d) if readable else None
            if regions is None:
                check(dirty_regions(uri, TARGET) == [(0, DEVICES[d])],
                      "%s: a full backup's bitmap is not all dirty"
                      % vm.style)
            got = read_all(uri, DEVICES[d], regions)
            for s, e in regions or [(0, DEVICES[d])]:
                check(got[s:e] == snap[d][s:e], "%s: %s at %d..%d is not "
                      "the disk at setup" % (vm.style, d, s, e))
        # Discards reach the fleecing image (attached with discard).
        d = "drive-scsi0"
        h = nbd.NBD()
        h.connect_uri("nbd+unix:///%s?socket=%s" % (d, sock))
        before = vm.fleecing_allocated(d)
        h.trim(DEVICES[d], 0)
        h.shutdown()
        check(vm.fleecing_allocated(d) < before, "%s: the fleecing image "
              "did not shrink (%d -> %d)" % (vm.style, before,
                                             vm.fleecing_allocated(d)))

        for d in DEVICES:
            qmp.cmd("block-export-del", id=d)
        wait_for(lambda: vm.exports() == [], "the exports to go")
        qmp.cmd("nbd-server-stop")
        qmp.cmd("backup-access-teardown", **{"target-id": TARGET,
                                              "success": True})
    finally:
        qmp.close()
    return during


def cycle(style, tmp):
    with PveVm(devices=DEVICES, style=style, tmpdir=tmp,
               fleecing_style="drive" if style == "drive" else "blockdev"
               ) as vm:
        for d in DEVICES:
            vm.guest_write(0, rng.randbytes(DEVICES[d]), d)
        # Full.
        for d in DEVICES:
            vm.add_fleecing(d, cluster_size=FLEECE_CLUSTER[d])
        during = backup(vm, tmp, "new", "new")
        vm.del_fleecing()
        check(vm.leftovers(bitmaps=(TARGET,)) == {}, "%s: left after the "
              "full backup: %s" % (style, vm.leftovers(bitmaps=(TARGET,))))
        # Incremental: the bitmap holds what the guest wrote since setup.
        after = guest_writes(vm, 6)
        written = {d: during[d] + after[d] for d in DEVICES}
        for d in DEVICES:
            vm.add_fleecing(d, cluster_size=FLEECE_CLUSTER[d])
        sock = os.path.join(tmp, "nbd.sock")

        def readable(d):
            want = clusters_of(written[d], GRAN)
            got = dirty_regions("nbd+unix:///%s?socket=%s" % (d, sock),
                                TARGET)
            check(got == want, "%s: %s's bitmap %s, written %s"
                  % (style, d, got, want))
            return want
        backup(vm, tmp, "use", "used", readable)
        vm.del_fleecing()
        check(vm.leftovers(bitmaps=(TARGET,)) == {}, "%s: left after the "
              "incremental: %s" % (style, vm.leftovers(bitmaps=(TARGET,))))
    check(vm.stopped_with is None, "quit: %s" % vm.stopped_with)


def abort_at_quit(tmp):
    """pve-qemu aborts at quit after a setup that failed half-way (the
    same device twice, with a bitmap): the fixture must say so.  (Now
    and then that setup crashes pve-qemu at once, SIGSEGV: then the
    fixture must say that QEMU died before the end.)"""
    vm = PveVm(8 << 20, tmpdir=tmp, fleecing=True)
    with vm:
        qmp = vm.connect()
        try:
            qmp.cmd("backup-access-setup", **{
                "target-id": TARGET,
                "devices": [{"device": vm.device, "bitmap-mode": "new"}] * 2})
            check(False, "a setup with the same device twice succeeded")
        except (QMPError, OSError) as e:
            if "already exists" not in str(e):
                # A crash drops the connection a moment before the
                # process is gone: QEMU must then exit, within bounds.
                wait_for(lambda: not vm.alive(), "QEMU to exit after "
                         "setup failed with: %s" % e, 30)
        finally:
            qmp.close()
        crashed = not vm.alive()
        if not crashed:
            check(vm.leftovers() != {}, "leftovers() sees nothing after a "
                  "half-failed setup")
        problem = vm.stop()
    if crashed:
        check(problem is not None and "before the end" in problem,
              "QEMU's crash in setup was not reported: %s" % problem)
    else:
        check(problem is not None and "ABORTED" in problem and
              "at quit" in problem, "the abort at quit was not caught: %s"
              % problem)
    print("half-failed setup:", problem.splitlines()[0])


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    for style in STYLES:
        cycle(style, os.path.join(tmp, style))
    abort_at_quit(os.path.join(tmp, "abort"))
print("ok")
