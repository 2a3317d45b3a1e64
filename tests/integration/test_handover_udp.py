"""UDP flows and ping sessions move in a handover to a new relay process (moving/handover.py),
their host sockets passed over SCM_RIGHTS as TCP's are.

The guest is an `InMemoryGuest` (the test plays it frame by frame), its relay in this
process; the new relay is a `relaynat serve --receive-handover` process, or, where the
test reads the new relay's timers, a `Relay` in this process. The peers are host sockets
on this namespace's loopback: a UDP echo server, a "resolver" on 127.0.0.1:53 (the
guest's DNS forwarding), a client of a UDP forward, and the kernel answering pings on
127.0.0.1 and ::1.

- Every kind of UDP flow (outbound, DNS forwarding, a forward's client) and a ping
  session of each family moves: the peers see the same host ports before and after
  (the sockets moved, nothing was opened anew), the new relay lists each flow with its
  byte counts going on from the old relay's, and no flow is left in `not_moved`.
- A moved flow keeps its idle time: it expires at the new relay when it would have at
  the old one, under the new relay's timeouts.
- A relay that does not take UDP flows over (one older than this) gets none: they are
  listed as not moved, with the reason.
- A refused document gives the UDP flows and ping sessions back: the old relay serves
  them on the same sockets; a corrupt record, or a descriptor that is not what its
  record says, is refused naming it.
- A namespace guest's UDP echo and ping every 10 ms go on across three `relaynat ctl
  handover`s of `relaynat run`, nothing lost, counts continued relay to relay.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python
from support.sysctl import ALL_GROUPS, ping_group_range

from integration.test_handover import _send_by_hand
from relaynat.config import RelayConfig
from relaynat.control.client import call
from relaynat.control.server import ControlServer
from relaynat.moving.handover import (
    HandoverError,
    Source,
    recv_document,
    recv_message,
    send_message,
)
from relaynat.moving.handover_receive import Receiver
from relaynat.relay import Relay
from relaynat.testing import InMemoryGuest, frames
from relaynat.testing.guest import Reply

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

ECHO_SPORT, DNS_SPORT, FORWARD_GUEST_PORT = 41000, 41053, 5353
PING_V4, PING_V6 = 0x4701, 0x4702


@pytest.fixture(autouse=True)
def _ping_sockets_allowed() -> Iterator[None]:
    """The relays answer the guest's pings through host ping sockets (host/icmp_relay.py)."""
    with ping_group_range(ALL_GROUPS):
        yield


@dataclass
class EchoServer:
    """A UDP server on `addr` answering each datagram with b"echo:" + it, recording who
    sent what."""

    addr: tuple[str, int]
    seen: list[tuple[bytes, tuple[str, int]]] = field(default_factory=list)
    sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> EchoServer:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(self.addr)
        # A receive that wakes now and then to see whether to stop: close() joins the
        # thread before it closes the socket, which closing under a blocked recvfrom
        # (it does not wake it) would turn into an EBADF at the thread's next send.
        self.sock.settimeout(0.1)
        self.addr = self.sock.getsockname()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        assert self.sock is not None
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except TimeoutError:
                continue
            self.seen.append((data, peer))
            self.sock.sendto(b"echo:" + data, peer)

    def senders(self) -> set[tuple[str, int]]:
        return {peer for _, peer in self.seen}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.sock is not None:
            self.sock.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer(("127.0.0.1", 0)).start()
    yield server
    server.close()


@pytest.fixture
def resolver() -> Iterator[EchoServer]:
    """The guest's DNS upstream (InMemoryGuest's relay forwards to 127.0.0.1:53)."""
    server = EchoServer(("127.0.0.1", 53)).start()
    yield server
    server.close()


