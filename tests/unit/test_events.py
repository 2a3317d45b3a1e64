"""Events (events.py, event_hub.py): the records, their JSON form, their delivery, and a
real relay's events as `InMemoryGuest` drives it against loopback servers.

Each relay test is a conversation with real host sockets: a server on 127.0.0.1 that the
gateway maps to, a closed port, a policy that denies. The byte counts asserted are the
payload the test sent and received.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.config import RelayConfig
from relaynat.event_hub import DENIAL_LOG_BURST, EventHub
from relaynat.events import (
    CLOSE_HOW,
    EVENT_TYPES,
    Endpoint,
    Event,
    FlowClosed,
    FlowDenied,
    FlowOpened,
    GuestReady,
    TransportLost,
    event_dict,
    event_from_dict,
)
from relaynat.guests import Guests
from relaynat.packet_builder import udp_frame
from relaynat.policy import Policy, Rule
from relaynat.testing import ACK, FIN, PSH, RST, SYN, InMemoryGuest, Reply
from relaynat.testing import frames as f

# -- the records -------------------------------------------------------------------------


def test_endpoint_prints_as_a_reader_expects() -> None:
    assert str(Endpoint("10.0.2.2", 80)) == "10.0.2.2:80"
    assert str(Endpoint("fd00::2", 80)) == "[fd00::2]:80"
    assert str(Endpoint("10.0.2.2", None)) == "10.0.2.2"
    assert json.dumps(Endpoint("10.0.2.2", 80)) == '["10.0.2.2", 80]'


_text = st.text(max_size=20)
_guest = st.none() | st.text(min_size=1, max_size=10)
_time = st.floats(min_value=0, max_value=4e9, allow_nan=False)
_addr = st.ip_addresses().map(str)
_port = st.integers(0, 65535)
_endpoint = st.builds(Endpoint, _addr, st.none() | _port)
_proto = st.sampled_from(["tcp", "udp", "icmp"])
_direction = st.sampled_from(["outbound", "inbound"])
_count = st.integers(0, 1 << 62)

EVENTS = st.one_of(
    st.builds(GuestReady, _time, _guest, _text, st.none() | _addr, st.none() | _addr,
              st.sampled_from(["mac", "dhcp", "dhcpv6"])),
    st.builds(FlowOpened, _time, _guest, _proto, _direction, _endpoint, _endpoint,
              st.none() | _endpoint),
    st.builds(FlowDenied, _time, _guest, _proto, _endpoint, st.integers(-1, 100), _text),
    st.builds(FlowClosed, _time, _guest, _proto, _direction, _endpoint, _endpoint, _count,
              _count, st.floats(min_value=0, max_value=1e7, allow_nan=False),
              st.sampled_from(sorted(CLOSE_HOW))),
    st.builds(TransportLost, _time, _guest, _text),
)


@given(EVENTS)
def test_an_event_survives_json_and_back(event: Event) -> None:
    as_dict = event_dict(event)
    assert next(iter(as_dict)) == "kind" and as_dict["kind"] == event.kind
    loaded = json.loads(json.dumps(as_dict))
    assert loaded == as_dict  # already JSON's own shapes: lists, not tuples
    assert event_from_dict(loaded) == event


def test_every_kind_is_listed_and_a_bad_dict_is_named() -> None:
    assert set(EVENT_TYPES) == {"guest_ready", "flow_opened", "flow_denied", "flow_closed",
                                "transport_lost", "dns_query"}
    with pytest.raises(ValueError, match="unknown event kind"):
        event_from_dict({"kind": "nope"})
    with pytest.raises(ValueError, match="missing field 'reason'"):
        event_from_dict({"kind": "transport_lost", "time": 1.0, "guest": None})
    with pytest.raises(ValueError, match="unknown fields"):
        event_from_dict({"kind": "transport_lost", "time": 1.0, "guest": None, "reason": "",
                         "x": 1})


# -- delivery -------------------------------------------------------------------------------


def _lost(i: int) -> TransportLost:
    return TransportLost(float(i), "g", str(i))


@given(st.integers(1, 50), st.integers(0, 120))
async def test_a_stream_holds_its_bound_and_counts_the_rest(maxsize: int, n: int) -> None:
    stats: Counter[str] = Counter()
    hub = EventHub("g", stats)
    stream = hub.events(maxsize)
    for i in range(n):
        hub.emit(_lost(i))
    hub.close()
    got = [event async for event in stream]
    kept = min(n, maxsize)
    assert got == [_lost(i) for i in range(kept)]  # in order; the newest were lost
    assert stream.dropped == stats["events_dropped"] == n - kept


async def test_a_raising_callback_is_logged_and_dropped_the_others_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    hub = EventHub("g", Counter())
    seen: list[Event] = []

    def bad(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    hub.subscribe(bad)
    unsubscribe = hub.subscribe(seen.append)
    assert hub.listening
    with caplog.at_level(logging.ERROR, "relaynat.events"):
        hub.emit(_lost(1))
        hub.emit(_lost(2))
    assert seen == [_lost(1), _lost(2)]
    assert [r.exc_info is not None for r in caplog.records] == [True]  # once, then gone
    unsubscribe()
    unsubscribe()
    assert not hub.listening


async def test_a_stream_left_behind_stops_listening() -> None:
    stats: Counter[str] = Counter()
    hub = EventHub("g", stats)

    async def first() -> Event:
        async for event in hub.events(1):
            return event  # leaves the iteration without aclose()
        raise AssertionError("the stream ended")

    taking = asyncio.ensure_future(first())
    await asyncio.sleep(0)
    hub.emit(_lost(1))
    assert await taking == _lost(1)
    gc.collect()
    assert not hub.listening
    hub.emit(_lost(2))
    assert stats["events_dropped"] == 0


async def test_aclose_ends_the_iteration() -> None:
    hub = EventHub("g", Counter())
    stream = hub.events()
    waiting = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert not hub.listening


async def test_a_stream_of_a_closed_hub_ends_at_once() -> None:
    hub = EventHub("g", Counter())
    hub.close()
    assert [e async for e in hub.events()] == []
    assert not hub.listening


# -- a relay's events ----------------------------------------------------------------------


class Recorder:
    """A relay's events as a test reads them: `wait_for` a kind, or the whole list."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._changed.set()

    def of(self, cls: type[Event]) -> list[Event]:
        return [e for e in self.events if isinstance(e, cls)]

    async def wait_for(self, cls: type[Event], count: int = 1, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.of(cls)) < count:
                self._changed.clear()
                await self._changed.wait()


