"""Migration by state between two hosts with the CLI (control/flows_file.py).

Four network namespaces::

    guest (the VM: eth0 10.0.2.15) --veth-- vmnic        [hostA, later hostB]
                                            up0 10.5.0.1 [hostA, later hostB]
                                             |
                                            veth
                                             |
                                            p0 10.5.0.2  [peer]

Relay A (`relaynat serve --interface vmnic`, a process in hostA) serves the guest; the
guest downloads from and uploads to a paced server in the peer namespace
(tests/support/paced_peer.py). Mid-transfer the VM moves, in the order a user must follow:

1. The uplink leaves hostA (`ip link set up0 netns hostB`; it arrives down): hostA
   has no route to the peer any more. A socket in repair mode is still a live TCP
   endpoint (its retransmission and delayed-ACK timers run and send with the socket's
   running clock, Linux 6.18): were the source still reachable, a late segment of it
   would reach the peer after the dump, carrying a TSval the target's restored clock
   is behind (PAWS would then drop the target's segments) or acknowledging data that
   is not in the document.
2. `ctl export` on A: the flows' state to a file; A lets the guest go.
3. The VM's NIC goes to hostB; the uplink comes up there with the same address (and
   MAC: the peer sees one host), the peer's traffic held (a tbf qdisc on p0) so that
   nothing reaches hostB before the sockets exist (else hostB answers with a RST). The
   uplink must be up for the import: connect() in repair mode looks up a route
   (ENETUNREACH without one).
4. Relay B starts in hostB with `--incoming`; `ctl import`; B serves the guest; the
   peer's hold ends.

Both transfers must end with equal sha256 and no error at either end.

tcpdump on p0 (in the peer namespace: it sees whichever host holds the other end)
checks what the peer saw: no RST at all; on each moved connection our TSvals never go
back across the move (PAWS, RFC 7323 §5, would drop them); the peer acknowledged data
that only relay B sent, and B data the peer sent only after the move. The hosts' own
TCP counters (/proc/net/snmp per namespace) show that neither sent a RST, A's held
sockets released silently included.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import parse_stats

from integration.test_flow_move import _flow
from relaynat.control.client import call

pytestmark = pytest.mark.integration

HOST_ADDR, PEER_ADDR = "10.5.0.1", "10.5.0.2"
SIZE = 24 << 20
#: The peer sends (and reads) 64 KiB per 10 ms: each transfer lasts 4 s or more, and the
#: move (about 1.5 s of process starts) happens about a second in.
CHUNK, PAUSE_S = 64 << 10, 0.01
M32 = 0xFFFFFFFF


def sh(*args: str, timeout: float = 20) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done.stdout


def ctl(sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--control-socket",
                           str(sock), *args], capture_output=True, text=True, timeout=30)


def ctl_ok(sock: Path, *args: str) -> str:
    done = ctl(sock, *args)
    assert done.returncode == 0, f"ctl {args}: {done.stderr}"
    return done.stdout


class Hosts:
    """The four namespaces and two veth pairs of the module docstring."""

    def __init__(self, workdir: Path) -> None:
        tag = f"{os.getpid() % 100000}{int(time.monotonic() * 1000) % 1000}"
        self.guest, self.a, self.b, self.peer = (f"rnm{x}{tag}" for x in "gabp")
        self.workdir = workdir
        self.procs: list[subprocess.Popen[str]] = []
        self.made: list[str] = []
        for ns in (self.guest, self.a, self.b, self.peer):
            sh("ip", "netns", "add", ns)
            self.made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # IPv4 only: no link-local chatter from the hosts' kernels on the links.
            self.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                     "net.ipv6.conf.default.disable_ipv6=1")
        sh("ip", "-n", self.a, "link", "add", "vmnic", "type", "veth", "peer", "name", "eth0",
           "netns", self.guest)
        sh("ip", "-n", self.a, "link", "add", "up0", "type", "veth", "peer", "name", "p0",
           "netns", self.peer)
        sh("ip", "-n", self.guest, "addr", "add", "10.0.2.15/24", "dev", "eth0")
        sh("ip", "-n", self.guest, "link", "set", "eth0", "up")
        sh("ip", "-n", self.guest, "route", "add", "default", "via", "10.0.2.2")
        sh("ip", "-n", self.peer, "addr", "add", f"{PEER_ADDR}/24", "dev", "p0")
        sh("ip", "-n", self.peer, "link", "set", "p0", "up")
        sh("ip", "-n", self.a, "link", "set", "vmnic", "up")
        sh("ip", "-n", self.a, "addr", "add", f"{HOST_ADDR}/24", "dev", "up0")
        sh("ip", "-n", self.a, "link", "set", "up0", "up")

    def run(self, ns: str, *args: str) -> str:
        return sh("ip", "netns", "exec", ns, *args)

    def popen(self, ns: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
        """A process in `ns`, in a session of its own: teardown ends its whole group
        (`timeout` does not pass a SIGKILL on to its child)."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *args], text=True,
                                start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def relay(self, ns: str, name: str, *options: str) -> tuple[subprocess.Popen[str], Path]:
        """`relaynat serve --interface vmnic` in `ns`; returns it and its control socket
        once it serves (or, with --incoming, waits for the import)."""
        sock, log = self.workdir / f"{name}.sock", self.workdir / f"{name}.log"
        with open(log, "w") as err:
            proc = self.popen(ns, sys.executable, "-m", "relaynat", "serve", "-4", "--interface",
                              "vmnic", "--control-socket", str(sock), "--stats", "--log-level",
                              "info", *options, stderr=err)
        ready = "waiting for `relaynat ctl import`" if "--incoming" in options else \
            "serving interface"
        deadline = time.monotonic() + 20
        while ready not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        return proc, sock

    def cut_uplink(self) -> None:
        """The uplink leaves hostA for hostB, where it arrives down: hostA loses the
        address and every route to the peer (its held sockets can send nothing), and
        the peer's frames find no carrier. Both directions are held."""
        sh("ip", "-n", self.a, "link", "set", "up0", "netns", self.b)

    def nic_to_b(self) -> None:
        """The VM's NIC arrives in hostB and goes up (relay B opens it)."""
        sh("ip", "-n", self.a, "link", "set", "vmnic", "netns", self.b)
        sh("ip", "-n", self.b, "link", "set", "vmnic", "up")

    def uplink_up_on_b(self) -> None:
        """The uplink up in hostB with the same address: the import needs its route
        (connect() in repair mode looks one up: ENETUNREACH). What the peer sends is
        dropped until `release_peer` (a 10-byte token bucket on p0), so nothing reaches
        hostB before the sockets exist. hostB knows the peer's MAC, as a host knows its
        neighbours; else its first segments would wait for ARP behind the hold."""
        mac = self.run(self.peer, "cat", "/sys/class/net/p0/address").strip()
        sh("ip", "netns", "exec", self.peer, "tc", "qdisc", "add", "dev", "p0", "root",
           "tbf", "rate", "8bit", "burst", "10", "limit", "1")
        sh("ip", "-n", self.b, "addr", "add", f"{HOST_ADDR}/24", "dev", "up0")
        sh("ip", "-n", self.b, "neigh", "replace", PEER_ADDR, "lladdr", mac, "dev", "up0",
           "nud", "stale")
        sh("ip", "-n", self.b, "link", "set", "up0", "up")

    def release_peer(self) -> None:
        sh("ip", "netns", "exec", self.peer, "tc", "qdisc", "del", "dev", "p0", "root")

    def out_rsts(self, ns: str) -> int:
        """RSTs the namespace's kernel sent (Tcp: OutRsts of /proc/net/snmp)."""
        lines = [line.split() for line in self.run(ns, "cat", "/proc/net/snmp").splitlines()
                 if line.startswith("Tcp:")]
        return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))["OutRsts"]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for ns in self.made:  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    made = Hosts(tmp_path)
    try:
        yield made
    finally:
        made.close()


