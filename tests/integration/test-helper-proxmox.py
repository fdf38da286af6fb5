#!/usr/bin/python3
"""backupaccess-helper against Proxmox VE's backup-access QMP API (the
fixture tests/lib/pve_fixture.py stands in for Proxmox's QEMU patches, on
a real qemu-storage-daemon): the API is found and its argument form read
from the schema (current `devices` and the first `devlist`); two devices
backed up full, then incrementally, byte-identical; the cluster size is
the fleecing node's; QEMU's exports and NBD server go before
backup-access-teardown; a failed backup loses no change; a missing
fleecing node is a clear error that changes nothing; and `serve
--nbd-path` puts the filter (and nbdkit's rate filter) in front of
exports that vzdump made."""
import json
import os
import random
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, check, run, run_helper
from pve_fixture import PveVm

SIZE = 16 << 20
DEVS = ("drive-scsi0", "drive-virtio1")
rng = random.Random(23)


helper = run_helper


def calls(vm, since=0):
    return [c for c, _a, ok in vm.proxy.calls[since:] if ok]


def copy_all(tmp, out, expected):
    for d in out["devices"]:
        dst = os.path.join(tmp, d["device"] + ".raw")
        run(["nbdcopy", d["uri"], dst])
        with open(dst, "rb") as f:
            check(f.read() == expected[d["device"]],
                  "%s differs from the snapshot" % d["device"])


def backup_in_order(vm, since):
    c = calls(vm, since)
    check("backup-access-teardown" in c, "no backup-access-teardown: %s" % c)
    t = c.index("backup-access-teardown")
    check("nbd-server-stop" in c[:t] and
          c[:t].count("block-export-del") == len(DEVS),
          "exports not removed before the teardown: %s" % c)