def _receiver(tmp_path: Path, *options: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A `relaynat serve --receive-handover` process, waiting."""
    path = tmp_path / "b.handover"
    log = open(tmp_path / "b.log", "ab")  # noqa: SIM115  # the process keeps it
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--receive-handover",
                             str(path), "--stats", "--log-level", "info", *options],
                            stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 30
    while not path.exists():
        assert proc.poll() is None, (tmp_path / "b.log").read_text()
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)
    return proc, path


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _is_udp_to(port: int) -> Any:
    return lambda r: r.udp is not None and r.udp.dport == port


def _echo_reply(ident: int, v6: bool) -> Any:
    def match(r: Reply) -> bool:
        ip = r.ip
        if ip is None or ip.proto != (58 if v6 else 1) or len(ip.payload) < 8:
            return False
        kind, _code, _sum, got = struct.unpack_from("!BBHH", ip.payload)
        return kind == (129 if v6 else 0) and got == ident
    return match


class Conversations:
    """The guest's side of every flow the tests move, one round each per `round`."""

    def __init__(self, guest: InMemoryGuest, echo: EchoServer,
                 resolver: EchoServer | None = None,
                 forward_port: int | None = None) -> None:
        self.guest, self.echo, self.resolver = guest, echo, resolver
        self.forward_port = forward_port
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(5)
        #: The inbound flow's far end as the guest sees it (address, port), once known.
        self.inbound_far: tuple[bytes, int] | None = None

    async def round(self, tag: bytes, seq: int) -> None:
        g, a = self.guest, self.guest.addressing
        await g.send(frames.udp_datagram(a, False, ECHO_SPORT, self.echo.addr[1], tag))
        reply = await g.expect(_is_udp_to(ECHO_SPORT))
        assert reply.udp is not None and bytes(reply.udp.payload) == b"echo:" + tag
        if self.resolver is not None:
            await g.send(frames.udp_datagram(a, False, DNS_SPORT, 53, b"q-" + tag, dst=a.dns4))
            reply = await g.expect(_is_udp_to(DNS_SPORT))
            assert reply.udp is not None and bytes(reply.udp.payload) == b"echo:q-" + tag
            assert reply.udp.src == a.dns4 and reply.udp.sport == 53
        for ident, v6 in ((PING_V4, False), (PING_V6, True)):
            await g.send(frames.echo_request(a, v6, ident, seq, b"ping " + tag))
            await g.expect(_echo_reply(ident, v6))
        if self.forward_port is not None:
            await asyncio.to_thread(self.client.sendto, b"in-" + tag,
                                    ("127.0.0.1", self.forward_port))
            inbound = await g.expect(_is_udp_to(FORWARD_GUEST_PORT))
            assert inbound.udp is not None and bytes(inbound.udp.payload) == b"in-" + tag
            far = (inbound.udp.src, inbound.udp.sport)
            assert self.inbound_far in (None, far), "the forward's client became a new flow"
            self.inbound_far = far
            await g.send(frames.udp_datagram(a, False, FORWARD_GUEST_PORT, far[1],
                                             b"out-" + tag, dst=far[0]))
            data, server = await asyncio.to_thread(self.client.recvfrom, 100)
            assert data == b"out-" + tag and server[1] == self.forward_port

    def close(self) -> None:
        self.client.close()


def _by_protocol(flows: list[dict[str, Any]]) -> dict[tuple[str, int | None], dict[str, Any]]:
    """Flows by (protocol, guest port or ICMP identifier)."""
    return {(f["protocol"], f["guest"][1]): f for f in flows}


def _round_bytes(key: tuple[str, int | None], tag: bytes) -> tuple[int, int]:
    """What one `Conversations.round` carries on a flow: payload bytes (ICMP: message
    bytes) from the guest and to it."""
    return {("udp", ECHO_SPORT): (len(tag), len(b"echo:" + tag)),
            ("udp", DNS_SPORT): (len(b"q-" + tag), len(b"echo:q-" + tag)),
            ("udp", FORWARD_GUEST_PORT): (len(b"out-" + tag), len(b"in-" + tag)),
            ("icmp", PING_V4): (8 + len(b"ping " + tag),) * 2,
            ("icmp", PING_V6): (8 + len(b"ping " + tag),) * 2}[key]


def _sum(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def test_udp_flows_and_pings_move_with_their_sockets(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], echo: EchoServer,
        resolver: EchoServer) -> None:
    receiver, path = _receiver(tmp_path)
    procs.append(receiver)
    control = tmp_path / "control.sock"

    async def main() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]],
                              dict[str, int], dict[str, Any]]:
        async with InMemoryGuest() as guest:
            server = ControlServer(str(control))
            await server.start(guest.relay)
            forward = guest.relay.add_forward("udp", "127.0.0.1", 0, FORWARD_GUEST_PORT)
            talk = Conversations(guest, echo, resolver, forward.host_port)
            try:
                await talk.round(b"before", 1)
                before = [f.to_dict() for f in guest.relay.flows()]
                stats_before = guest.stats()
                senders = echo.senders() | resolver.senders()
                result = await Source(guest.relay, server).hand_over(str(path))
                # Before, UDP flows and ping sessions stayed, "not_moved", and ended here.
                assert result["not_moved"] == [], result
                guest.relay.close()  # the old relay's end: its copies of the sockets go
                await talk.round(b"after", 2)
                assert echo.senders() | resolver.senders() == senders, \
                    "a peer saw another host port: a socket was opened anew"
                after = await asyncio.to_thread(call, str(control), {"execute": "flows"})
                # Every client of the control socket reaches the new relay now, none the
                # old one's copy of the listener (it stopped accepting at the handover).
                answers = [await asyncio.to_thread(call, str(control), {"execute": "stats"})
                           for _ in range(10)]
                assert all(a["return"]["udp_flows"] == 3 for a in answers), answers
                stats = answers[-1]
            finally:
                talk.close()
            return result, before, after["return"]["flows"], stats_before, stats["return"]

    result, before, after, stats_before, stats_after = asyncio.run(main())
    assert (result["moved_tcp"], result["moved_udp"], result["moved_icmp"]) == (0, 3, 2)
    assert result["accepted"] == {"tcp": 0, "udp": 3, "icmp": 2,
                                  "relaynat": result["accepted"]["relaynat"]}
    was, now = _by_protocol(before), _by_protocol(after)
    assert set(was) == set(now) == {("udp", ECHO_SPORT), ("udp", DNS_SPORT),
                                    ("udp", FORWARD_GUEST_PORT), ("icmp", PING_V4),
                                    ("icmp", PING_V6)}, after
    for key, flow in now.items():
        old = was[key]
        # The same flow, going on: same ends and host peer, its counts those of one
        # round at the old relay, then of one more at the new one.
        assert (flow["direction"], flow["guest"], flow["far"], flow["host_peer"]) == (
            old["direction"], old["guest"], old["far"], old["host_peer"]), (old, flow)
        assert flow["state"] == ("answered" if key[0] == "udp" else "open")
        counts = [(old["bytes_from_guest"], old["bytes_to_guest"]),
                  (flow["bytes_from_guest"], flow["bytes_to_guest"])]
        assert counts == [_round_bytes(key, b"before"),
                          _sum(_round_bytes(key, b"before"), _round_bytes(key, b"after"))]
    # Nothing was opened anew at the new relay; its counters go on from the old one's.
    for counter in ("udp_flows_opened", "udp_inbound_opened", "icmp_sockets_opened"):
        assert stats_after[counter] == stats_before[counter], counter
    assert stats_after["udp_flows"] == 3 and stats_after["icmp_sockets"] == 2, stats_after
    assert stats_after["udp_to_guest"] > stats_before["udp_to_guest"]
    assert receiver.wait(timeout=10) == 0  # it served until the guest's link closed


