"""Guest frames for tests: valid ones of every protocol the relay serves, and broken
ones whose fate is known.

Everything here is plain Python (no hypothesis): `strategies.py` draws the parameters,
these functions build the bytes, reusing `relaynat.packet_builder` for the headers and
checksums so the kit and the relay agree on what a well-formed frame is.

A broken frame is a `LabeledFrame` whose `expect` names the `Relay.stats()` counter the
relay must bump for it (e.g. ``drop_ip_header_len``). The label follows the relay's
documented parse order (wire.py, relay.py): a broken frame is refused at the first
check it fails, so each mutation below only breaks one field and predicts the check
that sees it first. Breakage the relay deliberately tolerates, as Linux does (a TCP
option running past the header, RFC 9293 §3.1 leaves that to the receiver; an L4
checksum, which a virtio guest with offload leaves partial), is labeled ``None``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

import dpkt

from relaynat import wire
from relaynat.addressing import DNS_PORT
from relaynat.checksum import finish, partial_sum, pseudo_header_sum
from relaynat.config import RelayConfig, eui64
from relaynat.link.dhcpv6 import ALL_DHCP_SERVERS
from relaynat.link.dhcpv6 import option as dhcp6_option
from relaynat.link.ndp import (
    ALL_ROUTERS,
    NDP_HOP_LIMIT,
    NS,
    RS,
    multicast_mac,
    solicited_node,
    with_checksum,
)
from relaynat.link.services import (
    BROADCAST_IP,
    DHCP_CLIENT_PORT,
    DHCP_SERVER_PORT,
    DHCPV6_CLIENT_PORT,
    DHCPV6_SERVER_PORT,
    ZERO_IP,
)
from relaynat.packet_builder import (
    BROADCAST_MAC,
    TcpFrameTemplate,
    arp_reply,
    ip_frame,
    ipv6_header,
    udp_frame,
)
from relaynat.wire import ETH_HLEN, ETHERTYPE_ARP, IPPROTO_ICMP, IPPROTO_ICMPV6, IPV6_HLEN

GUEST_MAC = bytes.fromhex("525400123456")
"""The MAC the kit's guest speaks from (locally administered, unicast)."""
#: The relay's default addressing (RelayConfig's defaults, slirp's plan).
DEFAULTS = RelayConfig()
ICMP_ECHO_REQUEST = 8
"""The ICMP type of an echo request (RFC 792)."""
ICMPV6_ECHO_REQUEST = 128
"""The ICMPv6 type of an echo request (RFC 4443 §4.1)."""
_U16 = struct.Struct("!H")

# The TCP flags (RFC 9293 §3.1), for `tcp_segment`'s `flags` and for reading a reply's
# `Reply.tcp.flags`: `SYN | ACK` is a SYN-ACK.
FIN = wire.FIN
"""No more data from the sender."""
SYN = wire.SYN
"""Synchronize sequence numbers: opens a connection."""
RST = wire.RST
"""Reset the connection."""
PSH = wire.PSH
"""Push: hand the data to the application."""
ACK = wire.ACK
"""The acknowledgment number is significant."""
URG = wire.URG
"""The urgent pointer is significant."""
ECE = 0x40
"""ECN-Echo (RFC 3168 §6.1)."""
CWR = 0x80
"""Congestion Window Reduced (RFC 3168 §6.1)."""


@dataclass(frozen=True, slots=True)
class LabeledFrame:
    """A frame and what it is: `kind` names the builder or mutation, `expect` the
    stats counter the relay must bump for it (None: a frame it accepts)."""

    data: bytes
    """The whole Ethernet frame."""
    kind: str
    """The builder or mutation that made it ("tcp", "truncated", ...)."""
    expect: str | None = None
    """The `stats()` counter the relay bumps for it; None: a frame it accepts."""


