"""A held first flight through the real relay, segment by segment: an in-process `Relay`
(relaynat.testing's `InMemoryGuest`) learns a name from a DNS answer it forwards to a
resolver on 127.0.0.1:53 (port 53: root, hence this lane), then a guest connection
sends a real ClientHello (OpenSSL's, through Python's ssl module) cut into segments at
many random places. With the name the rule covers, the host server receives exactly
the hello, in order, once; with another name the guest gets a RST and the server no
connection at all; nothing is left held. The parsing alone:
tests/unit/test_first_flight.py; real clients and servers: test_wire_names.py."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import socket
import threading
from collections.abc import Iterator
from ipaddress import IPv4Address

import dpkt
import pytest
from unit.test_first_flight import openssl_hello

from relaynat import FlowDenied, FlowOpened, Policy, RelayConfig
from relaynat.testing import ACK, FIN, PSH, RST, InMemoryGuest, frames

NAME = "www.allowed.test"


@pytest.fixture
def resolver() -> Iterator[None]:
    """Answers A and AAAA queries for names under allowed.test with the relay's
    gateway addresses (10.0.2.2 and fd00::2 stand for the host's loopback), TTL 60;
    REFUSED for the rest."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = sock.recvfrom(512)
            except TimeoutError:
                continue
            query = dpkt.dns.DNS(data)
            answer = dpkt.dns.DNS(id=query.id, qr=1, rd=1, ra=1, qd=query.qd)
            name = query.qd[0].name
            if name.endswith(".allowed.test") and query.qd[0].type == dpkt.dns.DNS_AAAA:
                answer.an = [dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_AAAA, ttl=60,
                                             rdata=socket.inet_pton(socket.AF_INET6,
                                                                    "fd00::2"))]
            elif name.endswith(".allowed.test"):
                answer.an = [dpkt.dns.DNS.RR(name=name, type=dpkt.dns.DNS_A, ttl=60,
                                             rdata=socket.inet_aton("10.0.2.2"))]
            else:
                answer.rcode = dpkt.dns.DNS_RCODE_REFUSED
            sock.sendto(bytes(answer), peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join()
    sock.close()


class _Server:
    """A loopback TCP server that keeps every byte of every connection (on ::1 and
    127.0.0.1 alike)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("::", 0), family=socket.AF_INET6,
                                             dualstack_ipv6=True)
        self.port: int = self.listener.getsockname()[1]
        self.received: list[bytearray] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            got = bytearray()
            self.received.append(got)
            threading.Thread(target=self._read, args=(conn, got), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, got: bytearray) -> None:
        # The relay resets its host sockets when it closes at the test's end.
        with conn, contextlib.suppress(ConnectionResetError):
            while chunk := conn.recv(65536):
                got += chunk


def _cuts(rng: random.Random, length: int) -> list[int]:
    """Where to cut a first flight: a few places, or byte by byte near the start."""
    if rng.random() < 0.2:
        return list(range(1, min(length, 12)))
    return sorted(rng.sample(range(1, length), rng.randint(1, 8)))


@pytest.mark.parametrize("seed", range(12))
async def test_a_hello_in_pieces_reaches_the_host_once_or_is_reset(
        resolver: None, seed: int) -> None:
    rng = random.Random(seed)
    server = _Server()
    config = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"))
    port = str(server.port)
    policy = Policy.from_dict({"default": "deny", "rule": [
        {"action": "allow", "proto": "tcp", "domains": ["*.allowed.test"], "ports": port,
         "inspect_ports": port, "comment": "the allowed zone"}]}, config)
    allowed = rng.random() < 0.5
    v6 = seed % 3 == 2  # the flow, and the answer that admits it, over IPv6
    hello = openssl_hello(NAME if allowed else "evil.example")
    events: list[object] = []
    async with InMemoryGuest(config, policy=policy) as guest:
        guest.relay.subscribe(events.append)
        await guest.send(frames.dns_query(guest.addressing, v6, 5353, 7, NAME,
                                          dpkt.dns.DNS_AAAA if v6 else dpkt.dns.DNS_A))
        answer = await guest.expect(lambda r: r.udp is not None and r.udp.sport == 53)
        assert answer.udp is not None and dpkt.dns.DNS(bytes(answer.udp.payload)).an
        conn = await guest.tcp_connect(server.port, v6=v6)
        points = [0, *_cuts(rng, len(hello)), len(hello)]
        pieces = [hello[a:b] for a, b in itertools.pairwise(points)]
        for piece in pieces[:-1]:
            await conn.send(piece)  # held and acknowledged
        await guest.send(conn.frame(ACK | PSH, pieces[-1]))
        last = await guest.expect(conn.matches)
        assert last.tcp is not None
        if allowed:
            assert not last.tcp.flags & RST
            for _ in range(200):
                if server.received and len(server.received[0]) >= len(hello):
                    break
                await asyncio.sleep(0.01)
            assert [bytes(b) for b in server.received] == [hello]
        else:
            assert last.tcp.flags & RST
            await asyncio.sleep(0.05)
            assert server.received == []
        stats = guest.stats()
    server.listener.close()
    assert stats["tcp_first_flights"] == 1
    assert stats["tcp_first_flight_bytes"] == 0
    opened = [e for e in events if isinstance(e, FlowOpened) and e.protocol == "tcp"]
    denied = [e for e in events if isinstance(e, FlowDenied)]
    if allowed:
        assert [(e.wire_name, e.rule, e.comment, e.names, e.far.addr) for e in opened] == [
            (NAME, 0, "the allowed zone", (NAME,), "fd00::2" if v6 else "10.0.2.2")]
        assert denied == []
    else:
        assert opened == [] and stats["policy_denied_name_mismatch"] == 1
        assert [(e.reason, e.wire_name, e.names) for e in denied] == [
            ("name_mismatch", "evil.example", (NAME,))]


async def test_a_fin_during_the_host_connect_waits_for_the_held_request(
        resolver: None) -> None:
    """A request, then at once the guest's FIN, while the host connect is still under way
    (the server's accept queue is full, so the relay's SYN waits for its retransmission
    a second later): the FIN is not taken before the request is in the host socket. The
    server gets the whole request, then the end of the stream; taking the FIN at once
    would shut the connecting socket down (SYN-SENT closes: no connection at all)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # one waiting connection fills it
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    config = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"))
    policy = Policy.from_dict({"default": "deny", "rule": [
        {"action": "allow", "proto": "tcp", "domains": ["*.allowed.test"],
         "ports": str(port), "inspect_ports": str(port)}]}, config)
    request = f"GET / HTTP/1.0\r\nHost: {NAME}\r\n\r\n".encode()
    try:
        async with InMemoryGuest(config, policy=policy) as guest:
            await guest.send(frames.dns_query(guest.addressing, False, 5353, 7, NAME))
            await guest.expect(lambda r: r.udp is not None and r.udp.sport == 53)
            conn = await guest.tcp_connect(port)
            await conn.send(request)  # acknowledged while the host connect waits
            fin_seq = conn.snd_nxt
            await guest.send(conn.frame(ACK | FIN))
            await asyncio.sleep(0.2)
            first, _ = listener.accept()  # the filler: room for the relay's SYN
            first.close()
            filler.close()
            loop = asyncio.get_running_loop()
            listener.settimeout(5)
            server_side, _ = await loop.run_in_executor(None, listener.accept)
            # The held request is written; the guest is asked for what was refused.
            await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                               and r.tcp.ack == fin_seq)
            await guest.send(conn.frame(ACK | FIN, seq=fin_seq))
            await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                               and r.tcp.ack == (fin_seq + 1) & 0xFFFFFFFF)
            server_side.settimeout(5)
            got = bytearray()
            while chunk := await loop.run_in_executor(None, server_side.recv, 65536):
                got += chunk
            server_side.close()
            assert bytes(got) == request
            assert guest.stats()["tcp_first_flight_bytes"] == 0
    finally:
        listener.close()
        filler.close()
