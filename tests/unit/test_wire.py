"""relaynat.wire against dpkt, the parser of record.

Hypothesis builds Ethernet/IPv4/TCP, UDP and ARP frames with dpkt from random fields
(ports, sequence numbers near 2**32, flags, windows, IPv4 and TCP options, payloads,
Ethernet padding after the IP packet) and checks that the struct-based views read
every field exactly as dpkt does. Arbitrary bytes and targeted mutations (truncation,
lying IHL, total length and data offset, fragments) may only ever raise
`MalformedFrame` with a reason string.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TypeVar

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from relaynat import wire
from relaynat.wire import MalformedFrame, seq_diff, seq_le, seq_lt

M32 = 0xFFFFFFFF
T = TypeVar("T")

#: Every reason wire.py may give; a new one must be added here deliberately.
REASONS = {
    "eth_short", "ip_short", "ip_version", "ip_header_len", "ip_total_len", "ip_fragment",
    "ip_checksum", "tcp_short", "tcp_header_len", "udp_short", "udp_len", "arp_short",
    "arp_format",
}

macs = st.binary(min_size=6, max_size=6)
ipv4_addrs = st.binary(min_size=4, max_size=4)
ports = st.integers(0, 0xFFFF)
u32 = st.one_of(
    st.integers(0, M32),
    st.integers(M32 - 100_000, M32),
    st.sampled_from([0, 1, 0x7FFFFFFF, 0x80000000, 0x80000001, M32]),
)
payloads = st.binary(max_size=1600)
#: Bytes after the IP packet: Ethernet minimum-size padding, or an FCS some NICs keep.
eth_padding = st.one_of(st.just(b""), st.binary(max_size=64))


# -- TCP options --------------------------------------------------------------------

def opt_mss(v: int) -> bytes:
    return struct.pack("!BBH", 2, 4, v)


def opt_ws(v: int) -> bytes:
    return bytes((3, 3, v))


tcp_option = st.one_of(
    st.integers(0, 0xFFFF).map(opt_mss),
    st.integers(0, 255).map(opt_ws),  # shifts above 14 too: wire clamps them
    st.just(b"\x01"),  # NOP
    st.just(b"\x04\x02"),  # SACK permitted
    st.tuples(u32, u32).map(lambda t: struct.pack("!BBII", 8, 10, *t)),  # timestamps
    # Timestamps as Linux lays them out (RFC 7323 Appendix A): wire's fast path.
    st.tuples(u32, u32).map(lambda t: b"\x01\x01" + struct.pack("!BBII", 8, 10, *t)),
    st.sampled_from([b"\x08\x09" + bytes(7), b"\x08\x0b" + bytes(9)]),  # wrong TS length
    st.lists(st.tuples(u32, u32), min_size=1, max_size=3).map(
        lambda blocks: bytes((5, 2 + 8 * len(blocks)))
        + b"".join(struct.pack("!II", *b) for b in blocks)),  # SACK blocks
    # Garbage: unknown kinds with a valid length byte.
    st.tuples(st.integers(6, 255).filter(lambda k: k != 8), st.binary(max_size=8)).map(
        lambda t: bytes((t[0], 2 + len(t[1]))) + t[1]),
    # Right kind, wrong length: ignored by both wire and the reference.
    st.binary(min_size=1, max_size=3).map(lambda b: bytes((2, 2 + len(b))) + b
                                          if len(b) != 2 else b"\x01"),
    st.sampled_from([b"\x03\x02", b"\x03\x04\x07\x00"]),
)


@st.composite
def tcp_options(draw: st.DrawFn) -> bytes:
    """A well-formed option list (every TLV fits), optionally ended by EOL, padded with
    zeros to a multiple of 4 and at most 40 bytes."""
    opts = b""
    for o in draw(st.lists(tcp_option, max_size=8)):
        if len(opts) + len(o) > 40:
            break
        opts += o
    if opts and len(opts) < 40 and draw(st.booleans()):
        opts += b"\x00"  # EOL
        # Anything after EOL is padding that must not be read as options.
        opts += draw(st.binary(max_size=40 - len(opts)))
    return opts + b"\x00" * (-len(opts) % 4)


TS_PREFIX = b"\x01\x01\x08\x0a"


def reference_options(opts: bytes, syn: bool) -> tuple[int | None, ...]:
    """(mss, wscale, tsval, tsecr) from dpkt's option list, with Linux's
    tcp_parse_options rules: stop at EOL, take only options of the right length, the
    last one wins, MSS and window scale only on a SYN, the shift clamped to 14
    (RFC 7323 §2.3). Like Linux's tcp_fast_parse_options, a non-SYN whose only
    option is NOP, NOP, TS (RFC 7323 Appendix A) is read from that option alone; any
    more options (SACK blocks after the TS) take the full parse."""
    mss = wscale = tsval = tsecr = None
    if not syn and len(opts) == 12 and opts[:4] == TS_PREFIX:
        return (None, None, *struct.unpack("!II", opts[4:12]))
    for item in dpkt.tcp.parse_opts(opts):
        assert item is not None, "the generator only builds well-formed options"
        kind, data = item
        if kind == dpkt.tcp.TCP_OPT_EOL:
            break
        if kind == dpkt.tcp.TCP_OPT_TIMESTAMP and len(data) == 8:
            tsval, tsecr = struct.unpack("!II", data)
        elif syn and kind == dpkt.tcp.TCP_OPT_MSS and len(data) == 2:
            mss = struct.unpack("!H", data)[0]
        elif syn and kind == dpkt.tcp.TCP_OPT_WSCALE and len(data) == 1:
            wscale = min(data[0], 14)
    return mss, wscale, tsval, tsecr


# -- frame builders (dpkt) ----------------------------------------------------------

ip_options = st.sampled_from([b"", b"\x01\x01\x01\x00", b"\x94\x04\x00\x00",
                              b"\x01" * 8, b"\x07\x07\x04" + b"\x00" * 4 + b"\x00"])


@st.composite
def ipv4_fields(draw: st.DrawFn) -> dict:
    return {
        "src": draw(ipv4_addrs), "dst": draw(ipv4_addrs), "ttl": draw(st.integers(0, 255)),
        "id": draw(st.integers(0, 0xFFFF)), "tos": draw(st.integers(0, 255)),
        "df": draw(st.booleans()), "opts": draw(ip_options),
    }


def build_ip(fields: dict, proto: int, l4: dpkt.Packet) -> dpkt.ip.IP:
    ip = dpkt.ip.IP(src=fields["src"], dst=fields["dst"], ttl=fields["ttl"], id=fields["id"],
                    tos=fields["tos"], p=proto, opts=fields["opts"], data=l4)
    ip.hl = 5 + len(fields["opts"]) // 4
    ip.df = int(fields["df"])
    return ip


def build_eth(dst: bytes, src: bytes, etype: int, data: dpkt.Packet, padding: bytes) -> bytes:
    return bytes(dpkt.ethernet.Ethernet(dst=dst, src=src, type=etype, data=data)) + padding


@st.composite
def tcp_frames(draw: st.DrawFn) -> bytes:
    opts = draw(tcp_options())
    tcp = dpkt.tcp.TCP(sport=draw(ports), dport=draw(ports), seq=draw(u32), ack=draw(u32),
                       win=draw(st.integers(0, 0xFFFF)), urp=draw(st.integers(0, 0xFFFF)),
                       opts=opts, data=draw(payloads))
    tcp.off = 5 + len(opts) // 4
    # The eight flag bits wire reads, with SYN often set so options are parsed, plus the
    # NS bit and reserved bits, which live in the byte before and must not leak in.
    flags = draw(st.integers(0, 0xFF))
    if draw(st.booleans()):
        flags |= wire.SYN
    tcp.flags = flags | (draw(st.integers(0, 1)) << 8)
    tcp._rsv = draw(st.integers(0, 7))
    ip = build_ip(draw(ipv4_fields()), dpkt.ip.IP_PROTO_TCP, tcp)
    return build_eth(draw(macs), draw(macs), dpkt.ethernet.ETH_TYPE_IP, ip, draw(eth_padding))


@st.composite
def udp_frames(draw: st.DrawFn) -> bytes:
    data = draw(payloads)
    udp = dpkt.udp.UDP(sport=draw(ports), dport=draw(ports), ulen=8 + len(data), data=data)
    ip = build_ip(draw(ipv4_fields()), dpkt.ip.IP_PROTO_UDP, udp)
    return build_eth(draw(macs), draw(macs), dpkt.ethernet.ETH_TYPE_IP, ip, draw(eth_padding))


@st.composite
def arp_frames(draw: st.DrawFn) -> bytes:
    arp = dpkt.arp.ARP(hrd=1, pro=0x0800, hln=6, pln=4, op=draw(st.integers(0, 0xFFFF)),
                       sha=draw(macs), spa=draw(ipv4_addrs), tha=draw(macs),
                       tpa=draw(ipv4_addrs))
    return build_eth(draw(macs), draw(macs), dpkt.ethernet.ETH_TYPE_ARP, arp, draw(eth_padding))


any_frame = st.one_of(tcp_frames(), udp_frames(), arp_frames())


# -- differential tests ---------------------------------------------------------------

@settings(max_examples=400, deadline=None)
@given(tcp_frames())
def test_tcp_matches_dpkt(frame: bytes) -> None:
    ref = dpkt.ethernet.Ethernet(frame)
    eth = wire.parse_ethernet(memoryview(frame))
    assert (eth.dst_mac, eth.src_mac, eth.ethertype) == (ref.dst, ref.src, ref.type)
    assert eth.ethertype == wire.ETHERTYPE_IPV4
    ip = wire.parse_ipv4(eth.payload)
    rip = ref.data
    assert isinstance(rip, dpkt.ip.IP)
    assert (ip.src, ip.dst, ip.proto, ip.ttl, ip.ident) == (rip.src, rip.dst, rip.p, rip.ttl,
                                                           rip.id)
    # Ethernet padding is dropped: the packet ends at the IPv4 total length.
    assert bytes(ip.packet) == bytes(rip)
    assert len(ip.packet) == rip.len
    seg = wire.parse_tcp(ip)
    rtcp = rip.data
    assert isinstance(rtcp, dpkt.tcp.TCP)
    assert (seg.src, seg.dst) == (rip.src, rip.dst)
    assert (seg.sport, seg.dport, seg.seq, seg.ack, seg.window) == (
        rtcp.sport, rtcp.dport, rtcp.seq, rtcp.ack, rtcp.win)
    # dpkt's flags field is 9 bits wide (NS included); wire reads the byte RFC 9293 names.
    assert seg.flags == rtcp.flags & 0xFF
    assert bytes(seg.payload) == rtcp.data
    assert (seg.mss, seg.wscale, seg.tsval, seg.tsecr) == reference_options(
        rtcp.opts, bool(seg.flags & wire.SYN))


@settings(max_examples=200, deadline=None)
@given(udp_frames(), st.integers(0, 64))
def test_udp_matches_dpkt(frame: bytes, shorten: int) -> None:
    ref = dpkt.ethernet.Ethernet(frame)
    rudp = ref.data.data
    assert isinstance(rudp, dpkt.udp.UDP)
    dgram = wire.parse_udp(wire.parse_ipv4(wire.parse_ethernet(memoryview(frame)).payload))
    assert (dgram.src, dgram.dst, dgram.sport, dgram.dport) == (
        ref.data.src, ref.data.dst, rudp.sport, rudp.dport)
    assert bytes(dgram.payload) == rudp.data
    # A UDP length shorter than the IP payload: bytes past it are not datagram payload.
    ulen = max(8, rudp.ulen - shorten)
    raw = bytearray(frame)
    udp_at = 14 + ref.data.hl * 4
    struct.pack_into("!H", raw, udp_at + 4, ulen)
    dgram = wire.parse_udp(wire.parse_ipv4(wire.parse_ethernet(memoryview(raw)).payload))
    assert bytes(dgram.payload) == rudp.data[:ulen - 8]


@settings(max_examples=200, deadline=None)
@given(arp_frames())
def test_arp_matches_dpkt(frame: bytes) -> None:
    ref = dpkt.ethernet.Ethernet(frame)
    rarp = ref.data
    assert isinstance(rarp, dpkt.arp.ARP)
    eth = wire.parse_ethernet(memoryview(frame))
    assert eth.ethertype == wire.ETHERTYPE_ARP
    arp = wire.parse_arp(eth.payload)
    assert (arp.op, arp.sender_mac, arp.sender_ip, arp.target_mac, arp.target_ip) == (
        rarp.op, rarp.sha, rarp.spa, rarp.tha, rarp.tpa)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 255), st.integers(0, 255))
@example(2, 0x0800, 6, 4)
@example(1, 0x86DD, 6, 4)
@example(1, 0x0800, 6, 16)
def test_arp_other_formats_refused(htype: int, ptype: int, hlen: int, plen: int) -> None:
    body = struct.pack("!HHBBH6s4s6s4s", htype, ptype, hlen, plen, 1, b"\1" * 6, b"\2" * 4,
                       b"\3" * 6, b"\4" * 4)
    if (htype, ptype, hlen, plen) == (1, 0x0800, 6, 4):
        assert wire.parse_arp(memoryview(body)).op == 1
    else:
        with pytest.raises(MalformedFrame) as exc:
            wire.parse_arp(memoryview(body))
        assert exc.value.reason == "arp_format"
    with pytest.raises(MalformedFrame) as exc:
        wire.parse_arp(memoryview(body[:27]))
    assert exc.value.reason == "arp_short"


def test_syn_options_examples() -> None:
    """A Linux SYN's options, and the RFC 7323 §2.3 clamp of an oversized shift."""
    def seg_with(opts: bytes, flags: int = wire.SYN) -> wire.TcpSegment:
        tcp = dpkt.tcp.TCP(sport=1, dport=2, seq=3, flags=flags, opts=opts)
        tcp.off = 5 + len(opts) // 4
        ip = dpkt.ip.IP(src=b"\1\2\3\4", dst=b"\5\6\7\x08", p=6, data=tcp)
        frame = bytes(dpkt.ethernet.Ethernet(type=0x0800, data=ip))
        return wire.parse_tcp(wire.parse_ipv4(wire.parse_ethernet(memoryview(frame)).payload))

    linux = bytes.fromhex("020405b40402080a0001e2400000000001030307")
    seg = seg_with(linux)
    assert (seg.mss, seg.wscale, seg.tsval, seg.tsecr) == (1460, 7, 123456, 0)
    # A Linux data segment: NOP, NOP, TS.
    seg = seg_with(TS_PREFIX + struct.pack("!II", 0xFFFFFFFF, 7), wire.ACK)
    assert (seg.mss, seg.wscale, seg.tsval, seg.tsecr) == (None, None, 0xFFFFFFFF, 7)
    seg = seg_with(opt_mss(1000) + b"\x01\x01" + struct.pack("!BBII", 8, 10, 5, 6), wire.ACK)
    assert (seg.mss, seg.tsval, seg.tsecr) == (None, 5, 6)
    assert (seg_with(opt_mss(536) + b"\x01" + opt_ws(15)).wscale) == 14
    assert (seg_with(opt_mss(536) + b"\x01" + opt_ws(255)).wscale) == 14
    # Not a SYN: MSS and window scale are ignored, timestamps are not.
    seg = seg_with(linux, wire.ACK)
    assert (seg.mss, seg.wscale, seg.tsval) == (None, None, 123456)
    # EOL ends the list: an MSS after it is padding.
    assert seg_with(b"\x00\x00\x00\x00" + opt_mss(1000)).mss is None
    # An option running past the header: stop, keep what came before.
    seg = seg_with(opt_mss(1200) + b"\x01\x03\x03")  # the shift's byte is missing
    assert (seg.mss, seg.wscale) == (1200, None)
    seg = seg_with(opt_ws(3) + b"\x01" + b"\x02\x09\x05\xb4")  # MSS claims 9 bytes
    assert (seg.mss, seg.wscale) == (None, 3)
    seg = seg_with(opt_mss(1300) + b"\x01\x08\x01\x00")  # length 1 < 2: stop
    assert (seg.mss, seg.wscale) == (1300, None)