def test_a_moved_flow_keeps_its_idle_time(tmp_path: Path, echo: EchoServer) -> None:
    """The old relay's flow has been idle 1.5 s when it moves to a relay (in this
    process, to read its timers) whose UDP timeout is 2 s: it expires 0.5 s later (the
    table is swept at most once a second), not 2 s after the handover. A ping session's
    last packet is where it was too."""
    path = tmp_path / "b.handover"

    async def main() -> tuple[float, float, float | None, float | None]:
        loop = asyncio.get_running_loop()
        short = RelayConfig(dns_upstream=RelayConfig().gateway_ipv4, udp_idle_timeout_s=2.0,
                            udp_stream_timeout_s=2.0)
        receiver = Receiver(str(path))
        async with Relay(short) as relay_b, InMemoryGuest() as guest:
            talk = Conversations(guest, echo)
            try:
                await talk.round(b"once", 1)
            finally:
                talk.close()
            last_datagram = loop.time()
            key = (PING_V4, guest.addressing.gateway4, guest.addressing.guest4)
            assert guest.relay._icmp is not None
            ping_seen = guest.relay._icmp.sessions.last_seen(key)
            await asyncio.sleep(1.5)
            taking = asyncio.ensure_future(receiver.take_over(relay_b))
            await Source(guest.relay).hand_over(str(path))
            await taking
            receiver.close()
            guest.relay.close()
            assert relay_b._icmp is not None
            ping_moved = relay_b._icmp.sessions.last_seen(key)
            assert [f.protocol for f in relay_b.flows()].count("udp") == 1
            while any(f.protocol == "udp" for f in relay_b.flows()):
                assert loop.time() < last_datagram + 10
                await asyncio.sleep(0.02)
            return last_datagram, loop.time(), ping_seen, ping_moved

    last, expired, ping_seen, ping_moved = asyncio.run(main())
    print(f"idle 1.5 s, moved, timeout 2 s: expired {expired - last:.2f} s after its last "
          "datagram")
    assert last + 2.0 <= expired < last + 3.0
    assert ping_seen is not None and ping_moved is not None
    assert abs(ping_moved - ping_seen) < 0.05