class Capture:
    """tcpdump on p0 in the peer namespace, headers only, into a pcap file."""

    def __init__(self, hosts: Hosts) -> None:
        self.path = hosts.workdir / "peer.pcap"
        self.err = hosts.workdir / "tcpdump.err"
        with open(self.err, "w") as err:
            self.proc = hosts.popen(hosts.peer, "timeout", "60", "tcpdump", "-i", "p0", "-n",
                                    "-s", "128", "-B", "16384", "--immediate-mode", "-U", "-w",
                                    str(self.path), "tcp", stderr=err)
        deadline = time.monotonic() + 10
        while "listening on" not in self.err.read_text():
            assert self.proc.poll() is None and time.monotonic() < deadline, \
                self.err.read_text()
            time.sleep(0.02)

    def stop(self) -> list[Segment]:
        """Stop, check that the kernel dropped nothing, and return the TCP segments."""
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        report = self.err.read_text()
        assert "\n0 packets dropped by kernel" in report, report
        return read_pcap(self.path.read_bytes())


class Segment:
    """One captured TCP segment: what the assertions need of it."""

    def __init__(self, when: float, src: tuple[str, int], dst: tuple[str, int], seq: int,
                 ack: int, flags: int, length: int, tsval: int | None) -> None:
        self.when, self.src, self.dst, self.seq, self.ack = when, src, dst, seq, ack
        self.flags, self.length, self.tsval = flags, length, tsval

    @property
    def end(self) -> int:
        return (self.seq + self.length) & M32


