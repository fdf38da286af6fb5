# SPDX-License-Identifier: BSD-3-Clause
"""Test fixture: a real Linux guest writing to an ext4 file system on a
virtio-blk disk, in qemu-system-x86_64 under TCG.

The guest is Debian's kernel (linux-image-amd64's linux-image-*-amd64,
unpacked with dpkg -x, never installed on the host) and an initramfs built
at test time: busybox-static, the few kernel modules the guest needs
(virtio_pci, virtio_blk, ext4 and their dependencies, from modules.dep)
and /init (guest-init.sh beside this file), a busybox shell script that
mounts the data disks and obeys commands on a serial port.  The data
disks are ext4, made on the host with mkfs.ext4, in qcow2 images attached
the way the helper finds them:

    style "upstream": -blockdev file node NAME-file, qcow2 node NAME,
                      -device virtio-blk-pci,drive=NAME,id=vblkN
    style "pve":      Proxmox VE 9's: file node e-DEV, qcow2 node f-DEV,
                      throttle node drive-DEV (DEV e.g. "virtio0") in a
                      throttle group, -device virtio-blk-pci,id=DEV

The kernel:

    tests/deps/guest-kernel.sh    (make deps) unpacks it into KERNEL_DIR,
                                  $BACKUPACCESS_GUEST_KERNEL or
                                  DEPS/guest-kernel, keeping only the
                                  kernel (vmlinux, booted through its PVH
                                  entry), the modules the guest loads, and
                                  their load order.

Use:

    with Guest(qemu, tmp, disks=[("vda0", 128 << 20)]) as g:
        g.qmp_path                  # a QMP socket for the program under test
        g.qmp                       # the test's own QMP connection
        g.start_workload()          # files written, overwritten, deleted,
                                    # renamed, sync, fstrim, until stopped
        g.freeze(); g.thaw()        # sync + fsfreeze in the guest
        g.status()                  # {"rounds": N, "bytes": N, "trims": N}
        with g.paused():            # QMP stop ... cont
            g.copy_disk(0, "ref.raw")
        g.stop_workload()

The control channel is the guest's second serial port (ttyS1) on a unix
socket the fixture listens on; each command is one line, and the guest
answers "OK <command> <rounds> <bytes> <trims>" or "ERR <command> <why>".
The guest's console (ttyS0, kernel messages and /init's) goes to
console.log in the directory.  Call with /usr/bin/python3.
"""
import contextlib
import lzma
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qemu_fixture import QMP, Started, stop_process, wait_for  # noqa: E402
import qemus  # noqa: E402

KERNEL_DIR = (os.environ.get("BACKUPACCESS_GUEST_KERNEL") or
              os.path.join(qemus.DEPS, "guest-kernel"))
BUSYBOX = "/bin/busybox"
# What the guest loads (with dependencies): the disk's PCI transport and
# driver, and the file system.  ext4 asks the crypto API for crc32c at
# mount time; without a module loader in the guest it must be loaded.
MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
# TCG: the kernel's own probing is most of the boot time.  No KASLR, no
# mitigations (nothing to protect), no keyboard or mouse probing, no
# clock calibration.
CMDLINE = ("console=ttyS0 rdinit=/init panic=-1 loglevel=4 quiet "
           "nokaslr mitigations=off tsc=reliable no_timer_check "
           "i8042.noaux i8042.nokbd i8042.nopnp audit=0 "
           "random.trust_cpu=on")


def missing():
    """Why a guest cannot be booted here, or None."""
    if not os.path.exists(os.path.join(KERNEL_DIR, "vmlinux")):
        return ("no guest kernel in %s: run make deps "
                "(tests/deps/guest-kernel.sh)" % KERNEL_DIR)
    for prog in (BUSYBOX, "/usr/bin/cpio", "/sbin/mkfs.ext4"):
        if not os.access(prog, os.X_OK):
            return "%s is missing: run make deps" % prog
    return None


# --- the kernel: fetched once, by make deps -----------------------------