# -- malformed input ------------------------------------------------------------------

def parse_all(frame: bytes | bytearray, verify: bool = True) -> object:
    """The relay's full parse of a guest frame; returns the innermost view."""
    eth = wire.parse_ethernet(memoryview(frame))
    if eth.ethertype == wire.ETHERTYPE_ARP:
        return wire.parse_arp(eth.payload)
    ip = wire.parse_ipv4(eth.payload, verify_header_checksum=verify)
    if ip.proto == wire.IPPROTO_TCP:
        seg = wire.parse_tcp(ip)
        assert 0 <= seg.sport <= 0xFFFF and 0 <= seg.seq <= M32 and 0 <= seg.flags <= 0xFF
        assert seg.mss is None or 0 <= seg.mss <= 0xFFFF
        assert seg.wscale is None or 0 <= seg.wscale <= 14
        assert (seg.tsval is None) == (seg.tsecr is None)
        assert seg.tsval is None or 0 <= seg.tsval <= M32
        assert len(seg.payload) <= len(frame)
        return seg
    if ip.proto == wire.IPPROTO_UDP:
        return wire.parse_udp(ip)
    return ip


def parse_or_reason(frame: bytes | bytearray, verify: bool = True) -> str | None:
    try:
        parse_all(frame, verify)
    except MalformedFrame as exc:
        assert exc.reason in REASONS
        assert exc.args == (exc.reason,)
        return exc.reason
    return None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_malformed(frame: bytes) -> None:
    parse_or_reason(frame)
    parse_or_reason(frame, verify=False)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"\x08\x00", b"\x08\x06"]),
       st.sampled_from([b"", b"\x45", b"\x46", b"\x4f", b"\x40", b"\x60"]))
