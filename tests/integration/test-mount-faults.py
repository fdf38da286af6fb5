#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: upstream
"""Faults under backupaccess-mount, against real QEMU:

- copy-before-write fails (blkdebug write errors on the fleecing image,
  on-cbw-error=break-snapshot): the read fails with EIO, the log says
  the snapshot is broken, every further read fails with EIO (also of
  data read fine before), the status file says "broken", nothing more
  is discarded;
- QEMU killed while the file is open: reads fail with EIO ("the
  connection to QEMU is lost"), fusermount3 -u works, and the mount
  exits by itself;
- through backupaccess-helper (upstream back end, mount straight on
  QEMU's export, no serve): status shows the mount's counters, serve is
  refused for a device mounted that way; a device served and then
  mounted, read partly through nbdkit and partly through the file, each
  refusing what the other read, nothing broken; the mount SIGKILLed mid-read
  while another process holds the file open: reads fail, mount says the
  mount has gone, teardown --failure unmounts lazily and leaves nothing;
  the next incremental holds every change; and a backup read through
  the mount to the end is torn down with the mount's summary."""
import json
import os
import random
import sys
import tempfile

import nbd

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Nbdkit, check, requests_in_log, run_helper
from fault_fixture import (UpstreamVm, chain_equals, helper_backup,
                           kill_mount_mid_read, no_leftovers)
from mount_fixture import Mount, read_direct, read_error, wait_until
from qemu_fixture import Fleecing

SIZE = 32 << 20
MiB = 1 << 20
rng = random.Random(4242)


