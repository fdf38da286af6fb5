# SPDX-License-Identifier: BSD-3-Clause
"""The QEMU builds the tests run on, and why one is missing.

Three builds, none of them installed over another:

- "7.2": Debian 12's QEMU, the system QEMU (/usr/bin);
- "10.0.2": Debian's bookworm-backports QEMU, unpacked by `make deps`
  (apt-get download + dpkg -x, with the newer seabios it depends on)
  into DEPS/qemu-10.0.2;
- "pve-10.0.2-4": a Proxmox VE QEMU (upstream 10.0.2 with every pve-qemu
  10.0.2-4 patch: the backup access API), unpacked by `make deps` from the
  prebuilt tarball PVE_QEMU_TARBALL into DEPS/pve-qemu-10.0.2-4.

DEPS is $BACKUPACCESS_DEPS, by default .deps in the project.

    for q in qemus.available():          # Qemu objects
        ... q.label, q.system, q.storage_daemon, q.img, q.args() ...
    for label, why in qemus.missing():   # what a test reports as skipped
    q = qemus.current()                  # the build this test runs on

tests/run-tests runs a test once per build when the test has a line
"# qemu: upstream" (7.2 and 10.0.2), "# qemu: pve" or "# qemu: all", with
BACKUPACCESS_QEMU=<label>; current() returns that build (7.2 when unset)
and puts its programs first in PATH, so that what the test starts by name
(the helper's qemu-img, nbdcopy's qemu-nbd) is of the same build.

A QEMU that cannot be had is skipped with its reason, never passed
silently; in CI every one must be there (BACKUPACCESS_REQUIRE_ALL_QEMUS=1
turns a missing one into a failure).

`python3 qemus.py list [upstream|pve|all]` prints, one build a line,
"LABEL<TAB>ok<TAB>BINDIR<TAB>MODULE_DIR" or "LABEL<TAB>missing<TAB>REASON"
(for tests/run-tests).
"""
import os
import subprocess
import sys

TOP = os.environ.get("TOP") or os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))
DEPS = os.environ.get("BACKUPACCESS_DEPS") or os.path.join(TOP, ".deps")

# What make deps (tests/deps/qemus.py) fetches, and where it puts it.
BACKPORTS_VERSION = "10.0.2"              # upstream version in backports
BACKPORTS_DIR = os.path.join(DEPS, "qemu-" + BACKPORTS_VERSION)
PVE_VERSION = "10.0.2-4"
PVE_DIR = os.path.join(DEPS, "pve-qemu-" + PVE_VERSION)
PVE_TARBALL_DEFAULT = os.path.join(
    "..", "shared", "pve-qemu",
    "pve-qemu-%s-bookworm-amd64.tar.xz" % PVE_VERSION)