def test_arbitrary_l3_bytes_only_malformed(body: bytes, etype: bytes, first: bytes) -> None:
    """Arbitrary bytes behind a valid Ethernet header, so the IPv4/ARP parsers see them."""
    frame = b"\0" * 12 + etype + first + body
    parse_or_reason(frame)
    parse_or_reason(frame, verify=False)


@settings(max_examples=500, deadline=None)
@given(any_frame, st.data())
def test_mutated_frames_only_malformed(frame: bytes, data: st.DataObject) -> None:
    raw = bytearray(frame)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["truncate", "byte", "ihl", "totlen", "doff",
                                          "frag", "udplen"]))
        if kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif kind == "byte" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "ihl" and len(raw) > 14:
            raw[14] = (raw[14] & 0xF0) | data.draw(st.integers(0, 15))
        elif kind == "totlen" and len(raw) >= 18:
            struct.pack_into("!H", raw, 16, data.draw(st.integers(0, 0xFFFF)))
        elif kind == "doff" and len(raw) >= 47:
            raw[46] = (data.draw(st.integers(0, 15)) << 4) | (raw[46] & 0x0F)
        elif kind == "frag" and len(raw) >= 22:
            struct.pack_into("!H", raw, 20, data.draw(st.integers(0, 0xFFFF)))
        elif kind == "udplen" and len(raw) >= 40:
            struct.pack_into("!H", raw, 38, data.draw(st.integers(0, 0xFFFF)))
    parse_or_reason(raw)
    parse_or_reason(raw, verify=False)