@dataclass(frozen=True, slots=True)
class Addressing:
    """Both ends of the guest's link, packed, from a `RelayConfig`."""

    guest_mac: bytes
    """The guest's MAC, the source of the kit's frames."""
    gateway_mac: bytes
    """The relay's MAC (`RelayConfig.gateway_mac`)."""
    guest4: bytes
    """The guest's IPv4 address."""
    gateway4: bytes
    """The gateway's IPv4 address (by default the mapped host loopback, too)."""
    dns4: bytes
    """The relay's IPv4 DNS address."""
    guest6: bytes
    """The guest's IPv6 address."""
    gateway6: bytes
    """The gateway's IPv6 address (by default the mapped host loopback, too)."""
    dns6: bytes
    """The relay's IPv6 DNS address."""
    link_local6: bytes
    """The guest's link-local IPv6 address (fe80::/64 and the MAC's EUI-64)."""

    @classmethod
    def of(cls, config: RelayConfig = DEFAULTS, guest_mac: bytes = GUEST_MAC) -> Addressing:
        """The addressing of a relay with `config`, seen by a guest at `guest_mac`
        (its link-local IPv6 address is that MAC's EUI-64)."""
        return cls(guest_mac, config.gateway_mac, config.guest_ipv4.packed,
                   config.gateway_ipv4.packed, config.dns_ipv4.packed, config.guest_ipv6.packed,
                   config.gateway_ipv6.packed, config.dns_ipv6.packed,
                   b"\xfe\x80" + bytes(6) + eui64(guest_mac))


DEFAULT_ADDRESSING = Addressing.of()
"""`RelayConfig()`'s addressing with `GUEST_MAC`: what the strategies build frames for."""


# -- valid frames ----------------------------------------------------------------------


def arp_request(a: Addressing, target_ip: bytes, sender_ip: bytes | None = None) -> bytes:
    """RFC 826 request "who has `target_ip`", broadcast. Built as the reply builder's
    frame with the opcode and destination turned around (same layout, §"Packet format")."""
    frame = bytearray(arp_reply(a.guest_mac, sender_ip or a.guest4, bytes(6), target_ip))
    frame[0:6] = BROADCAST_MAC
    frame[ETH_HLEN + 7] = 1  # op: request
    return bytes(frame)


def dhcp_discover(a: Addressing, xid: int, msg_type: int = dpkt.dhcp.DHCPDISCOVER) -> bytes:
    """A DHCPDISCOVER (RFC 2131 §4.4.1) from 0.0.0.0 to the limited broadcast."""
    msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=xid & 0xFFFFFFFF, chaddr=a.guest_mac,
                         opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([msg_type]))])
    return udp_frame(BROADCAST_MAC, a.guest_mac, ZERO_IP, BROADCAST_IP, DHCP_CLIENT_PORT,
                     DHCP_SERVER_PORT, bytes(msg))


def dhcpv6_solicit(a: Addressing, xid: int, iaid: int = 1) -> bytes:
    """A DHCPv6 Solicit (RFC 8415 §18.2.1) with a DUID-LL client id (§11.4), elapsed
    time and one IA_NA, from the link-local address to All_DHCP_Relay_Agents_and_Servers."""
    duid = struct.pack("!HH", 3, 1) + a.guest_mac
    body = (dhcp6_option(1, duid) + dhcp6_option(8, b"\x00\x00")
            + dhcp6_option(3, struct.pack("!III", iaid, 0, 0)))
    msg = bytes([1]) + (xid & 0xFFFFFF).to_bytes(3, "big") + body
    return udp_frame(multicast_mac(ALL_DHCP_SERVERS), a.guest_mac, a.link_local6,
                     ALL_DHCP_SERVERS, DHCPV6_CLIENT_PORT, DHCPV6_SERVER_PORT, msg)


def _icmpv6_frame(a: Addressing, src: bytes, dst: bytes, dst_mac: bytes, message: bytes,
                  hop_limit: int = NDP_HOP_LIMIT) -> bytes:
    return ip_frame(dst_mac, a.guest_mac, src, dst, IPPROTO_ICMPV6,
                    with_checksum(src, dst, message), ttl=hop_limit)


def router_solicitation(a: Addressing, hop_limit: int = NDP_HOP_LIMIT) -> bytes:
    """RFC 4861 §4.1 with a source link-layer address option (§4.6.1)."""
    msg = struct.pack("!BBHI", RS, 0, 0, 0) + b"\x01\x01" + a.guest_mac
    return _icmpv6_frame(a, a.link_local6, ALL_ROUTERS, multicast_mac(ALL_ROUTERS), msg,
                         hop_limit)


