#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""Self-test of tests/lib/pve_fixture.py, the STAND-IN for a Proxmox VE
QEMU whose QMP stalls (a proxy in front of the real pve-qemu).  It is
transparent: the same QMP sequence (greeting, query-proxmox-support, a
refused and a good backup-access-setup, a second one refused, teardowns)
gets the same answers through it as straight from the real QEMU, bar
the generated node names.  And it models the real QEMU's QMP while an
answer is held: the command has taken effect, its answer comes only on
release (or after the given seconds); every other command, from any
client, waits meanwhile; the next client connects and is greeted once
the one before has gone; a client that goes away loses its answer and
its commands that had not run."""
import json
import os
import re
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import check                                  # noqa: E402
from pve_fixture import FaultProxy                         # noqa: E402
from pve_vm import PveVm                                   # noqa: E402
from qemu_fixture import QMP                               # noqa: E402

DEV = "drive-scsi0"


def raw(path):
    """A QMP connection that keeps every answer as it came."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    f = s.makefile("rwb")
    return s, f, f.readline()


def sequence(vm, path):
    """What a client sees: the greeting and every answer (node names
    made alike)."""
    s, f, greeting = raw(path)
    out = [greeting]
    for cmd in [
            {"execute": "qmp_capabilities"},
            {"execute": "query-proxmox-support", "id": 1},
            {"execute": "backup-access-setup", "arguments": {
                "target-id": "t", "devices": [{"device": "nosuch"}]}},
            {"execute": "backup-access-setup", "arguments": {
                "target-id": "t", "devlist": DEV}},
            {"execute": "backup-access-setup", "arguments": {
                "target-id": "t", "devices": [{"device": DEV,
                                                "bitmap-mode": "new"}]}},
            {"execute": "backup-access-setup", "arguments": {
                "target-id": "u", "devices": [{"device": DEV}]}},
            {"execute": "backup-access-teardown", "arguments": {
                "target-id": "u", "success": True}},
            {"execute": "backup-access-teardown", "arguments": {
                "target-id": "t", "success": True}}]:
        f.write((json.dumps(cmd) + "\n").encode())
        f.flush()
        out.append(re.sub(rb"#block\d+", b"#block", f.readline()))
    f.close()
    s.close()
    return out


def line_of(s, timeout):
    """The next line from socket s, or None after timeout seconds."""
    s.settimeout(timeout)
    out = b""
    try:
        while not out.endswith(b"\n"):
            c = s.recv(1)
            if not c:
                break
            out += c
    except socket.timeout:
        return None
    return out


def timed_out(q, command, **args):
    try:
        q.cmd(command, **args)
    except socket.timeout:
        return True
    return False


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     PveVm(8 << 20, devices=(DEV,), tmpdir=os.path.join(tmp, "vm"),
           fleecing=True) as vm:
    sock = os.path.join(tmp, "proxy.sock")
    with FaultProxy(vm.qmp_path, sock) as proxy:
        via = sequence(vm, sock)
        direct = sequence(vm, vm.qmp_path)
        check(via == direct, "the proxy changed something:\n%s\n%s"
              % (b"".join(via).decode(), b"".join(direct).decode()))
        check(b"previous backup for target 't' not finished" in via[6],
              "%r" % via[6])
        check(vm.leftovers(bitmaps=("t",)).keys() <= {"nodes"},
              "%s" % vm.leftovers())

        # A held answer: the command has run, the answer waits.
        proxy.hold("block-dirty-bitmap-add")
        a = QMP(sock, timeout=1)
        check(timed_out(a, "block-dirty-bitmap-add", node=DEV, name="a1"),
              "the held answer came")
        check("a1" in vm.bitmaps(), "the held command did not run")
        check(proxy.wait_held() == "block-dirty-bitmap-add", "not held")
        # Its client leaves, with a command queued: it never runs.
        a.file.write(b'{"execute": "block-dirty-bitmap-add", "arguments":'
                     b' {"node": "%s", "name": "a2"}}\n' % DEV.encode())
        a.file.flush()
        a.close()
        # The next client is greeted, but waits like every command (its
        # qmp_capabilities too).
        start = time.monotonic()
        bs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bs.connect(sock)
        greeting = line_of(bs, 5)
        check(time.monotonic() - start < 5 and
              b'"QMP"' in (greeting or b""),
              "no greeting while held: %r" % greeting)
        bs.sendall(b'{"execute": "qmp_capabilities"}\n')
        check(line_of(bs, 1) is None, "a command ran while one was held")
        proxy.release()
        check(json.loads(line_of(bs, 10)) == {"return": {}},
              "not its own answer after release")
        bs.close()
        check("a2" not in vm.bitmaps(),
              "a command of a client that had gone ran")
        b = QMP(sock, timeout=10)
        # Held for some seconds only.
        proxy.hold("query-name", seconds=1)
        start = time.monotonic()
        b.cmd("query-name")
        check(time.monotonic() - start >= 0.9, "not held for 1 s")
        b.close()
        check([c for c, _ in proxy.calls].count("block-dirty-bitmap-add")
              == 1, "calls: %s" % proxy.calls)
    vm.qmp.cmd("block-dirty-bitmap-remove", node=DEV, name="a1")
print("ok")