def _module_order(moddir, wanted):
    """The .ko paths (relative to moddir) to insmod, dependencies first,
    from modules.dep."""
    deps = {}
    with open(os.path.join(moddir, "modules.dep")) as f:
        for line in f:
            path, _, rest = line.partition(":")
            deps[path] = rest.split()
    by_name = {os.path.basename(p)[:-3].replace("-", "_"): p for p in deps}
    order = []

    def visit(path):
        if path in order:
            return
        for d in deps[path]:
            visit(d)
        order.append(path)

    for name in wanted:
        if name not in by_name:
            raise RuntimeError("no module %s in %s" % (name, moddir))
        visit(by_name[name])
    return order


def extract_vmlinux(vmlinuz, dest):
    """The kernel ELF inside Debian's bzImage (XZ-compressed).  QEMU boots
    it through its PVH entry point (CONFIG_PVH): no firmware real-mode
    boot and no decompression under TCG, half the boot time."""
    with open(vmlinuz, "rb") as f:
        data = f.read()
    at = data.find(b"\xfd7zXZ\x00")
    if at < 0:
        raise RuntimeError("%s: no XZ-compressed kernel inside" % vmlinuz)
    elf = lzma.LZMADecompressor().decompress(data[at:])
    if not elf.startswith(b"\x7fELF"):
        raise RuntimeError("%s: the compressed kernel is not an ELF"
                           % vmlinuz)
    with open(dest, "wb") as f:
        f.write(elf)


def fetch_kernel(dest=KERNEL_DIR):
    """Downloads the package linux-image-amd64 depends on (apt-get
    download: not installed), unpacks it (dpkg -x) and keeps the kernel
    (vmlinux), MODULES with their dependencies, and modules.order (the
    load order).
    Does nothing if dest has a kernel already."""
    if os.path.exists(os.path.join(dest, "vmlinux")):
        print("guest kernel: %s is there" % dest)
        return
    for update in (False, True):
        if update:                      # no package lists yet
            subprocess.run(["apt-get", "update", "-q"], check=True)
        out = subprocess.run(["apt-cache", "depends", "linux-image-amd64"],
                             capture_output=True, text=True).stdout
        pkg = [w.split()[1] for w in out.splitlines()
               if w.strip().startswith("Depends: linux-image-")]
        if pkg:
            break
    else:
        raise RuntimeError("linux-image-amd64 depends on no kernel: %s" % out)
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(prefix="guest-kernel.", dir=parent)
    try:
        with contextlib.suppress(LookupError, OSError):
            shutil.chown(work, "_apt")      # apt downloads as _apt
        subprocess.run(["apt-get", "download", "-q", pkg[0]], cwd=work,
                       check=True)
        deb = [f for f in os.listdir(work) if f.endswith(".deb")][0]
        x = os.path.join(work, "x")
        subprocess.run(["dpkg", "-x", os.path.join(work, deb), x], check=True)
        version = os.listdir(os.path.join(x, "lib", "modules"))[0]
        # modules.dep is made at install time: busybox's depmod makes it.
        subprocess.run([BUSYBOX, "depmod", "-b", x, version], check=True)
        moddir = os.path.join(x, "lib", "modules", version)
        keep = os.path.join(work, "keep")
        os.makedirs(os.path.join(keep, "modules"))
        extract_vmlinux(os.path.join(x, "boot", "vmlinuz-" + version),
                        os.path.join(keep, "vmlinux"))
        names = []
        for rel in _module_order(moddir, MODULES):
            names.append(os.path.basename(rel))
            shutil.copy(os.path.join(moddir, rel),
                        os.path.join(keep, "modules", names[-1]))
        with open(os.path.join(keep, "modules.order"), "w") as f:
            f.write("\n".join(names) + "\n")
        with open(os.path.join(keep, "VERSION"), "w") as f:
            f.write("%s %s\n" % (deb, version))
        os.rename(keep, dest)
        print("guest kernel: %s in %s (modules: %s)"
              % (deb, dest, " ".join(names)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- the guest's side ----------------------------------------------------

INIT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                    "guest-init.sh")


def build_initramfs(path, disks):
    """A newc cpio archive (uncompressed: nothing to unpack slowly
    under TCG) with busybox, the modules and /init; disks are the
    guest's device names of the data disks, mounted in this order."""
    root = tempfile.mkdtemp(prefix="initramfs.", dir=os.path.dirname(path))
    try:
        for d in ("bin", "modules"):
            os.makedirs(os.path.join(root, d))
        shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
        with open(os.path.join(KERNEL_DIR, "modules.order")) as f:
            order = f.read().split()
        for m in order:
            shutil.copy(os.path.join(KERNEL_DIR, "modules", m),
                        os.path.join(root, "modules", m))
        shutil.copy(INIT, os.path.join(root, "init"))
        for name, text in (("modules.order", "\n".join(order) + "\n"),
                           ("disks", "\n".join(disks) + "\n")):
            with open(os.path.join(root, name), "w") as f:
                f.write(text)
        os.chmod(os.path.join(root, "init"), 0o755)
        files = subprocess.run(["find", "."], cwd=root, check=True,
                               capture_output=True).stdout
        with open(path, "wb") as out:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc",
                            "-R", "0:0"], cwd=root, input=files, stdout=out,
                           check=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- the VM ---------------------------------------------------------------