def neighbour_solicitation(a: Addressing, target: bytes | None = None,
                           hop_limit: int = NDP_HOP_LIMIT) -> bytes:
    """RFC 4861 §4.3 for `target` (default: the gateway) to its solicited-node group."""
    target = target or a.gateway6
    group = solicited_node(target)
    msg = struct.pack("!BBHI", NS, 0, 0, 0) + target + b"\x01\x01" + a.guest_mac
    return _icmpv6_frame(a, a.guest6, group, multicast_mac(group), msg, hop_limit)


def dns_query_message(qid: int, name: str, qtype: int = 1) -> bytes:
    """A recursive query for (`name`, `qtype`, IN) (RFC 1035 §4.1)."""
    qname = b"".join(bytes([len(label)]) + label.encode()
                     for label in name.strip(".").split(".") if label) + b"\x00"
    return struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0) + qname + struct.pack(
        "!HH", qtype, 1)


def dns_query(a: Addressing, v6: bool, sport: int, qid: int, name: str,
              qtype: int = 1) -> bytes:
    """`dns_query_message` in a UDP datagram from the guest to the relay's DNS address,
    port 53."""
    src, dst = (a.guest6, a.dns6) if v6 else (a.guest4, a.dns4)
    return udp_frame(a.gateway_mac, a.guest_mac, src, dst, sport, DNS_PORT,
                     dns_query_message(qid, name, qtype))


def udp_datagram(a: Addressing, v6: bool, sport: int, dport: int, payload: bytes,
                 dst: bytes | None = None) -> bytes:
    """A UDP datagram from the guest to `dst` (default: the gateway, which the relay
    maps to the host's loopback), over IPv6 if `v6`."""
    src, gw = (a.guest6, a.gateway6) if v6 else (a.guest4, a.gateway4)
    return udp_frame(a.gateway_mac, a.guest_mac, src, dst or gw, sport, dport, payload)


def echo_request(a: Addressing, v6: bool, ident: int, seq: int, payload: bytes,
                 dst: bytes | None = None) -> bytes:
    """ICMP echo request (RFC 792) or ICMPv6 echo request (RFC 4443 §4.1)."""
    head = struct.pack("!BBHHH", ICMPV6_ECHO_REQUEST if v6 else ICMP_ECHO_REQUEST, 0, 0,
                       ident & 0xFFFF, seq & 0xFFFF)
    if v6:
        dst = dst or a.gateway6
        return ip_frame(a.gateway_mac, a.guest_mac, a.guest6, dst, IPPROTO_ICMPV6,
                        with_checksum(a.guest6, dst, head + payload))
    msg = bytearray(head + payload)
    _U16.pack_into(msg, 2, finish(partial_sum(msg)))
    return ip_frame(a.gateway_mac, a.guest_mac, a.guest4, dst or a.gateway4, IPPROTO_ICMP,
                    bytes(msg))


def tcp_segment(a: Addressing, v6: bool, sport: int, dport: int, seq: int, ack: int,
                flags: int, window: int = 65535, payload: bytes = b"", options: bytes = b"",
                dst: bytes | None = None) -> bytes:
    """One guest TCP segment; `options` is padded with NOPs to a 4-byte multiple
    (RFC 9293 §3.1: the data offset counts 32-bit words)."""
    src, gw = (a.guest6, a.gateway6) if v6 else (a.guest4, a.gateway4)
    options += b"\x01" * (-len(options) % 4)
    template = TcpFrameTemplate(dst_mac=a.gateway_mac, src_mac=a.guest_mac, src=src,
                                dst=dst or gw, sport=sport, dport=dport)
    return template.build(seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window & 0xFFFF, payload,
                          options) + payload


# -- IPv6 extension headers (RFC 8200 §4) -----------------------------------------------


def ext_header(next_header: int, body_len_units: int = 0, fill: int = 1) -> bytes:
    """A Hop-by-Hop / Destination Options shaped header of (1 + `body_len_units`) * 8
    bytes whose option area is PadN (§4.2, type 1), so any node may skip it."""
    size = (1 + body_len_units) * 8
    return bytes([next_header, body_len_units, fill, size - 4]) + bytes(size - 4)