def _git(top, *args):
    try:
        r = subprocess.run(["git", "-C", top] + list(args),
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _main_checkout(top):
    """The main checkout of top when top is a git worktree, else None."""
    common = _git(top, "rev-parse", "--path-format=absolute",
                  "--git-common-dir")
    if common and os.path.basename(common) == ".git":
        return os.path.dirname(common)
    return None


_tarball_candidates = None


def pve_tarball_candidates():
    """Where the Proxmox VE QEMU tarball is looked for, in order:
    PVE_QEMU_TARBALL when set (relative to the project top); else the
    default ../shared/pve-qemu/... relative to the project top, then
    relative to the checkout this one was cloned from (origin, when it is
    a local path: CI runs in a clean clone elsewhere), then relative to
    the main checkout of a git worktree (this one, or origin)."""
    global _tarball_candidates
    given = os.environ.get("PVE_QEMU_TARBALL")
    if given:
        return [os.path.join(TOP, given)]
    if _tarball_candidates is not None:
        return _tarball_candidates
    tops = [TOP]
    origin = _git(TOP, "remote", "get-url", "origin")
    if origin and origin.startswith("file://"):
        origin = origin[len("file://"):]
    if origin and "://" not in origin and \
       ":" not in origin.split("/")[0]:        # not host:path
        origin = os.path.join(TOP, origin)
        tops.append(origin)
    else:
        origin = None
    for t in (TOP, origin):
        main = _main_checkout(t) if t and os.path.isdir(t) else None
        if main:
            tops.append(main)
    out = []
    for t in tops:
        p = os.path.normpath(os.path.join(t, PVE_TARBALL_DEFAULT))
        if p not in out:
            out.append(p)
    _tarball_candidates = out
    return out


def pve_tarball():
    """The tarball to unpack, or None."""
    for p in pve_tarball_candidates():
        if os.path.isfile(p):
            return p
    return None


class Qemu:
    """One QEMU build: its programs, and the options they need."""

    def __init__(self, label, bindir, firmware=(), pve=False,
                 has_storage_daemon=True, module_dir=None):
        self.label = label
        self.bindir = bindir
        self.pve = pve
        self.kind = "pve" if pve else "upstream"
        self.firmware = list(firmware)
        self.module_dir = module_dir
        self.system = os.path.join(bindir, "qemu-system-x86_64")
        self.storage_daemon = (os.path.join(bindir, "qemu-storage-daemon")
                               if has_storage_daemon else None)
        self.img = os.path.join(bindir, "qemu-img")
        self.io = os.path.join(bindir, "qemu-io")
        self.nbd = os.path.join(bindir, "qemu-nbd")
        self._version = None

    def args(self):
        """Options for qemu-system-x86_64: where its firmware is."""
        out = []
        for d in self.firmware:
            out += ["-L", d]
        return out

    def env(self, base=None):
        """An environment for processes that start this build's programs
        by name: its bindir first in PATH (after BACKUPACCESS_TEST_BIN),
        and its own module directory
        (Debian's QEMU 10 otherwise loads QEMU 7.2's block modules from
        /usr/lib/x86_64-linux-gnu/qemu and fails: "undefined symbol")."""
        env = dict(os.environ if base is None else base)
        # After the wrappers of tests/san/run (nbdkit under a checker).
        parts = [p for p in env.get("PATH", "").split(":") if p]
        wrappers = env.get("BACKUPACCESS_TEST_BIN")
        n = 1 if wrappers and parts[:1] == [wrappers] else 0
        if parts[n:n + 1] != [self.bindir]:
            parts.insert(n, self.bindir)
        env["PATH"] = ":".join(parts)
        if self.module_dir:
            env["QEMU_MODULE_DIR"] = self.module_dir
        else:
            env.pop("QEMU_MODULE_DIR", None)
        return env

    def usable(self):
        return os.access(self.system, os.X_OK) and os.access(self.img,
                                                             os.X_OK)

    def version(self):
        """The version the binary reports, e.g. "10.0.2"."""
        if self._version is None:
            out = subprocess.run([self.img, "--version"],
                                 capture_output=True, text=True,
                                 check=True).stdout
            self._version = out.split("version", 1)[1].split()[0]
        return self._version

    def version_tuple(self):
        return tuple(int(x) for x in self.version().split("."))

    def at_least(self, *version):
        """True when this build is of upstream QEMU version or later,
        e.g. at_least(9, 1)."""
        return self.version_tuple() >= tuple(version)

    def __repr__(self):
        return "QEMU %s" % self.label


def _candidates():
    """(label, Qemu, reason it is missing)."""
    out = []
    out.append(("7.2", Qemu("7.2", "/usr/bin"),
                "the system QEMU is not installed: run make deps"))
    q10 = BACKPORTS_DIR
    out.append((BACKPORTS_VERSION, Qemu(
        BACKPORTS_VERSION, os.path.join(q10, "usr", "bin"),
        # seabios: QEMU 10.0.2 depends on seabios > 1.16.3, which
        # make deps unpacks from bookworm-backports next to it.
        firmware=[os.path.join(q10, "usr", "share", "qemu"),
                  os.path.join(q10, "usr", "share", "seabios"),
                  "/usr/share/seabios", "/usr/lib/ipxe/qemu"],
        module_dir=os.path.join(q10, "usr", "lib", "x86_64-linux-gnu",
                                "qemu")),
        "QEMU %s from bookworm-backports is not unpacked in %s: "
        "run make deps" % (BACKPORTS_VERSION, q10)))
    pve = PVE_DIR
    tarball = pve_tarball()
    if tarball:
        why = ("the Proxmox VE QEMU is not unpacked in %s: run make deps "
               "(it unpacks %s)" % (pve, tarball))
    else:
        why = ("the Proxmox VE QEMU is not unpacked in %s, and this machine "
               "has no PVE_QEMU_TARBALL to unpack (looked for %s)"
               % (pve, ", ".join(pve_tarball_candidates())))
    label = "pve-" + PVE_VERSION
    out.append((label, Qemu(
        label, os.path.join(pve, "bin"),
        firmware=[os.path.join(pve, "share", "qemu"), "/usr/share/qemu",
                  "/usr/share/seabios", "/usr/lib/ipxe/qemu"],
        pve=True, has_storage_daemon=False), why))
    return out


def build(label):
    """The Qemu of label, whether it is there or not."""
    for lbl, q, _ in _candidates():
        if lbl == label:
            return q
    raise KeyError("no QEMU build %r (known: %s)"
                   % (label, ", ".join(c[0] for c in _candidates())))


def _kind_matches(q, pve):
    return pve is None or q.pve == pve


def available(pve=None):
    """The builds present.  pve=True: only Proxmox VE's; False: only
    upstream ones; None: all."""
    return [q for _, q, _ in _candidates()
            if q.usable() and _kind_matches(q, pve)]


def missing(pve=None):
    """(label, reason) of each build that is not there."""
    return [(label, why) for label, q, why in _candidates()
            if not q.usable() and _kind_matches(q, pve)]


def require_all():
    """In CI a missing QEMU is a failure, not a skip."""
    return os.environ.get("BACKUPACCESS_REQUIRE_ALL_QEMUS") == "1"


_current = None


def current(pve=False):
    """The build named by BACKUPACCESS_QEMU; when unset (a test run by
    hand), "7.2", or with pve=True the Proxmox VE build.  pve=True also
    refuses a build that is not Proxmox VE's.  The first call puts its
    programs first in this process's PATH (see Qemu.env).  A build that
    is not there ends the test: skipped (exit 77) with the reason, or
    failed when every build is required."""
    global _current
    if _current is None:
        label = os.environ.get("BACKUPACCESS_QEMU") or (
            "pve-" + PVE_VERSION if pve else "7.2")
        found = [(q, why) for lbl, q, why in _candidates() if lbl == label]
        if not found:
            print("BACKUPACCESS_QEMU=%s: no such QEMU build (known: %s)"
                  % (label, ", ".join(c[0] for c in _candidates())))
            sys.exit(1)
        q, why = found[0]
        if not q.usable():
            print("QEMU %s: %s" % (label, why))
            sys.exit(1 if require_all() else 77)
        env = q.env()
        for k in [k for k in os.environ if k not in env]:
            del os.environ[k]
        os.environ.update(env)
        _current = q
    if pve and not _current.pve:
        print("QEMU %s: this test needs a Proxmox VE QEMU" % _current.label)
        sys.exit(1)
    return _current


def main(argv):
    kinds = {"upstream": False, "pve": True, "all": None}
    if len(argv) < 2 or argv[1] != "list" or len(argv) > 3 or \
       (len(argv) == 3 and argv[2] not in kinds):
        print("usage: qemus.py list [upstream|pve|all]", file=sys.stderr)
        return 2
    pve = kinds[argv[2] if len(argv) == 3 else "all"]
    for label, q, why in _candidates():
        if not _kind_matches(q, pve):
            continue
        if q.usable():
            print("%s\tok\t%s\t%s" % (label, q.bindir, q.module_dir or ""))
        else:
            print("%s\tmissing\t%s" % (label, why))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