def fix_ip_checksum(raw: bytearray) -> None:
    hl = (raw[14] & 0x0F) * 4
    struct.pack_into("!H", raw, 24, 0)
    if 20 <= hl <= len(raw) - 14:
        struct.pack_into("!H", raw, 24, dpkt.in_cksum(bytes(raw[14:14 + hl])))


@settings(max_examples=300, deadline=None)
@given(tcp_frames(), st.data())
def test_lying_headers_give_their_reason(frame: bytes, data: st.DataObject) -> None:
    """Each lie, with a correct IPv4 checksum, is refused with its own reason."""
    ip_len = struct.unpack_from("!H", frame, 16)[0]
    ihl = frame[14] & 0x0F
    l3_avail = len(frame) - 14

    raw = bytearray(frame)
    lie = data.draw(st.integers(0, 4))
    raw[14] = 0x40 | lie
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "ip_header_len"

    raw = bytearray(frame)
    bad_ihl = data.draw(st.integers(6, 15))
    struct.pack_into("!H", raw, 16, data.draw(st.integers(20, bad_ihl * 4 - 1)))
    raw[14] = 0x40 | bad_ihl
    fix_ip_checksum(raw)
    # A header longer than the total length claims (or than the frame) is a lying IHL.
    assert parse_or_reason(raw, verify=False) == "ip_header_len"

    raw = bytearray(frame)
    struct.pack_into("!H", raw, 16, data.draw(st.integers(l3_avail + 1, 0xFFFF)))
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "ip_total_len"

    raw = bytearray(frame)
    struct.pack_into("!H", raw, 16, data.draw(st.integers(0, ihl * 4 - 1)))
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "ip_header_len"  # total length shorter than the header

    raw = bytearray(frame)
    frag = data.draw(st.one_of(st.just(0x2000), st.integers(1, 0x1FFF),
                               st.integers(0, 0xFFFF).filter(lambda v: v & 0x3FFF)))
    struct.pack_into("!H", raw, 20, frag)
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "ip_fragment"

    raw = bytearray(frame)
    raw[24] ^= 0x01  # checksum off by one
    assert parse_or_reason(raw) == "ip_checksum"
    assert parse_or_reason(raw, verify=False) is None

    raw = bytearray(frame)
    tcp_at = 14 + ihl * 4
    tcp_len = ip_len - ihl * 4
    doff = data.draw(st.integers(0, 4))
    raw[tcp_at + 12] = (doff << 4) | (raw[tcp_at + 12] & 0x0F)
    assert parse_or_reason(raw) == "tcp_header_len"

    raw = bytearray(frame)
    doff = data.draw(st.integers(6, 15))
    # Cut the segment (via the IPv4 total length) below what the data offset claims.
    new_tcp_len = data.draw(st.integers(20, min(doff * 4 - 1, tcp_len)))
    struct.pack_into("!H", raw, 16, ihl * 4 + new_tcp_len)
    raw[tcp_at + 12] = (doff << 4) | (raw[tcp_at + 12] & 0x0F)
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "tcp_header_len"

    raw = bytearray(frame)
    cut = data.draw(st.integers(0, 19))
    struct.pack_into("!H", raw, 16, ihl * 4 + cut)
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "tcp_short"