def with_ipv6_extensions(frame: bytes, kinds: list[int]) -> bytes:
    """`frame` (Ethernet + IPv6 without extensions) with headers of types `kinds`
    (0 hop-by-hop, 60 destination options, 43 routing with segments left 0, 44
    fragment) inserted before the upper layer; the upper-layer checksum is unchanged
    because the pseudo-header's addresses are (§8.1, no routing header in transit)."""
    l3 = ETH_HLEN
    proto = frame[l3 + 6]
    upper = frame[l3 + IPV6_HLEN:]
    chain = b""
    nexts = [*kinds[1:], proto]
    for kind, nxt in zip(kinds, nexts, strict=True):
        if kind == 43:  # routing type 0-less form: type 253 (experimental), segments left 0
            chain += bytes([nxt, 0, 253, 0]) + bytes(4)
        elif kind == 44:  # fragment header (§4.5): offset 0, M set
            chain += bytes([nxt, 0, 0, 1]) + bytes(4)
        else:
            chain += ext_header(nxt)
    first = kinds[0] if kinds else proto
    src, dst = frame[l3 + 8:l3 + 24], frame[l3 + 24:l3 + 40]
    hop_limit = frame[l3 + 7]
    return (frame[:l3] + ipv6_header(src, dst, first, len(chain) + len(upper), hop_limit)
            + chain + upper)


# -- broken frames ------------------------------------------------------------------------


def is_ipv4(frame: bytes) -> bool:
    """Whether `frame`'s EtherType is IPv4."""
    return frame[12:14] == b"\x08\x00"


def is_ipv6(frame: bytes) -> bool:
    """Whether `frame`'s EtherType is IPv6."""
    return frame[12:14] == b"\x86\xdd"


def truncated(frame: bytes, length: int) -> LabeledFrame:
    """`frame` cut to `length` bytes (less than its length): the first length check of
    its layer fails. Only for frames without Ethernet padding (the kit's own)."""
    cut = frame[:length]
    if length < ETH_HLEN:
        reason = "eth_short"
    elif frame[12:14] == _U16.pack(ETHERTYPE_ARP):
        reason = "arp_short"
    elif is_ipv6(frame):
        reason = "ip6_short" if length - ETH_HLEN < IPV6_HLEN else "ip6_payload_len"
    else:
        reason = "ip_short" if length - ETH_HLEN < 20 else "ip_total_len"
    return LabeledFrame(cut, "truncated", "drop_" + reason)


def _fix_ipv4_checksum(frame: bytearray) -> None:
    hlen = (frame[ETH_HLEN] & 0x0F) * 4
    _U16.pack_into(frame, ETH_HLEN + 10, 0)
    _U16.pack_into(frame, ETH_HLEN + 10, finish(partial_sum(frame[ETH_HLEN:ETH_HLEN + hlen])))


def ipv4_bad_ihl(frame: bytes, ihl: int) -> LabeledFrame:
    """IHL below 5 (RFC 791 §3.1: the minimum) or pointing past the total length."""
    total = _U16.unpack_from(frame, ETH_HLEN + 2)[0]
    if not (ihl < 5 or ihl * 4 > total):
        raise ValueError(f"IHL {ihl} is valid for a {total}-byte packet")
    out = bytearray(frame)
    out[ETH_HLEN] = 0x40 | ihl
    return LabeledFrame(bytes(out), "ipv4_bad_ihl", "drop_ip_header_len")


def ipv4_bad_total_length(frame: bytes, total: int) -> LabeledFrame:
    """Total length (checksum fixed) past the frame's end, or below the header."""
    available = len(frame) - ETH_HLEN
    if 20 <= total <= available:
        raise ValueError(f"total length {total} fits the {available}-byte packet")
    out = bytearray(frame)
    _U16.pack_into(out, ETH_HLEN + 2, total)
    _fix_ipv4_checksum(out)
    reason = "ip_header_len" if total < 20 else "ip_total_len"
    return LabeledFrame(bytes(out), "ipv4_bad_total_length", "drop_" + reason)


def ipv4_fragment(frame: bytes, more_fragments: bool, offset_units: int) -> LabeledFrame:
    """A fragment (MF set or a non-zero offset; §3.2), checksum fixed."""
    if not more_fragments and not offset_units:
        raise ValueError("a packet with MF clear and offset 0 is not a fragment")
    out = bytearray(frame)
    _U16.pack_into(out, ETH_HLEN + 6, (0x2000 if more_fragments else 0) | (offset_units & 0x1FFF))
    _fix_ipv4_checksum(out)
    return LabeledFrame(bytes(out), "ipv4_fragment", "drop_ip_fragment")