def test_a_relay_that_does_not_take_udp_gets_none(tmp_path: Path, echo: EchoServer) -> None:
    """A new relay from before UDP flows moved answers the offer without "takes": the
    document carries no UDP flows or ping sessions (such a relay refuses keys it does
    not know), they are listed as not moved with the reason; and when that relay
    refuses the document, the old one serves them on, on the same sockets."""
    path = tmp_path / "old.handover"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)
    seen: dict[str, Any] = {}

    def old_relay() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            recv_message(conn)  # the offer
            send_message(conn, {"ready": {"relaynat": "0.old"}})
            fds: list[int] = []
            seen["doc"] = json.loads(recv_document(conn, fds))
            for fd in fds:
                socket.socket(fileno=fd).close()
            send_message(conn, {"error": "refused by the test"})

    async def main() -> None:
        async with InMemoryGuest() as guest:
            talk = Conversations(guest, echo)
            try:
                await talk.round(b"one", 1)
                senders = echo.senders()
                thread = threading.Thread(target=old_relay)
                thread.start()
                with pytest.raises(HandoverError, match="refused by the test"):
                    await Source(guest.relay).hand_over(str(path))
                await asyncio.to_thread(thread.join, 10)
                await talk.round(b"two", 2)  # served on by the old relay, same sockets
                assert echo.senders() == senders
                assert guest.stats()["udp_flows_opened"] == 1
                assert guest.stats()["icmp_sockets_opened"] == 2
            finally:
                talk.close()

    asyncio.run(main())
    listener.close()
    doc = seen["doc"]
    assert "udp" not in doc and "icmp" not in doc, sorted(doc)
    left = doc["tcp"]["not_moved"]
    assert sorted((f["protocol"], f["guest"][1]) for f in left) == [
        ("icmp", PING_V4), ("icmp", PING_V6), ("udp", ECHO_SPORT)], left
    assert all("does not take UDP flows and ping sessions" in f["reason"] for f in left)


HANDOVERS = 3
#: What the command of `relaynat run` exits with in the exit status test.
GUEST_STATUS = 3


def _ctl(control: Path, request: str) -> Any:
    return call(str(control), {"execute": request})["return"]


def _flows(control: Path) -> list[dict[str, Any]]:
    """The flows `relaynat ctl list` shows (none while the control socket is not there)."""
    return _ctl(control, "flows")["flows"] if control.exists() else []


