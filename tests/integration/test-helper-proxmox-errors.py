#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""backupaccess-helper setup refuses, against the real Proxmox VE QEMU
(tests/lib/pve_vm.py; VE 9 disks under throttle nodes), whatever would
make backup-access-setup fail half-way (which leaves nodes that QEMU
cannot remove, and QEMU then aborts when it quits) or abort QEMU at
once, and whatever would give a wrong backup: each with a clear error,
before any QMP command that changes anything, and QEMU quits with status
0 at the end.  The same device twice, or none (before QMP at all); an
unknown device or a device id; a fleecing image missing, of another
size, or read-only; two names of one node (a throttle node and its
child); a background bitmap left on a disk; the backup's bitmap busy
(exported by someone else); an incremental from a disabled bitmap;
--bitmap and --target-id that differ.  A second backup access while one
runs: QEMU refuses it, and the helper leaves the first alone (it sends
no backup-access-teardown for a setup QEMU refused).  And when QEMU
does fail half-way (the stand-in tests/lib/pve_fixture.py delays QEMU's
answer between the checks and the setup, modelling a QEMU that answers
late, while the test changes the disk), the helper says exactly what QEMU
left behind."""
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, check, run, run_helper         # noqa: E402
from pve_fixture import FaultProxy                         # noqa: E402
from pve_vm import PveVm                                   # noqa: E402

M = 1 << 20
DEVS = ("drive-scsi0", "drive-virtio1")
TARGET = "backup"


def refused(vm, rd, args, message, qmp=None):
    """setup with args fails with message, and changes nothing."""
    r = run_helper("setup", "--qmp", qmp or vm.qmp_path, "--run-dir", rd,
                   *args, ok=False)
    check(r.returncode == 1 and message in r.stderr,
          "%s: expected %r: exit %d, %s" % (args, message, r.returncode,
                                            r.stderr))
    check(not os.path.exists(rd), "%s: the run directory was made" % args)
    check(vm.leftovers(bitmaps=(TARGET,)) == {}, "%s: changed: %s"
          % (args, vm.leftovers(bitmaps=(TARGET,))))
    return r


def dev_args(*devs):
    return sum((["--device", d] for d in devs), [])


def bad_input(vm, tmp, rd):
    nowhere = os.path.join(tmp, "no-qmp.sock")
    # Refused before QMP is even tried: the socket does not exist.
    refused(vm, rd, dev_args(DEVS[0], DEVS[0]),
            "--device drive-scsi0 is given twice", qmp=nowhere)
    refused(vm, rd, [], "at least one --device", qmp=nowhere)
    refused(vm, rd, dev_args(DEVS[0]) + ["--bitmap", "a", "--target-id",
                                         "b"],
            "Proxmox VE names the bitmap after the target id")
    refused(vm, rd, dev_args(DEVS[0], "nosuch"), "device 'nosuch' not found")
    refused(vm, rd, dev_args("scsi0"), "device 'scsi0' not found")

    # The fleecing images.
    vm.del_fleecing(DEVS[1])
    refused(vm, rd, dev_args(*DEVS), "its fleecing image "
            "'drive-virtio1-fleecing' not found")
    small = os.path.join(tmp, "small.qcow2")
    run([vm.qemu.img, "create", "-q", "-f", "qcow2", small, str(4 * M)])
    vm.qmp.cmd("blockdev-add", **{"driver": "qcow2",
                                   "node-name": DEVS[1] + "-fleecing",
                                   "file": {"driver": "file",
                                            "filename": small}})
    vm.mark()
    refused(vm, rd, dev_args(*DEVS), "must be the same size")
    vm.qmp.cmd("blockdev-del", **{"node-name": DEVS[1] + "-fleecing"})
    run([vm.qemu.img, "create", "-q", "-f", "qcow2", small, str(8 * M)])
    vm.qmp.cmd("blockdev-add", **{"driver": "qcow2", "read-only": True,
                                   "node-name": DEVS[1] + "-fleecing",
                                   "file": {"driver": "file",
                                            "filename": small,
                                            "read-only": True}})
    vm.mark()
    refused(vm, rd, dev_args(*DEVS), "is read-only")
    vm.qmp.cmd("blockdev-del", **{"node-name": DEVS[1] + "-fleecing"})
    vm.add_fleecing(DEVS[1])

    # Two names of one node: the throttle node and its child.
    vm.qmp.cmd("blockdev-add", **{"driver": "qcow2",
                                   "node-name": "f-scsi0-fleecing",
                                   "file": {"driver": "file",
                                            "filename": small}})
    vm.mark()
    refused(vm, rd, dev_args(DEVS[0], "f-scsi0") + ["--bitmap", TARGET],
            "drive-scsi0 and f-scsi0 are the same node f-scsi0")
    vm.qmp.cmd("blockdev-del", **{"node-name": "f-scsi0-fleecing"})

    # Bitmaps.
    node = vm.bitmap_node(DEVS[1])
    vm.qmp.cmd("block-dirty-bitmap-add", node=node,
               name="backup-access-background-bitmap")
    vm.mark()
    refused(vm, rd, dev_args(*DEVS) + ["--bitmap", TARGET], "has a bitmap "
            "'backup-access-background-bitmap' already")
    vm.qmp.cmd("block-dirty-bitmap-remove", node=node,
               name="backup-access-background-bitmap")
    vm.qmp.cmd("block-dirty-bitmap-add", node=node, name=TARGET)
    vm.qmp.cmd("block-dirty-bitmap-disable", node=node, name=TARGET)
    vm.mark()
    refused(vm, rd, dev_args(*DEVS) + ["--bitmap", TARGET],
            "bitmap 'backup' on node f-virtio1 is disabled")
    # Exported elsewhere (read-only, as a disabled bitmap may be): busy.
    sock = os.path.join(tmp, "other-nbd.sock")
    vm.qmp.cmd("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": sock}})
    vm.qmp.cmd("block-export-add", type="nbd", id="other",
               **{"node-name": node}, bitmaps=[TARGET])
    vm.mark()
    for mode in ("none", "new", "use"):
        refused(vm, rd, dev_args(*DEVS) + ["--bitmap", TARGET,
                                           "--bitmap-mode", mode],
                "bitmap 'backup' on node f-virtio1 is in use")
    vm.qmp.cmd("block-export-del", id="other")
    vm.qmp.cmd("nbd-server-stop")
    vm.qmp.cmd("block-dirty-bitmap-remove", node=node, name=TARGET)
    vm.mark()


def second_access(vm, tmp, rd):
    """One backup access per QEMU: the second setup is refused by QEMU,
    and the first goes on unharmed."""
    run_helper("setup", "--qmp", vm.qmp_path, "--run-dir", rd,
               *dev_args(*DEVS), "--bitmap", TARGET)
    served = run_helper("serve", "--run-dir", rd)
    rd2 = os.path.join(tmp, "run2")
    for target in (TARGET, "other"):
        r = run_helper("setup", "--qmp", vm.qmp_path, "--run-dir", rd2,
                       *dev_args(DEVS[0]), "--target-id", target, ok=False)
        check(r.returncode == 1 and "previous backup for target 'backup' "
              "not finished" in r.stderr and not os.path.exists(rd2),
              "second setup (%s): %s" % (target, r.stderr))
    check(vm.alive(), "QEMU died")
    uri = json.loads(served.stdout)["devices"][0]["uri"]
    run(["nbdcopy", uri, "null:"])
    run_helper("teardown", "--run-dir", rd, "--success")
    vm.del_fleecing()
    check(vm.leftovers(bitmaps=(TARGET,)) == {}, "left: %s" % vm.leftovers())


def half_way(vm, tmp, rd):
    """QEMU fails half-way after all: the helper says what is left."""
    vm.add_fleecing()
    vm.mark()
    sock = os.path.join(tmp, "proxy.sock")
    node = vm.bitmap_node(DEVS[1])
    with FaultProxy(vm.qmp_path, sock) as proxy:
        # The checks' last query answers late; meanwhile another program
        # leaves a background bitmap on the second disk.
        proxy.hold("query-named-block-nodes")
        p = subprocess.Popen([HELPER, "setup", "--qmp", sock, "--run-dir", rd,
                              *dev_args(*DEVS), "--bitmap", "late"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        try:
            proxy.wait_held()
            vm.qmp.cmd("block-dirty-bitmap-add", node=node,
                       name="backup-access-background-bitmap")
            vm.mark()
            proxy.release()
            out, err = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    check(p.returncode == 1 and "Bitmap already exists" in err, err)
    left = vm.leftovers()
    nodes = sorted(re.findall(r"node (#block\d+) \(", err))
    check(nodes == left["nodes"] and len(nodes) == 2, "said %s, left %s: %s"
          % (nodes, left, err))
    check("(copy-before-write)" in err and "(snapshot-access)" in err and
          "bitmap 'late' on f-scsi0" in err and
          "abort when it quits" in err, err)
    check(not os.path.exists(rd), "run directory left")
    problem = vm.stop()
    check(problem and "ABORTED" in problem, "QEMU: %s" % problem)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    rd = os.path.join(tmp, "run")
    try:
        with PveVm(devices={DEVS[0]: 8 * M, DEVS[1]: 8 * M},
                   style="throttle", tmpdir=os.path.join(tmp, "vm"),
                   fleecing=True) as vm:
            vm.mark()
            bad_input(vm, tmp, rd)
            second_access(vm, tmp, rd)
        check(vm.stopped_with is None, "quit: %s" % vm.stopped_with)
        with PveVm(devices={DEVS[0]: 8 * M, DEVS[1]: 8 * M},
                   style="throttle", tmpdir=os.path.join(tmp, "vm2")) as vm:
            half_way(vm, tmp, rd)
    finally:
        for d in (rd, os.path.join(tmp, "run2")):
            if os.path.exists(d):
                subprocess.run([HELPER, "teardown", "--run-dir", d,
                                "--failure"], capture_output=True, timeout=120)
print("ok")