def ipv4_bad_checksum(frame: bytes, mask: int) -> LabeledFrame:
    """The header checksum with low-byte bits `mask` (1..255) flipped: a change of less
    than 256 can never turn into the other zero of ones'-complement (RFC 1071 §1)."""
    out = bytearray(frame)
    out[ETH_HLEN + 11] ^= (mask % 255) + 1
    return LabeledFrame(bytes(out), "ipv4_bad_checksum", "drop_ip_checksum")


def bad_ip_version(frame: bytes, version: int) -> LabeledFrame:
    """An IP frame whose version field says `version`, not its own (RFC 791 §3.1,
    RFC 8200 §3)."""
    out = bytearray(frame)
    out[ETH_HLEN] = (version << 4) | (out[ETH_HLEN] & 0x0F)
    v6 = is_ipv6(frame)
    if version == (6 if v6 else 4):
        raise ValueError("that is the right version")
    reason = "drop_ip6_version" if v6 else "drop_ip_version"
    return LabeledFrame(bytes(out), "bad_ip_version", reason)


def transport_offset(frame: bytes) -> int:
    """Where the upper-layer header starts in an IP `frame` without IPv6 extension
    headers."""
    if is_ipv6(frame):
        return ETH_HLEN + IPV6_HLEN
    return ETH_HLEN + (frame[ETH_HLEN] & 0x0F) * 4


def tcp_bad_data_offset(frame: bytes, doff: int) -> LabeledFrame:
    """Data offset below 5 words or past the segment's end (RFC 9293 §3.1)."""
    l4 = transport_offset(frame)
    if doff >= 5 and doff * 4 <= len(frame) - l4:
        raise ValueError(f"data offset {doff} is valid here")
    out = bytearray(frame)
    out[l4 + 12] = (doff << 4) | (out[l4 + 12] & 0x0F)
    return LabeledFrame(bytes(out), "tcp_bad_data_offset", "drop_tcp_header_len")


def udp_bad_length(frame: bytes, length: int) -> LabeledFrame:
    """UDP length below 8 or past the IP payload (RFC 768)."""
    l4 = transport_offset(frame)
    if 8 <= length <= len(frame) - l4:
        raise ValueError(f"UDP length {length} is valid here")
    out = bytearray(frame)
    _U16.pack_into(out, l4 + 4, length)
    return LabeledFrame(bytes(out), "udp_bad_length", "drop_udp_len")


def l4_bad_checksum(frame: bytes, expect: str | None) -> LabeledFrame:
    """The upper-layer checksum damaged: never equal to the right one, nor (for TCP and
    UDP) to the pseudo-header-only value a sender with checksum offload leaves."""
    l4 = transport_offset(frame)
    v6 = is_ipv6(frame)
    proto = frame[ETH_HLEN + 6] if v6 else frame[ETH_HLEN + 9]
    at = l4 + {6: 16, 17: 6}.get(proto, 2)
    out = bytearray(frame)
    old = _U16.unpack_from(out, at)[0]
    # A change below 0x100 keeps it away from both representations of the right sum.
    new = old ^ 0x00FF
    if proto in (6, 17):
        addrs = (ETH_HLEN + 8, ETH_HLEN + 40) if v6 else (ETH_HLEN + 12, ETH_HLEN + 20)
        half = (addrs[1] - addrs[0]) // 2
        partial = pseudo_header_sum(frame[addrs[0]:addrs[0] + half],
                                    frame[addrs[0] + half:addrs[1]], proto, len(frame) - l4)
        if new % 0xFFFF == partial:
            new = old ^ 0x007F
    _U16.pack_into(out, at, new)
    return LabeledFrame(bytes(out), "l4_bad_checksum", expect)


def with_source_mac(frame: bytes, mac: bytes) -> bytes:
    """`frame` sent from Ethernet address `mac`."""
    return frame[:6] + mac + frame[12:]


def with_ipv4_source(frame: bytes, src: IPv4Address) -> bytes:
    """IPv4 `frame` from `src`, its header checksum good again (a spoofed source)."""
    out = bytearray(frame)
    out[ETH_HLEN + 12:ETH_HLEN + 16] = src.packed
    _fix_ipv4_checksum(out)
    return bytes(out)