def _talk(flows: list[dict[str, Any]], port: int, ident: int | None
          ) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The guest's UDP flow to the echo peer's `port` and its ping session, if listed."""
    udp = [f for f in flows if f["protocol"] == "udp" and f["far"] == ["10.0.2.2", port]]
    icmp = [f for f in flows if f["protocol"] == "icmp" and f["far"][0] == "10.0.2.2"
            and (ident is None or f["guest"][1] == ident)]
    return (udp[0] if udp else None), (icmp[0] if icmp else None)


def test_a_namespace_guest_talks_and_pings_across_three_handovers(
        tmp_path: Path, guest_dir: Path, procs: list[subprocess.Popen[bytes]],
        echo: EchoServer) -> None:
    """`relaynat run` with a command that sends a UDP echo request and a ping every 10 ms
    is handed over three times by `relaynat ctl handover` (each new relay a `relaynat
    serve --receive-handover`): nothing is lost, the echo peer sees one host port
    throughout, each new relay lists the flow and the session with the counts going on
    from the old one's, and at the end those counts are the guest's own."""
    receivers = []
    for i in range(HANDOVERS):
        (tmp_path / f"b{i}").mkdir()
        receivers.append(_receiver(tmp_path / f"b{i}"))
    procs.extend(proc for proc, _ in receivers)
    control = tmp_path / "control.sock"
    go, result, exit_file = guest_dir / "go", guest_dir / "result.json", guest_dir / "exit"
    log = open(tmp_path / "a.log", "ab")  # noqa: SIM115  # the process keeps it
    relay_a = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--control-socket", str(control),
         "--log-level", "info", "--", guest_python(), str(GUESTS / "udp_ping_conversation.py"),
         str(echo.addr[1]), str(go), str(result), str(exit_file), "0"],
        stdout=log, stderr=log)
    log.close()
    procs.append(relay_a)
    deadline = time.monotonic() + 30
    while None in _talk(_flows(control), echo.addr[1], None):
        assert relay_a.poll() is None, (tmp_path / "a.log").read_text()
        assert time.monotonic() < deadline, "the guest's flows did not appear"
        time.sleep(0.05)
    time.sleep(0.3)
    pauses, old = [], relay_a
    for i, (proc, path) in enumerate(receivers):
        udp, icmp = _talk(_flows(control), echo.addr[1], None)
        done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                               "--json", "handover", "--to", str(path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)["return"]
        # Before, the UDP flow and the ping session were left behind, "not_moved".
        assert answer["not_moved"] == [], answer
        assert (answer["moved_udp"], answer["moved_icmp"]) == (1, 1), answer
        if old is not relay_a:  # a relay that took over ends once it handed over
            assert old.wait(timeout=20) == 0
        stats = _ctl(control, "stats")
        pauses.append(stats["handover_pause_us"] / 1000)
        udp_now, icmp_now = _talk(_flows(control), echo.addr[1], None)
        assert udp is not None and icmp is not None
        assert udp_now is not None and icmp_now is not None, f"not listed after handover {i}"
        for was, now in ((udp, udp_now), (icmp, icmp_now)):
            assert (now["guest"], now["far"], now["host_peer"]) == (
                was["guest"], was["far"], was["host_peer"]), (was, now)
            assert now["bytes_from_guest"] >= was["bytes_from_guest"] > 0, (was, now)
            assert now["bytes_to_guest"] >= was["bytes_to_guest"] > 0, (was, now)
        old = proc
        time.sleep(0.5)
    go.touch()
    deadline = time.monotonic() + 30
    while not result.exists():
        assert time.monotonic() < deadline, "the guest wrote no result"
        time.sleep(0.05)
    talked = json.loads(result.read_text())
    udp, icmp = _talk(_flows(control), echo.addr[1], talked["ident"])
    stats = _ctl(control, "stats")
    exit_file.touch()
    assert old.wait(timeout=30) == 0  # the last relay ends with the command
    status = relay_a.wait(timeout=30)
    print(f"{HANDOVERS} handovers of a UDP echo and a ping every 10 ms: the relays "
          f"counted pauses of {[round(p, 1) for p in pauses]} ms; the guest saw "
          f"UDP {talked['udp']} and ICMP {talked['icmp']}")
    for name in ("udp", "icmp"):
        assert talked[name]["lost"] == [] and talked[name]["sent"] > 100, talked
        assert talked[name]["answered"] == talked[name]["sent"], talked
    assert len(echo.senders()) == 1, f"the echo peer saw {echo.senders()}: a new socket"
    assert udp is not None and icmp is not None
    # The counts went on across every relay: they are exactly the guest's own.
    assert (udp["bytes_from_guest"], udp["bytes_to_guest"]) == (
        talked["udp"]["bytes_out"], talked["udp"]["bytes_in"]), (udp, talked)
    assert (icmp["bytes_from_guest"], icmp["bytes_to_guest"]) == (
        talked["icmp"]["bytes_out"], talked["icmp"]["bytes_in"]), (icmp, talked)
    assert stats["udp_flows_opened"] == 1 and stats["icmp_sockets_opened"] == 1, stats
    assert stats["handovers_received"] == HANDOVERS, stats
    assert status == 0, (tmp_path / "a.log").read_text()


def test_relaynat_run_exits_with_the_commands_status_after_a_handover(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """The command of `relaynat run` runs on under the new relay, and `relaynat run`, the
    process its caller waits for, exits with the command's status once it ends (it is
    the command's parent: no other process can learn the status); the new relay ends
    with the command too, with 0. A SIGTERM to `relaynat run` in the meantime still
    reaches the command."""
    receiver, path = _receiver(tmp_path)
    procs.append(receiver)
    control = tmp_path / "control.sock"
    log = open(tmp_path / "a.log", "ab")  # noqa: SIM115  # the process keeps it
    relay_a = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--control-socket", str(control), "--",
         "sh", "-c", f"trap 'exit {GUEST_STATUS + 1}' TERM; sleep 1 & wait; "
                     f"sleep 30 & wait; exit {GUEST_STATUS}"],
        stdout=log, stderr=log)
    log.close()
    procs.append(relay_a)
    deadline = time.monotonic() + 30
    while not control.exists():
        assert relay_a.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                           "handover", "--to", str(path)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    time.sleep(2)  # the command's first sleep ended under the new relay
    assert relay_a.poll() is None, "relaynat run did not wait for its command"
    assert _ctl(control, "stats")["handovers_received"] == 1  # the new relay answers
    relay_a.terminate()  # passed on to the command, which exits GUEST_STATUS + 1
    assert relay_a.wait(timeout=20) == GUEST_STATUS + 1, (tmp_path / "a.log").read_text()
    assert receiver.wait(timeout=20) == 0


def test_a_corrupt_udp_or_ping_record_is_refused_with_nothing_kept(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], echo: EchoServer) -> None:
    """A document whose UDP flow or ping session record is corrupt, or whose descriptor
    is not what the record says, is refused naming it; the old relay serves on, and
    then hands over for real."""
    receiver, path = _receiver(tmp_path)
    procs.append(receiver)

    async def main() -> None:
        async with InMemoryGuest() as guest:
            talk = Conversations(guest, echo)
            try:
                await talk.round(b"one", 1)
                source = Source(guest.relay)
                held = source._take_out()  # what a real handover sends, then serve on
                source._give_back(held)
                udp_fd = held.doc["udp"][0]["fd"]

                def corrupt_idle(doc: dict[str, Any]) -> None:
                    doc["udp"][0]["idle_s"] = -1

                def other_peer(doc: dict[str, Any]) -> None:
                    doc["udp"][0]["peer"] = ["127.0.0.1", 1]

                def no_forward(doc: dict[str, Any]) -> None:
                    doc["udp"][0] |= {"fd": None, "forward": 0, "peer": ["127.0.0.1", 9]}
                    doc["icmp"][0]["fd"] = udp_fd  # keep every descriptor used

                def udp_socket_as_ping(doc: dict[str, Any]) -> None:
                    doc["udp"] = []
                    doc["icmp"][0]["fd"] = udp_fd

                for change, error in (
                        (corrupt_idle, "udp: flows[0]: field idle_s: -1 is not a number of "
                                       "seconds"),
                        (other_peer, "udp flows[0]: its socket is connected to"),
                        (no_forward, "udp flows[0]: forward 0 is not a UDP forward"),
                        (udp_socket_as_ping, "icmp sessions[0]: descriptor is not the "
                                             "socket described")):
                    doc = json.loads(json.dumps(held.doc))
                    change(doc)
                    refusal = await asyncio.to_thread(_send_by_hand, path, doc, held.fds)
                    assert refusal.startswith(error), (change.__name__, refusal)
                    await talk.round(change.__name__.encode(), 2)
                result = await Source(guest.relay).hand_over(str(path))
                assert (result["moved_udp"], result["moved_icmp"]) == (1, 2), result
                guest.relay.close()
                await talk.round(b"taken", 3)
            finally:
                talk.close()

    asyncio.run(main())