async def _server(handle: Callable[[socket.socket], None]) -> tuple[int, asyncio.Task[None]]:
    """A one-connection TCP server on 127.0.0.1: `handle(conn)` runs in a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                handle(conn)

    return port, asyncio.ensure_future(asyncio.to_thread(serve))


def _until_gone(conn: socket.socket) -> None:
    """Read until the relay closes or resets the connection."""
    with contextlib.suppress(OSError):
        while conn.recv(1000):
            pass


def _upper_then_send(extra: bytes) -> Callable[[socket.socket], None]:
    """Read one request, answer it upper-cased followed by `extra`, then close."""
    def handle(conn: socket.socket) -> None:
        data = conn.recv(1000)
        conn.sendall(data.upper() + extra)
        # A test whose guest closes as soon as it has the answer resets the connection
        # first (the relay closing): nothing is left to shut down then.
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)
        _until_gone(conn)
    return handle


async def test_a_tcp_connection_opens_and_closes_with_its_bytes() -> None:
    port, served = await _server(_upper_then_send(b"!" * 3000))
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        conn = await guest.tcp_connect(port)
        await record.wait_for(FlowOpened)
        await conn.send(b"hello")
        assert await conn.recv_exactly(5 + 3000) == b"HELLO" + b"!" * 3000
        fin = await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                                 and bool(r.tcp.flags & 1))  # FIN
        assert fin.tcp is not None
        conn.rcv_nxt = (fin.tcp.seq + len(fin.tcp.payload) + 1) & 0xFFFFFFFF
        await conn.close()
        await record.wait_for(FlowClosed)
        await served
        stats = guest.stats()
    opened, closed = record.of(FlowOpened)[0], record.of(FlowClosed)[0]
    assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
    a = guest.config
    assert opened.protocol == "tcp" and opened.direction == "outbound"
    assert opened.guest_end == Endpoint(str(a.guest_ipv4), 40000)
    assert opened.far == Endpoint(str(a.gateway_ipv4), port)
    assert opened.host_peer == Endpoint("127.0.0.1", port)
    assert opened.guest is None and opened.time > 0
    assert (closed.bytes_from_guest, closed.bytes_to_guest, closed.how) == (5, 3005, "closed")
    assert (closed.guest_end, closed.far) == (opened.guest_end, opened.far)
    assert 0 <= closed.duration_s < 10
    assert record.events.index(opened) < record.events.index(closed)
    assert stats["tcp_bytes_from_guest"] == 5 and stats["tcp_bytes_to_guest"] == 3005


def _reset(conn: socket.socket) -> None:
    conn.recv(1000)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def test_an_inbound_connection_opens_and_closes_as_inbound() -> None:
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        a = guest.addressing
        await guest.send(f.arp_request(a, a.gateway4))  # the relay learns the guest's MAC
        await guest.expect(lambda r: r.arp is not None)
        forward = guest.relay.add_forward("tcp", "127.0.0.1", 0, 8080)
        loop = asyncio.get_running_loop()
        client = socket.socket()
        client.setblocking(False)
        await loop.sock_connect(client, ("127.0.0.1", forward.host_port))
        client_port = client.getsockname()[1]
        syn = (await guest.expect(lambda r: r.tcp is not None and r.tcp.dport == 8080)).tcp
        assert syn is not None and syn.flags & SYN
        sport, ours, theirs = syn.sport, 7000, (syn.seq + 1) & 0xFFFFFFFF

        def segment(flags: int, payload: bytes = b"") -> bytes:
            return f.tcp_segment(a, False, 8080, sport, ours, theirs, flags, 65535, payload)

        def from_relay(r: Reply) -> bool:
            return r.tcp is not None and r.tcp.sport == sport and r.tcp.dport == 8080

        await guest.send(segment(SYN | ACK))
        ours += 1
        await guest.expect(from_relay)  # the ACK of our SYN-ACK: established
        await loop.sock_sendall(client, b"hello")
        data = (await guest.expect(lambda r: from_relay(r) and r.tcp is not None
                                   and bool(r.tcp.payload))).tcp
        assert data is not None and bytes(data.payload) == b"hello"
        theirs += 5
        await guest.send(segment(ACK | PSH, b"hi"))
        ours += 2
        assert await loop.sock_recv(client, 10) == b"hi"
        client.shutdown(socket.SHUT_WR)
        fin = (await guest.expect(lambda r: from_relay(r) and r.tcp is not None
                                  and bool(r.tcp.flags & FIN))).tcp
        assert fin is not None
        theirs += 1
        await guest.send(segment(FIN | ACK))
        ours += 1
        await record.wait_for(FlowClosed)
        client.close()
    opened, closed = record.of(FlowOpened)[0], record.of(FlowClosed)[0]
    assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
    assert (opened.protocol, opened.direction) == ("tcp", "inbound")
    assert opened.guest_end == Endpoint(str(guest.config.guest_ipv4), 8080)
    assert opened.far == Endpoint(str(guest.config.gateway_ipv4), sport)
    assert opened.host_peer == Endpoint("127.0.0.1", client_port)
    assert (closed.direction, closed.bytes_from_guest, closed.bytes_to_guest, closed.how) == (
        "inbound", 2, 5, "closed")


async def test_a_reset_from_the_host_peer_says_so() -> None:
    port, served = await _server(_reset)
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        conn = await guest.tcp_connect(port)
        await conn.send(b"x" * 10)
        await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                           and bool(r.tcp.flags & RST))
        await record.wait_for(FlowClosed)
        await served
    closed = record.of(FlowClosed)[0]
    assert isinstance(closed, FlowClosed)
    assert (closed.how, closed.bytes_from_guest, closed.bytes_to_guest) == (
        "reset_by_host", 10, 0)


async def test_a_reset_from_the_guest_says_so() -> None:
    port, served = await _server(_until_gone)
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        conn = await guest.tcp_connect(port)
        await guest.send(conn.frame(RST | ACK))
        await record.wait_for(FlowClosed)
        await served
    closed = record.of(FlowClosed)[0]
    assert isinstance(closed, FlowClosed) and closed.how == "reset_by_guest"


async def test_a_refused_connect_opens_and_closes_as_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]  # closed once the block ends: nothing listens
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        with pytest.raises(ConnectionRefusedError):
            await guest.tcp_connect(port)
        await record.wait_for(FlowClosed)
    assert [type(e) for e in record.events if not isinstance(e, GuestReady)] == [
        FlowOpened, FlowClosed]
    closed = record.of(FlowClosed)[0]
    assert isinstance(closed, FlowClosed) and closed.how == "refused"


async def test_a_denied_flow_names_its_rule_and_is_logged_at_a_bounded_rate(
        caplog: pytest.LogCaptureFixture) -> None:
    policy = Policy([Rule("allow", "udp", ("host",), ((53, 53),)),
                     Rule("deny", "tcp", ("host",), ((22, 22),), comment="no ssh to the host")])
    record = Recorder()
    async with InMemoryGuest(policy=policy) as guest:
        guest.relay.subscribe(record)
        with caplog.at_level(logging.WARNING, "relaynat.events"):
            for i in range(DENIAL_LOG_BURST + 5):
                await guest.send(f.tcp_segment(guest.addressing, False, 41000 + i, 22, 1, 0,
                                               0x02, 65535))
                await guest.expect(lambda r: r.tcp is not None and bool(r.tcp.flags & RST))
        stats = guest.stats()
    denied = record.of(FlowDenied)
    assert len(denied) == DENIAL_LOG_BURST + 5
    first = denied[0]
    assert isinstance(first, FlowDenied)
    assert (first.protocol, first.rule, first.comment, first.reason) == (
        "tcp", 1, "no ssh to the host", "policy")
    assert first.far == Endpoint(str(guest.config.gateway_ipv4), 22)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # The bucket refills at 10/s while the test runs: a few more may pass, never all.
    assert DENIAL_LOG_BURST <= len(lines) < DENIAL_LOG_BURST + 5
    assert "rule 1: no ssh to the host" in lines[0] and "tcp" in lines[0]
    assert stats["policy_denied_unlogged"] == DENIAL_LOG_BURST + 5 - len(lines)
    assert not record.of(FlowOpened)


async def test_a_udp_flow_times_out(udp_echo: int) -> None:
    record = Recorder()
    cfg = RelayConfig(dns_upstream=IPv4Address("127.0.0.1"), udp_idle_timeout_s=0.2,
                      udp_stream_timeout_s=0.2)
    async with InMemoryGuest(cfg) as guest:
        guest.relay.subscribe(record)
        await guest.send(f.udp_datagram(guest.addressing, False, 42000, udp_echo, b"ping!"))
        await guest.expect(lambda r: r.udp is not None and r.udp.sport == udp_echo)
        await record.wait_for(FlowClosed, timeout=5)
    opened, closed = record.of(FlowOpened)[0], record.of(FlowClosed)[0]
    assert isinstance(opened, FlowOpened) and isinstance(closed, FlowClosed)
    assert opened.protocol == "udp" and opened.host_peer == Endpoint("127.0.0.1", udp_echo)
    assert (closed.how, closed.bytes_from_guest, closed.bytes_to_guest) == ("timeout", 5, 5)
    assert closed.duration_s >= 0.2


def _dhcp_request(a: f.Addressing) -> bytes:
    """DHCPREQUEST in INIT-REBOOT (RFC 2131 §4.3.2): option 50 names the address."""
    msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=7, chaddr=a.guest_mac,
                         opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPREQUEST])),
                               (dpkt.dhcp.DHCP_OPT_REQ_IP, a.guest4)])
    return udp_frame(b"\xff" * 6, a.guest_mac, bytes(4), b"\xff" * 4, 68, 67, bytes(msg))


def _dhcpv6_rapid_solicit(a: f.Addressing) -> bytes:
    """A Solicit with Rapid Commit (RFC 8415 §18.2.1): answered by a Reply at once."""
    frame = f.dhcpv6_solicit(a, xid=9)
    # Append the empty Rapid Commit option (14) and fix the UDP and IPv6 lengths and the
    # checksum by building it again from its parts.
    msg = frame[14 + 40 + 8:] + struct.pack("!HH", 14, 0)
    return udp_frame(frame[0:6], a.guest_mac, a.link_local6, frame[14 + 24:14 + 40], 546,
                     547, msg)


async def test_the_guest_is_ready_at_its_first_frame_and_its_leases() -> None:
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        a = guest.addressing
        await guest.send(_dhcp_request(a))
        await guest.expect(lambda r: r.udp is not None and r.udp.sport == 67)
        await guest.send(_dhcpv6_rapid_solicit(a))
        await guest.expect(lambda r: r.udp is not None and r.udp.sport == 547)
        await guest.send(f.dhcp_discover(a, xid=1))  # an OFFER: no lease, no event
        await guest.expect(lambda r: r.udp is not None and r.udp.sport == 67)
    ready = record.of(GuestReady)
    mac = a.guest_mac.hex(":")
    cfg = guest.config
    assert ready == [
        GuestReady(ready[0].time, None, mac, None, None, "mac"),
        GuestReady(ready[1].time, None, mac, str(cfg.guest_ipv4), None, "dhcp"),
        GuestReady(ready[2].time, None, mac, None, str(cfg.guest_ipv6), "dhcpv6"),
    ]


async def test_transport_lost_comes_before_the_flows_it_ends() -> None:
    port, served = await _server(_until_gone)
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        await guest.tcp_connect(port)
        assert guest._sock is not None
        guest._sock.close()
        guest._sock = None
        await guest.relay.transport_lost_event.wait()
        await served
    kinds = [e.kind for e in record.events if e.kind != "guest_ready"]
    assert kinds == ["flow_opened", "transport_lost", "flow_closed"]
    closed = record.of(FlowClosed)[0]
    assert isinstance(closed, FlowClosed) and closed.how == "detached"
    lost = record.of(TransportLost)[0]
    assert isinstance(lost, TransportLost) and lost.reason


async def test_a_policy_cut_and_a_closed_relay_end_flows_with_their_reasons(
        udp_echo: int) -> None:
    port, served = await _server(_until_gone)
    record = Recorder()
    async with InMemoryGuest() as guest:
        guest.relay.subscribe(record)
        await guest.tcp_connect(port)
        await guest.send(f.udp_datagram(guest.addressing, False, 42000, udp_echo, b"x"))
        await guest.expect(lambda r: r.udp is not None)
        cut = Policy([Rule("deny", "tcp", ("host",))])
        assert guest.relay.set_policy(cut, cut=True) == 1
        stream = guest.relay.events()
    await served
    assert [(e.protocol, e.how) for e in record.of(FlowClosed)  # type: ignore[attr-defined]
            ] == [("tcp", "policy_cut"), ("udp", "detached")]
    assert [e async for e in stream] == [record.events[-1]]  # ends with the relay


async def test_guests_merge_every_guests_events_later_ones_too(udp_echo: int) -> None:
    async with Guests() as guests:
        record = Recorder()
        unsubscribe = guests.subscribe(record)
        stream = guests.events()
        relay_a = guests.add("a", RelayConfig(dns_upstream=IPv4Address("127.0.0.1")))
        relay_b = guests.add("b", RelayConfig(dns_upstream=IPv4Address("127.0.0.1")))
        async with InMemoryGuest(relay=relay_a) as a, InMemoryGuest(relay=relay_b) as b:
            for guest in (a, b):
                await guest.send(f.udp_datagram(guest.addressing, False, 42000, udp_echo, b"x"))
                await guest.expect(lambda r: r.udp is not None)
        await record.wait_for(FlowClosed, 2)
        unsubscribe()
        guests.remove("a")
        assert relay_b.stats().get("events_dropped", 0) == 0
    opened = [(e.guest, e.protocol) for e in record.of(FlowOpened)]  # type: ignore[attr-defined]
    assert opened == [("a", "udp"), ("b", "udp")]
    streamed = [e async for e in stream]
    assert streamed[:len(record.events)] == record.events


async def test_a_slow_consumer_loses_events_counted_and_the_relay_keeps_serving(
        udp_echo: int) -> None:
    async with InMemoryGuest() as guest:
        stream = guest.relay.events(maxsize=2)
        for i in range(6):
            await guest.send(f.udp_datagram(guest.addressing, False, 43000 + i, udp_echo, b"x"))
            await guest.expect(lambda r: r.udp is not None)
        stats = guest.stats()
        port, served = await _server(_upper_then_send(b""))
        conn = await guest.tcp_connect(port)
        await conn.send(b"still")
        assert await conn.recv_exactly(5) == b"STILL"
    await served
    # The guest's MAC and the first flow fit; the other five flows did not.
    assert stats["events_dropped"] == 5
    got = [e async for e in stream]
    assert [type(e) for e in got] == [GuestReady, FlowOpened]


async def test_with_no_subscriber_nothing_is_emitted() -> None:
    async with InMemoryGuest() as guest:
        hub = guest.relay._hub
        assert not hub.listening
        built: list[Event] = []
        hub.emit = built.append  # type: ignore[method-assign]
        await guest.send(f.tcp_segment(guest.addressing, False, 41000, 9, 1, 0, 0x02, 65535))
        await guest.expect(lambda r: r.tcp is not None)
    assert built == []
