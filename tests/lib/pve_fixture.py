"""Test fixture: a stand-in for Proxmox VE's QEMU backup-access QMP API.

Proxmox VE patches QEMU (pve-qemu) with QMP commands for external backup
providers: `query-proxmox-support` reports `backup-access-api`, and
`backup-access-setup` / `backup-access-teardown` build and remove the
copy-before-write + fleecing + snapshot-access graph of every disk of a
running VM.  Those patches cannot be installed here.  This module is a
FIXTURE that stands in for them, built on real, unpatched QEMU 7.2
(qemu-storage-daemon) underneath:

PveQmpProxy
    A QMP server on a unix socket.  It implements the Proxmox commands
    itself, with plain upstream QMP commands on a real
    qemu-storage-daemon, and forwards every other command to that daemon
    unchanged.  A client (vzdump, or the helper under test) cannot tell
    it from the monitor socket of a Proxmox VM, except where noted below.

PveVm
    A qemu-storage-daemon playing a VM: one qcow2 node per disk, named
    like Proxmox's drives ("drive-scsi0"), the guest writing to each
    through a FUSE export (a file), and a PveQmpProxy in front of it.

What is emulated, and how (see PveQmpProxy for the details):

    query-proxmox-support   {"backup-access-api": true, ...}
    query-qmp-schema        QEMU's schema + backup-access-setup/teardown,
                            in the "devices" form (pve-qemu >= 9.2.0-4)
                            or the older "devlist" form (api=...)
    backup-access-setup     ONE transaction: per device freeze the dirty
                            bitmap (frozen copy) and start a
                            `blockdev-backup sync=none` job whose
                            copy-before-write filter ("<device>-cbw")
                            slides in above the device node atomically;
                            then blockdev-add snapshot-access over it.
    backup-access-teardown  refuses while a snapshot-access node is still
                            exported; cancels the jobs (the filter goes),
                            deletes the snapshot-access nodes, and drops
                            the frozen bitmap (success) or merges it back
                            into the live one (failure).

Known differences from real Proxmox VE (deliberate, or impossible on
upstream QEMU 7.2):
  - The copy-before-write filter comes from blockdev-backup, which in 7.2
    takes no bitmap with sync=none: the whole snapshot stays readable even
    for an incremental backup, and the filter copies every first write
    (Proxmox's filter probably only copies, and only allows reads of, the
    bitmap's dirty regions; the readable-set behaviour is what
    qemu_fixture.Fleecing tests).  Its on-cbw-error is QEMU's default
    (break-guest-write), not break-snapshot.
  - The dirty bitmaps are in memory only (like Proxmox's), 4 MiB granular.
  - The backup jobs are internal: their JOB_STATUS_CHANGE / BLOCK_JOB_*
    events are not passed to clients, but they show in query-block-jobs
    (id "pvefixture-job-N") and the filter node in query-named-block-nodes.
  - The greeting offers no "oob" capability.
  - Argument errors use upstream QEMU's wording ("Parameter 'devlist' is
    unexpected", "Parameter 'devices' is missing", ...); bitmap-mode is
    optional (default none).

Every class here is a context manager that stops and removes everything
it started, also when a test fails.  Use /usr/bin/python3 (the nbd
module); stdlib only otherwise.
"""
import codecs
import itertools
import json
import os
import queue
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import nbd

from qemu_fixture import (QMP, QMPError, Started, start_qsd, stop_process,
                          wait_for)

__all__ = ["PveQmpProxy", "PveVm", "QmpCommandError", "BITMAP_ACTIONS"]

BITMAP_ACTIONS = ["not-used", "not-used-removed", "new", "used", "invalid",
                  "missing-recreated"]
BITMAP_MODES = ["none", "new", "use"]
INTERNAL_PREFIX = "pvefixture-"


