"""The ICMP echo core (icmp_echo.py) against dpkt, and the relay's refusals that open no
socket (host/icmp_relay.py).

Echo requests are built with dpkt from random identifiers, sequence numbers and
payloads; validation must read them as dpkt does, any bytes at all may only ever raise
`MalformedFrame` (with a known reason), and every reply frame parses with dpkt with
valid IPv4 and ICMP checksums and carries the guest's id, seq and payload. The echo
table is checked against a model. The frame helpers here serve the integration tests
with real ping sockets too (tests/integration/test_icmp_echo.py).
"""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from ipaddress import IPv4Address

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relaynat.config import RelayConfig
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.icmp_echo import (
    ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST,
    EchoTable,
    echo_reply_frame,
    parse_echo_reply,
    parse_echo_request,
)
from relaynat.wire import Ipv4Packet, MalformedFrame, parse_ethernet, parse_ipv4

#: Every reason the ICMP parsers may give, on top of wire.py's own.
ICMP_REASONS = {"icmp_short", "icmp_checksum", "icmp_type", "icmp_code"}
REPLY_REASONS = {"icmp_reply_short", "icmp_reply_type"}
WIRE_REASONS = {"eth_short", "ip_short", "ip_version", "ip_header_len", "ip_total_len",
                "ip_fragment", "ip_checksum"}

CONFIG = RelayConfig()
GUEST_MAC = bytes.fromhex("020000000015")
GUEST_IP = CONFIG.guest_ipv4.packed
GATEWAY_IP = CONFIG.gateway_ipv4.packed

macs = st.binary(min_size=6, max_size=6)
addrs = st.binary(min_size=4, max_size=4)
u16 = st.integers(0, 0xFFFF)
payloads = st.binary(max_size=1500)


def icmp_message(icmp_type: int, code: int, ident: int, seq: int, payload: bytes,
                 *, checksum: int | None = None) -> bytes:
    """An ICMP echo-shaped message built by dpkt (which fills in the checksum)."""
    msg = dpkt.icmp.ICMP(type=icmp_type, code=code,
                         data=dpkt.icmp.ICMP.Echo(id=ident, seq=seq, data=payload))
    raw = bytes(msg)
    if checksum is not None:
        raw = raw[:2] + struct.pack("!H", checksum) + raw[4:]
    return raw