RST, ACK = 0x04, 0x10


def read_pcap(raw: bytes) -> list[Segment]:
    """The IPv4 TCP segments of a pcap file (microsecond timestamps, Ethernet), parsed
    from the headers only (payload length from the IP header: the capture is cut)."""
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", raw)
    assert (magic, linktype) == (0xA1B2C3D4, 1)
    segments, off = [], 24
    while off + 16 <= len(raw):
        sec, usec, caplen, _ = struct.unpack_from("<IIII", raw, off)
        frame = raw[off + 16:off + 16 + caplen]
        off += 16 + caplen
        if frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack_from("!H", frame, 16)[0]
        tcp = 14 + ihl
        sport, dport, seq, ack, offset, flags = struct.unpack_from("!HHIIBB", frame, tcp)
        hdr = (offset >> 4) * 4
        segments.append(Segment(
            sec + usec / 1e6, (".".join(map(str, frame[26:30])), sport),
            (".".join(map(str, frame[30:34])), dport), seq, ack, flags, total - ihl - hdr,
            _tsval(frame[tcp + 20:tcp + hdr])))
    return segments


def _tsval(options: bytes) -> int | None:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break
        if kind == 8:
            return int(struct.unpack_from("!I", options, i + 2)[0])
        i += options[i + 1]
    return None


def _after(a: int, b: int) -> bool:
    """Sequence space (RFC 9293 §3.4): a is at or after b."""
    return (a - b) & M32 < 1 << 31


def _wait_flowing(sock: Path, count: int) -> None:
    """Until the relay has `count` established flows that carried data (bounded)."""
    deadline = time.monotonic() + 20
    while True:
        flows = json.loads(ctl_ok(sock, "--json", "flows"))["return"]["flows"]
        if sum(f["state"] == "established" and f["bytes_to_guest"] + f["bytes_from_guest"] > 0
               for f in flows) >= count:
            return
        assert time.monotonic() < deadline, flows
        time.sleep(0.05)


