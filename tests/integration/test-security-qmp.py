#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
"""backupaccess-helper against a QMP peer it cannot trust (a scripted unix
socket server, tests/lib/fake_qmp.py): a reply longer than 16 MiB, one
that never ends, events without end, a reply dripping a byte at a time,
no answer, no greeting, garbage, JSON nested 100000 deep.  Each time the
helper fails with a clear message and exit status 1 within its QMP
timeout (BACKUPACCESS_QMP_TIMEOUT=3 here; the test allows 60 s), holds
at most about 16 MiB for a reply, and leaves nothing behind.
A peer playing Proxmox's backup-access API answers with the wrong JSON
types (an object for a list, a string for a schema's members), or
names the helper did not ask for or that are not plain (a device
"../../etc", a bitmap name with a newline and "="): a clear error,
never an abort, and what was set up is torn down."""
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from fake_qmp import FakeQmp
from harness import HELPER, check

TIMEOUT = 3
LIMIT = 60


def setup(qmp, rd, env=None):
    """Runs setup against the peer; returns (result, seconds)."""
    start = time.monotonic()
    try:
        r = subprocess.run([HELPER, "setup", "--qmp", qmp, "--run-dir", rd,
                            "--device", "drive-scsi0"], capture_output=True,
                           text=True, timeout=LIMIT,
                           env=env or dict(os.environ,
                                           BACKUPACCESS_QMP_TIMEOUT=str(
                                               TIMEOUT)))
    except subprocess.TimeoutExpired:
        check(False, "the helper was still waiting after %d s" % LIMIT)
    return r, time.monotonic() - start


def silent(peer, conn, cmd, args):
    pass


def huge(peer, conn, cmd, args):
    peer.send(conn, b'{"return": "' + b"A" * (40 << 20))


def events(peer, conn, cmd, args):
    ev = b'{"event": "JOB_STATUS_CHANGE", "data": {}, "timestamp": ' \
         b'{"seconds": 1, "microseconds": 0}}\n'
    while not peer.stopping and peer.send(conn, ev):
        time.sleep(0.02)


def drip(peer, conn, cmd, args):
    for c in b'{"return": {"backup-access-api": true' + b" " * 10000:
        if peer.stopping or not peer.send(conn, bytes([c])):
            return
        time.sleep(0.1)


def garbage(peer, conn, cmd, args):
    peer.send(conn, b"SSH-2.0-OpenSSH_9.2\n")


def deep(peer, conn, cmd, args):
    peer.send(conn, b'{"return": ' + b"[" * 100000 + b"]" * 100000 + b"}\n")


cases = [
    # name, handler, greeting, expected message
    ("huge", huge, True, "QMP reply longer than 16777216 bytes"),
    ("silent", silent, True, "did not answer within %d s" % TIMEOUT),
    ("events", events, True, "did not answer within %d s" % TIMEOUT),
    ("drip", drip, True, "did not answer within %d s" % TIMEOUT),
    ("no greeting", silent, False, "no QMP greeting"),
    ("garbage", garbage, True, "malformed QMP output"),
    ("deep", deep, True, "malformed QMP output"),
]

