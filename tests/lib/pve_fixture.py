# SPDX-License-Identifier: BSD-3-Clause
"""STAND-IN for a Proxmox VE QEMU whose QMP stalls: a QMP proxy in front
of the real pve-qemu (tests/lib/pve_vm.py) that passes every message
through unchanged and, when told to, holds back the answer to one command
for a while, or for ever.

The real QEMU answers every command promptly here; on a Proxmox VE host a
command can take long (backup-access-setup or -teardown draining I/O to a
slow or hung storage, a QEMU that stopped answering), and a client then
gets no answer within its timeout.  That is the one thing this stand-in
adds.  Everything else (schema, names, errors, node graph, bitmaps, NBD
exports, aborts) is the real QEMU's, so nothing of Proxmox VE's backup
access API is emulated here.

What it models of the real QEMU while an answer is held (how QEMU's QMP
works, which the proxy keeps to):
  - QEMU has done the command (the proxy passed it on and has its
    answer): the effect is there, only the answer is late;
  - QEMU runs one QMP command at a time for all its monitors: until the
    held answer is let go, the commands of every client wait;
  - one client per monitor socket at a time: the next one connects, and
    gets QEMU's greeting only once the one before has gone;
  - a client that goes away loses the held answer and the commands it
    sent that had not been run (QEMU drops a closed monitor's queue).

    with PveVm(...) as vm, FaultProxy(vm.qmp_path, sock) as proxy:
        proxy.hold("backup-access-setup")       # the next one's answer
        program_under_test(sock)                 # times out
        proxy.wait_held(); proxy.release()       # QEMU answers at last

Use /usr/bin/python3; stdlib only.
"""
import json
import os
import queue
import socket
import threading
import time

from qemu_fixture import Started

__all__ = ["FaultProxy"]


class FaultProxy(Started):
    """FaultProxy(upstream_path, listen_path, timeout=60)

    upstream_path: the QMP socket of the real QEMU (PveVm.qmp_path);
    listen_path: where the program under test connects instead.

    hold(command, nth=1, seconds=None): hold back the answer to the nth
        next call of command; with seconds, let it go after that long.
    wait_held(timeout=30): waits until an answer is held; its command.
    release(): lets the held answer go (to its client, if still there).
    calls: [(command, arguments)] passed to QEMU, in order.
    """

    def __init__(self, upstream_path, listen_path, timeout=60):
        self.upstream_path = upstream_path
        self.listen_path = listen_path
        self.timeout = timeout
        self.calls = []
        self.rules = []                 # [command, countdown, seconds]
        self.free = threading.Event()   # no answer is held
        self.free.set()
        self.held = None                # the command whose answer is held
        self.lock = threading.Lock()
        self.stopping = False
        self.listener = None
        self.thread = None
        self.conn = None

    # --- life cycle ---------------------------------------------------------

    def start(self):
        if os.path.exists(self.listen_path):
            os.unlink(self.listen_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.listen_path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name="fault-proxy")
        self.thread.start()

    def stop(self):
        self.stopping = True
        self.release()
        for s in (self.listener, self.conn):
            if s is not None:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        if self.listener is not None:
            self.listener.close()
        if self.thread is not None:
            self.thread.join(10)
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass

    # --- faults -------------------------------------------------------------

    def hold(self, command, nth=1, seconds=None):
        with self.lock:
            self.rules.append([command, nth, seconds])

    def wait_held(self, timeout=30):
        end = time.monotonic() + timeout
        while self.held is None:
            if time.monotonic() > end:
                raise TimeoutError("no answer was held")
            time.sleep(0.02)
        return self.held

    def release(self):
        with self.lock:
            self.held = None
            self.free.set()

    def _rule(self, command):
        """The seconds of a rule that holds this call (0: until released),
        or None."""
        with self.lock:
            for r in self.rules:
                if r[0] == command:
                    r[1] -= 1
                    if r[1] == 0:
                        self.rules.remove(r)
                        return r[2] or 0
                    return None
        return None

    # --- serving --------------------------------------------------------------

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conn = conn
            try:
                _Client(self, conn).run()
            except OSError:
                pass
            finally:
                self.conn = None
                _close(conn)


def _close(sock):
    """Closes a socket now, whatever file objects still refer to it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Client:
    """One client, with a connection of its own to QEMU's monitor."""

    def __init__(self, proxy, conn):
        self.proxy = proxy
        self.conn = conn
        self.gone = threading.Event()
        self.send_lock = threading.Lock()
        self.commands = queue.Queue()
        self.answers = queue.Queue()

    def send(self, line):
        if self.gone.is_set():
            return
        with self.send_lock:
            try:
                self.conn.sendall(line)
            except OSError:
                self.gone.set()

    def _read_client(self):
        try:
            for line in self.conn.makefile("rb"):
                self.commands.put(line)
        except OSError:
            pass
        self.gone.set()
        self.commands.put(None)

    def _read_qemu(self, up):
        try:
            for line in up.makefile("rb"):
                try:
                    msg = json.loads(line)
                except ValueError:
                    msg = {}
                if "event" in msg:
                    self.send(line)
                else:
                    self.answers.put(line)
        except OSError:                 # QEMU went away
            pass
        self.answers.put(None)

    def _wait_free(self):
        """Until no answer is held: False if the client went meanwhile."""
        p = self.proxy
        while not p.free.wait(0.05):
            if self.gone.is_set() or p.stopping:
                return False
        return not self.gone.is_set()

    def run(self):
        p = self.proxy
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.settimeout(p.timeout)
        up.connect(p.upstream_path)
        try:
            greeting = up.makefile("rb").readline()
            up.settimeout(None)
            self.send(greeting)
            threading.Thread(target=self._read_client, daemon=True).start()
            threading.Thread(target=self._read_qemu, args=(up,),
                             daemon=True).start()
            self._commands(up)
        finally:
            _close(up)

    def _commands(self, up):
        p = self.proxy
        while True:
            line = self.commands.get()
            if line is None or not self._wait_free():
                return
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {}
            command = msg.get("execute") if isinstance(msg, dict) else None
            if command:
                p.calls.append((command, msg.get("arguments", {})))
            up.sendall(line)
            answer = self.answers.get()
            if answer is None:
                return
            seconds = p._rule(command) if command else None
            if seconds is not None:
                self._hold(command, seconds)
            self.send(answer)

    def _hold(self, command, seconds):
        p = self.proxy
        with p.lock:
            p.held = command
            p.free.clear()
        if seconds:
            threading.Timer(seconds, p.release).start()
        # Held until released; the client may go meanwhile (its answer
        # is then lost, as with QEMU).
        while not p.free.wait(0.05) and not p.stopping:
            if self.gone.is_set():
                return