def test_short_frames_reasons() -> None:
    assert parse_or_reason(b"\0" * 13) == "eth_short"
    assert parse_or_reason(b"\0" * 12 + b"\x08\x00" + b"\x45" * 19) == "ip_short"
    assert parse_or_reason(b"\0" * 12 + b"\x08\x00" + b"\x60" + b"\0" * 39) == "ip_version"
    assert parse_or_reason(b"\0" * 12 + b"\x08\x06" + b"\0" * 27) == "arp_short"


def test_udp_reasons() -> None:
    udp = dpkt.udp.UDP(sport=1, dport=2, ulen=12, data=b"abcd")
    ip = dpkt.ip.IP(src=b"\1\2\3\4", dst=b"\5\6\7\x08", p=17, data=udp)
    frame = bytearray(bytes(dpkt.ethernet.Ethernet(type=0x0800, data=ip)))
    for ulen in (0, 7, 13, 0xFFFF):
        raw = bytearray(frame)
        struct.pack_into("!H", raw, 38, ulen)
        assert parse_or_reason(raw) == "udp_len"
    raw = bytearray(frame)
    struct.pack_into("!H", raw, 16, 20 + 7)
    fix_ip_checksum(raw)
    assert parse_or_reason(raw) == "udp_short"


def test_payload_is_a_view_of_the_frame() -> None:
    tcp = dpkt.tcp.TCP(sport=1, dport=2, flags=wire.ACK, data=b"hello")
    ip = dpkt.ip.IP(src=b"\1\2\3\4", dst=b"\5\6\7\x08", p=6, data=tcp)
    buf = bytearray(bytes(dpkt.ethernet.Ethernet(type=0x0800, data=ip))) + b"\0" * 6
    seg = wire.parse_tcp(wire.parse_ipv4(wire.parse_ethernet(memoryview(buf)).payload))
    assert bytes(seg.payload) == b"hello"
    buf[-7] = ord("O")  # no copy was made
    assert bytes(seg.payload) == b"hellO"