class QmpCommandError(QMPError):
    """A QMP error reply: .cls (e.g. "GenericError") and .desc."""

    def __init__(self, desc, cls="GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


# --- QAPI-like argument checking ----------------------------------------
#
# A type is "str", "int", "bool", ("enum", [values]), ("array", type) or
# ("object", [(member, type, required), ...]).  The messages are upstream
# QEMU 7.2's (qobject-input-visitor): members are visited in order (so a
# missing one is reported before an unexpected one), nested names look
# like "devices[0].device".

_JSON_TYPE = {"str": "string", "int": "integer", "bool": "boolean"}


def _check(value, typ, name):
    if isinstance(typ, tuple) and typ[0] == "object":
        if not isinstance(value, dict):
            raise QmpCommandError("Invalid parameter type for '%s', "
                                  "expected: object" % name)
        out = {}
        for member, mtype, required in typ[1]:
            full = member if not name else "%s.%s" % (name, member)
            if member not in value:
                if required:
                    raise QmpCommandError("Parameter '%s' is missing" % full)
                continue
            out[member] = _check(value[member], mtype, full)
        known = {m[0] for m in typ[1]}
        for member in value:
            if member not in known:
                full = member if not name else "%s.%s" % (name, member)
                raise QmpCommandError("Parameter '%s' is unexpected" % full)
        return out
    if isinstance(typ, tuple) and typ[0] == "array":
        if not isinstance(value, list):
            raise QmpCommandError("Invalid parameter type for '%s', "
                                  "expected: array" % name)
        return [_check(v, typ[1], "%s[%d]" % (name, i))
                for i, v in enumerate(value)]
    if isinstance(typ, tuple) and typ[0] == "enum":
        if not isinstance(value, str):
            raise QmpCommandError("Invalid parameter type for '%s', "
                                  "expected: string" % name)
        if value not in typ[1]:
            raise QmpCommandError("Parameter '%s' does not accept value "
                                  "'%s'" % (name, value))
        return value
    ok = {"str": lambda v: isinstance(v, str),
          "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool)}[typ]
    if not ok(value):
        raise QmpCommandError("Invalid parameter type for '%s', expected: %s"
                              % (name, _JSON_TYPE[typ]))
    return value


SETUP_DEVICES_ARGS = ("object", [
    ("target-id", "str", True),
    ("devices", ("array", ("object", [
        ("device", "str", True),
        ("bitmap-mode", ("enum", BITMAP_MODES), False)])), True)])
SETUP_DEVLIST_ARGS = ("object", [
    ("target-id", "str", True),
    ("devlist", "str", True),
    ("bitmap-name", "str", False),
    ("timeout", "int", False)])
TEARDOWN_ARGS = ("object", [("target-id", "str", True),
                            ("success", "bool", True)])
NO_ARGS = ("object", [])


# --- the connection to the real QEMU -------------------------------------

class _Upstream:
    """A QMP connection to qemu-storage-daemon with a reader thread:
    replies go to whoever waits for them, events to on_event(msg)."""

    def __init__(self, path, on_event, timeout=60):
        self.timeout = timeout
        self.on_event = on_event
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.rfile = self.sock.makefile("rb")
        self.greeting = json.loads(self.rfile.readline())
        self.sock.settimeout(None)
        self.lock = threading.Lock()          # one command at a time
        self.cond = threading.Condition()
        self.replies = {}
        self.closed = False
        self.ids = itertools.count(1)
        self.reader = threading.Thread(target=self._read_loop, daemon=True,
                                       name="pve-fixture-upstream")
        self.reader.start()
        self.call("qmp_capabilities")

    def _read_loop(self):
        try:
            for line in self.rfile:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if "event" in msg:
                    try:
                        self.on_event(msg)
                    except Exception:
                        pass
                    continue
                with self.cond:
                    self.replies[msg.get("id")] = msg
                    self.cond.notify_all()
        except (OSError, ValueError):
            pass
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def call_raw(self, command, arguments=None):
        """The reply, {"return": ...} or {"error": ...}, as QEMU sent it
        (without our id)."""
        with self.lock:
            cid = "%sq%d" % (INTERNAL_PREFIX, next(self.ids))
            msg = {"execute": command, "id": cid}
            if arguments is not None:
                msg["arguments"] = arguments
            try:
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as e:
                raise QmpCommandError("fixture: connection to "
                                      "qemu-storage-daemon lost: %s" % e)
            end = time.monotonic() + self.timeout
            with self.cond:
                while cid not in self.replies:
                    left = end - time.monotonic()
                    if self.closed:
                        raise QmpCommandError("fixture: connection to "
                                              "qemu-storage-daemon lost")
                    if left <= 0:
                        raise QmpCommandError("fixture: no reply from "
                                              "qemu-storage-daemon to %s"
                                              % command)
                    self.cond.wait(left)
                reply = self.replies.pop(cid)
        reply.pop("id", None)
        return reply

    def call(self, command, /, **args):
        r = self.call_raw(command, args or None)
        if "error" in r:
            raise QmpCommandError(r["error"].get("desc", "?"),
                                  r["error"].get("class", "GenericError"))
        return r["return"]

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.reader.join(5)


# --- the proxy -------------------------------------------------------------

class _Device:
    """What one device of an active backup-access target consists of."""

    def __init__(self, device, size, job, cbw, sa, live, frozen, action,
                 exported):
        self.device = device
        self.size = size
        self.job = job              # blockdev-backup job id
        self.cbw = cbw              # its copy-before-write filter node
        self.sa = sa                # snapshot-access node
        self.live = live            # live bitmap name, or None
        self.frozen = frozen        # frozen copy, or None (mode none)
        self.action = action        # bitmap-action, or None
        self.exported = exported    # frozen copy returned as bitmap-name
        self.sa_added = False
        self.job_gone = False
        self.bitmap_done = frozen is None


def _frozen_copy(device, frozen, gran, source):
    """Transaction actions: a disabled bitmap `frozen` on device holding a
    copy of source (a bitmap name, or {node, name} elsewhere)."""
    return [("block-dirty-bitmap-add",
             {"node": device, "name": frozen, "granularity": gran,
              "persistent": False}),
            ("block-dirty-bitmap-merge",
             {"node": device, "target": frozen, "bitmaps": [source]}),
            ("block-dirty-bitmap-disable",
             {"node": device, "name": frozen})]


class PveQmpProxy(Started):
    """FIXTURE standing in for Proxmox VE's QEMU backup-access QMP API
    (pve-qemu patches), on a real qemu-storage-daemon.

    PveQmpProxy(real_qmp_path, listen_path, api="devices", *,
                tmpdir=None, bitmap_granularity=4 MiB,
                export_new_bitmaps=False, timeout=60)

    real_qmp_path: the daemon's QMP socket (a monitor of its own: the
        proxy keeps one connection open for its whole life).
    listen_path: the unix socket clients connect to.  Clients are served
        one at a time (the next waits in the backlog), in a thread.  QMP as
        QEMU speaks it: greeting, qmp_capabilities, then commands, "id"
        passed through, QEMU's events passed on.
    api: "devices" (current form):
            backup-access-setup {target-id, devices: [{device,
                                 bitmap-mode?: none|new|use}]}
         "devlist" (older form):
            backup-access-setup {target-id, devlist: "dev1,dev2",
                                 bitmap-name?, timeout?}
         Both: backup-access-teardown {target-id, success}.
    bitmap_granularity: of the bitmaps the fixture creates.
    export_new_bitmaps: for a full backup (bitmap-action new, invalid,
        missing-recreated) also return the frozen copy, which is then fully
        dirty, as bitmap-name (what Proxmox's own Perl expects: it wants a
        bitmap-name with every bitmap-action).  Default: not returned.
    tmpdir: for scratch files (default: a private temporary directory).

    Devices are node names in the daemon.  Each needs a node
    "<device>-fleecing" of the same size (the caller blockdev-adds it: a
    qcow2 with discard: unmap).  Per device the setup makes the nodes
    "<device>-cbw" (filter) and "<device>-snapshot-access" and the job
    "pvefixture-job-N"; the live bitmap is named after the target-id
    (devices form) or bitmap-name (devlist form), its frozen copy
    "<bitmap>-frozen".

    Bitmap modes (devlist form: bitmap-name given = "use" for every
    device, absent = "none" without any bitmap-action):
        none  bitmap removed if it exists ("not-used-removed"), else
              "not-used" (reported only in the first case); no freeze.
        new   bitmap (re)created: "new"; full backup.
        use   exists and records: "used", incremental (frozen copy
              exported); exists but disabled/inconsistent: recreated,
              "invalid"; missing: created, "missing-recreated" (devlist
              form: "new", the only action the older Perl knows).
    Full backups also get a frozen copy, fully dirty, so that a failed
    full backup (teardown success=false) leaves the live bitmap fully
    dirty: nothing is lost.

    Returns [{node-name, device, size, bitmap-node-name?, bitmap-name?,
    bitmap-action?}].  Errors are GenericError with nothing changed.

    Besides the socket: execute(command, arguments=None) runs one command
    as a client would (raises QmpCommandError), targets() returns the
    active target ids.
    """

    def __init__(self, real_qmp_path, listen_path, api="devices", *,
                 tmpdir=None, bitmap_granularity=4 << 20,
                 export_new_bitmaps=False, timeout=60):
        if api not in ("devices", "devlist"):
            raise ValueError("api must be 'devices' or 'devlist'")
        self.real_qmp_path = real_qmp_path
        self.listen_path = listen_path
        self.api = api
        self.granularity = bitmap_granularity
        self.export_new_bitmaps = export_new_bitmaps
        self.timeout = timeout
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir
        self.up = None
        self.listener = None
        self.thread = None
        self.stopping = False
        self.exec_lock = threading.Lock()    # one command at a time
        self.state_lock = threading.Lock()
        self.active = {}                     # target-id -> [_Device]
        self.client_q = None                 # outbound queue of the client
        self.client_sock = None
        self.n = itertools.count(1)
        # (command, arguments, ok) of every command run, in order
        self.calls = []

    # --- life cycle -----------------------------------------------------

    def start(self):
        if self.tmp is None:
            self.tmp = tempfile.mkdtemp(prefix="pve-fixture.")
        self.up = _Upstream(self.real_qmp_path, self._on_event,
                            self.timeout)
        if os.path.exists(self.listen_path):
            os.unlink(self.listen_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.listen_path)
        self.listener.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True,
                                       name="pve-fixture-proxy")
        self.thread.start()

    def stop(self, teardown=True):
        """Stop serving.  teardown: best effort backup-access-teardown
        (success=false) of targets still active, errors ignored."""
        self.stopping = True
        if self.listener is not None:
            try:
                self.listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.listener.close()
        sock = self.client_sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.thread is not None:
            self.thread.join(10)
            self.thread = None
        if self.up is not None:
            if teardown:
                for target in list(self.active):
                    try:
                        self.execute("backup-access-teardown",
                                     {"target-id": target, "success": False})
                    except Exception:
                        pass
            self.up.close()
            self.up = None
        if self.listener is not None:
            self.listener = None
            try:
                os.unlink(self.listen_path)
            except OSError:
                pass
        if self.own_tmp and self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def targets(self):
        with self.state_lock:
            return sorted(self.active)

    # --- serving clients ------------------------------------------------

    def _on_event(self, msg):
        data = msg.get("data") or {}
        for key in ("id", "device", "job-id"):
            v = data.get(key)
            if isinstance(v, str) and v.startswith(INTERNAL_PREFIX):
                return                       # our own jobs' events
        q = self.client_q
        if q is not None:
            if q.qsize() > 1000:             # a client that never reads
                return
            q.put(msg)

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                self._client(conn)
            except Exception:
                pass
            finally:
                try:
                    conn.close()
                except OSError:
                    pass

    def _writer(self, conn, q):
        while True:
            msg = q.get()
            if msg is None:
                return
            try:
                conn.sendall(json.dumps(msg).encode() + b"\r\n")
            except OSError:
                return

    def _client(self, conn):
        out = queue.Queue()
        writer = threading.Thread(target=self._writer, args=(conn, out),
                                  daemon=True, name="pve-fixture-writer")
        writer.start()
        self.client_sock = conn
        version = self.up.greeting.get("QMP", {}).get("version", {})
        out.put({"QMP": {"version": version, "capabilities": []}})
        negotiated = False
        buf = ""
        dec = json.JSONDecoder()
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while not self.stopping:
                try:
                    data = conn.recv(65536)
                except OSError:
                    break
                if not data:
                    break
                buf += utf8.decode(data)
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        msg, end = dec.raw_decode(buf)
                    except json.JSONDecodeError as e:
                        if (e.msg.startswith("Unterminated string") or
                                e.pos >= len(buf)):
                            break            # incomplete: wait for more
                        out.put({"error": {
                            "class": "GenericError",
                            "desc": "JSON parse error, %s" % e.msg}})
                        nl = buf.find("\n", e.pos)
                        buf = "" if nl < 0 else buf[nl + 1:]
                        continue
                    buf = buf[end:]
                    reply, negotiated = self._one(msg, negotiated, out)
                    if reply is not None:
                        out.put(reply)
        finally:
            self.client_q = None
            self.client_sock = None
            out.put(None)
            writer.join(5)

    def _one(self, msg, negotiated, out):
        """(reply, negotiated) for one message from the client."""
        def err(desc, cls="GenericError"):
            r = {"error": {"class": cls, "desc": desc}}
            if isinstance(msg, dict) and "id" in msg:
                r["id"] = msg["id"]
            return r

        if not isinstance(msg, dict):
            return err("QMP input must be a JSON object"), negotiated
        for k in msg:
            if k not in ("execute", "arguments", "id"):
                return err("QMP input member '%s' is unexpected" % k), \
                    negotiated
        if "execute" not in msg:
            return err("QMP input lacks member 'execute'"), negotiated
        command = msg["execute"]
        if not isinstance(command, str):
            return err("QMP input member 'execute' must be a string"), \
                negotiated
        args = msg.get("arguments", {})
        if not isinstance(args, dict):
            return err("QMP input member 'arguments' must be an object"), \
                negotiated
        if not negotiated:
            if command != "qmp_capabilities":
                return err("Expecting capabilities negotiation with "
                           "'qmp_capabilities'", "CommandNotFound"), False
            if args.get("enable"):
                return err("Capability '%s' not available"
                           % (args["enable"],)), False
            self.client_q = out
            r = {"return": {}}
        elif command == "qmp_capabilities":
            return err("Capabilities negotiation is already complete, "
                       "command ignored", "CommandNotFound"), True
        else:
            r = self._dispatch(command, msg.get("arguments"))
        if "id" in msg:
            r["id"] = msg["id"]
        return r, True

    # --- commands ---------------------------------------------------------

    def execute(self, command, arguments=None):
        """Run one command as if a client had sent it: returns what the
        client would get as "return", raises QmpCommandError.  Commands
        the fixture does not implement go to the daemon."""
        r = self._dispatch(command, arguments)
        if "error" in r:
            raise QmpCommandError(r["error"].get("desc", "?"),
                                  r["error"].get("class", "GenericError"))
        return r["return"]

    def _dispatch(self, command, arguments):
        """The reply to one command: {"return": ...} or {"error": ...}."""
        handler = {
            "query-proxmox-support": self._query_proxmox_support,
            "query-qmp-schema": self._query_qmp_schema,
            "backup-access-setup": self._setup,
            "backup-access-teardown": self._teardown,
        }.get(command)
        with self.exec_lock:
            try:
                if handler is None:
                    r = self.up.call_raw(command, arguments)
                else:
                    r = {"return": handler(arguments or {})}
            except QmpCommandError as e:
                r = {"error": {"class": e.cls, "desc": e.desc}}
            except Exception as e:          # a bug in the fixture
                r = {"error": {"class": "GenericError",
                               "desc": "fixture internal error: %r" % e}}
            self.calls.append((command, arguments, "error" not in r))
        return r

    def _query_proxmox_support(self, args):
        _check(args, NO_ARGS, "")
        return {"backup-access-api": True, "pbs-dirty-bitmap": True,
                "backup-fleecing": True, "pbs-library-version": "fixture"}

    def _query_qmp_schema(self, args):
        _check(args, NO_ARGS, "")
        schema = self.up.call("query-qmp-schema")
        names = {e["name"] for e in schema}
        nums = [int(n) for n in names if n.isdigit()]
        counter = itertools.count(max(nums, default=0) + 1)

        def new():
            while True:
                n = str(next(counter))
                if n not in names:
                    names.add(n)
                    return n

        def member(name, typ, optional=False):
            m = {"name": name, "type": typ}
            if optional:
                m["default"] = None
            return m

        def enum(values):
            n = new()
            schema.append({"name": n, "meta-type": "enum", "values": values,
                           "members": [{"name": v} for v in values]})
            return n

        def obj(members):
            n = new()
            schema.append({"name": n, "meta-type": "object",
                           "members": members})
            return n

        def array(elem):
            n = "[%s]" % elem
            if n not in names:
                names.add(n)
                schema.append({"name": n, "meta-type": "array",
                               "element-type": elem})
            return n

        def command(name, arg_type, ret_type):
            schema.append({"name": name, "meta-type": "command",
                           "arg-type": arg_type, "ret-type": ret_type,
                           "allow-oob": False})

        empty = next((e["name"] for e in schema if e["meta-type"] == "object"
                      and e["members"] == [] and "tag" not in e
                      and "variants" not in e), None) or obj([])
        if self.api == "devices":
            mode = enum(BITMAP_MODES)
            dev = obj([member("device", "str"),
                       member("bitmap-mode", mode, True)])
            setup_args = obj([member("target-id", "str"),
                              member("devices", array(dev))])
        else:
            setup_args = obj([member("target-id", "str"),
                              member("devlist", "str"),
                              member("bitmap-name", "str", True),
                              member("timeout", "int", True)])
        info = obj([member("node-name", "str"), member("device", "str"),
                    member("size", "int"),
                    member("bitmap-node-name", "str", True),
                    member("bitmap-name", "str", True),
                    member("bitmap-action", enum(BITMAP_ACTIONS), True)])
        command("backup-access-setup", setup_args, array(info))
        command("backup-access-teardown",
                obj([member("target-id", "str"), member("success", "bool")]),
                empty)
        support = obj([member("backup-access-api", "bool"),
                       member("pbs-dirty-bitmap", "bool"),
                       member("backup-fleecing", "bool"),
                       member("pbs-library-version", "str")])
        command("query-proxmox-support", empty, support)
        return schema

    # --- backup-access-setup --------------------------------------------

    def _nodes(self):
        return {n["node-name"]: n for n in
                self.up.call("query-named-block-nodes", flat=True)}

    def _setup(self, args):
        if self.api == "devices":
            a = _check(args, SETUP_DEVICES_ARGS, "")
            wanted = [(d["device"], d.get("bitmap-mode", "none"),
                       a["target-id"]) for d in a["devices"]]
        else:
            a = _check(args, SETUP_DEVLIST_ARGS, "")
            names = a["devlist"].split(",")
            if any(not n for n in names):
                raise QmpCommandError("empty device name in devlist '%s'"
                                      % a["devlist"])
            bm = a.get("bitmap-name")
            wanted = [(n, "use" if bm else "none", bm) for n in names]
        target = a["target-id"]
        with self.state_lock:
            if target in self.active:
                raise QmpCommandError("backup access target '%s' is already "
                                      "set up" % target)
            busy = {d.device: t for t, devs in self.active.items()
                    for d in devs}
        if not wanted:
            raise QmpCommandError("no devices given")

        nodes = self._nodes()
        seen = set()
        plan = []
        for device, mode, bitmap in wanted:
            if device in seen:
                raise QmpCommandError("device '%s' given twice" % device)
            seen.add(device)
            if device in busy:
                raise QmpCommandError("device '%s' is in use by backup access"
                                      " target '%s'" % (device, busy[device]))
            if device not in nodes:
                raise QmpCommandError("device '%s' not found" % device)
            fleecing = device + "-fleecing"
            if fleecing not in nodes:
                raise QmpCommandError("fleecing node '%s' not found"
                                      % fleecing)
            size = nodes[device]["image"]["virtual-size"]
            fsize = nodes[fleecing]["image"]["virtual-size"]
            if fsize != size:
                raise QmpCommandError(
                    "fleecing node '%s' has size %d, device '%s' has size %d"
                    % (fleecing, fsize, device, size))
            for suffix in ("-cbw", "-snapshot-access"):
                if device + suffix in nodes:
                    raise QmpCommandError("node '%s' already exists"
                                          % (device + suffix))
            bitmaps = {b["name"]: b for b in
                       nodes[device].get("dirty-bitmaps") or []
                       if "name" in b}
            plan.append((device, mode, bitmap, size, bitmaps))

        actions = []        # the transaction
        devices = []        # _Device per device, in order
        fills = {}          # size -> node with a fully dirty bitmap "all"
        removals = []       # inconsistent bitmaps: removed first
        try:
            for device, mode, bitmap, size, bitmaps in plan:
                old = bitmaps.get(bitmap) if bitmap else None
                pre_remove = []
                frozen = None
                action = None
                exported = False
                gran = self.granularity
                if mode == "none":
                    if old is not None:
                        action = "not-used-removed"
                        actions.append(("block-dirty-bitmap-remove",
                                        {"node": device, "name": bitmap}))
                    elif self.api == "devices":
                        action = None       # nothing requested, nothing done
                    bitmap = None
                else:
                    frozen = bitmap + "-frozen"
                    if frozen in bitmaps:
                        raise QmpCommandError(
                            "bitmap '%s' already exists on node '%s'"
                            % (frozen, device))
                    healthy = (old is not None and old.get("recording")
                               and not old.get("inconsistent")
                               and not old.get("busy"))
                    if mode == "use" and healthy:
                        action = "used"
                        gran = old["granularity"]
                        exported = True
                        actions += _frozen_copy(device, frozen, gran, bitmap)
                        actions.append(("block-dirty-bitmap-clear",
                                        {"node": device, "name": bitmap}))
                    else:
                        if mode == "new":
                            action = "new"
                        elif old is not None:
                            action = "invalid"
                        else:
                            action = ("missing-recreated"
                                      if self.api == "devices" else "new")
                        if old is not None and old.get("busy"):
                            raise QmpCommandError(
                                "bitmap '%s' on node '%s' is busy"
                                % (bitmap, device))
                        # (A remove and an add of the same name cannot
                        # share a transaction: the removal is only final
                        # at commit.)
                        if old is not None and old.get("inconsistent"):
                            pre_remove.append(bitmap)
                            old = None
                        if old is None:
                            actions.append((
                                "block-dirty-bitmap-add",
                                {"node": device, "name": bitmap,
                                 "granularity": gran, "persistent": False}))
                        else:
                            gran = old["granularity"]
                            actions.append(("block-dirty-bitmap-clear",
                                            {"node": device, "name": bitmap}))
                            if not old.get("recording"):
                                actions.append((
                                    "block-dirty-bitmap-enable",
                                    {"node": device, "name": bitmap}))
                        if size not in fills:
                            fills[size] = self._fill_node(size)
                        actions += _frozen_copy(
                            device, frozen, gran,
                            {"node": fills[size], "name": "all"})
                        exported = self.export_new_bitmaps
                job = "%sjob-%d" % (INTERNAL_PREFIX, next(self.n))
                actions.append(("blockdev-backup", {
                    "job-id": job, "device": device,
                    "target": device + "-fleecing", "sync": "none",
                    "filter-node-name": device + "-cbw"}))
                devices.append(_Device(device, size, job, device + "-cbw",
                                       device + "-snapshot-access", bitmap,
                                       frozen, action, exported))
                removals += [(device, b) for b in pre_remove]

            for device, name in removals:
                self.up.call("block-dirty-bitmap-remove", node=device,
                             name=name)
            self.up.call("transaction", actions=[
                {"type": t, "data": d} for t, d in actions])
        finally:
            for node in fills.values():
                self._drop_fill(node)

        try:
            for d in devices:
                self.up.call("blockdev-add", **{
                    "driver": "snapshot-access", "node-name": d.sa,
                    "file": d.cbw, "discard": "unmap"})
                d.sa_added = True
        except QmpCommandError:
            # Undo as a failed backup would: nothing is lost.
            try:
                self._undo(devices, success=False)
            except QmpCommandError:
                pass
            raise

        with self.state_lock:
            self.active[target] = devices
        result = []
        for d in devices:
            info = {"node-name": d.sa, "device": d.device, "size": d.size}
            if d.exported:
                info["bitmap-node-name"] = d.device
                info["bitmap-name"] = d.frozen
            if d.action is not None:
                info["bitmap-action"] = d.action
            result.append(info)
        return result

    def _fill_node(self, size):
        """A read-only node whose bitmap "all" is dirty everywhere (QMP has
        no command to fill a bitmap): qemu-io discards all of an empty
        qcow2 with an enabled bitmap, which marks it and allocates nothing.
        """
        n = next(self.n)
        path = os.path.join(self.tmp, "fill-%d.qcow2" % n)
        node = "%sfill-%d" % (INTERNAL_PREFIX, n)
        try:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            "cluster_size=2M", path, str(size)],
                           check=True, capture_output=True, timeout=60)
            subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(1 << 30),
                            path, "all"],
                           check=True, capture_output=True, timeout=60)
            chunk = 1 << 30
            cmds = []
            for off in range(0, size, chunk):
                cmds += ["-c", "discard %d %d" % (off, min(chunk, size - off))]
            for i in range(0, len(cmds), 4096):
                subprocess.run(["qemu-io", "-f", "qcow2"] + cmds[i:i + 4096]
                               + [path], check=True, capture_output=True,
                               timeout=120)
            self.up.call("blockdev-add", **{
                "driver": "qcow2", "node-name": node, "read-only": True,
                "file": {"driver": "file", "filename": path,
                         "read-only": True}})
        except (subprocess.SubprocessError, OSError) as e:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise QmpCommandError("fixture: cannot make a full bitmap: %s"
                                  % e)
        except QmpCommandError:
            try:
                os.unlink(path)
            except OSError:
                pass
            raise
        return node

    def _drop_fill(self, node):
        try:
            self.up.call("blockdev-del", **{"node-name": node})
        except QmpCommandError:
            pass
        path = os.path.join(self.tmp, node[len(INTERNAL_PREFIX):] + ".qcow2")
        try:
            os.unlink(path)
        except OSError:
            pass

    # --- backup-access-teardown -----------------------------------------

    def _teardown(self, args):
        a = _check(args, TEARDOWN_ARGS, "")
        target = a["target-id"]
        with self.state_lock:
            devices = self.active.get(target)
        if devices is None:
            return {}                        # idempotent, like Proxmox
        sa_nodes = {d.sa for d in devices if d.sa_added}
        for e in self.up.call("query-block-exports"):
            if e.get("node-name") in sa_nodes:
                raise QmpCommandError(
                    "node '%s' is still exported (export '%s'): remove the "
                    "exports (block-export-del, nbd-server-stop) before "
                    "backup-access-teardown" % (e["node-name"], e["id"]))
        self._undo(devices, a["success"])
        with self.state_lock:
            self.active.pop(target, None)
        return {}

    def _undo(self, devices, success):
        """Snapshot-access nodes, then the jobs (their filters go with
        them), then the bitmaps.  Resumable: a retry continues."""
        for d in devices:
            if d.sa_added:
                self.up.call("blockdev-del", **{"node-name": d.sa})
                d.sa_added = False
        jobs = [d for d in devices if not d.job_gone]
        running = {j["device"] for j in self.up.call("query-block-jobs")}
        for d in jobs:
            if d.job in running:
                try:
                    self.up.call("block-job-cancel", device=d.job, force=True)
                except QmpCommandError:
                    pass
        end = time.monotonic() + self.timeout
        while True:
            running = {j["device"] for j in self.up.call("query-block-jobs")}
            if not any(d.job in running for d in jobs):
                break
            if time.monotonic() > end:
                raise QmpCommandError("fixture: backup jobs did not end")
            time.sleep(0.02)
        for d in jobs:
            d.job_gone = True
        for d in devices:
            if d.bitmap_done:
                continue
            if not success:
                self.up.call("block-dirty-bitmap-merge", node=d.device,
                             target=d.live, bitmaps=[d.frozen])
            self.up.call("block-dirty-bitmap-remove", node=d.device,
                         name=d.frozen)
            d.bitmap_done = True


