"""The QEMU builds the tests run on, and why one is missing.

Three builds, none of them installed over another:

- "7.2": Debian 12's QEMU, the system QEMU (/usr/bin);
- "10.0.2": Debian's bookworm-backports QEMU, unpacked by `make deps`
  (dpkg -x) into DEPS/qemu-10.0.2;
- "pve-10.0.2-4": a Proxmox VE QEMU (upstream 10.0.2 with every pve-qemu
  10.0.2-4 patch: the backup access API), unpacked by `make deps` from the
  prebuilt tarball in ../shared/pve-qemu/ into DEPS/pve-qemu-10.0.2-4.

DEPS is $BACKUPACCESS_DEPS, by default .deps in the project.

    for q in qemus.available():          # Qemu objects
        ... q.label, q.system, q.storage_daemon, q.img, q.args() ...
    for label, why in qemus.missing():   # what a test reports as skipped

A QEMU that cannot be had is skipped with its reason, never passed
silently; in CI every one must be there (BACKUPACCESS_REQUIRE_ALL_QEMUS=1
turns a missing one into a failure).
"""
import os
import subprocess

TOP = os.environ.get("TOP") or os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))
DEPS = os.environ.get("BACKUPACCESS_DEPS") or os.path.join(TOP, ".deps")


class Qemu:
    """One QEMU build: its programs, and the options they need."""

    def __init__(self, label, bindir, firmware=(), pve=False,
                 has_storage_daemon=True):
        self.label = label
        self.bindir = bindir
        self.pve = pve
        self.firmware = list(firmware)
        self.system = os.path.join(bindir, "qemu-system-x86_64")
        self.storage_daemon = (os.path.join(bindir, "qemu-storage-daemon")
                               if has_storage_daemon else None)
        self.img = os.path.join(bindir, "qemu-img")
        self.io = os.path.join(bindir, "qemu-io")
        self.nbd = os.path.join(bindir, "qemu-nbd")

    def args(self):
        """Options for qemu-system-x86_64: where its firmware is."""
        out = []
        for d in self.firmware:
            out += ["-L", d]
        return out

    def version(self):
        """The version the binary reports, e.g. "10.0.2"."""
        out = subprocess.run([self.system, "--version"], capture_output=True,
                             text=True, check=True).stdout
        return out.split("version", 1)[1].split()[0]

    def __repr__(self):
        return "QEMU %s" % self.label


def _candidates():
    """(label, Qemu or None, reason it is missing)."""
    out = []
    out.append(("7.2", Qemu("7.2", "/usr/bin"),
                "the system QEMU is not installed: run make deps"))
    q10 = os.path.join(DEPS, "qemu-10.0.2")
    out.append(("10.0.2", Qemu(
        "10.0.2", os.path.join(q10, "usr", "bin"),
        firmware=[os.path.join(q10, "usr", "share", "qemu"),
                  "/usr/share/seabios", "/usr/lib/ipxe/qemu"]),
        "QEMU 10.0.2 from bookworm-backports is not unpacked in %s: "
        "run make deps" % q10))
    pve = os.path.join(DEPS, "pve-qemu-10.0.2-4")
    out.append(("pve-10.0.2-4", Qemu(
        "pve-10.0.2-4", os.path.join(pve, "bin"),
        firmware=[os.path.join(pve, "share", "qemu"), "/usr/share/qemu",
                  "/usr/share/seabios", "/usr/lib/ipxe/qemu"],
        pve=True, has_storage_daemon=False),
        "the Proxmox VE QEMU is not unpacked in %s: make deps unpacks it "
        "from PVE_QEMU_TARBALL (by default "
        "../shared/pve-qemu/pve-qemu-10.0.2-4-bookworm-amd64.tar.xz), "
        "which this machine does not have" % pve))
    return out


def _usable(q):
    return os.access(q.system, os.X_OK) and os.access(q.img, os.X_OK)


def available(pve=None):
    """The builds present.  pve=True: only Proxmox VE's; False: only
    upstream ones; None: all."""
    return [q for _, q, _ in _candidates()
            if _usable(q) and (pve is None or q.pve == pve)]


def missing(pve=None):
    """(label, reason) of each build that is not there."""
    return [(label, why) for label, q, why in _candidates()
            if not _usable(q) and (pve is None or q.pve == pve)]


def require_all():
    """In CI a missing QEMU is a failure, not a skip."""
    return os.environ.get("BACKUPACCESS_REQUIRE_ALL_QEMUS") == "1"