def main(tmp, rd):
    with PveVm(size=SIZE, devices=DEVS, api="devices", fleecing=True) as vm:
        common = ["--qmp", vm.qmp_path, "--run-dir", rd]
        for d in DEVS:
            vm.guest_write(0, rng.randbytes(SIZE), device=d)

        # A missing fleecing node: a clear error, nothing changed.
        vm.del_fleecing(DEVS[1])
        r = helper("setup", *common, "--device", DEVS[0], "--device", DEVS[1],
                   "--bitmap", "backup", ok=False)
        check(r.returncode == 1 and
              "fleecing node 'drive-virtio1-fleecing' not found" in r.stderr,
              r.stderr)
        check(vm.proxy.targets() == [] and not os.path.exists(rd),
              "a failed setup changed something")
        # Back with 128 KiB clusters: copy-before-write's cluster size.
        vm.add_fleecing(DEVS[1], cluster_size=128 << 10)

        # Full backup (the bitmap is new).
        at = {d: vm.disk_read(0, SIZE, device=d) for d in DEVS}
        since = len(vm.proxy.calls)
        out = json.loads(helper("setup", *common, "--device", DEVS[0],
                                "--device", DEVS[1], "--bitmap",
                                "backup").stdout)
        check(out["backend"] == "proxmox", "%s" % out)
        check([d["bitmap-mode"] for d in out["devices"]] == ["new", "new"],
              "%s" % out)
        check([d["cluster-size"] for d in out["devices"]] ==
              [64 << 10, 128 << 10], "cluster sizes: %s" % out)
        args = [a for c, a, ok in vm.proxy.calls[since:]
                if c == "backup-access-setup"][0]
        check(args == {"target-id": "backup", "devices": [
            {"device": DEVS[0], "bitmap-mode": "use"},
            {"device": DEVS[1], "bitmap-mode": "use"}]},
              "backup-access-setup arguments %s" % args)
        for d in DEVS:
            vm.guest_write(0, rng.randbytes(65536), device=d)
        out = json.loads(helper("serve", "--run-dir", rd).stdout)
        copy_all(tmp, out, at)
        helper("teardown", "--run-dir", rd, "--success")
        backup_in_order(vm, since)
        check(vm.proxy.targets() == [] and not os.path.exists(rd),
              "left over after teardown")

        # Incremental; it fails; the next one still has every change.
        writes = {DEVS[0]: 5 << 20, DEVS[1]: 9 << 20}
        for d, off in writes.items():
            vm.guest_write(off, rng.randbytes(4096), device=d)
        at = {d: vm.disk_read(0, SIZE, device=d) for d in DEVS}
        out = json.loads(helper("setup", *common, "--device", DEVS[0],
                                "--device", DEVS[1], "--bitmap",
                                "backup").stdout)
        check([d["bitmap-mode"] for d in out["devices"]] == ["reuse"] * 2,
              "%s" % out)
        helper("serve", "--run-dir", rd)
        mounts = json.loads(helper("mount", "--run-dir", rd).stdout)["mounts"]
        gran = 4 << 20
        for m in mounts:
            off = writes[m["device"]] // gran * gran
            # The 64 KiB written at 0 during the full backup, and this.
            want = ([[0, off + gran]] if off == gran else
                    [[0, gran], [off, gran]])
            check(m["dirty-regions"] == want,
                  "dirty regions of %s: %s != %s"
                  % (m["device"], m["dirty-regions"], want))
            with open(m["file"], "rb", buffering=0) as f:
                f.seek(off)
                check(f.read(gran) == at[m["device"]][off:off + gran],
                      "the virtual file of %s differs" % m["device"])
        since = len(vm.proxy.calls)
        helper("teardown", "--run-dir", rd, "--failure")
        backup_in_order(vm, since)
        out = json.loads(helper("setup", *common, "--device", DEVS[0],
                                "--device", DEVS[1], "--bitmap",
                                "backup").stdout)
        helper("serve", "--run-dir", rd)
        mounts = json.loads(helper("mount", "--run-dir", rd).stdout)["mounts"]
        for m in mounts:
            off = writes[m["device"]] // gran * gran
            check(any(o <= off and off + gran <= o + n
                      for o, n in m["dirty-regions"]),
                  "a failed backup lost %s's change: %s"
                  % (m["device"], m["dirty-regions"]))
        helper("teardown", "--run-dir", rd, "--success")
        check(vm.proxy.targets() == [] and not os.path.exists(rd), "left over")

        # A provider's backup_vm: vzdump made the exports, the helper
        # only serves them (with a bandwidth limit).
        q = vm.connect()
        info = q.cmd("backup-access-setup", **{"target-id": "backup",
                                                "devices": [{
                                                    "device": DEVS[0],
                                                    "bitmap-mode": "use"}]})
        sock = os.path.join(tmp, "vzdump-nbd.sock")
        q.cmd("nbd-server-start", addr={"type": "unix",
                                        "data": {"path": sock}})
        q.cmd("block-export-add", type="nbd", id=DEVS[0], name=DEVS[0],
              writable=True, **{"node-name": info[0]["node-name"]},
              bitmaps=[{"node": info[0]["bitmap-node-name"],
                        "name": info[0]["bitmap-name"]}])
        q.close()
        rd2 = os.path.join(tmp, "provider")
        out = json.loads(helper(
            "serve", "--run-dir", rd2, "--nbd-path", sock, "--device",
            "%s:%s" % (DEVS[0], info[0]["bitmap-name"]),
            "--bandwidth-limit", "1048576").stdout)
        d = out["devices"][0]
        check(d["bitmap-mode"] == "reuse" and d["size"] == SIZE, "%s" % d)
        pid = int(open(os.path.join(rd2, DEVS[0] + ".nbdkit.pid")).read())
        cmdline = open("/proc/%d/cmdline" % pid).read().split("\0")
        check("--filter=rate" in cmdline and "rate=8388608" in cmdline,
              "no rate filter: %s" % cmdline)
        m = run(["nbdinfo", "--map", d["uri"]]).stdout
        check(m.split("\n")[0].split()[2] == "1", "extents %s" % m)
        helper("teardown", "--run-dir", rd2, "--success")
        check(not os.path.exists(rd2), "provider run dir left")
        q = vm.connect()
        q.cmd("block-export-del", id=DEVS[0])
        q.cmd("nbd-server-stop")
        q.cmd("backup-access-teardown", **{"target-id": "backup",
                                            "success": False})
        q.close()

    # The first form of the API: devlist + bitmap-name.
    with PveVm(size=SIZE, devices=DEVS[:1], api="devlist",
               fleecing=True) as vm:
        vm.guest_write(0, rng.randbytes(SIZE))
        at = {DEVS[0]: vm.disk_read(0, SIZE)}
        since = len(vm.proxy.calls)
        out = json.loads(helper("setup", "--qmp", vm.qmp_path, "--run-dir",
                                rd, "--device", DEVS[0], "--bitmap",
                                "local-backup").stdout)
        args = [a for c, a, ok in vm.proxy.calls[since:]
                if c == "backup-access-setup"][0]
        check(args == {"target-id": "local-backup", "devlist": DEVS[0],
                       "bitmap-name": "local-backup"},
              "devlist arguments %s" % args)
        out = json.loads(helper("serve", "--run-dir", rd).stdout)
        copy_all(tmp, out, at)
        helper("teardown", "--run-dir", rd, "--success")
        check(vm.proxy.targets() == [] and not os.path.exists(rd), "left over")


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    rd = os.path.join(tmp, "run")
    try:
        main(tmp, rd)
    finally:
        # Whatever failed: no mount or nbdkit may outlive the test.
        for d in (rd, os.path.join(tmp, "provider")):
            if os.path.exists(d):
                subprocess.run([HELPER, "teardown", "--run-dir", d,
                                "--failure"], capture_output=True, timeout=120)
print("ok")