with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    sock = os.path.join(tmp, "qmp.sock")
    rd = os.path.join(tmp, "run")
    for name, handler, greeting, message in cases:
        with FakeQmp(sock, handler, greeting=greeting) as peer:
            r, secs = setup(sock, rd)
        print("%-12s exit %d after %.1f s: %s" % (name, r.returncode, secs,
                                                  r.stderr.strip()))
        check(r.returncode == 1, "%s: exit %d: %s" % (name, r.returncode,
                                                       r.stderr))
        check(message in r.stderr, "%s: expected %r in %r"
              % (name, message, r.stderr))
        check(not os.path.exists(rd), "%s: the run directory was made" % name)
        if name == "huge":
            # The first child of this process: its peak memory.
            kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            print("peak memory of the helper: %d KiB" % kib)
            # Under make check-asan/valgrind the checker's own memory
            # counts too: the bound is for the real helper.
            check(kib < 48 << 10 or os.environ.get("BACKUPACCESS_SAN"),
                  "the helper used %d KiB" % kib)

    # Wrong types, from a peer that otherwise answers as the real Proxmox
    # VE QEMU does (pve-qemu 10.0.2-4, a -blockdev disk: the shapes of
    # its answers, trimmed to what the helper reads).
    SCHEMA = [{"name": "backup-access-setup", "meta-type": "command",
               "arg-type": "35"},
              {"name": "35", "meta-type": "object",
               "members": [{"name": "target-id", "type": "str"},
                           {"name": "devices", "type": "[314]"}]}]

    def node(name, child, bitmaps=()):
        return {"node-name": name, "drv": "qcow2", "ro": False,
                "image": {"virtual-size": 1 << 20, "cluster-size": 65536},
                "children": [{"node-name": child, "child": "file"}],
                "dirty-bitmaps": list(bitmaps)}
    NODES = [node("drive-scsi0-fleecing", "#block030"),
             node("drive-scsi0", "file-scsi0")]
    GOOD = {
        "query-proxmox-support": {"backup-access-api": True},
        "query-qmp-schema": SCHEMA,
        "query-block": [{"device": "", "qdev": "/machine/peripheral/scsi0/"
                         "virtio-backend",
                         "inserted": {"node-name": "drive-scsi0"}}],
        "query-named-block-nodes": NODES,
        "backup-access-setup": [{"device": "drive-scsi0",
                                 "node-name": "#block566",
                                 "size": 1 << 20}],
        "query-block-exports": [],
        "query-block-jobs": [],
    }
    def scripted(answers):
        def handler(peer, conn, cmd, args):
            peer.reply(conn, answers.get(cmd, {}))
        return handler

    def proxmox(changes, message, torn_down):
        answers = dict(GOOD, **changes)
        with FakeQmp(sock, scripted(answers)) as peer:
            r, secs = setup(sock, rd)
            if message is None:
                t = subprocess.run(
                    [HELPER, "teardown", "--run-dir", rd, "--failure"],
                    env=dict(os.environ, BACKUPACCESS_QMP_TIMEOUT="3"),
                    capture_output=True, text=True, timeout=LIMIT)
                check(t.returncode == 0, "teardown: %s" % t.stderr)
        calls = [c for c, a in peer.calls]
        print("%-12s exit %d after %.1f s: %s" % (
            "+".join(changes) or "good", r.returncode, secs,
            r.stderr.strip()))
        if message is None:
            check(r.returncode == 0, r.stderr)
            return
        check(r.returncode == 1, "exit %d: %s" % (r.returncode, r.stderr))
        check(message in r.stderr, "expected %r in %r" % (message, r.stderr))
        check(("backup-access-teardown" in calls) == torn_down,
              "calls: %s" % calls)
        check(not os.path.exists(rd), "the run directory was left")

    proxmox({}, None, False)                    # the script itself works
    proxmox({"query-named-block-nodes": [          # taken as none
        NODES[0], dict(NODES[1], **{"dirty-bitmaps": {"name": "x"}})]},
            None, False)
    for changes, message, torn_down in [
            ({"query-qmp-schema": {"name": "x"}},
             "query-qmp-schema: QEMU's answer is not a list", False),
            ({"query-qmp-schema": [dict(SCHEMA[0]),
                                   dict(SCHEMA[1], members="devices")]},
             "takes no 'devices' list", False),
            ({"query-named-block-nodes": {"node-name": "x"}},
             "query-named-block-nodes: QEMU's answer is not a list", False),
            ({"query-block": {"device": "drive-scsi0"}},
             "query-block: QEMU's answer is not a list", False),
            # Lists that are not lists: no abort in json-c.
            ({"query-named-block-nodes": [
                NODES[0], dict(NODES[1], drv="throttle",
                               children={"file": "x"})]},
             "device 'drive-scsi0' not found", False),
            ({"query-block": [{"device": "drive-scsi0", "inserted": []}]},
             "'drive-scsi0' has no medium", False),
            ({"backup-access-setup": {"device": "drive-scsi0"}},
             "backup-access-setup: QEMU's answer is not a list", True),
            ({"backup-access-setup": ["drive-scsi0"]},
             "without device/node-name", True),
            # Names that would end up in paths and nbdkit's arguments.
            ({"backup-access-setup": [dict(GOOD["backup-access-setup"][0],
                                           device="../../etc")]},
             "device returned by QEMU '../../etc'", True),
            ({"backup-access-setup": [dict(GOOD["backup-access-setup"][0],
                                           device="drive-virtio9")]},
             "device 'drive-virtio9', which was not asked for", True),
            ({"backup-access-setup": [dict(
                GOOD["backup-access-setup"][0], **{
                    "bitmap-name": "x\nbackupaccess-map=/etc/passwd",
                    "bitmap-node-name": "drive-scsi0",
                    "bitmap-action": "used"})]},
             "bitmap name returned by QEMU", True)]:
        proxmox(changes, message, torn_down)

    # The upstream back end reads the disk's bitmaps and the block jobs:
    # an object where QEMU sends a list is taken as none (a full
    # backup), never an abort in json-c.
    up = {"query-named-block-nodes": [dict(NODES[1], **{
              "dirty-bitmaps": {"name": "backup"}})],
          "query-block": [], "query-block-jobs": {"device": "x"},
          "query-block-exports": [],
          "query-status": {"status": "running", "running": True}}

    def upstream(peer, conn, cmd, args):
        if cmd == "query-proxmox-support":
            peer.error(conn, "The command query-proxmox-support has not "
                       "been found")
        else:
            peer.reply(conn, up.get(cmd, {}))
    with FakeQmp(sock, upstream) as peer:
        r = subprocess.run(
            [HELPER, "setup", "--qmp", sock, "--run-dir", rd, "--device",
             "drive-scsi0", "--bitmap", "backup", "--fleecing-dir", tmp],
            capture_output=True, text=True, timeout=LIMIT,
            env=dict(os.environ, BACKUPACCESS_QMP_TIMEOUT=str(TIMEOUT)))
        print("upstream, lists that are not: exit %d: %s"
              % (r.returncode, r.stderr.strip()))
        check(r.returncode in (0, 1), "exit %d: %s" % (r.returncode,
                                                       r.stderr))
        up["query-block-jobs"] = []     # teardown, from a sane QEMU
        t = subprocess.run([HELPER, "teardown", "--run-dir", rd,
                            "--failure"], capture_output=True, text=True,
                           timeout=LIMIT, env=dict(
                               os.environ, BACKUPACCESS_QMP_TIMEOUT="3"))
        check(t.returncode == 0 and not os.path.exists(rd),
              "teardown: %s" % t.stderr)

    r, _ = setup(sock, rd, env=dict(os.environ, BACKUPACCESS_QMP_TIMEOUT="0"))
    check(r.returncode == 1 and "BACKUPACCESS_QMP_TIMEOUT=0" in r.stderr,
          r.stderr)
print("ok")