# -- sequence arithmetic ----------------------------------------------------------------

seqs = st.one_of(st.integers(0, M32), st.integers(M32 - 1000, M32), st.integers(0, 1000))


@given(seqs, st.integers(-(2**31), 2**31 - 1))
@example(M32, 1)
@example(M32 - 5, 10)
@example(0, -1)
def test_seq_helpers_across_wrap(a: int, d: int) -> None:
    b = (a + d) & M32
    assert seq_diff(b, a) == d
    assert seq_diff(a, b) == (-d if d != -(2**31) else -(2**31))
    assert seq_lt(a, b) == (d > 0)
    assert seq_le(a, b) == (d >= 0)
    assert seq_lt(b, a) == (0 < -d < 2**31)
    assert seq_le(a, a) and not seq_lt(a, a)


def test_seq_helpers_examples() -> None:
    assert seq_lt(M32, 0) and seq_lt(M32 - 10, 5) and not seq_lt(5, M32 - 10)
    assert seq_diff(3, M32 - 2) == 6
    assert seq_diff(M32 - 2, 3) == -6
    assert seq_le(M32, M32) and seq_le(M32, 0)
    # Exactly half the space apart: neither is "before" the other; the distance is -2**31.
    assert not seq_lt(0, 2**31) and not seq_lt(2**31, 0)
    assert seq_diff(2**31, 0) == -(2**31)


def test_segment_checksum_ok_takes_full_and_partial_sums_and_catches_a_flipped_bit() -> None:
    from relaynat.checksum import finish, partial_sum, pseudo_header_sum, segment_checksum_ok

    src, dst = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])
    seg = bytearray(struct.pack("!HHIIBBHHH", 40000, 80, 1, 2, 5 << 4, 0x18, 1000, 0, 0)
                    + bytes(range(256)) * 5)
    pseudo = pseudo_header_sum(src, dst, 6, len(seg))
    partial = bytes(seg[:16]) + struct.pack("!H", pseudo) + bytes(seg[18:])
    struct.pack_into("!H", seg, 16, finish(pseudo + partial_sum(seg)))
    assert segment_checksum_ok(src, dst, 6, seg, 16)
    assert segment_checksum_ok(src, dst, 6, partial, 16)  # offload: nothing to verify
    for at, bit in ((2, 0), (13, 2), (20, 7), (120, 3), (len(seg) - 1, 5)):
        damaged = bytearray(seg)
        damaged[at] ^= 1 << bit  # a port, the flags, the payload: one bit each
        assert not segment_checksum_ok(src, dst, 6, damaged, 16), (at, bit)


# -- the fast path ----------------------------------------------------------------------

@st.composite
def data_segment_frames(draw: st.DrawFn) -> bytes:
    """What an established flow sends: no IP options, no SYN, no TCP options or a lone
    NOP, NOP, TS (with SACK blocks after it now and then: the general path's)."""
    opts = draw(st.sampled_from([b"", "ts", "ts+sack"]))
    if opts:
        ts = TS_PREFIX + struct.pack("!II", draw(u32), draw(u32))
        opts = ts if opts == "ts" else ts + b"\x01\x01\x05\x0a" + struct.pack("!II", draw(u32),
                                                                             draw(u32))
    tcp = dpkt.tcp.TCP(sport=draw(ports), dport=draw(ports), seq=draw(u32), ack=draw(u32),
                       win=draw(st.integers(0, 0xFFFF)), opts=opts, data=draw(payloads),
                       flags=draw(st.integers(0, 0xFF)) & ~wire.SYN)
    tcp.off = 5 + len(opts) // 4
    fields = draw(ipv4_fields())
    fields["opts"] = b""
    ip = build_ip(fields, dpkt.ip.IP_PROTO_TCP, tcp)
    return build_eth(draw(macs), draw(macs), dpkt.ethernet.ETH_TYPE_IP, ip, draw(eth_padding))


