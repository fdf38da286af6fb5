#!/usr/bin/python3
# SPDX-License-Identifier: BSD-3-Clause
# qemu: pve
"""TCP only when asked, and then with TLS: `backupaccess-helper serve
--listen 127.0.0.1:PORT` refuses to start without --tls-psk (unless
--insecure-no-tls), and refuses a PSK file others can read or with a
short key.  With a PSK file made by psktool, nbdkit requires TLS: a
client with the right key copies the snapshot byte for byte; a client
without TLS, one with a wrong key, and one with another user name are
refused.  --tls-psk without --listen puts TLS on the unix socket too;
--insecure-no-tls serves plain TCP; `run` checks the options before it
sets anything up.  mount refuses a device served with TLS
(backupaccess-mount does not speak TLS) instead of failing half-way.
Against the real Proxmox VE QEMU (tests/lib/pve_vm.py), through its
backup access API."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import check, run_helper
from pve_vm import PveVm

if shutil.which("psktool") is None:
    print("psktool (gnutls-bin) is not installed")
    sys.exit(77)

SIZE = 8 << 20
DEV = "drive-scsi0"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psk(path, user):
    subprocess.run(["psktool", "-u", user, "-p", path], check=True,
                   capture_output=True, timeout=60)
    os.chmod(path, 0o600)
    return path


def nbdinfo(uri):
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                          text=True, timeout=60)


def refused(r, message):
    check(r.returncode != 0 and message in r.stderr,
          "expected %r: exit %d, %s" % (message, r.returncode, r.stderr))


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     PveVm(size=SIZE, devices=(DEV,), fleecing=True) as vm:
    vm.mark()                   # the fleecing image is vzdump's
    vm.guest_write(0, os.urandom(SIZE))
    snapshot = vm.disk()
    rd = os.path.join(tmp, "run")
    keys = psk(os.path.join(tmp, "backup.psk"), "backup")
    wrong = psk(os.path.join(tmp, "wrong.psk"), "backup")
    other = psk(os.path.join(tmp, "other.psk"), "other")
    loose = os.path.join(tmp, "loose.psk")
    shutil.copy(keys, loose)
    os.chmod(loose, 0o644)
    short = os.path.join(tmp, "short.psk")
    with open(short, "w") as f:
        f.write("backup:00112233\n")
    os.chmod(short, 0o600)
    port = free_port()
    listen = "127.0.0.1:%d" % port
    q = ["--qmp", vm.qmp_path, "--run-dir", rd, "--device", DEV]

    # run checks before it sets anything up.
    refused(run_helper("run", *q, "--listen", listen, "--", "true",
                       ok=False), "TCP is served with TLS only")
    refused(run_helper("run", *q, "--tls-psk", keys, "--mount", "--", "true",
                       ok=False), "backupaccess-mount does not speak TLS")
    check(vm.leftovers() == {} and not os.path.exists(rd),
          "run set up before it checked --listen")

    run_helper("setup", *q)
    try:
        s = ["serve", "--run-dir", rd]
        refused(run_helper(*s, "--listen", listen, ok=False),
                "TCP is served with TLS only")
        refused(run_helper(*s, "--listen", listen, "--tls-psk", loose,
                           ok=False), "readable by its owner only")
        refused(run_helper(*s, "--listen", listen, "--tls-psk", short,
                           ok=False), "at least 16 bytes")
        refused(run_helper(*s, "--insecure-no-tls", ok=False),
                "--insecure-no-tls goes with --listen")
        refused(run_helper(*s, "--listen", "127.0.0.1:99999", "--tls-psk",
                           keys, ok=False), "the port must be")
        refused(run_helper(*s, "--listen", "a/b:%d" % port, "--tls-psk",
                           keys, ok=False), "not a host name")
        check(not [f for f in os.listdir(rd) if f.endswith(".pid")],
              "nbdkit was started: %s" % os.listdir(rd))

        out = json.loads(run_helper(*s, "--listen", listen, "--tls-psk",
                                    keys).stdout)
        uri = out["devices"][0]["uri"]
        check(uri == "nbds://backup@%s/?tls-psk-file=%s" % (listen, keys),
              "uri %s" % uri)
        # Only on 127.0.0.1, and only with TLS and the right key.
        refused(nbdinfo("nbd://%s/" % listen), "requires TLS")
        refused(nbdinfo("nbds://backup@%s/?tls-psk-file=%s"
                        % (listen, wrong)), "gnutls_handshake")
        refused(nbdinfo("nbds://other@%s/?tls-psk-file=%s"
                        % (listen, other)), "gnutls_handshake")
        copy = os.path.join(tmp, "copy.raw")
        subprocess.run(["nbdcopy", uri, copy], check=True,
                       capture_output=True, timeout=120)
        with open(copy, "rb") as f:
            check(f.read() == snapshot, "the copy over TLS differs")
    finally:
        run_helper("teardown", "--run-dir", rd, "--failure", ok=False)
    check(not os.path.exists(rd) and vm.leftovers(bitmaps=("backupaccess",))
          == {}, "left behind: %s" % vm.leftovers())

    # TLS on the unix socket.
    run_helper("setup", *q)
    try:
        out = json.loads(run_helper("serve", "--run-dir", rd, "--tls-psk",
                                    keys).stdout)
        uri = out["devices"][0]["uri"]
        sock = os.path.join(rd, DEV + ".sock")
        check(uri == "nbds+unix://backup@/?socket=%s&tls-psk-file=%s"
              % (sock, keys), "uri %s" % uri)
        refused(nbdinfo("nbd+unix:///?socket=" + sock), "requires TLS")
        refused(run_helper("mount", "--run-dir", rd, ok=False),
                "served with TLS, which backupaccess-mount does not speak")
        r = nbdinfo(uri)
        check(r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr)
    finally:
        run_helper("teardown", "--run-dir", rd, "--failure", ok=False)

    # Plain TCP, when explicitly asked for.
    run_helper("setup", *q)
    try:
        out = json.loads(run_helper("serve", "--run-dir", rd, "--listen",
                                    listen, "--insecure-no-tls").stdout)
        uri = out["devices"][0]["uri"]
        check(uri == "nbd://%s/" % listen, "uri %s" % uri)
        r = nbdinfo(uri)
        check(r.returncode == 0 and r.stdout.strip() == str(SIZE), r.stderr)
    finally:
        run_helper("teardown", "--run-dir", rd, "--failure", ok=False)
    check(not os.path.exists(rd) and vm.leftovers(bitmaps=("backupaccess",))
          == {}, "left behind: %s" % vm.leftovers())
print("ok")
