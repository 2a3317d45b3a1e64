"""IPv6 on the wire: `wire.parse_ipv6` and the IPv6 frames of `packet_builder`, checked
against scapy, an independent parser and checksum implementation (RFC 8200, RFC 4443,
RFC 768/9293 over IPv6).

Frames are built with scapy for parsing and parsed with scapy for building, so neither
direction is checked only against itself.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
)
from scapy.layers.l2 import Ether

from relaynat.icmp_echo import echo_reply_frame, parse_echo_request
from relaynat.packet_builder import (
    ICMP_ADMIN_PROHIBITED,
    ICMP_PORT_UNREACH,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VNET_HDR,
    TcpFrameTemplate,
    icmp_unreachable_frame,
    udp_frame,
    udp_frame_head,
)
from relaynat.wire import (
    ACK,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PSH,
    SYN,
    MalformedFrame,
    parse_ethernet,
    parse_ipv6,
    parse_tcp,
    parse_udp,
)

GUEST = "fd00::15"
REMOTE = "2001:db8::7"
GUEST_B = bytes.fromhex("fd000000000000000000000000000015")
REMOTE_B = bytes.fromhex("20010db8000000000000000000000007")
MAC_G, MAC_R = b"\x02" * 6, b"\x52\x55\x0a\x00\x02\x02"
addrs6 = st.binary(min_size=16, max_size=16)
ports = st.integers(0, 0xFFFF)


def _ipv6_of(frame: bytes) -> IPv6:
    pkt = Ether(frame)
    assert IPv6 in pkt
    return pkt[IPv6]


def _checksum_ok(layer: object, field: str = "chksum") -> bool:
    """scapy recomputes a checksum when the field is None: compare with ours."""
    ours = getattr(layer, field)
    clone = Ether(bytes(layer.firstlayer()))  # type: ignore[attr-defined]
    target = clone[type(layer)]
    setattr(target, field, None)
    return ours == getattr(Ether(bytes(clone))[type(layer)], field)


# -- parsing --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["tcp", "udp"]), ports, ports, st.binary(max_size=300),
       st.integers(0, 255))
def test_parse_ipv6_tcp_and_udp_agree_with_scapy(kind: str, sport: int, dport: int,
                                                  data: bytes, hlim: int) -> None:
    l4 = TCP(sport=sport, dport=dport, flags="PA") if kind == "tcp" else UDP(sport=sport,
                                                                           dport=dport)
    frame = bytes(Ether(dst=MAC_R, src=MAC_G) / IPv6(src=GUEST, dst=REMOTE, hlim=hlim) / l4
                  / data)
    ip = parse_ipv6(parse_ethernet(memoryview(frame)).payload)
    assert (ip.src, ip.dst, ip.ttl) == (GUEST_B, REMOTE_B, hlim)
    if kind == "tcp":
        assert ip.proto == IPPROTO_TCP
        seg = parse_tcp(ip)
        assert (seg.sport, seg.dport, bytes(seg.payload)) == (sport, dport, data)
    else:
        assert ip.proto == IPPROTO_UDP
        dgram = parse_udp(ip)
        assert (dgram.sport, dgram.dport, bytes(dgram.payload)) == (sport, dport, data)


def test_extension_headers_are_skipped_and_fragments_refused() -> None:
    base = IPv6(src=GUEST, dst=REMOTE)
    frame = bytes(Ether() / base / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                  / UDP(sport=1, dport=2) / b"x")
    ip = parse_ipv6(parse_ethernet(memoryview(frame)).payload)
    assert ip.proto == IPPROTO_UDP and bytes(parse_udp(ip).payload) == b"x"
    frag = bytes(Ether() / base / IPv6ExtHdrFragment(m=1) / UDP(sport=1, dport=2) / b"y")
    with pytest.raises(MalformedFrame, match="ip6_fragment"):
        parse_ipv6(parse_ethernet(memoryview(frag)).payload)


def test_padding_is_trimmed_and_lies_about_length_are_refused() -> None:
    packet = bytes(IPv6(src=GUEST, dst=REMOTE) / UDP(sport=1, dport=2) / b"abc")
    ip = parse_ipv6(memoryview(packet + b"\0" * 20))
    assert bytes(parse_udp(ip).payload) == b"abc"
    too_long = bytearray(packet)
    struct.pack_into("!H", too_long, 4, len(packet))  # payload length past the end
    with pytest.raises(MalformedFrame, match="ip6_payload_len"):
        parse_ipv6(memoryview(bytes(too_long)))
    with pytest.raises(MalformedFrame, match="ip6_version"):
        parse_ipv6(memoryview(b"\x40" + packet[1:]))
    with pytest.raises(MalformedFrame, match="ip6_short"):
        parse_ipv6(memoryview(packet[:39]))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=40, max_size=120))
def test_parse_ipv6_never_raises_anything_but_malformed_frame(data: bytes) -> None:
    data = b"\x60" + data[1:]
    try:
        ip = parse_ipv6(memoryview(data))
    except MalformedFrame:
        return
    assert len(ip.payload) <= len(data) - 40


# -- building -------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFF),
       st.binary(max_size=2000), st.booleans())
def test_tcp_template_v6_frames_parse_with_valid_checksums(seq: int, ack: int, window: int,
                                                           payload: bytes, ts: bool) -> None:
    tmpl = TcpFrameTemplate(dst_mac=MAC_G, src_mac=MAC_R, src=REMOTE_B, dst=GUEST_B,
                            sport=80, dport=40000, timestamps=ts)
    frame = tmpl.build(seq, ack, ACK | PSH, window, payload, tsval=7, tsecr=9) + payload
    ip6 = _ipv6_of(frame)
    assert (ip6.src, ip6.dst, ip6.nh, ip6.plen) == (REMOTE, GUEST, 6, len(frame) - 54)
    tcp = ip6[TCP]
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.ack, tcp.window) == (80, 40000, seq, ack, window)
    assert bytes(tcp.payload) == payload
    assert _checksum_ok(tcp)
    if ts:
        assert dict(tcp.options)["Timestamp"] == (7, 9)


def test_tcp_template_v6_syn_ack_options_and_gso() -> None:
    tmpl = TcpFrameTemplate(dst_mac=MAC_G, src_mac=MAC_R, src=REMOTE_B, dst=GUEST_B,
                            sport=80, dport=40000, vnet_hdr_len=12, offload=True)
    payload = bytes(range(256)) * 200  # 51200 bytes: a GSO super-frame of 1420-byte MSS
    head = tmpl.build(1, 2, ACK, 100, payload, mss=1420)
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(head)
    assert flags == VIRTIO_NET_HDR_F_NEEDS_CSUM and gso_type == VIRTIO_NET_HDR_GSO_TCPV6
    assert (hdr_len, gso_size, csum_start, csum_offset) == (14 + 40 + 20, 1420, 54, 16)
    ip6 = _ipv6_of(head[12:] + payload)
    assert ip6.plen == 20 + len(payload)


@settings(max_examples=100, deadline=None)
@given(addrs6, addrs6, ports, ports, st.binary(max_size=1500))
def test_udp_frames_v6(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> None:
    frame = udp_frame(MAC_G, MAC_R, src, dst, sport, dport, payload)
    udp = _ipv6_of(frame)[UDP]
    assert (udp.sport, udp.dport, bytes(udp.payload)) == (sport, dport, payload)
    assert udp.chksum != 0 and _checksum_ok(udp)
    head = udp_frame_head(MAC_G, MAC_R, src, dst, sport, dport, payload)
    assert head + payload == frame


@pytest.mark.parametrize(("code", "v6_code"), [(ICMP_PORT_UNREACH, 4),
                                               (ICMP_ADMIN_PROHIBITED, 1)])
def test_icmpv6_unreachable_quotes_the_datagram(code: int, v6_code: int) -> None:
    offending = bytes(IPv6(src=GUEST, dst=REMOTE) / UDP(sport=5000, dport=53) / b"q")
    frame = icmp_unreachable_frame(MAC_G, MAC_R, REMOTE_B, GUEST_B, offending[:48], code)
    ip6 = _ipv6_of(frame)
    err = ip6[ICMPv6DestUnreach]
    assert err.code == v6_code and _checksum_ok(err, "cksum")
    # scapy reads the quote as IPerror6/UDPerror: the offending packet, as the
    # receiving kernel matches it to a socket.
    assert bytes(err.payload) == offending[:48]
    assert err.payload.dst == REMOTE and err.payload.payload.dport == 53


def test_icmpv6_echo_request_and_reply() -> None:
    from scapy.layers.inet6 import ICMPv6EchoRequest

    request = bytes(IPv6(src=GUEST, dst=REMOTE) / ICMPv6EchoRequest(id=77, seq=3, data=b"ping"))
    msg = parse_echo_request(parse_ipv6(memoryview(request)))
    assert (msg.ident, msg.seq, msg.payload) == (77, 3, b"ping")
    corrupt = bytearray(request)
    corrupt[-1] ^= 1
    with pytest.raises(MalformedFrame, match="icmp_checksum"):
        parse_echo_request(parse_ipv6(memoryview(bytes(corrupt))))
    frame = echo_reply_frame(dst_mac=MAC_G, src_mac=MAC_R, src=REMOTE_B, dst=GUEST_B, ident=77,
                             seq=3, payload=b"ping")
    reply = _ipv6_of(frame)[ICMPv6EchoReply]
    assert (reply.id, reply.seq, reply.data) == (77, 3, b"ping")
    assert _checksum_ok(reply, "cksum")


def test_syn_from_scapy_round_trips_options() -> None:
    syn = bytes(IPv6(src=GUEST, dst=REMOTE) / TCP(sport=4000, dport=80, flags="S", options=[
        ("MSS", 65460), ("SAckOK", b""), ("Timestamp", (5, 0)), ("NOP", None),
        ("WScale", 7)]))
    seg = parse_tcp(parse_ipv6(memoryview(syn)))
    assert seg.flags == SYN and (seg.mss, seg.wscale, seg.tsval) == (65460, 7, 5)
