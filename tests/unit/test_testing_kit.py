"""relaynat.testing, used the way a user's integration test would use it (copy freely).

`InMemoryGuest` runs a real `Relay` on a socketpair; the test is the guest. Its host
side is real: the TCP test below starts a loopback server, and the relay connects to
it when the guest opens a connection to the gateway (which maps to host loopback).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from functools import partial
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import example, find, given, settings
from hypothesis import strategies as st

from relaynat.testing import (
    ACK,
    CWR,
    ECE,
    FIN,
    PSH,
    RST,
    SYN,
    URG,
    GuestTcp,
    InMemoryGuest,
    MalformedFrame,
    Reply,
    broken_frames,
    frame_sequences,
    tcp_conversations,
    valid_frames,
)
from relaynat.testing import frames as f
from relaynat.testing.sink import sink


async def test_arp_request_gets_the_gateway_mac() -> None:
    async with InMemoryGuest() as guest:
        a = guest.addressing
        await guest.send(f.arp_request(a, a.gateway4))
        reply = await guest.expect(lambda r: r.arp is not None)
        assert reply.arp is not None
        assert reply.arp.op == 2  # RFC 826 reply
        assert reply.arp.sender_ip == a.gateway4
        assert reply.arp.sender_mac == guest.config.gateway_mac
        assert reply.eth.dst_mac == a.guest_mac


async def test_dhcp_discover_gets_an_offer_of_the_guest_address() -> None:
    async with InMemoryGuest() as guest:
        await guest.send(f.dhcp_discover(guest.addressing, xid=0x1234))
        reply = await guest.expect(lambda r: r.udp is not None and r.udp.sport == 67)
        assert reply.udp is not None
        offer = dpkt.dhcp.DHCP(bytes(reply.udp.payload))
        assert offer.xid == 0x1234
        assert IPv4Address(offer.yiaddr) == guest.config.guest_ipv4
        assert dict(offer.opts)[dpkt.dhcp.DHCP_OPT_MSGTYPE] == bytes([dpkt.dhcp.DHCPOFFER])


async def test_router_solicitation_gets_an_advertisement() -> None:
    async with InMemoryGuest() as guest:
        await guest.send(f.router_solicitation(guest.addressing))
        # The advertisement sent on attach goes to all nodes (33:33:00:00:00:01); the
        # solicited one comes to our MAC.
        ra = await guest.expect(lambda r: r.ip is not None and r.ip.proto == 58
                                and r.ip.payload[0] == 134 and r.eth.dst_mac == f.GUEST_MAC)
        assert ra.ip is not None and ra.ip.ttl == 255  # RFC 4861 §6.1.2


async def test_tcp_through_the_relay_to_a_loopback_server() -> None:
    received = bytearray()
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello guest")
        await writer.drain()
        while chunk := await reader.read(65536):
            received.extend(chunk)
        writer.close()  # EOF from the guest's FIN: close our side too
        done.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, InMemoryGuest() as guest:
        conn = await guest.tcp_connect(port)
        assert await conn.recv_exactly(len(b"hello guest")) == b"hello guest"
        await conn.send(b"hello host")
        await conn.close()  # FIN; the relay ACKs it and half-closes the host socket
        await asyncio.wait_for(done.wait(), 5)
        assert bytes(received) == b"hello host"
        fin = await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                                 and bool(r.tcp.flags & FIN))
        assert fin.tcp is not None and fin.tcp.flags & ACK
        assert guest.stats().get("drop_internal_error", 0) == 0


async def test_syn_to_a_closed_port_is_reset() -> None:
    async with InMemoryGuest() as guest:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()  # nothing listens on `port` any more
        try:
            await guest.tcp_connect(port)
        except ConnectionRefusedError as exc:
            assert "0x14" in str(exc)  # RST|ACK
        else:
            raise AssertionError("the relay accepted a connection nobody listens for")
        assert guest.stats()["tcp_connect_failed"] == 1


@settings(max_examples=25, deadline=None)
@given(frame=broken_frames())
def test_a_user_property_broken_frames_are_counted(frame: f.LabeledFrame) -> None:
    """The pattern for a user's own property: feed strategy frames to a relay and check
    its counters (tests/integration/test_fuzz_relay.py does this at length)."""

    async def run() -> dict[str, int]:
        async with InMemoryGuest() as guest:
            await guest.send(frame.data)
            await guest.delivered()  # the relay has handled it
            return guest.stats()

    stats = asyncio.run(run())
    assert stats.get("drop_internal_error", 0) == 0
    if frame.expect is not None:
        assert stats.get(frame.expect) == 1, (frame.kind, stats)


def test_kit_without_hypothesis_says_how_to_install_it() -> None:
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "try:\n    import relaynat.testing\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "pip install 'relaynat[testing]'" in out


def test_conversation_frames_acknowledge_the_relay_isn() -> None:
    """TcpConversation builds ACKs from the ISN the relay chose (read from its SYN-ACK)."""
    from relaynat.testing.strategies import tcp_conversations
    from relaynat.wire import parse_ethernet, parse_ipv4, parse_ipv6, parse_tcp

    @settings(max_examples=20, deadline=None)
    @given(conv=tcp_conversations(dport=80), isn=st.integers(0, 2**32 - 1))
    def check(conv: object, isn: int) -> None:
        for data in conv.frames(isn):  # type: ignore[attr-defined]
            eth = parse_ethernet(memoryview(data))
            ip = parse_ipv6(eth.payload) if f.is_ipv6(data) else parse_ipv4(eth.payload)
            seg = parse_tcp(ip)
            assert seg.dport == 80
            assert seg.ack == (0 if seg.flags == SYN else (isn + 1) & 0xFFFFFFFF)

    check()


@settings(max_examples=60, deadline=None)
@given(frame=broken_frames())
@example(frame=f.LabeledFrame(b"", "truncated", "drop_eth_short"))
@example(frame=f.LabeledFrame(bytes(13), "truncated", "drop_eth_short"))
def test_a_broken_frame_sent_by_the_guest_is_counted_under_its_label(
        frame: f.LabeledFrame) -> None:
    """The kit's promise: a frame sent through `InMemoryGuest.send` reaches the relay,
    which counts it under `frame.expect`, whatever its length (the stream wire cannot
    carry a frame under 14 bytes: its framing would close the link)."""

    async def run() -> dict[str, int]:
        async with InMemoryGuest() as guest:
            await guest.send(frame.data)
            await guest.delivered()
            return guest.stats()

    stats = asyncio.run(run())
    assert stats["frames_in"] == 1, (frame, stats)
    assert stats.get("drop_internal_error", 0) == 0
    if frame.expect is not None:
        assert stats.get(frame.expect) == 1, (frame.kind, stats)


def _host_bound(frame: bytes, a: f.Addressing = f.DEFAULT_ADDRESSING) -> tuple[str, int] | None:
    """("tcp"|"udp", destination port) of a frame to the gateway (the host's loopback),
    None for any other frame, or one that does not parse."""
    try:
        reply = Reply.parse(frame)
    except MalformedFrame:
        return None
    if reply.ip is None or bytes(reply.ip.dst) not in (a.gateway4, a.gateway6):
        return None
    if reply.tcp is not None:
        return ("tcp", reply.tcp.dport)
    if reply.udp is not None:
        return ("udp", reply.udp.dport)
    return None


@settings(max_examples=200, deadline=None)
@given(frames=st.one_of(
    valid_frames().map(lambda x: [x.data]), broken_frames().map(lambda x: [x.data]),
    tcp_conversations().map(lambda c: c.frames(0)),
    frame_sequences().map(lambda xs: [x.data for x in xs])))
def test_strategies_send_host_traffic_to_the_kit_sink_by_default(frames: list[bytes]) -> None:
    """A drawn port on the host's loopback could be a developer's database: by default
    every TCP and UDP frame toward the gateway goes to the kit's sink."""
    for frame in frames:
        target = _host_bound(frame)
        assert target is None or target[1] == sink().port, target


@settings(max_examples=50, deadline=None)
@given(frame=valid_frames(tcp_port=8080, udp_port=5353))
def test_strategies_take_a_port_of_the_tests_instead_of_the_sink(frame: f.LabeledFrame) -> None:
    assert _host_bound(frame.data) in (None, ("tcp", 8080), ("udp", 5353))


def test_strategies_take_any_port_when_asked_and_refuse_a_bad_one() -> None:
    anywhere = find(valid_frames(tcp_port="any").map(lambda x: _host_bound(x.data)),
                    lambda t: t is not None and t[0] == "tcp" and t[1] != sink().port)
    assert anywhere is not None
    with pytest.raises(ValueError, match="65536"):
        valid_frames(tcp_port=65536)


async def test_the_sink_takes_tcp_and_udp_and_answers_nothing() -> None:
    async with InMemoryGuest() as guest:
        a = guest.addressing
        for v6 in (False, True) if "::1" in sink().addresses else (False,):
            conn = await guest.tcp_connect(guest.sink_port, v6=v6, sport=41000 + v6)
            await conn.send(b"anything at all")  # ACKed: the sink took it
            await conn.close()
            # The sink closes on the guest's FIN: the relay passes its FIN on.
            fin = await guest.expect(partial(_is_fin_of, conn))
            assert fin.tcp is not None and not fin.tcp.payload
            await guest.send(f.udp_datagram(a, v6, 42000, guest.sink_port, b"datagram"))
        await guest.delivered()
        await asyncio.sleep(0.2)
        stats = guest.stats()
        assert stats["tcp_connect_failed"] == 0 and stats["udp_flows"] >= 1, stats
        # Nothing came back for the datagrams: no reply, no port unreachable.
        with pytest.raises(TimeoutError):
            await guest.expect(lambda r: r.udp is not None or (
                r.ip is not None and r.ip.proto in (1, 58) and r.ip.payload[0] in (1, 3)),
                timeout=0.2)


def _is_fin_of(conn: GuestTcp, reply: Reply) -> bool:
    return conn.matches(reply) and reply.tcp is not None and bool(reply.tcp.flags & FIN)


def test_the_tcp_flags_are_exported_with_their_rfc_values() -> None:
    # RFC 9293 §3.1 (FIN..URG) and RFC 3168 §6.1 (ECE, CWR).
    assert (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR) == (1, 2, 4, 8, 16, 32, 64, 128)