class GuestError(Exception):
    pass


class Disk:
    """A data disk: its qcow2 image, and the names QEMU knows it by."""

    def __init__(self, tmp, index, size, style):
        self.index = index
        self.size = size
        self.image = os.path.join(tmp, "disk%d.qcow2" % index)
        if style == "pve":
            dev = "virtio%d" % index
            self.device = "drive-" + dev        # what the helper is given
            self.node = "f-" + dev              # the qcow2 node
            self.qdev = dev
        else:
            self.device = self.node = "disk%d" % index
            self.qdev = "vblk%d" % index
        self.style = style

    def make(self, img):
        """ext4 on the host (complete inode tables and journal: no lazy
        initialisation writing in the guest), in a qcow2 image."""
        raw = self.image + ".raw"
        with open(raw, "wb") as f:
            f.truncate(self.size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "data%d" % self.index,
                        "-E", "lazy_itable_init=0,lazy_journal_init=0,"
                        "nodiscard", raw], check=True)
        subprocess.run([img, "convert", "-q", "-f", "raw", "-O", "qcow2",
                        raw, self.image], check=True)
        os.unlink(raw)

    def args(self):
        if self.style == "pve":
            dev = self.qdev
            return ["-object", "throttle-group,id=throttle-drive-" + dev,
                    "-blockdev", "driver=file,filename=%s,node-name=e-%s,"
                    "discard=unmap" % (self.image, dev),
                    "-blockdev", "driver=qcow2,file=e-%s,node-name=f-%s,"
                    "discard=unmap" % (dev, dev),
                    "-blockdev", "driver=throttle,throttle-group=throttle-"
                    "drive-%s,file=f-%s,node-name=drive-%s" % (dev, dev, dev),
                    "-device", "virtio-blk-pci,drive=drive-%s,id=%s"
                    % (dev, dev)]
        return ["-blockdev", "driver=file,filename=%s,node-name=%s-file,"
                "discard=unmap" % (self.image, self.node),
                "-blockdev", "driver=qcow2,file=%s-file,node-name=%s,"
                "discard=unmap" % (self.node, self.node),
                "-device", "virtio-blk-pci,drive=%s,id=%s"
                % (self.node, self.qdev)]