def request_frame(icmp: bytes, src: bytes = GUEST_IP, dst: bytes = GATEWAY_IP) -> bytes:
    ip = dpkt.ip.IP(src=src, dst=dst, p=dpkt.ip.IP_PROTO_ICMP, ttl=64, id=1, data=icmp)
    ip.len = 20 + len(icmp)
    eth = dpkt.ethernet.Ethernet(dst=CONFIG.gateway_mac, src=GUEST_MAC,
                                 type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


def parse_frame(frame: bytes) -> Ipv4Packet:
    return parse_ipv4(parse_ethernet(memoryview(frame)).payload)


def raw_ip(payload: bytes, src: bytes = GUEST_IP, dst: bytes = GATEWAY_IP) -> Ipv4Packet:
    view = memoryview(payload)
    return Ipv4Packet(src, dst, 1, 64, 0, view, view)


def check_reply(frame: bytes, *, src: bytes, dst: bytes, ident: int, seq: int,
                payload: bytes, dst_mac: bytes = GUEST_MAC,
                src_mac: bytes = CONFIG.gateway_mac) -> None:
    """The frame is an Ethernet/IPv4/ICMP echo reply as dpkt reads it, checksums valid."""
    eth = dpkt.ethernet.Ethernet(frame)
    assert (eth.dst, eth.src, eth.type) == (dst_mac, src_mac, dpkt.ethernet.ETH_TYPE_IP)
    ip = eth.data
    assert isinstance(ip, dpkt.ip.IP)
    assert (ip.src, ip.dst, ip.p) == (src, dst, dpkt.ip.IP_PROTO_ICMP)
    assert ip.len == len(frame) - 14 == 20 + 8 + len(payload)
    assert dpkt.in_cksum(frame[14:34]) == 0
    icmp_raw = frame[34:]
    assert dpkt.in_cksum(icmp_raw) == 0
    icmp = ip.data
    assert isinstance(icmp, dpkt.icmp.ICMP)
    assert (icmp.type, icmp.code) == (dpkt.icmp.ICMP_ECHOREPLY, 0)
    echo = icmp.data
    assert (echo.id, echo.seq, echo.data) == (ident, seq, payload)


# -- pure: requests ----------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(u16, u16, payloads)
@example(0, 0, b"")
@example(0xFFFF, 0xFFFF, b"\xff" * 3)
def test_request_parsed_as_dpkt_builds_it(ident: int, seq: int, payload: bytes) -> None:
    frame = request_frame(icmp_message(ICMP_ECHO_REQUEST, 0, ident, seq, payload))
    req = parse_echo_request(parse_frame(frame))
    assert (req.ident, req.seq, req.payload) == (ident, seq, payload)
    assert (req.src, req.dst) == (GUEST_IP, GATEWAY_IP)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
@example(b"")
@example(b"\x08\x00\xf7\xff\x00\x00\x00\x00")  # a valid, empty echo request
def test_arbitrary_icmp_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        req = parse_echo_request(raw_ip(data))
    except MalformedFrame as exc:
        assert exc.reason in ICMP_REASONS
        return
    # Accepted: then it really is an echo request with a valid checksum.
    assert data[0] == ICMP_ECHO_REQUEST and data[1] == 0
    assert dpkt.in_cksum(data) == 0
    assert req.payload == data[8:]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_frames_only_raise_malformed(data: bytes) -> None:
    try:
        parse_echo_request(parse_frame(data))
    except MalformedFrame as exc:
        assert exc.reason in ICMP_REASONS | WIRE_REASONS


@settings(max_examples=200, deadline=None)
@given(u16, u16, st.binary(min_size=1, max_size=64), st.data())
def test_corrupted_request_refused(ident: int, seq: int, payload: bytes,
                                   data: st.DataObject) -> None:
    icmp = bytearray(icmp_message(ICMP_ECHO_REQUEST, 0, ident, seq, payload))
    pos = data.draw(st.integers(0, len(icmp) - 1))
    flip = data.draw(st.integers(1, 255))
    icmp[pos] ^= flip
    # A one-byte change moves the ones'-complement sum by d or 256*d, 0 < |d| < 256,
    # never a multiple of 0xffff: the checksum always catches it (RFC 1071).
    with pytest.raises(MalformedFrame, match="icmp_checksum"):
        parse_echo_request(raw_ip(bytes(icmp)))


@pytest.mark.parametrize(("icmp_type", "code", "reason"), [
    (ICMP_ECHO_REPLY, 0, "icmp_type"),
    (3, 1, "icmp_type"),  # destination unreachable
    (13, 0, "icmp_type"),  # timestamp
    (ICMP_ECHO_REQUEST, 1, "icmp_code"),
])
def test_non_echo_requests_refused(icmp_type: int, code: int, reason: str) -> None:
    with pytest.raises(MalformedFrame) as exc:
        parse_echo_request(raw_ip(icmp_message(icmp_type, code, 1, 2, b"x")))
    assert exc.value.reason == reason


def test_short_and_bad_checksum_refused() -> None:
    for short in (b"", b"\x08\x00\xf7\xff\x00\x00\x00"):
        with pytest.raises(MalformedFrame, match="icmp_short"):
            parse_echo_request(raw_ip(short))
    good = icmp_message(ICMP_ECHO_REQUEST, 0, 1, 2, b"abc")
    bad = struct.unpack("!H", good[2:4])[0] ^ 1
    with pytest.raises(MalformedFrame, match="icmp_checksum"):
        parse_echo_request(raw_ip(icmp_message(ICMP_ECHO_REQUEST, 0, 1, 2, b"abc",
                                               checksum=bad)))


# -- pure: replies -----------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(macs, macs, addrs, addrs, u16, u16, st.binary(max_size=1600), u16, st.integers(1, 255))
@example(GUEST_MAC, CONFIG.gateway_mac, GATEWAY_IP, GUEST_IP, 0, 0, b"", 0, 64)
def test_reply_frame_parses_with_valid_checksums(dmac: bytes, smac: bytes, src: bytes,
                                                 dst: bytes, ident: int, seq: int,
                                                 payload: bytes, ip_ident: int,
                                                 ttl: int) -> None:
    frame = echo_reply_frame(dst_mac=dmac, src_mac=smac, src=src, dst=dst, ident=ident,
                             seq=seq, payload=payload, ip_ident=ip_ident, ttl=ttl)
    check_reply(frame, src=src, dst=dst, ident=ident, seq=seq, payload=payload,
                dst_mac=dmac, src_mac=smac)
    ip = dpkt.ethernet.Ethernet(frame).data
    assert (ip.id, ip.ttl, ip.df, ip.mf, ip.offset) == (ip_ident, ttl, 1, 0, 0)
    # Our own parser accepts it too (header checksum included).
    assert bytes(parse_frame(frame).payload) == frame[34:]


def test_reply_frame_too_large_refused() -> None:
    kw = {"dst_mac": GUEST_MAC, "src_mac": CONFIG.gateway_mac, "src": GATEWAY_IP,
          "dst": GUEST_IP, "ident": 1, "seq": 1}
    echo_reply_frame(payload=bytes(0xFFFF - 28), **kw)
    with pytest.raises(ValueError, match="does not fit"):
        echo_reply_frame(payload=bytes(0xFFFF - 27), **kw)


@settings(max_examples=200, deadline=None)
@given(u16, u16, payloads)
def test_reply_from_ping_socket_read(kernel_ident: int, seq: int, payload: bytes) -> None:
    reply = parse_echo_reply(icmp_message(ICMP_ECHO_REPLY, 0, kernel_ident, seq, payload))
    assert (reply.ident, reply.seq, reply.payload) == (kernel_ident, seq, payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_arbitrary_reply_bytes_only_raise_malformed(data: bytes) -> None:
    try:
        reply = parse_echo_reply(data)
    except MalformedFrame as exc:
        assert exc.reason in REPLY_REASONS
    else:
        assert data[:2] == b"\x00\x00" and reply.payload == data[8:]


# -- pure: the session table -------------------------------------------------------------

def test_table_bound_touch_and_expiry() -> None:
    table: EchoTable[tuple[int, bytes], str] = EchoTable(capacity=2, idle_timeout_s=10.0)
    assert table.next_deadline() is None
    table.add((1, b"a"), "one", now=0.0)
    table.add((2, b"a"), "two", now=5.0)
    assert table.full and len(table) == 2
    with pytest.raises(OverflowError):
        table.add((3, b"a"), "three", now=5.0)
    with pytest.raises(KeyError):
        table.add((1, b"a"), "again", now=5.0)
    assert table.next_deadline() == 10.0
    table.touch((1, b"a"), now=8.0)  # traffic postpones expiry
    assert table.next_deadline() == 15.0
    assert table.expired(14.9) == []
    assert table.expired(15.0) == [((2, b"a"), "two")]
    assert table.get((1, b"a")) == "one" and not table.full
    assert table.expired(18.0) == [((1, b"a"), "one")]
    assert len(table) == 0
    table.touch((1, b"a"), now=20.0)  # touching a gone session does not revive it
    assert (1, b"a") not in table


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "touch", "expire"]), st.integers(0, 5),
                          st.floats(0, 5)), max_size=60))