def _general(frame: bytes | bytearray, proto: int,
             parse: Callable[[wire.Ipv4Packet], T]) -> tuple[bytes, wire.Ipv4Packet, T] | None:
    """(source MAC, packet, `parse(packet)`) by the general parsers for an IPv4 frame of
    protocol `proto`, or None for anything else, valid or not."""
    try:
        eth = wire.parse_ethernet(memoryview(frame))
        if eth.ethertype != wire.ETHERTYPE_IPV4:
            return None
        ip = wire.parse_ipv4(eth.payload)
        if ip.proto != proto:
            return None
        return eth.src_mac, ip, parse(ip)
    except MalformedFrame:
        return None


def _general_tcp(frame: bytes | bytearray,
                 verify: bool) -> tuple[bytes, wire.Ipv4Packet, wire.TcpSegment] | None:
    return _general(frame, wire.IPPROTO_TCP, lambda ip: wire.parse_tcp(ip, verify))


def _fields(seg: wire.TcpSegment) -> tuple:
    return (seg.src, seg.dst, seg.sport, seg.dport, seg.seq, seg.ack, seg.flags, seg.window,
            bytes(seg.payload), seg.mss, seg.wscale, seg.sack_permitted, seg.tsval, seg.tsecr,
            seg.sack)


def damaged(frame: bytes, data: st.DataObject) -> bytearray:
    """`frame` with up to three faults in the fields the fast parsers read, and then
    the IP header checksum repaired or not."""
    raw = bytearray(frame)
    for _ in range(data.draw(st.integers(0, 3))):
        kind = data.draw(st.sampled_from(["truncate", "byte", "totlen", "doff", "frag", "ihl",
                                          "proto", "etype", "udplen"]))
        if kind == "truncate":
            del raw[data.draw(st.integers(0, len(raw))):]
        elif kind == "byte" and raw:
            raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
        elif kind == "totlen" and len(raw) >= 18:
            value = data.draw(st.one_of(st.integers(0, 60), st.integers(0, 0xFFFF)))
            struct.pack_into("!H", raw, 16, value)
        elif kind == "doff" and len(raw) >= 47:
            raw[46] = (data.draw(st.integers(0, 15)) << 4) | (raw[46] & 0x0F)
        elif kind == "frag" and len(raw) >= 22:
            struct.pack_into("!H", raw, 20, data.draw(st.integers(0, 0xFFFF)))
        elif kind == "udplen" and len(raw) >= 40:
            struct.pack_into("!H", raw, 38, data.draw(st.one_of(st.integers(0, 40),
                                                                st.integers(0, 0xFFFF))))
        elif kind == "ihl" and len(raw) > 14:
            raw[14] = data.draw(st.one_of(st.integers(0x40, 0x4F), st.integers(0, 255)))
        elif kind == "proto" and len(raw) > 23:
            raw[23] = data.draw(st.sampled_from([1, 6, 17, 255]))
        elif kind == "etype" and len(raw) >= 14:
            raw[12:14] = data.draw(st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00"]))
    if len(raw) >= 34 and data.draw(st.booleans()):
        fix_ip_checksum(raw)  # so that a damaged header is judged by more than its sum
    return raw


@settings(max_examples=1500, deadline=None)
@given(st.one_of(data_segment_frames(), data_segment_frames(), tcp_frames(), udp_frames()),
       st.data(), st.booleans())
def test_fast_path_agrees_with_the_general_parsers(frame: bytes, data: st.DataObject,
                                                   verify: bool) -> None:
    """`parse_tcp4_fast` vouches only for frames the general parsers (proved against
    dpkt above) accept, and reads them field for field as they do; it declines nothing
    but what is not a plain data segment. Frames are also damaged (a byte, a length, the
    data offset, truncation) and then the IP header checksum repaired or not."""
    raw = damaged(frame, data)
    fast = wire.parse_tcp4_fast(memoryview(raw), verify)
    general = _general_tcp(raw, verify)
    if fast is not None:
        assert general is not None
        assert fast[0] == general[0] and _fields(fast[1]) == _fields(general[2])
        return
    if general is None:
        return
    seg = general[2]
    plain_options = len(raw) >= 47 and (raw[46] >> 4 == 5 or (
        raw[46] >> 4 == 8 and raw[54:58] == TS_PREFIX))
    common = raw[14] == 0x45 and not seg.flags & wire.SYN and plain_options
    assert not common, "a plain data segment the fast path declined"


def test_fast_path_takes_a_timestamped_data_segment() -> None:
    opts = TS_PREFIX + struct.pack("!II", 7, 9)
    tcp = dpkt.tcp.TCP(sport=40000, dport=5201, seq=M32, ack=1, win=512, opts=opts,
                       data=b"x" * 1000, flags=wire.ACK | wire.PSH)
    tcp.off = 8
    ip = build_ip({"src": b"\x0a\x00\x02\x0f", "dst": b"\x0a\x00\x02\x02", "ttl": 64, "id": 1,
                   "tos": 0, "df": True, "opts": b""}, dpkt.ip.IP_PROTO_TCP, tcp)
    frame = build_eth(b"\x02" * 6, b"\x52\x54\x00\x12\x34\x56", dpkt.ethernet.ETH_TYPE_IP,
                      ip, b"")
    fast = wire.parse_tcp4_fast(memoryview(frame), True)
    assert fast is not None
    mac, seg = fast
    assert mac == b"\x52\x54\x00\x12\x34\x56"
    assert (seg.seq, seg.ack, seg.tsval, seg.tsecr, bytes(seg.payload)) == (M32, 1, 7, 9,
                                                                           b"x" * 1000)
    assert wire.parse_tcp4_fast(memoryview(frame[:-1]), False) is None  # cut short


def test_fast_path_declines_edge_headers() -> None:
    """Headers the random frames reach only rarely: a total length that ends inside the
    TCP header, IP options of zeros (the first 20 bytes still sum right) and data
    offsets between 20 and 32 bytes. The general parsers decide them all."""
    opts = TS_PREFIX + struct.pack("!II", 7, 9)
    tcp = dpkt.tcp.TCP(sport=1, dport=2, seq=3, ack=4, win=5, opts=opts, data=b"y" * 64,
                       flags=wire.ACK)
    tcp.off = 8
    fields = {"src": b"\x0a\x00\x02\x0f", "dst": b"\x0a\x00\x02\x02", "ttl": 64, "id": 1,
              "tos": 0, "df": True, "opts": b""}
    eth_src = b"\x52\x54\x00\x12\x34\x56"
    good = bytearray(build_eth(b"\x02" * 6, eth_src, dpkt.ethernet.ETH_TYPE_IP,
                               build_ip(fields, dpkt.ip.IP_PROTO_TCP, tcp), b""))
    assert wire.parse_tcp4_fast(memoryview(good)) is not None
    for total_len in (20, 39, 40, 51):  # inside the TCP header or its options
        raw = bytearray(good)
        struct.pack_into("!H", raw, 16, total_len)
        fix_ip_checksum(raw)
        assert wire.parse_tcp4_fast(memoryview(raw)) is None
        assert _general_tcp(raw, False) is None
    zero_opts = bytearray(build_eth(b"\x02" * 6, eth_src, dpkt.ethernet.ETH_TYPE_IP,
                                    build_ip({**fields, "opts": b"\x00" * 4},
                                             dpkt.ip.IP_PROTO_TCP, tcp), b""))
    assert wire.parse_tcp4_fast(memoryview(zero_opts)) is None
    general = _general_tcp(zero_opts, True)
    assert general is not None and general[2].tsval == 7
    for off in (6, 7, 9, 15):
        raw = bytearray(good)
        raw[46] = (off << 4) | (raw[46] & 0x0F)
        assert wire.parse_tcp4_fast(memoryview(raw)) is None


@st.composite
def plain_udp_frames(draw: st.DrawFn) -> bytes:
    data = draw(payloads)
    udp = dpkt.udp.UDP(sport=draw(ports), dport=draw(ports), ulen=8 + len(data), data=data)
    fields = draw(ipv4_fields())
    fields["opts"] = b""
    ip = build_ip(fields, dpkt.ip.IP_PROTO_UDP, udp)
    return build_eth(draw(macs), draw(macs), dpkt.ethernet.ETH_TYPE_IP, ip, draw(eth_padding))


@settings(max_examples=1500, deadline=None)
@given(st.one_of(plain_udp_frames(), plain_udp_frames(), udp_frames(), tcp_frames()),
       st.data())
def test_udp_fast_path_agrees_with_the_general_parsers(frame: bytes,
                                                       data: st.DataObject) -> None:
    """As for TCP: `parse_udp4_fast` accepts only what the general parsers accept, reads
    the same fields and the same IPv4 packet (the ICMP quote comes from it), and
    declines no plain datagram."""
    raw = damaged(frame, data)
    fast = wire.parse_udp4_fast(memoryview(raw))
    general = _general(raw, wire.IPPROTO_UDP, wire.parse_udp)
    if fast is not None:
        assert general is not None
        mac, dgram, packet = fast
        ref_mac, ref_ip, ref = general
        assert (mac, dgram.src, dgram.dst, dgram.sport, dgram.dport, bytes(dgram.payload),
                bytes(packet)) == (ref_mac, ref.src, ref.dst, ref.sport, ref.dport,
                                   bytes(ref.payload), bytes(ref_ip.packet))
        return
    assert general is None or raw[14] != 0x45, "a plain datagram the fast path declined"
