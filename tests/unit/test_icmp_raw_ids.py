"""icmp_echo.py's raw-socket part without sockets: identifier allocation and matching
(`RawEchoIds`), the sequence numbers a session sent (`RecentSeqs`), the requests sent on
a raw socket and the replies read from one (checked against dpkt)."""

from __future__ import annotations

import struct

import dpkt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relaynat.checksum import internet_checksum, verify
from relaynat.icmp_echo import (
    ICMP_ECHO_REPLY,
    ICMPV6_ECHO_REPLY,
    RawEchoIds,
    RecentSeqs,
    echo_request_message,
    parse_raw_reply,
)
from relaynat.wire import MalformedFrame

HOSTS = st.sampled_from([bytes([127, 0, 0, 1]), bytes([10, 0, 0, 1]), bytes(15) + b"\x01"])
#: A script of operations: allocate toward a host, or release the n-th live allocation.
OPS = st.lists(st.one_of(st.tuples(st.just("alloc"), HOSTS),
                         st.tuples(st.just("free"), st.integers(0, 50))), max_size=200)


@given(start=st.integers(0, 0xFFFF), ops=OPS)
def test_ids_are_unique_per_host_and_match_only_live_sessions(
        start: int, ops: list[tuple[str, object]]) -> None:
    ids: RawEchoIds[int] = RawEchoIds(start)
    live: dict[tuple[bytes, int], int] = {}
    freed: list[tuple[bytes, int]] = []
    for n, (op, arg) in enumerate(ops):
        if op == "alloc":
            assert isinstance(arg, bytes)
            ident = ids.allocate(arg, n)
            assert 0 <= ident <= 0xFFFF
            assert (arg, ident) not in live  # never two live sessions on one (host, id)
            live[(arg, ident)] = n
        elif live:
            assert isinstance(arg, int)
            key = list(live)[arg % len(live)]
            del live[key]
            ids.release(*key)
            freed.append(key)
        assert len(ids) == len(live)
    for (host, ident), value in live.items():
        assert ids.match(host, ident) == value
    for key in freed:
        if key not in live:
            assert ids.match(*key) is None
    # An identifier toward one host says nothing about another host's.
    for _host, ident in live:
        assert ids.match(bytes([192, 0, 2, 1]), ident) is None


def test_a_freed_id_is_not_reused_at_once() -> None:
    ids: RawEchoIds[str] = RawEchoIds(0xFFFE)
    host = bytes([127, 0, 0, 1])
    first = ids.allocate(host, "a")
    ids.release(host, first)
    second = ids.allocate(host, "b")
    assert (first, second) == (0xFFFE, 0xFFFF)
    assert ids.allocate(host, "c") == 0  # wraps
    ids.release(host, 12345)  # not allocated: nothing happens
    assert len(ids) == 2


def test_two_guests_with_one_identifier_get_two() -> None:
    ids: RawEchoIds[str] = RawEchoIds(7)
    host = bytes([127, 0, 0, 1])
    a, b = ids.allocate(host, "guest a"), ids.allocate(host, "guest b")
    assert a != b
    assert ids.match(host, a) == "guest a" and ids.match(host, b) == "guest b"


def test_every_identifier_toward_a_host_taken() -> None:
    ids: RawEchoIds[int] = RawEchoIds(0)
    host, other = bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2])
    for n in range(0x10000):
        ids.allocate(host, n)
    with pytest.raises(OverflowError):
        ids.allocate(host, -1)
    assert ids.allocate(other, -2) == 0  # the cursor is shared, the space per host
    ids.release(host, 4242)
    assert ids.allocate(host, -3) == 4242


@given(capacity=st.integers(1, 20), seqs=st.lists(st.integers(0, 0xFFFF), max_size=100))
def test_recent_seqs_keep_the_last_sent(capacity: int, seqs: list[int]) -> None:
    recent = RecentSeqs(capacity)
    for seq in seqs:
        recent.sent(seq)
        assert seq in recent
        assert len(recent) <= capacity
    # The `capacity` most recently sent distinct numbers are all remembered.
    last: list[int] = []
    for seq in reversed(seqs):
        if seq not in last:
            last.append(seq)
    for seq in last[:capacity]:
        assert seq in recent
    for seq in last[capacity:]:
        assert seq not in recent
    with pytest.raises(ValueError):
        RecentSeqs(0)


@given(ident=st.integers(0, 0xFFFF), seq=st.integers(0, 0xFFFF), payload=st.binary(max_size=300))
def test_raw_requests_ipv4_checksummed_ipv6_left_to_the_kernel(
        ident: int, seq: int, payload: bytes) -> None:
    msg = echo_request_message(ident, seq, payload, v6=False)
    parsed = dpkt.icmp.ICMP(msg)
    assert (parsed.type, parsed.code) == (8, 0)
    assert verify(msg)
    assert struct.unpack_from("!HH", msg, 4) == (ident, seq) and msg[8:] == payload
    msg6 = echo_request_message(ident, seq, payload, v6=True)
    assert msg6[0] == 128 and msg6[2:4] == b"\0\0" and msg6[4:] == msg[4:]


def _reply(ident: int, seq: int, payload: bytes, *, kind: int = ICMP_ECHO_REPLY) -> bytes:
    head = bytearray(struct.pack("!BBHHH", kind, 0, 0, ident, seq))
    struct.pack_into("!H", head, 2, internet_checksum(bytes(head) + payload))
    return bytes(head) + payload


def _ipv4(icmp: bytes, options: bytes = b"") -> bytes:
    ip = dpkt.ip.IP(src=bytes([127, 0, 0, 1]), dst=bytes([127, 0, 0, 1]), p=1, data=icmp,
                    opts=options, hl=5 + len(options) // 4)
    return bytes(ip)


@given(ident=st.integers(0, 0xFFFF), seq=st.integers(0, 0xFFFF), payload=st.binary(max_size=300),
       options=st.sampled_from([b"", b"\x01\x01\x01\x00"]))
def test_raw_replies_read_past_the_ip_header(ident: int, seq: int, payload: bytes,
                                             options: bytes) -> None:
    reply = parse_raw_reply(_ipv4(_reply(ident, seq, payload), options), v6=False)
    assert (reply.ident, reply.seq, reply.payload) == (ident, seq, payload)
    reply6 = parse_raw_reply(_reply(ident, seq, payload, kind=ICMPV6_ECHO_REPLY), v6=True)
    assert (reply6.ident, reply6.seq, reply6.payload) == (ident, seq, payload)


def test_raw_replies_rejected() -> None:
    good = _reply(1, 2, b"abc")
    bad = bytearray(good)
    bad[-1] ^= 1
    cases = [
        (_ipv4(bytes(bad)), False, "icmp_reply_checksum"),
        (_ipv4(good)[:20], False, "icmp_reply_short"),
        (b"\x45" + bytes(10), False, "icmp_reply_short"),
        (b"\x4f" + bytes(30), False, "icmp_reply_short"),  # IHL says 60 bytes
        (_ipv4(_reply(1, 2, b"", kind=8)), False, "icmp_reply_type"),
        (_ipv4(_reply(1, 2, b"", kind=ICMPV6_ECHO_REPLY)), False, "icmp_reply_type"),
        (good, True, "icmp_reply_type"),  # an ICMP (v4) echo reply is not ICMPv6's
        (good[:5], True, "icmp_reply_short"),
    ]
    for data, v6, reason in cases:
        with pytest.raises(MalformedFrame) as caught:
            parse_raw_reply(data, v6=v6)
        assert caught.value.reason == reason, (data, reason)