def test_table_against_model(ops: list[tuple[str, int, float]]) -> None:
    table: EchoTable[int, int] = EchoTable(capacity=3, idle_timeout_s=4.0)
    model: dict[int, float] = {}
    now = 0.0
    for op, key, step in ops:
        now += step
        if op == "add":
            if key in model or len(model) >= 3:
                with pytest.raises((KeyError, OverflowError)):
                    table.add(key, key, now)
            else:
                table.add(key, key, now)
                model[key] = now
        elif op == "touch":
            table.touch(key, now)
            if key in model:
                model[key] = now
        else:
            gone = {k for k, last in model.items() if last + 4.0 <= now}
            assert {k for k, _v in table.expired(now)} == gone
            for k in gone:
                del model[k]
        assert len(table) == len(model) <= 3
        assert table.next_deadline() == (min(model.values()) + 4.0 if model else None)


# -- the relay without sockets -----------------------------------------------------------

async def test_drops_without_opening_sockets() -> None:
    stats: Counter[str] = Counter()
    frames: list[bytes] = []
    relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), frames.append, stats)
    try:
        echo = request_frame(icmp_message(ICMP_ECHO_REQUEST, 0, 7, 1, b"ping"))
        relay.on_packet(parse_frame(echo), None, GUEST_MAC)  # e.g. mapping switched off
        other = request_frame(icmp_message(13, 0, 7, 1, b"x" * 12))
        relay.on_packet(parse_frame(other), "127.0.0.1", GUEST_MAC)
        relay.on_packet(raw_ip(b"\x08\x00"), "127.0.0.1", GUEST_MAC)
        for dst in ("10.0.2.255", "255.255.255.255", "224.0.0.1"):
            packed = IPv4Address(dst).packed
            frame = request_frame(icmp_message(ICMP_ECHO_REQUEST, 0, 7, 2, b""), dst=packed)
            relay.on_packet(parse_frame(frame), dst, GUEST_MAC)
        assert stats == Counter(icmp_echo_requests=4, drop_icmp_no_host=1, drop_icmp_type=1,
                                drop_icmp_short=1, drop_icmp_not_unicast=3)
        assert relay.socket_count == 0 and frames == []
    finally:
        relay.close()