def test_transfers_survive_export_on_a_link_switch_and_import_on_b(
        hosts: Hosts, data_file: tuple[Path, str]) -> None:
    path, digest = data_file
    capture = Capture(hosts)
    peer = hosts.popen(hosts.peer, sys.executable, str(SUPPORT / "paced_peer.py"), str(path),
                       str(CHUNK), str(PAUSE_S), PEER_ADDR, "0", stdout=subprocess.PIPE)
    assert peer.stdout is not None
    down_port, up_port = json.loads(peer.stdout.readline())
    relay_a, sock_a = hosts.relay(hosts.a, "A")
    rsts_before = {ns: hosts.out_rsts(ns) for ns in (hosts.a, hosts.b, hosts.peer)}
    out = hosts.workdir / "downloaded"
    # `timeout`: a stuck transfer must not outlive the test.
    down = hosts.popen(hosts.guest, "timeout", "40", "socat", "-u",
                       f"TCP:{PEER_ADDR}:{down_port}", f"OPEN:{out},creat,trunc")
    up = hosts.popen(hosts.guest, "timeout", "40", "socat", "-u", f"OPEN:{path}",
                     f"TCP:{PEER_ADDR}:{up_port}")
    _wait_flowing(sock_a, 2)
    time.sleep(0.5)  # well into both transfers

    hosts.cut_uplink()
    doc_path = hosts.workdir / "flows.json"
    exported = ctl_ok(sock_a, "export", str(doc_path))
    hosts.nic_to_b()
    hosts.uplink_up_on_b()
    relay_b, sock_b = hosts.relay(hosts.b, "B", "--incoming")
    moved_at = time.time()  # A cannot send since the cut; B sends nothing before this
    imported = ctl_ok(sock_b, "import", str(doc_path))
    hosts.release_peer()

    assert down.wait(40) == 0 and up.wait(40) == 0
    assert peer.wait(40) == 0
    print(f"transfers ended {time.time() - moved_at:.1f} s after the import")
    reports = {r["kind"]: r for r in map(json.loads, peer.stdout.read().splitlines())}
    released = ctl_ok(sock_a, "release")
    assert ctl_ok(sock_a, "quit") == "the relay is exiting\n"
    assert relay_a.wait(10) == 0
    relay_b.send_signal(signal.SIGTERM)
    assert relay_b.wait(10) == 0
    segments = capture.stop()
    rsts_after = {ns: hosts.out_rsts(ns) for ns in (hosts.a, hosts.b, hosts.peer)}
    a_stats = parse_stats((hosts.workdir / "A.log").read_text())
    b_stats_log = parse_stats((hosts.workdir / "B.log").read_text())
    print(exported, imported, released, sep="")

    doc = json.loads(doc_path.read_text())
    assert len(doc["flows"]) == 2 and doc["not_moved"] == [], exported
    assert exported.startswith(f"exported 2 flows to {doc_path}"), exported
    assert imported.startswith(f"imported 2 flows from {doc_path}"), imported
    assert released == "released 2 held sockets silently\n"
    assert a_stats["tcp_flows_exported"] == b_stats_log["tcp_flows_imported"] == 2
    assert reports["down"] == {"kind": "down", "sent": SIZE, "error": None}
    assert reports["up"] == {"kind": "up", "length": SIZE, "sha256": digest, "error": None}
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert rsts_after == rsts_before
    assert not [s for s in segments if s.flags & RST], "a RST on the peer's link"

    for flow in doc["flows"]:
        local, far = tuple(flow["socket"]["local"]), tuple(flow["socket"]["peer"])
        assert local[0] == HOST_ADDR and far[0] == PEER_ADDR
        ours = [s for s in segments if (s.src, s.dst) == (local, far)]
        theirs = [s for s in segments if (s.src, s.dst) == (far, local)]
        before = [s for s in ours if s.when < moved_at]
        after = [s for s in ours if s.when >= moved_at]
        assert before and after, f"{local}: {len(before)} segments before the move, " \
                                 f"{len(after)} after"
        tsvals = [s.tsval for s in ours]
        assert None not in tsvals
        backwards = [(a.tsval, b.tsval, round(b.when - moved_at, 4))
                     for a, b in itertools.pairwise(ours)
                     if not _after(b.tsval, a.tsval)]  # type: ignore[arg-type]
        assert not backwards, f"{local}: TSval went back {backwards[:3]}"
        # The peer took what only relay B sent (upload), B what the peer sent only
        # after the move (download).
        sender, receiver = (ours, theirs) if far[1] == up_port else (theirs, ours)
        _assert_new_data_acked(sender, receiver, moved_at)


def _assert_new_data_acked(sender: list[Segment], receiver: list[Segment],
                           moved_at: float) -> None:
    """A data segment sent after `moved_at` past every byte sent before it, and a later
    ACK from the receiver covering it."""
    ends = [s.end for s in sender if s.length and s.when < moved_at]
    assert ends, "no data before the move"
    last = max(ends, key=lambda e: (e - ends[0]) & M32)
    new = next((s for s in sender if s.when >= moved_at and s.length and _after(s.seq, last)),
               None)
    assert new is not None, "no new data after the move"
    assert any(s.when >= new.when and s.flags & ACK and _after(s.ack, new.end)
               for s in receiver), f"{new.end} was never acknowledged"


