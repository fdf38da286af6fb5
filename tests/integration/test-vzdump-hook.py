#!/usr/bin/python3
"""contrib/vzdump-hook, called phase by phase as vzdump would (each phase a
new process), against the Proxmox backup-access fixture: backup-start sets
up and serves and starts the consumer; backup-end tears down with success
when the consumer succeeded; a consumer that fails, or backup-abort, tears
down with failure; nothing is left behind."""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import TOP, check
from pve_fixture import PveVm

HOOK = os.path.join(TOP, "contrib", "vzdump-hook")
SIZE = 8 << 20

with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp, \
     PveVm(size=SIZE, devices=("drive-scsi0",), fleecing=True) as vm:
    vm.guest_write(0, os.urandom(SIZE))
    expected = vm.disk_read(0, SIZE)
    root = os.path.join(tmp, "run")
    out = os.path.join(tmp, "copy.raw")
    env = dict(os.environ, VMTYPE="qemu", STOREID="ext",
               BACKUPACCESS_HELPER=os.path.join(TOP, "helper",
                                                "backupaccess-helper"),
               BACKUPACCESS_QMP=vm.qmp_path, BACKUPACCESS_RUN_ROOT=root)

    def phase(name, consumer=None):
        e = dict(env)
        if consumer:
            e["BACKUPACCESS_CONSUMER"] = consumer
        r = subprocess.run([HOOK, name, "snapshot", "100"], env=e,
                           capture_output=True, text=True, timeout=120)
        check(r.returncode == 0, "%s: %s" % (name, r.stderr))

    consumer = ("/usr/bin/python3 -c \"import json,os,subprocess;"
                "d=json.loads(os.environ['BACKUPACCESS_JSON'])['devices'][0];"
                "subprocess.run(['nbdcopy',d['uri'],'%s'],check=True)\"" % out)
    phase("job-start")                          # ignored
    phase("backup-start", consumer)
    check(vm.proxy.targets() == ["backupaccess-ext"], "%s"
          % vm.proxy.targets())
    phase("backup-end")
    with open(out, "rb") as f:
        check(f.read() == expected, "the consumer's copy differs")
    check(vm.proxy.targets() == [] and [f for f in os.listdir(root) if not f.endswith(".consumer.log")] == [],
          "left over: %s" % os.listdir(root))
    teardowns = [a for c, a, ok in vm.proxy.calls
                 if c == "backup-access-teardown"]
    check(teardowns[-1]["success"] is True, "%s" % teardowns)

    phase("backup-start", "false")              # a consumer that fails
    phase("backup-end")
    teardowns = [a for c, a, ok in vm.proxy.calls
                 if c == "backup-access-teardown"]
    check(teardowns[-1]["success"] is False, "%s" % teardowns)

    phase("backup-start", "sleep 61")
    phase("backup-abort")
    left = subprocess.run(["pgrep", "-f", "sleep 61"], capture_output=True,
                          text=True).stdout
    check(left.strip() == "", "the consumer was left running: %s" % left)
    teardowns = [a for c, a, ok in vm.proxy.calls
                 if c == "backup-access-teardown"]
    check(teardowns[-1]["success"] is False and vm.proxy.targets() == [] and
          [f for f in os.listdir(root) if not f.endswith(".consumer.log")] == [], "abort left: %s" % os.listdir(root))
print("ok")
