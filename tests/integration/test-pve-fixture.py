#!/usr/bin/python3
"""Self-test of tests/lib/pve_fixture.py: the FIXTURE that stands in for
Proxmox VE's patched QEMU (backup-access-setup/-teardown,
query-proxmox-support) on a real qemu-storage-daemon.

Only the fixture, plain QMP (through the fixture's socket, as a client of
a Proxmox VM would talk), libnbd and nbdinfo: no project binary.  Checks,
for both forms of the API ("devices" and the older "devlist"):
  - detection through query-proxmox-support and query-qmp-schema;
  - full and incremental backups: the exported dirty bitmap shows exactly
    the written regions, the snapshot does not change while the guest
    (a FUSE export on the disk node) writes, the fleecing image grows;
  - teardown refuses while the snapshot is exported; success=false merges
    the frozen bitmap back, success=true keeps only the writes made during
    the backup;
  - errors: QEMU-like argument errors, a missing fleecing node (nothing
    changed), unknown targets are a no-op; QMP ids and events;
  - cleanup of processes, mounts and files, also after a failure.
Run with /usr/bin/python3 (the one with the nbd module).
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "lib"))
import nbd                                                  # noqa: E402
from pve_fixture import PveQmpProxy, PveVm                  # noqa: E402
from qemu_fixture import QMP, QMPError, wait_for            # noqa: E402

M = 1 << 20
SIZE = 64 * M
GRAN = 4 * M                      # the fixture's bitmap granularity
TARGET = "snapshot-access:teststore"
rng = random.Random(20240611)


class TestFailure(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise TestFailure(msg)


def on_alarm(signum, frame):
    raise TimeoutError("test-pve-fixture took too long")


# --- helpers: QMP, NBD -------------------------------------------------------

def detect_api(q):
    """What a client does: find backup-access-setup in the schema and look
    at the members of its argument type."""
    support = q.cmd("query-proxmox-support")
    check(support.get("backup-access-api") is True,
          "query-proxmox-support: %r" % support)
    schema = {e["name"]: e for e in q.cmd("query-qmp-schema")}
    check("blockdev-backup" in schema, "the real schema is not included")
    for name in ("backup-access-setup", "backup-access-teardown"):
        check(schema.get(name, {}).get("meta-type") == "command",
              "%s not in the schema" % name)
    args = schema[schema["backup-access-setup"]["arg-type"]]
    check(args["meta-type"] == "object", "setup arg-type: %r" % args)
    members = {m["name"]: m for m in args["members"]}
    ret = schema[schema["backup-access-setup"]["ret-type"]]
    check(ret["meta-type"] == "array", "setup ret-type: %r" % ret)
    info = {m["name"] for m in schema[ret["element-type"]]["members"]}
    check({"node-name", "device", "size", "bitmap-name", "bitmap-node-name",
           "bitmap-action"} <= info, "info members: %r" % info)
    if "devices" in members:
        elem = schema[schema[members["devices"]["type"]]["element-type"]]
        em = {m["name"]: m for m in elem["members"]}
        check(em["device"]["type"] == "str", "device member: %r" % em)
        mode = schema[em["bitmap-mode"]["type"]]
        check(mode["meta-type"] == "enum" and
              mode["values"] == ["none", "new", "use"], "mode: %r" % mode)
        return "devices"
    check("devlist" in members and "bitmap-name" in members,
          "neither devices nor devlist: %r" % members)
    check("default" in members["bitmap-name"], "bitmap-name is optional")
    return "devlist"


def expect_error(q, substr, command, **args):
    try:
        r = q.cmd(command, **args)
    except QMPError as e:
        check(substr in str(e), "%s: expected an error with %r, got %r"
              % (command, substr, str(e)))
        return str(e)
    raise TestFailure("%s %r succeeded (%r), expected an error with %r"
                      % (command, args, r, substr))


def setup(q, api, devices, modes=None, bitmap_name=None):
    if api == "devices":
        devs = []
        for i, d in enumerate(devices):
            e = {"device": d}
            if modes is not None:
                e["bitmap-mode"] = modes[i] if isinstance(modes, list) \
                    else modes
            devs.append(e)
        return q.cmd("backup-access-setup",
                     **{"target-id": TARGET, "devices": devs})
    args = {"target-id": TARGET, "devlist": ",".join(devices)}
    if bitmap_name:
        args["bitmap-name"] = bitmap_name
    return q.cmd("backup-access-setup", **args)


def teardown(q, success):
    return q.cmd("backup-access-teardown",
                 **{"target-id": TARGET, "success": success})


def export(q, vm, infos):
    """As vzdump does: nbd-server-start, one export per device (id and
    name = device, writable, the bitmap if one is returned)."""
    sock = os.path.join(vm.tmp, "backup-nbd.sock")
    q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    for info in infos:
        e = {"type": "nbd", "id": info["device"],
             "node-name": info["node-name"], "name": info["device"],
             "writable": True}
        if info.get("bitmap-name"):
            e["bitmaps"] = [{"node": info["bitmap-node-name"],
                             "name": info["bitmap-name"]}]
        q.cmd("block-export-add", **e)
    return sock


def unexport(q, infos):
    for info in infos:
        q.cmd("block-export-del", id=info["device"])
    wait_for(lambda: not any(e["id"] in {i["device"] for i in infos}
                             for e in q.cmd("query-block-exports")),
             "the exports to go")
    q.cmd("nbd-server-stop")


def uri(sock, name):
    return "nbd+unix:///%s?socket=%s" % (name, sock)


def dirty_map(sock, info):
    out = subprocess.run(
        ["nbdinfo", "--map=qemu:dirty-bitmap:" + info["bitmap-name"],
         uri(sock, info["device"])], check=True, capture_output=True,
        text=True, timeout=30).stdout
    regions = []
    for line in out.splitlines():
        if not line.strip():
            continue
        off, length, typ = (int(x) for x in line.split()[:3])
        if typ & 1:
            regions.append((off, off + length))
    return merge(regions)


def merge(ranges):
    out = []
    for s, e in sorted(r for r in ranges if r[1] > r[0]):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(e, out[-1][1]))
        else:
            out.append((s, e))
    return out


def expected(writes, size=SIZE):
    """The dirty regions `writes` [(offset, length)] leave behind."""
    return merge((o // GRAN * GRAN, min(size, -(-(o + n) // GRAN) * GRAN))
                 for o, n in writes)


def read_export(sock, name, size):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(sock)
    try:
        return b"".join(bytes(h.pread(min(16 * M, size - o), o))
                        for o in range(0, size, 16 * M))
    finally:
        h.shutdown()


def guest_writes(vm, writes, device=None):
    for off, n in writes:
        vm.guest_write(off, rng.randbytes(n), device)


def check_graph_clean(vm, devices):
    names = vm.node_names()
    for d in devices:
        check(d in names and d + "-fleecing" in names,
              "device or fleecing node gone: %r" % names)
        for suffix in ("-cbw", "-snapshot-access"):
            check(d + suffix not in names, "%s left behind" % (d + suffix))
        check(not [b for b in vm.bitmaps(d) if b.endswith("-frozen")],
              "frozen bitmap left on %s: %r" % (d, vm.bitmaps(d)))
        for e in vm.exports():
            if e["id"] == "guest-" + d:
                check(e["node-name"] == d, "guest export still on %r"
                      % e["node-name"])
    check(vm.block_jobs() == [], "jobs left: %r" % vm.block_jobs())
    check(vm.proxy.targets() == [], "targets left: %r" % vm.proxy.targets())


# --- the tests ---------------------------------------------------------------

def test_devices_incremental():
    """api="devices": full backup, then incrementals across a failed and a
    successful backup."""
    with PveVm(SIZE, fleecing=True) as vm:
        dev = vm.device
        vm.guest_write(0, rng.randbytes(SIZE))
        q = vm.connect()
        check(detect_api(q) == "devices", "api not detected as devices")

        # --- full backup (bitmap-mode new) -------------------------------
        at_setup = vm.disk_read(0, SIZE)
        infos = setup(q, "devices", [dev], "new")
        check(len(infos) == 1, "setup: %r" % infos)
        info = infos[0]
        check(info["device"] == dev and info["size"] == SIZE and
              info["node-name"] in vm.node_names() and
              info["bitmap-action"] == "new" and "bitmap-name" not in info,
              "full backup setup returned %r" % info)
        # The backup job put copy-before-write above the disk node: the
        # guest's export now goes through it.
        guest = [e for e in vm.exports() if e["id"] == "guest-" + dev]
        check(guest and guest[0]["node-name"] == dev + "-cbw",
              "the guest does not write through copy-before-write: %r"
              % vm.exports())
        expect_error(q, "already set up", "backup-access-setup",
                     **{"target-id": TARGET, "devices": [{"device": dev}]})
        sock = export(q, vm, infos)
        fleece0 = vm.fleecing_allocated()
        w1 = [(5 * M + 123, 1000), (33 * M, 2 * M)]
        guest_writes(vm, w1)
        check(vm.fleecing_allocated() > fleece0 + 2 * M,
              "the fleecing image did not grow: %d -> %d"
              % (fleece0, vm.fleecing_allocated()))
        check(read_export(sock, dev, SIZE) == at_setup,
              "the full snapshot changed with guest writes")
        check(vm.disk_read(33 * M, 4096) != at_setup[33 * M:33 * M + 4096],
              "the guest's write did not reach the disk")
        expect_error(q, "still exported", "backup-access-teardown",
                     **{"target-id": TARGET, "success": True})
        check(read_export(sock, dev, 1 * M) == at_setup[:1 * M],
              "the snapshot broke after a refused teardown")
        check(vm.proxy.targets() == [TARGET], "target lost")
        unexport(q, infos)
        check(teardown(q, True) == {}, "teardown result")
        check_graph_clean(vm, [dev])
        live = vm.bitmaps()[TARGET]
        check(live["count"] == sum(e - s for s, e in expected(w1)) and
              live["recording"], "live bitmap after the full backup: %r"
              % live)

        # --- incremental 1, fails ----------------------------------------
        w2 = [(20 * M, 64 * 1024), (40 * M - 10, 20)]
        guest_writes(vm, w2)
        at_setup = vm.disk_read(0, SIZE)
        infos = setup(q, "devices", [dev], "use")
        info = infos[0]
        check(info.get("bitmap-action") == "used" and
              info.get("bitmap-node-name") == dev and info.get("bitmap-name"),
              "incremental setup returned %r" % info)
        sock = export(q, vm, infos)
        check(dirty_map(sock, info) == expected(w1 + w2),
              "dirty map %r, expected %r" % (dirty_map(sock, info),
                                             expected(w1 + w2)))
        fleece0 = vm.fleecing_allocated()
        w3 = [(60 * M, 4 * M), (21 * M, 512)]
        guest_writes(vm, w3)
        check(vm.fleecing_allocated() > fleece0, "fleecing did not grow")
        check(read_export(sock, dev, SIZE) == at_setup,
              "the incremental snapshot changed with guest writes")
        check(dirty_map(sock, info) == expected(w1 + w2),
              "the exported (frozen) bitmap changed with guest writes")
        expect_error(q, "still exported", "backup-access-teardown",
                     **{"target-id": TARGET, "success": False})
        unexport(q, infos)
        teardown(q, False)
        check_graph_clean(vm, [dev])

        # --- incremental 2: still everything since the full backup -------
        infos = setup(q, "devices", [dev], "use")
        sock = export(q, vm, infos)
        check(dirty_map(sock, infos[0]) == expected(w1 + w2 + w3),
              "after a failed backup the bitmap lost regions: %r, expected %r"
              % (dirty_map(sock, infos[0]), expected(w1 + w2 + w3)))
        w4 = [(0, 1), (47 * M, 3)]
        guest_writes(vm, w4)
        unexport(q, infos)
        teardown(q, True)
        check_graph_clean(vm, [dev])

        # --- incremental 3: only the writes during incremental 2 ---------
        infos = setup(q, "devices", [dev], "use")
        sock = export(q, vm, infos)
        check(dirty_map(sock, infos[0]) == expected(w4),
              "after a successful backup: %r, expected %r"
              % (dirty_map(sock, infos[0]), expected(w4)))
        unexport(q, infos)
        teardown(q, True)

        # --- mode none removes the bitmap, use recreates it --------------
        infos = setup(q, "devices", [dev], "none")
        check(infos[0].get("bitmap-action") == "not-used-removed" and
              "bitmap-name" not in infos[0], "none: %r" % infos)
        check(TARGET not in vm.bitmaps(), "bitmap not removed")
        teardown(q, True)
        infos = setup(q, "devices", [dev])            # no bitmap-mode
        check("bitmap-action" not in infos[0] and
              "bitmap-name" not in infos[0], "none again: %r" % infos)
        teardown(q, False)
        infos = setup(q, "devices", [dev], "use")
        check(infos[0].get("bitmap-action") == "missing-recreated" and
              "bitmap-name" not in infos[0], "use, missing: %r" % infos)
        check(vm.bitmaps()[TARGET]["recording"], "bitmap not recreated")
        teardown(q, True)
        check_graph_clean(vm, [dev])

        # Events: QEMU's reach the client, the fixture's own jobs' do not.
        deleted = [e for e in q.events if e["event"] == "BLOCK_EXPORT_DELETED"
                   and e["data"]["id"] == dev]
        check(len(deleted) >= 4, "BLOCK_EXPORT_DELETED events: %r" % deleted)
        check(not [e for e in q.events if "pvefixture" in json.dumps(e)],
              "internal events leaked")
        q.close()
        check(vm.alive(), "qemu-storage-daemon died: " + vm.qsd_log())


def test_devlist():
    """api="devlist", two disks of different sizes."""
    sizes = {"drive-scsi0": 32 * M, "drive-virtio1": 16 * M}
    with PveVm(devices=sizes, api="devlist", fleecing=True) as vm:
        q = vm.connect()
        check(detect_api(q) == "devlist", "api not detected as devlist")
        expect_error(q, "Parameter 'devlist' is missing",
                     "backup-access-setup", **{
                         "target-id": TARGET,
                         "devices": [{"device": "drive-scsi0"}]})
        expect_error(q, "Parameter 'devices' is unexpected",
                     "backup-access-setup", **{
                         "target-id": TARGET, "devlist": "drive-scsi0",
                         "devices": []})
        devs = list(sizes)
        infos = setup(q, "devlist", devs)
        check([(i["device"], i["size"]) for i in infos] == list(sizes.items())
              and not any("bitmap-action" in i for i in infos),
              "devlist without a bitmap: %r" % infos)
        teardown(q, True)
        check_graph_clean(vm, devs)

        infos = setup(q, "devlist", devs, bitmap_name="teststore-bm")
        check([i.get("bitmap-action") for i in infos] == ["new", "new"],
              "first devlist backup with a bitmap: %r" % infos)
        teardown(q, True)
        writes = {"drive-scsi0": [(9 * M, 5)], "drive-virtio1": [(15 * M, M)]}
        for d, w in writes.items():
            guest_writes(vm, w, d)
        infos = setup(q, "devlist", devs, bitmap_name="teststore-bm")
        check([i.get("bitmap-action") for i in infos] == ["used", "used"],
              "second devlist backup: %r" % infos)
        sock = export(q, vm, infos)
        for info in infos:
            d = info["device"]
            check(dirty_map(sock, info) == expected(writes[d], sizes[d]),
                  "%s: dirty %r, expected %r" % (
                      d, dirty_map(sock, info), expected(writes[d], sizes[d])))
        unexport(q, infos)
        teardown(q, True)
        check_graph_clean(vm, devs)
        q.close()


def test_errors():
    """Argument errors like QEMU's, a missing fleecing node, unknown
    targets, QMP ids and forwarding."""
    with PveVm(SIZE) as vm:                  # no fleecing node yet
        dev = vm.device
        q = vm.connect()
        expect_error(q, "Parameter 'devices' is missing",
                     "backup-access-setup",
                     **{"target-id": TARGET, "devlist": dev})
        expect_error(q, "Parameter 'devlist' is unexpected",
                     "backup-access-setup",
                     **{"target-id": TARGET, "devices": [{"device": dev}],
                        "devlist": dev})
        expect_error(q, "Parameter 'devices[0].bitmap-mode' does not accept "
                     "value 'sometimes'", "backup-access-setup",
                     **{"target-id": TARGET, "devices": [
                         {"device": dev, "bitmap-mode": "sometimes"}]})
        expect_error(q, "Invalid parameter type for 'target-id', expected: "
                     "string", "backup-access-setup",
                     **{"target-id": 1, "devices": []})
        expect_error(q, "Parameter 'success' is missing",
                     "backup-access-teardown", **{"target-id": TARGET})

        # A bitmap from an earlier backup, then a setup that must fail.
        vm.qmp.cmd("block-dirty-bitmap-add", node=dev, name=TARGET,
                   granularity=GRAN)
        guest_writes(vm, [(M, 10)])
        before = (vm.node_names(), vm.bitmaps(), vm.block_jobs(),
                  vm.exports())
        for mode in ("use", "new", "none"):
            expect_error(q, "fleecing node '%s-fleecing' not found" % dev,
                         "backup-access-setup", **{
                             "target-id": TARGET,
                             "devices": [{"device": dev,
                                          "bitmap-mode": mode}]})
        expect_error(q, "device 'drive-nope' not found",
                     "backup-access-setup", **{
                         "target-id": TARGET,
                         "devices": [{"device": "drive-nope"}]})
        after = (vm.node_names(), vm.bitmaps(), vm.block_jobs(),
                 vm.exports())
        check(before == after, "a failed setup changed something:\n%r\n%r"
              % (before, after))
        check(vm.proxy.targets() == [], "a failed setup left a target")

        # Unknown target: a no-op, twice.
        check(teardown(q, False) == {} and teardown(q, True) == {},
              "teardown of an unknown target")
        check(before == (vm.node_names(), vm.bitmaps(), vm.block_jobs(),
                         vm.exports()), "teardown of nothing changed things")

        # With the fleecing node it works, and the old bitmap is used.
        vm.add_fleecing()
        infos = setup(q, "devices", [dev], "use")
        check(infos[0].get("bitmap-action") == "used", "%r" % infos)
        teardown(q, False)
        check(vm.bitmaps()[TARGET]["count"] == GRAN, "bitmap after failure")
        check_graph_clean(vm, [dev])
        # Fleecing node of the wrong size.
        vm.del_fleecing()
        vm.sizes[dev] = SIZE // 2
        vm.add_fleecing()
        vm.sizes[dev] = SIZE
        expect_error(q, "has size", "backup-access-setup",
                     **{"target-id": TARGET, "devices": [{"device": dev}]})
        q.close()

        # Raw QMP: greeting, negotiation, ids passed through, forwarding.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(vm.qmp_path)
        f = s.makefile("rwb")

        def send(obj):
            f.write(json.dumps(obj).encode() + b"\n")
            f.flush()
            while True:
                r = json.loads(f.readline())
                if "event" not in r:
                    return r
        greeting = json.loads(f.readline())
        check("version" in greeting.get("QMP", {}), "greeting %r" % greeting)
        r = send({"execute": "query-proxmox-support"})
        check(r.get("error", {}).get("class") == "CommandNotFound",
              "before qmp_capabilities: %r" % r)
        check(send({"execute": "qmp_capabilities", "id": 1}) ==
              {"return": {}, "id": 1}, "qmp_capabilities")
        r = send({"execute": "query-proxmox-support", "id": "a"})
        check(r.get("id") == "a" and r["return"]["backup-access-api"],
              "id on a fixture command: %r" % r)
        r = send({"execute": "query-block-jobs", "id": {"n": [2]}})
        check(r == {"return": [], "id": {"n": [2]}},
              "id on a forwarded command: %r" % r)
        r = send({"execute": "backup-access-teardown", "id": 3,
                  "arguments": {"target-id": 5, "success": True}})
        check(r.get("id") == 3 and r["error"]["class"] == "GenericError",
              "id on an error: %r" % r)
        r = send({"execute": "no-such-command", "id": 4})
        check(r.get("id") == 4 and
              r["error"]["class"] == "CommandNotFound", "unknown: %r" % r)
        # Two commands in one write, the second split over two writes.
        f.write(b'{"execute": "query-block-jobs", "id": 5}{"execute": "qu')
        f.flush()
        time.sleep(0.1)
        f.write(b'ery-proxmox-support", "id": 6}\n')
        f.flush()
        ids = [json.loads(f.readline()).get("id") for _ in range(2)]
        check(ids == [5, 6], "pipelined commands: %r" % ids)
        f.close()
        s.close()
        # The next client is served.
        q = vm.connect()
        q.cmd("query-proxmox-support")
        q.close()


def test_export_new_bitmaps():
    """export_new_bitmaps=True: a full backup exports a fully dirty bitmap;
    a failed one leaves the live bitmap fully dirty."""
    with PveVm(SIZE, fleecing=True, export_new_bitmaps=True) as vm:
        dev = vm.device
        q = vm.connect()
        infos = setup(q, "devices", [dev], "new")
        check(infos[0].get("bitmap-name") and
              infos[0].get("bitmap-action") == "new", "%r" % infos)
        sock = export(q, vm, infos)
        check(dirty_map(sock, infos[0]) == [(0, SIZE)], "not fully dirty")
        unexport(q, infos)
        teardown(q, False)
        infos = setup(q, "devices", [dev], "use")
        check(infos[0].get("bitmap-action") == "used", "%r" % infos)
        sock = export(q, vm, infos)
        check(dirty_map(sock, infos[0]) == [(0, SIZE)],
              "a failed full backup lost regions")
        w = [(13 * M, 7)]
        guest_writes(vm, w)
        unexport(q, infos)
        teardown(q, True)
        infos = setup(q, "devices", [dev], "use")
        sock = export(q, vm, infos)
        check(dirty_map(sock, infos[0]) == expected(w), "after success")
        unexport(q, infos)
        teardown(q, True)
        check_graph_clean(vm, [dev])
        q.close()


def test_standalone_proxy():
    """PveQmpProxy on its own, over a daemon the test started itself."""
    import tempfile
    with tempfile.TemporaryDirectory(prefix="pve-fixture-test.") as tmp:
        real = os.path.join(tmp, "qsd.qmp")
        listen = os.path.join(tmp, "proxy.qmp")
        qsd = subprocess.Popen(
            ["qemu-storage-daemon", "--chardev",
             "socket,id=m,path=%s,server=on,wait=off" % real,
             "--monitor", "chardev=m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: os.path.exists(real), "the QMP socket")
            with PveQmpProxy(real, listen, api="devlist") as proxy:
                q = QMP(listen)
                check(detect_api(q) == "devlist", "standalone: api")
                check(q.cmd("query-block-jobs") == [], "forwarding")
                q.close()
                check(proxy.execute("backup-access-teardown", {
                    "target-id": "x", "success": True}) == {},
                      "execute()")
                check(("query-block-jobs", None, True) in proxy.calls,
                      "calls: %r" % proxy.calls)
                scratch = proxy.tmp
            check(not os.path.exists(listen), "listen socket left")
            check(not os.path.exists(scratch), "scratch directory left")
        finally:
            qsd.terminate()
            qsd.wait(10)


def test_guest_nbd():
    """guest_nbd=True: the guest disk also over NBD (and then nobody else
    can start an NBD server)."""
    with PveVm(SIZE, guest_nbd=True, fleecing=True) as vm:
        data = rng.randbytes(M)
        vm.guest_write(7 * M, data)
        check(read_export(vm.nbd_path, "guest", SIZE)[7 * M:8 * M] == data,
              "the guest NBD export differs")
        q = vm.connect()
        expect_error(q, "already", "nbd-server-start", addr={
            "type": "unix",
            "data": {"path": os.path.join(vm.tmp, "x.sock")}})
        q.close()


def test_cleanup():
    """Everything goes, also when a test fails half-way or QEMU dies."""
    def mounted(path):
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == path for line in f)

    class Boom(Exception):
        pass

    for kill in (False, True):
        vm = PveVm(SIZE, fleecing=True)
        try:
            with vm:
                q = vm.connect()
                infos = setup(q, "devices", [vm.device], "new")
                export(q, vm, infos)
                check(mounted(vm.guest_path()), "no FUSE mount")
                if kill:
                    vm.proc.kill()
                    vm.proc.wait()
                raise Boom()
        except Boom:
            pass
        check(vm.proc is None, "qemu-storage-daemon not stopped")
        check(not mounted(vm.guest_path()), "FUSE mount left behind")
        check(not os.path.exists(vm.tmp), "temporary directory left")


def main():
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(55)
    start = time.monotonic()
    for t in (test_devices_incremental, test_devlist, test_errors,
              test_export_new_bitmaps, test_standalone_proxy, test_guest_nbd,
              test_cleanup):
        t0 = time.monotonic()
        try:
            t()
        except TestFailure as e:
            print("FAIL: %s: %s" % (t.__name__, e), file=sys.stderr)
            sys.exit(1)
        print("ok: %s (%.1fs)" % (t.__name__, time.monotonic() - t0))
    print("all passed in %.1fs" % (time.monotonic() - start))


if __name__ == "__main__":
    main()