def broken_snapshot(tmp):
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        f.qmp.cmd("block-dirty-bitmap-clear", node="disk", name="live")
        for off in (1 * MiB, 5 * MiB, 9 * MiB):
            f.guest_write(off, rng.randbytes(MiB))
        snap = f.disk_read(0, SIZE)
        f.snapshot(bitmap=True, fleece_file={
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio", "errno": 5}]})
        log = os.path.join(tmp, "broken-requests.log")
        st = os.path.join(tmp, "broken.status.json")
        with Nbdkit(tmp, ["--filter=log", "nbd", "socket=" + f.nbd_path,
                          "export=snap", "logfile=" + log], "broken") as nk, \
             Mount(tmp, ["--socket", nk.sock, "--bitmap", "frozen",
                         "--bitmap-socket", f.nbd_path, "--bitmap-export",
                         "snap", "--trim-batch", "0", "--status", st],
                   "broken") as m:
            path = m.file()
            # Read before the failure: the first half of region 1.
            check(read_direct(path, MiB, MiB // 2) ==
                  snap[MiB:MiB + MiB // 2], "read before the failure")
            trims_before = requests_in_log(log, "Trim")
            check(trims_before, "nothing discarded before the failure")
            # The guest overwrites a dirty region: copying the old data
            # to the fleecing image fails, the snapshot breaks.
            f.guest_write(5 * MiB, rng.randbytes(65536))
            check(read_error(path, 9 * MiB, 1 << 20) == "EIO",
                  "a read after the snapshot broke did not fail with EIO")
            reads = len(requests_in_log(log, "Read"))
            for off in (9 * MiB, MiB + MiB // 2, 5 * MiB + 65536):
                check(read_error(path, off, 65536) == "EIO",
                      "read at %d after the break: not EIO" % off)
            check(len(requests_in_log(log, "Read")) == reads,
                  "reads reached QEMU after the break was known")
            wait_until(lambda: json.load(open(st))["broken"], "broken")
            check(m.unmount() == 0, "exit status: " + m.log())
        out = m.log()
        check("the snapshot is broken" in out and "every further read fails"
              in out, out)
        check(requests_in_log(log, "Trim") == trims_before,
              "trims after the failure: %s" % requests_in_log(log, "Trim"))
        check(f.alive(), "qemu-storage-daemon died")


def qemu_killed(tmp):
    with Fleecing(SIZE) as f:
        f.guest_write(0, rng.randbytes(SIZE))
        snap = f.disk_read(0, 4 * MiB)
        f.snapshot(bitmap=False)
        with Mount(tmp, ["--socket", f.nbd_path, "--export", "snap"],
                   "killed") as m:
            path = m.file()
            fd = os.open(path, os.O_RDONLY)
            try:
                check(read_direct(path, 0, 4 * MiB) == snap, "before")
                f.proc.kill()
                f.proc.wait()
                for off in (4 * MiB, 8 * MiB):
                    check(read_error(path, off, MiB) == "EIO",
                          "a read after QEMU died: not EIO")
            finally:
                os.close(fd)
            check(m.unmount() == 0, "exit status after QEMU died: " + m.log())
        out = m.log()
        check("the connection to QEMU is lost" in out, out)
        check("summary: %d bytes read" % (4 * MiB) in out, out)


def helper_mount_killed(tmp):
    with UpstreamVm(SIZE, tmpdir=os.path.join(tmp, "vm")) as vm:
        rd = vm.run_dir(os.path.join(tmp, "run"))
        fl = os.path.join(tmp, "fleecing")
        os.mkdir(fl)
        vm.guest_write(0, rng.randbytes(SIZE))
        chain = [os.path.join(tmp, "backup0.raw")]
        helper_backup(vm, rd, fl, tmp, None, chain[0], "the full backup",
                      "new")

        # A mount straight on QEMU's export, read to the end.
        vm.random_writes(rng, 12)
        at_setup = vm.disk_read()
        run_helper("setup", "--qmp", vm.helper_qmp, "--run-dir", rd,
                   "--backend", "upstream", "--device", vm.device,
                   "--fleecing-dir", fl, "--bitmap", "backup")
        m = json.loads(run_helper("mount", "--run-dir", rd).stdout)
        m = m["mounts"][0]
        r = run_helper("serve", "--run-dir", rd, ok=False)
        check(r.returncode == 1 and "reads QEMU's export itself" in r.stderr,
              "serve after a mount: %s" % r.stderr)
        out = os.path.join(tmp, "backup1.raw")
        with open(chain[-1], "rb") as src, open(out, "wb") as dst:
            dst.write(src.read())
        with open(out, "r+b") as dst:
            for off, n in m["dirty-regions"]:
                dst.seek(off)
                dst.write(read_direct(m["file"], off, n))
        total = sum(n for _, n in m["dirty-regions"])

        def status():
            return json.loads(run_helper("status", "--run-dir",
                                         rd).stdout)["devices"][0]
        # The mount's status file, rewritten every second.
        wait_until(lambda: status()["bytes-read"] == total and
                   status()["bytes-left"] == 0,
                   "status after the mount read it all: %s" % status())
        r = run_helper("teardown", "--run-dir", rd, "--success")
        check("backupaccess-mount: summary: %d bytes read" % total in r.stderr
              and "0 of %d readable bytes left" % total in r.stderr, r.stderr)
        no_leftovers(vm, rd, fl)
        chain_equals(out, at_setup, tmp, "the incremental through the mount")
        chain.append(out)

        # Served, then mounted: the mount reads through that nbdkit, so
        # both agree on what has been read (and nothing looks broken).
        vm.random_writes(rng, 12, max_len=600 << 10)
        at_setup = vm.disk_read()
        run_helper("setup", "--qmp", vm.helper_qmp, "--run-dir", rd,
                   "--backend", "upstream", "--device", vm.device,
                   "--fleecing-dir", fl, "--bitmap", "backup")
        uri = json.loads(run_helper("serve", "--run-dir", rd).stdout)
        uri = uri["devices"][0]["uri"]
        m = json.loads(run_helper("mount", "--run-dir", rd).stdout)
        m = m["mounts"][0]
        out = os.path.join(tmp, "backup-served.raw")
        with open(chain[-1], "rb") as src, open(out, "wb") as dst:
            dst.write(src.read())
        h = nbd.NBD()
        h.connect_uri(uri)
        try:
            with open(out, "r+b") as dst:
                for i, (off, n) in enumerate(m["dirty-regions"]):
                    dst.seek(off)
                    if i % 2 == 0:          # through nbdkit, then the file
                        dst.write(h.pread(n, off))
                        check(read_error(m["file"], off, 4096) == "EPERM",
                              "the file read what nbdkit had read")
                    else:                   # through the file, then nbdkit
                        dst.write(read_direct(m["file"], off, n))
                        try:
                            h.pread(4096, off)
                            check(False, "nbdkit read what the file had read")
                        except nbd.Error as e:
                            check(e.errno == "EPERM", "nbdkit: %s" % e)
        finally:
            h.shutdown()
        r = run_helper("teardown", "--run-dir", rd, "--success")
        check("broken" not in r.stderr and " 0 of " in r.stderr, r.stderr)
        no_leftovers(vm, rd, fl)
        chain_equals(out, at_setup, tmp, "served and mounted")
        chain.append(out)

        # The mount SIGKILLed mid-read, the file held open elsewhere.
        vm.random_writes(rng, 12)
        run_helper("setup", "--qmp", vm.helper_qmp, "--run-dir", rd,
                   "--backend", "upstream", "--device", vm.device,
                   "--fleecing-dir", fl, "--bitmap", "backup")
        m = json.loads(run_helper("mount", "--run-dir", rd).stdout)
        m = m["mounts"][0]

        def mount_refused_then_teardown():
            r = run_helper("mount", "--run-dir", rd, ok=False)
            check(r.returncode == 1 and "its backupaccess-mount has gone" in
                  r.stderr, "mount after it was killed: %s" % r.stderr)
            return run_helper("teardown", "--run-dir", rd, "--failure")
        kill_mount_mid_read(vm, rd, m, mount_refused_then_teardown)
        no_leftovers(vm, rd, fl)
        out = os.path.join(tmp, "backup2.raw")
        helper_backup(vm, rd, fl, tmp, chain[-1], out,
                      "the incremental after the mount was killed", "reuse")


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    broken_snapshot(tmp)
    qemu_killed(tmp)
    helper_mount_killed(tmp)
print("ok")