def test_release_reset_resets_the_peer(hosts: Hosts) -> None:
    """`ctl release --reset`: the old behaviour, for flows that did not live on."""
    capture = Capture(hosts)
    # One connection that sends a line, then waits for whatever ends it.
    peer = hosts.popen(hosts.peer, sys.executable, str(GUESTS / "hello_then_wait_peer.py"),
                       PEER_ADDR, stdout=subprocess.PIPE)
    assert peer.stdout is not None
    port = int(peer.stdout.readline())
    _, sock_a = hosts.relay(hosts.a, "A")
    hosts.popen(hosts.guest, "timeout", "30", "socat", "-u", f"TCP:{PEER_ADDR}:{port}",
                "-", stdout=subprocess.DEVNULL)
    _wait_flowing(sock_a, 1)
    rsts_before = hosts.out_rsts(hosts.a)

    doc_path = hosts.workdir / "flows.json"
    exported = ctl_ok(sock_a, "export", str(doc_path))
    released = ctl_ok(sock_a, "release", "--reset")
    end = json.loads(peer.stdout.readline())
    segments = capture.stop()

    assert exported.startswith(f"exported 1 flows to {doc_path}"), exported
    assert released == "released 1 held sockets with a reset to each peer\n"
    assert end == "ConnectionResetError"
    assert hosts.out_rsts(hosts.a) == rsts_before + 1
    resets = [s for s in segments if s.flags & RST]
    assert [(s.src[0], s.dst) for s in resets] == [(HOST_ADDR, (PEER_ADDR, port))]
    assert ctl_ok(sock_a, "release") == "released 0 held sockets silently\n"


def test_ctl_refusals_name_the_problem_and_import_nothing(tmp_path: Path) -> None:
    """Bad documents, paths and option combinations are refused with what is wrong;
    a refused import leaves the relay without a flow, and `quit` ends it."""
    sock = tmp_path / "c.sock"
    log = tmp_path / "relay.log"
    with open(log, "w") as err:
        relay = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "-4", "--socket",
                                  str(tmp_path / "guest.sock"), "--control-socket", str(sock)],
                                 stderr=err)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert relay.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        doc = {"format": "relaynat-flows", "version": 1, "not_moved": [],
               "flows": [_flow(1, "127.0.0.1"), _flow(2, "127.0.0.1") | {"mss": 0}]}
        cases = {
            "field": (doc, "flows[1]: field mss: 0 is not in 1..65535; nothing imported"),
            "version": (doc | {"version": 3}, "relaynat-flows version 3 is not supported"),
            "json": ("{not json", "is not JSON"),
        }
        for name, (content, error) in cases.items():
            path = tmp_path / f"{name}.json"
            path.write_text(content if isinstance(content, str) else json.dumps(content))
            done = ctl(sock, "import", str(path))
            assert (done.returncode, done.stdout) == (1, ""), done
            assert error in done.stderr and str(path) in done.stderr, done.stderr
        for request, error in [
                ({"execute": "import_flows"}, "import_flows: missing argument 'file'"),
                ({"execute": "import_flows", "arguments": {"file": "flows.json"}},
                 "import_flows: 'flows.json' is not an absolute path"),
                ({"execute": "release_exported", "arguments": {"reset": 1}},
                 "release_exported: argument 'reset' must be true or false, not 1"),
                ({"execute": "quit", "arguments": {"now": True}},
                 "quit: unknown argument 'now' (known: none)")]:
            assert call(str(sock), request) == {"error": {"desc": error}}
        done = ctl(sock, "import", str(tmp_path / "missing.json"))
        assert done.returncode == 1 and "cannot read" in done.stderr, done.stderr
        done = ctl(sock, "export", str(tmp_path / "no-such-dir" / "flows.json"))
        assert done.returncode == 1 and "cannot create" in done.stderr, done.stderr
        assert json.loads(ctl_ok(sock, "--json", "flows"))["return"]["flows"] == []
        assert ctl_ok(sock, "quit") == "the relay is exiting\n"
        assert relay.wait(10) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    for options, error in [
            (("--socket", str(tmp_path / "g2.sock"), "--control-socket", str(sock)),
             "--incoming needs --interface or --fd"),
            (("--fd", "0"), "--incoming needs --control-socket")]:
        done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--incoming",
                               *options], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2 and error in done.stderr, done.stderr