class Guest(Started):
    """qemu-system-x86_64 (qemu: a qemus.Qemu) booting the guest with
    the data disks of the given sizes; style "upstream" or "pve"."""

    def __init__(self, qemu, tmp, sizes=(128 << 20,), style="upstream",
                 memory=160, boot_timeout=120):
        self.qemu = qemu
        self.tmp = tmp
        self.style = style
        self.memory = memory
        self.boot_timeout = boot_timeout
        self.disks = [Disk(tmp, i, s, style) for i, s in enumerate(sizes)]
        self.qmp_path = os.path.join(tmp, "qmp.sock")       # the program's
        self.own_qmp = os.path.join(tmp, "qmp-test.sock")   # the test's
        self.ctl_path = os.path.join(tmp, "guest-ctl.sock")
        self.console = os.path.join(tmp, "console.log")
        self.proc = self.qmp = self.ctl = self.listener = None
        self.log = None
        self.boot_seconds = None
        self.kernel_release = None

    def start(self):
        for d in self.disks:
            d.make(self.qemu.img)
        initrd = os.path.join(self.tmp, "initramfs.cpio")
        build_initramfs(initrd, ["vd" + chr(ord("a") + d.index)
                                 for d in self.disks])
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.ctl_path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        args = [self.qemu.system] + self.qemu.args() + [
            "-machine", "q35,accel=tcg", "-smp", "1",
            "-m", str(self.memory), "-nodefaults", "-display", "none",
            "-no-reboot", "-name", "backupaccess-guest",
            "-kernel", os.path.join(KERNEL_DIR, "vmlinux"),
            "-initrd", initrd, "-append", CMDLINE,
            "-chardev", "file,id=con,path=" + self.console,
            "-serial", "chardev:con",
            "-chardev", "socket,id=ctl,path=%s,server=off" % self.ctl_path,
            "-serial", "chardev:ctl",
            "-qmp", "unix:%s,server=on,wait=off" % self.qmp_path,
            "-qmp", "unix:%s,server=on,wait=off" % self.own_qmp]
        for d in self.disks:
            args += d.args()
        self.log = open(os.path.join(self.tmp, "qemu.log"), "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        try:
            self.ctl, _ = self.listener.accept()
        except socket.timeout:
            raise GuestError("QEMU did not connect the control port: "
                             + self.qemu_log())
        wait_for(lambda: os.path.exists(self.own_qmp) or
                 self.proc.poll() is not None, "QEMU's QMP socket")
        self.qmp = QMP(self.own_qmp)
        line = self._line(self.boot_timeout)
        if not line.startswith("READY"):
            raise GuestError("guest said %r" % line)
        self.boot_seconds = time.monotonic() - t0
        self.kernel_release = line.split()[1]

    def stop(self):
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp.cmd("quit")
                self.proc.wait(10)
            with contextlib.suppress(Exception):
                self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        for s in (self.ctl, self.listener):
            if s is not None:
                s.close()
        self.ctl = self.listener = None
        if self.log is not None:
            self.log.close()
            self.log = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def qemu_log(self):
        with open(os.path.join(self.tmp, "qemu.log")) as f:
            return f.read()

    def console_tail(self, n=30):
        with open(self.console, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    # --- the control channel --------------------------------------------

    def _line(self, timeout):
        """One line from the guest, within timeout seconds."""
        self.ctl.settimeout(timeout)
        buf = b""
        try:
            while not buf.endswith(b"\n"):
                c = self.ctl.recv(1)
                if not c:
                    raise GuestError("the control port closed")
                buf += c
        except socket.timeout:
            raise GuestError("no answer from the guest in %ds (got %r); "
                             "console:\n%s"
                             % (timeout, buf, self.console_tail()))
        return buf.decode(errors="replace").strip()

    def command(self, cmd, timeout=60):
        """Sends one command; returns the numbers of its OK answer."""
        self.ctl.sendall(cmd.encode() + b"\n")
        line = self._line(timeout)
        words = line.split()
        if words[:2] != ["OK", cmd]:
            raise GuestError("%s: the guest said %r; console:\n%s"
                             % (cmd, line, self.console_tail()))
        return words[2:]

    def _progress(self, cmd, timeout=60):
        w = self.command(cmd, timeout)
        return dict(zip(("rounds", "bytes", "trims"), map(int, w)))

    def start_workload(self):
        return self._progress("start")

    def stop_workload(self):
        return self._progress("stop", 120)

    def status(self):
        return self._progress("status")

    def freeze(self):
        """sync, then fsfreeze --freeze every data file system: the writers
        block, the journal is flushed, the file systems are clean."""
        return self._progress("freeze", 120)

    def thaw(self):
        return self._progress("thaw")

    def umount(self):
        self.command("umount", 120)

    @contextlib.contextmanager
    def paused(self):
        """The VM stopped (QMP stop: every request drained and flushed
        to the images) in the block, running again after it."""
        self.qmp.cmd("stop")
        try:
            yield
        finally:
            self.qmp.cmd("cont")

    def copy_disk(self, index, dest, fmt="raw"):
        """The disk's image as it is now (call while paused: QEMU has
        flushed it and writes nothing), read beside QEMU (-U)."""
        subprocess.run([self.qemu.img, "convert", "-U", "-q", "-f", "qcow2",
                        "-O", fmt, self.disks[index].image, dest],
                       check=True, timeout=120)


if __name__ == "__main__":
    if sys.argv[1:] == ["fetch-kernel"]:
        fetch_kernel()
    else:
        sys.exit("usage: guest.py fetch-kernel")