# --- a VM -----------------------------------------------------------------

class PveVm(Started):
    """FIXTURE: a qemu-storage-daemon standing in for a Proxmox VE VM's
    QEMU, with the backup-access API of Proxmox's patches emulated by a
    PveQmpProxy in front of it.

    PveVm(size=64 MiB, devices=("drive-scsi0",), api="devices", *,
          tmpdir=None, guest_nbd=False, fleecing=False,
          fleecing_cluster=65536, bitmap_granularity=4 MiB,
          export_new_bitmaps=False)

    devices: node names of the disks, all `size` bytes; or a dict
        {name: size}.  Each is an empty qcow2 (discard: unmap).
    The guest writes through a FUSE export of each disk node (export id
        "guest-<device>", a file in tmp): after backup-access-setup these
        writes go through copy-before-write, like a VM's.  No NBD server is
        started, so that the helper under test can start its own (QEMU 7.2
        allows one).  guest_nbd=True starts one on nbd_path with a
        writable export "guest" of the first device instead of its FUSE
        export (in QEMU 7.2 the two conflict over the "resize"
        permission); guest_write/disk_read then use it, and
        nbd-server-start fails for everyone else.
    fleecing=True: add_fleecing() for every device at start.
    api, bitmap_granularity, export_new_bitmaps: see PveQmpProxy.

    Attributes:
        tmp           the temporary directory (removed at the end unless
                      given)
        qmp_path      the VM's QMP socket (the proxy): what the helper
                      under test connects to
        real_qmp_path the daemon's own socket, used by the proxy
        qmp           a QMP (qemu_fixture) connection of the fixture's own
                      to the daemon, on a third socket, not the proxy
        proxy         the PveQmpProxy
        sizes         {device: size}
        device        the first device's name
        nbd_path      the guest NBD socket (guest_nbd=True only)

    Methods:
        connect()                          QMP client to qmp_path
        guest_write(offset, data, device=None)    write as the guest
        disk_read(offset, count, device=None)     what the guest sees now
        guest_path(device=None)            the FUSE file of a disk
        add_fleecing(device=None, cluster_size=None)
                                           qcow2 "<device>-fleecing"
        del_fleecing(device=None)
        fleecing_allocated(device=None)    bytes allocated in its image
        bitmaps(device=None)               {name: query info} of a node
        node_names(), block_jobs(), exports()
        alive(), qsd_log(), stop()
    device=None means the first device; for add/del_fleecing all of them.
    """

    def __init__(self, size=64 << 20, devices=("drive-scsi0",),
                 api="devices", *, tmpdir=None, guest_nbd=False,
                 fleecing=False, fleecing_cluster=65536,
                 bitmap_granularity=4 << 20, export_new_bitmaps=False):
        if isinstance(devices, dict):
            self.sizes = dict(devices)
        else:
            self.sizes = {d: size for d in devices}
        if not self.sizes:
            raise ValueError("no devices")
        self.device = next(iter(self.sizes))
        self.api = api
        self.guest_nbd = guest_nbd
        self.fleecing_at_start = fleecing
        self.fleecing_cluster = fleecing_cluster
        self.proxy_opts = {"bitmap_granularity": bitmap_granularity,
                           "export_new_bitmaps": export_new_bitmaps}
        self.own_tmp = tmpdir is None
        self.tmp = tmpdir or tempfile.mkdtemp(prefix="pve-fixture-vm.")
        os.makedirs(self.tmp, exist_ok=True)
        self.qmp_path = os.path.join(self.tmp, "vm.qmp")
        self.real_qmp_path = os.path.join(self.tmp, "qsd-proxy.qmp")
        self.own_qmp_path = os.path.join(self.tmp, "qsd-fixture.qmp")
        self.nbd_path = os.path.join(self.tmp, "guest-nbd.sock")
        self.proc = None
        self.log = None
        self.qmp = None
        self.proxy = None
        self.fds = {}
        self.mounts = []
        self.fuse_exports = []
        self.nbd_guest = None

    # --- life cycle -----------------------------------------------------

    def start(self):
        for dev, size in self.sizes.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                            self._disk(dev), str(size)], check=True,
                           timeout=60)
        self.log = open(os.path.join(self.tmp, "qsd.log"), "w")
        self.proc = start_qsd([self.real_qmp_path, self.own_qmp_path],
                              self.log)
        self.qmp = QMP(self.own_qmp_path)
        for dev in self.sizes:
            self.qmp.cmd("blockdev-add", **{
                "driver": "qcow2", "node-name": dev, "discard": "unmap",
                "file": {"driver": "file", "filename": self._disk(dev)}})
            if self.guest_nbd and dev == self.device:
                continue
            mnt = self.guest_path(dev)
            open(mnt, "w").close()
            self.qmp.cmd("block-export-add", type="fuse", id="guest-" + dev,
                         **{"node-name": dev}, mountpoint=mnt,
                         writable=True)
            self.mounts.append(mnt)
            self.fuse_exports.append("guest-" + dev)
            self.fds[dev] = os.open(mnt, os.O_RDWR)
        if self.guest_nbd:
            self.qmp.cmd("nbd-server-start", addr={
                "type": "unix", "data": {"path": self.nbd_path}})
            self.qmp.cmd("block-export-add", type="nbd", id="guest",
                         **{"node-name": self.device}, name="guest",
                         writable=True)
            h = nbd.NBD()
            h.set_export_name("guest")
            h.connect_unix(self.nbd_path)
            self.nbd_guest = h
        if self.fleecing_at_start:
            self.add_fleecing()
        self.proxy = PveQmpProxy(self.real_qmp_path, self.qmp_path,
                                 self.api, tmpdir=self.tmp,
                                 **self.proxy_opts)
        self.proxy.start()

    def stop(self):
        if self.proxy is not None:
            try:
                self.proxy.stop(teardown=False)
            except Exception:
                pass
            self.proxy = None
        if self.nbd_guest is not None:
            try:
                self.nbd_guest.shutdown()
            except Exception:
                pass
            self.nbd_guest = None
        for fd in self.fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = {}
        if self.qmp is not None:
            try:
                self.qmp.sock.settimeout(5)
                for export_id in self.fuse_exports:
                    try:
                        self.qmp.cmd("block-export-del", id=export_id)
                    except QMPError:
                        pass
            except Exception:
                pass
            try:
                self.qmp.close()
            except Exception:
                pass
            self.qmp = None
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
        if self.log is not None:
            self.log.close()
            self.log = None
        self._unmount_all()
        if self.own_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _unmount_all(self):
        """Lazy-unmounts whatever FUSE mount of ours is left (a daemon
        that died leaves a dead one behind)."""
        if not self.mounts:
            return
        try:
            with open("/proc/self/mounts") as f:
                mounted = {line.split()[1] for line in f}
        except OSError:
            mounted = set(self.mounts)
        for mnt in self.mounts:
            if mnt in mounted:
                for cmd in (["umount", "-l", mnt],
                            ["fusermount3", "-u", "-z", mnt],
                            ["fusermount", "-u", "-z", mnt]):
                    try:
                        if subprocess.run(cmd, capture_output=True,
                                          timeout=10).returncode == 0:
                            break
                    except (OSError, subprocess.SubprocessError):
                        pass
        self.mounts = []

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def qsd_log(self):
        with open(os.path.join(self.tmp, "qsd.log")) as f:
            return f.read()

    def connect(self, timeout=30):
        """A QMP client (qemu_fixture.QMP) on the VM's socket, through the
        proxy.  One client at a time: close() it before the next one (or
        before the helper under test) can talk."""
        return QMP(self.qmp_path, timeout)

    # --- disks and the guest ----------------------------------------------

    def _dev(self, device):
        return self.device if device is None else device

    def _disk(self, device):
        return os.path.join(self.tmp, "%s.qcow2" % device)

    def guest_path(self, device=None):
        return os.path.join(self.tmp, "guest-%s.img" % self._dev(device))

    def guest_write(self, offset, data, device=None):
        """Writes as the guest would (through the FUSE export: through
        copy-before-write while a backup is set up), then flushes."""
        if self._dev(device) not in self.fds:
            h = self.nbd_guest
            for i in range(0, len(data), 32 << 20):
                h.pwrite(data[i:i + (32 << 20)], offset + i)
            h.flush()
            return
        fd = self.fds[self._dev(device)]
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:done + (8 << 20)], offset + done)
        os.fsync(fd)

    def disk_read(self, offset, count, device=None):
        """What the guest sees now."""
        if self._dev(device) not in self.fds:
            h = self.nbd_guest
            return b"".join(bytes(h.pread(min(count - i, 32 << 20),
                                          offset + i))
                            for i in range(0, count, 32 << 20))
        fd = self.fds[self._dev(device)]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while len(out) < count:
            b = os.pread(fd, min(count - len(out), 8 << 20),
                         offset + len(out))
            if not b:
                raise OSError("short read at %d" % (offset + len(out)))
            out += b
        return bytes(out)

    def _devs(self, device):
        return list(self.sizes) if device is None else [device]

    def fleecing_path(self, device=None):
        return os.path.join(self.tmp, "%s-fleecing.qcow2" % self._dev(device))

    def add_fleecing(self, device=None, cluster_size=None):
        """Creates and blockdev-adds "<device>-fleecing" (qcow2, same size,
        discard: unmap), as vzdump does before backup-access-setup."""
        for dev in self._devs(device):
            path = self.fleecing_path(dev)
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                            "cluster_size=%d" % (cluster_size or
                                                 self.fleecing_cluster),
                            path, str(self.sizes[dev])], check=True,
                           timeout=60)
            self.qmp.cmd("blockdev-add", **{
                "driver": "qcow2", "node-name": dev + "-fleecing",
                "discard": "unmap",
                "file": {"driver": "file", "filename": path,
                         "discard": "unmap"}})

    def del_fleecing(self, device=None):
        for dev in self._devs(device):
            self.qmp.cmd("blockdev-del", **{"node-name": dev + "-fleecing"})
            os.unlink(self.fleecing_path(dev))

    def fleecing_allocated(self, device=None):
        """Bytes allocated in the fleecing image now."""
        return os.stat(self.fleecing_path(device)).st_blocks * 512

    def nodes(self):
        return {n["node-name"]: n for n in
                self.qmp.cmd("query-named-block-nodes", flat=True)}

    def node_names(self):
        return set(self.nodes())

    def bitmaps(self, device=None):
        node = self.nodes()[self._dev(device)]
        return {b["name"]: b for b in node.get("dirty-bitmaps") or []
                if "name" in b}

    def block_jobs(self):
        return self.qmp.cmd("query-block-jobs")

    def exports(self):
        return self.qmp.cmd("query-block-exports")
