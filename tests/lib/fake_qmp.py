# SPDX-License-Identifier: BSD-3-Clause
"""A scripted QMP peer on a unix socket, for tests of how the helper
copes with a QMP server it cannot trust: one that never answers, answers
without end, sends huge or malformed replies, or wrong data.

    with FakeQmp(path, handler) as peer:
        ...
        peer.calls      [(command, arguments)] in the order received

handler(peer, conn, command, arguments) is called for every command but
qmp_capabilities (always answered {}); it answers with peer.reply(conn,
value) or peer.error(conn, desc), sends raw bytes with peer.send(conn,
data), or returns without a word.  peer.stopping tells a handler that
loops to stop.  greeting=False never greets.  stdlib only.
"""
import json
import os
import socket
import threading

GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2,
                                         "micro": 0}, "package": ""},
                    "capabilities": []}}


class FakeQmp:
    def __init__(self, path, handler, greeting=True):
        self.path = path
        self.handler = handler
        self.greeting = greeting
        self.calls = []
        self.stopping = False
        self.sock = None
        self.conns = []
        self.threads = []

    def __enter__(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(self.path)
        self.sock.listen(4)
        self.sock.settimeout(0.1)       # so that accept sees stopping
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def __exit__(self, *exc):
        self.stopping = True
        self.sock.close()
        for c in list(self.conns):
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self.threads:
            t.join(10)
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self):
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.conns.append(conn)
            t = threading.Thread(target=self._client, args=(conn,),
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def send(self, conn, data):
        """Sends bytes; False once the client has gone."""
        try:
            conn.sendall(data)
            return True
        except OSError:
            return False

    def reply(self, conn, value):
        return self.send(conn, json.dumps({"return": value}).encode() + b"\n")

    def error(self, conn, desc):
        return self.send(conn, json.dumps(
            {"error": {"class": "GenericError", "desc": desc}}).encode()
            + b"\n")

    def _client(self, conn):
        if self.greeting and not self.send(
                conn, json.dumps(GREETING).encode() + b"\n"):
            return
        buf = b""
        while not self.stopping:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                msg = json.loads(line)
                cmd, args = msg.get("execute"), msg.get("arguments", {})
                self.calls.append((cmd, args))
                if cmd == "qmp_capabilities":
                    self.reply(conn, {})
                else:
                    self.handler(self, conn, cmd, args)
