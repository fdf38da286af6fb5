# SPDX-License-Identifier: BSD-3-Clause
"""Shared helpers for the Python integration tests (run with /usr/bin/python3)."""
import os
import random
import subprocess
import sys
import threading
import time

TOP = os.environ.get("TOP") or os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))))
FILTER = os.path.join(TOP, "nbdkit-backupaccess-filter.so")
PLUGIN = os.path.join(TOP, "nbdkit-snapshotaccess-plugin.so")


class Nbdkit:
    """nbdkit in the foreground on a unix socket, stopped (SIGTERM, so that
    the filter writes its summary) when the block ends."""

    def __init__(self, tmpdir, args, name="nbdkit"):
        self.sock = os.path.join(tmpdir, name + ".sock")
        self.logpath = os.path.join(tmpdir, name + ".log")
        self.args = args
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.logf = open(self.logpath, "w")
        self.proc = subprocess.Popen(["nbdkit", "-f", "-U", self.sock]
                                     + self.args, stdout=self.logf,
                                     stderr=subprocess.STDOUT)
        end = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("nbdkit did not start: " + self.log())
            time.sleep(0.05)

    def stop(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.logf.close()
            self.proc = None

    def uri(self):
        return "nbd+unix:///?socket=" + self.sock

    def cpu_seconds(self):
        """User + system CPU time nbdkit has used so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log(self):
        with open(self.logpath) as f:
            return f.read()


def filtered(plugin_args, *filter_args, log_below=None):
    """nbdkit arguments: the backupaccess filter (and optionally nbdkit's
    log filter below it, logging what reaches the plugin) over a plugin."""
    args = ["--filter=" + FILTER]
    if log_below:
        args.append("--filter=log")
    args += plugin_args + list(filter_args)
    if log_below:
        args.append("logfile=" + log_below)
    return args


HELPER = os.path.join(TOP, "helper", "backupaccess-helper")


def run_helper(*args, ok=True, env=None):
    """Runs backupaccess-helper; with ok, it must exit 0."""
    r = subprocess.run([HELPER] + list(args), capture_output=True, text=True,
                       timeout=180, env=env)
    if ok:
        check(r.returncode == 0, "backupaccess-helper %s failed (%d): %s"
              % (args[0], r.returncode, r.stderr))
    return r


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 120), **kw)


def nbdinfo_map(uri, context="base:allocation"):
    """[(offset, length, type)] as nbdinfo --map prints them."""
    out = run(["nbdinfo", "--map=" + context, uri]).stdout
    return [tuple(int(x) for x in line.split()[:3])
            for line in out.splitlines() if line.strip()]


def dirty_regions(uri, bitmap):
    return [(o, o + l) for o, l, t in nbdinfo_map(
        uri, "qemu:dirty-bitmap:" + bitmap) if t & 1]


def check(cond, msg):
    if not cond:
        print("FAIL:", msg, file=sys.stderr)
        sys.exit(1)


def within(secs, what, fn):
    """fn() in a thread of its own: a request stuck in nbdkit fails the
    test after secs instead of hanging it."""
    box = {}

    def run():
        try:
            box["r"] = fn()
        except BaseException as e:          # check() exits: pass it on
            box["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(secs)
    check(not t.is_alive(), "%s: no answer in %d s (a pool connection "
          "never given back?)" % (what, secs))
    if "e" in box:
        raise box["e"]
    return box.get("r")


def requests_in_log(path, kind):
    """[(offset, count)] of the requests of a kind ("Read", "Trim") that
    nbdkit's log filter saw."""
    out = []
    with open(path) as f:
        for line in f:
            if " %s " % kind in line and "offset=" in line:
                kv = dict(w.split("=", 1) for w in line.split() if "=" in w)
                out.append((int(kv["offset"], 16), int(kv["count"], 16)))
    return out


def trims_in_log(path):
    return requests_in_log(path, "Trim")


def reads_in_log(path):
    return requests_in_log(path, "Read")


def random_writes(fleecing, rng, n, max_len=256 << 10):
    """n random guest writes of random non-zero data; returns them."""
    writes = []
    for _ in range(n):
        length = rng.randrange(1, max_len)
        offset = rng.randrange(0, fleecing.size - length)
        data = bytes(rng.randrange(1, 256) for _ in range(16)) * (
            length // 16 + 1)
        fleecing.guest_write(offset, data[:length])
        writes.append((offset, length))
    return writes
