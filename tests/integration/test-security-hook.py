#!/usr/bin/python3
"""contrib/vzdump-hook facing bad local state (no QEMU needed):
- a pid file holding 0 (or nothing, or text): backup-abort must not kill
  its own process group (kill -- -0), and backup-end must not wait
  forever on it (kill -0 0 always succeeds); both still tear down;
- BACKUPACCESS_RUN_ROOT that is a symlink, another user's, or open to
  group and others is refused before anything is written there;
- BACKUPACCESS_DEVICES is split into words but never expanded as a
  pattern against the current directory."""
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import HELPER, TOP, check

HOOK = os.path.join(TOP, "contrib", "vzdump-hook")
NOBODY = 65534


def hook(phase, env, cwd=None):
    """The hook in a session of its own, as vzdump would run it: a kill
    of its own process group then cannot reach this test."""
    try:
        return subprocess.run([HOOK, phase, "snapshot", "100"], env=env,
                              cwd=cwd, capture_output=True, text=True,
                              timeout=60, start_new_session=True)
    except subprocess.TimeoutExpired:
        check(False, "%s: still running after 60 s" % phase)


with tempfile.TemporaryDirectory(prefix="backupaccess-test.") as tmp:
    root = os.path.join(tmp, "root")
    os.mkdir(root, 0o700)
    env = dict(os.environ, VMTYPE="qemu", BACKUPACCESS_HELPER=HELPER,
               BACKUPACCESS_QMP=os.path.join(tmp, "no-qmp"),
               BACKUPACCESS_RUN_ROOT=root, BACKUPACCESS_CONSUMER="true")
    pid_file = os.path.join(root, "100.consumer.pid")

    # Not 1 or -1: were the check ever broken, kill -- -1 as root would
    # end every process on the machine.
    for bad in ("0", "", "12 13", "x"):
        for phase in ("backup-abort", "backup-end"):
            with open(pid_file, "w") as f:
                f.write(bad + "\n")
            r = hook(phase, env)
            check(r.returncode == 0, "%s with pid %r: exit %d: %s"
                  % (phase, bad, r.returncode, r.stderr))
            check("is not a process id" in r.stderr and
                  "nothing to tear down" in r.stderr,
                  "%s with pid %r: %s" % (phase, bad, r.stderr))
            check(not os.path.exists(pid_file), "pid file left")

    # The run root.
    link = os.path.join(tmp, "link")
    os.symlink(root, link)
    theirs = os.path.join(tmp, "theirs")
    os.mkdir(theirs, 0o700)
    os.chown(theirs, NOBODY, NOBODY)
    loose = os.path.join(tmp, "loose")
    os.mkdir(loose)
    os.chmod(loose, 0o755)
    for bad in (link, theirs, loose):
        for phase in ("backup-start", "backup-end", "backup-abort"):
            r = hook(phase, dict(env, BACKUPACCESS_RUN_ROOT=bad))
            check(r.returncode != 0 and "the run root must be" in r.stderr,
                  "%s: run root %s accepted: %s" % (phase, bad, r.stderr))
        check(os.listdir(bad) == [], "%s: written to: %s"
              % (bad, os.listdir(bad)))

    # No pattern expansion: "drive-scsi*" stays what it is.
    cwd = os.path.join(tmp, "cwd")
    os.mkdir(cwd)
    open(os.path.join(cwd, "drive-scsi0"), "w").close()
    r = hook("backup-start", dict(env, BACKUPACCESS_DEVICES="drive-scsi*"),
             cwd=cwd)
    check(r.returncode != 0 and "device 'drive-scsi*'" in r.stderr,
          "the device list was expanded: %s" % r.stderr)
print("ok")
