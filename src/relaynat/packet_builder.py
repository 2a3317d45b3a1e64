"""Frames toward the guest: Ethernet, IPv4/IPv6, TCP, UDP, ICMP and ARP, with checksums.

The address family follows the addresses: 4-byte addresses build IPv4 (RFC 791),
16-byte ones IPv6 (RFC 8200), with the same pseudo-header sum for TCP/UDP/ICMPv6
checksums (RFC 8200 §8.1: source, destination, length, next header; in the mod-0xffff
domain of checksum.py that is the same sum as IPv4's pseudo-header).

The TCP data path is the hot one, so each flow owns a `TcpFrameTemplate`: the
Ethernet, IPv4 and TCP headers are built once at flow creation and every segment
only patches total length, IP ID, sequence, acknowledgement, flags, window and the
two checksums. The IPv4 header checksum is incremental: the constant words are
summed once, and each frame adds only its total length and ID (RFC 1624 §3 shows
why sums can be updated this way).

Offload: when the transport is a TAP opened with a virtio-net header
(IFF_VNET_HDR + TUNSETOFFLOAD TUN_F_CSUM|TUN_F_TSO4), a frame can be handed to the
guest's kernel with VIRTIO_NET_HDR_F_NEEDS_CSUM: the TCP checksum field then holds
only the folded pseudo-header sum and the kernel treats the payload as verified
(CHECKSUM_PARTIAL), so we never touch payload bytes. A payload larger than the MSS
is marked GSO_TCPV4 with gso_size = MSS and the guest's kernel segments it, which is
what lets one 64 KiB write serve a guest at MTU 1500.

Without offload the checksum is computed over the payload (numpy; see checksum.py).
"""

from __future__ import annotations

import struct
from typing import Any

from relaynat.checksum import finish, fold, partial_sum, pseudo_header_sum
from relaynat.wire import (
    ETH_HLEN,
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV6_HLEN,
)

# struct virtio_net_hdr (include/uapi/linux/virtio_net.h), host byte order for a
# legacy TAP: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
VNET_HDR = struct.Struct("=BBHHHH")
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4

IPV4_HLEN = 20
TCP_HLEN = 20
#: NOP, NOP, kind 8, length 10, TSval, TSecr (RFC 7323 §3.2, Appendix A layout).
TS_OPTION_LEN = 12
_TS_VALUES = struct.Struct("!II")
_TCP_CSUM_OFFSET = 16
_IP_TOTLEN_MAX = 0xFFFF

_ETH = struct.Struct("!6s6sH")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_TCP_VAR = struct.Struct("!IIBBH")  # seq, ack, data offset, flags, window
_U16 = struct.Struct("!H")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_UDP = struct.Struct("!HHHH")
_IPV6 = struct.Struct("!IHBB16s16s")
#: Version 6, traffic class 0, flow label 0 (RFC 8200 §3).
_IPV6_VTF = 6 << 28

BROADCAST_MAC = b"\xff" * 6


def ethernet_header(dst_mac: bytes, src_mac: bytes, ethertype: int) -> bytes:
    return _ETH.pack(dst_mac, src_mac, ethertype)


def ipv4_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int = 0,
                ttl: int = 64) -> bytes:
    """A 20-byte IPv4 header with DF set (RFC 791 §3.1) and a valid checksum."""
    head = bytearray(_IPV4.pack(0x45, 0, IPV4_HLEN + payload_len, ident & 0xFFFF, 0x4000, ttl,
                                proto, 0, src, dst))
    _U16.pack_into(head, 10, finish(partial_sum(head)))
    return bytes(head)


def ipv6_header(src: bytes, dst: bytes, proto: int, payload_len: int,
                hop_limit: int = 64) -> bytes:
    """A 40-byte IPv6 header without extension headers (RFC 8200 §3)."""
    return _IPV6.pack(_IPV6_VTF, payload_len, proto, hop_limit, src, dst)


def ip_header(src: bytes, dst: bytes, proto: int, payload_len: int, ident: int = 0,
              ttl: int = 64) -> bytes:
    """An IPv4 or IPv6 header, by the length of the addresses."""
    if len(src) == 16:
        return ipv6_header(src, dst, proto, payload_len, ttl)
    return ipv4_header(src, dst, proto, payload_len, ident, ttl)


def ip_header_len(addr: bytes) -> int:
    return IPV6_HLEN if len(addr) == 16 else IPV4_HLEN


def ethertype_of(addr: bytes) -> int:
    return ETHERTYPE_IPV6 if len(addr) == 16 else ETHERTYPE_IPV4


def ip_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, proto: int,
             l4: bytes, ident: int = 0, ttl: int = 64) -> bytes:
    """Ethernet + IP header + `l4` (complete, checksummed by the caller)."""
    return (ethernet_header(dst_mac, src_mac, ethertype_of(src))
            + ip_header(src, dst, proto, len(l4), ident, ttl) + l4)


def udp_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int,
              payload: bytes, ident: int = 0) -> bytes:
    """A complete Ethernet/IP/UDP frame with the UDP checksum filled in (RFC 768)."""
    length = 8 + len(payload)
    udp = bytearray(_UDP.pack(sport, dport, length, 0))
    pseudo = pseudo_header_sum(src, dst, IPPROTO_UDP, length)
    # RFC 768: a computed checksum of zero must be sent as all ones (zero means "none",
    # which RFC 8200 §8.1 forbids over IPv6); finish() returns 0xFFFF, never 0.
    _U16.pack_into(udp, 6, finish(pseudo + partial_sum(udp) + partial_sum(payload)))
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_UDP, bytes(udp) + payload, ident)


def arp_reply(our_mac: bytes, our_ip: bytes, their_mac: bytes, their_ip: bytes) -> bytes:
    """RFC 826 reply: `our_ip` is at `our_mac`, addressed to the asker."""
    body = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, 2, our_mac, our_ip, their_mac, their_ip)
    return ethernet_header(their_mac, our_mac, ETHERTYPE_ARP) + body


def arp_request(our_mac: bytes, our_ip: bytes, target_ip: bytes) -> bytes:
    """RFC 826 request, broadcast: who has `target_ip`? (target hardware address 0)."""
    body = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, 1, our_mac, our_ip, bytes(6), target_ip)
    return ethernet_header(BROADCAST_MAC, our_mac, ETHERTYPE_ARP) + body


def tcp_options_syn(mss: int, wscale: int | None,
                    timestamps: tuple[int, int] | None = None,
                    sack_permitted: bool = False) -> bytes:
    """SYN(-ACK) options: MSS (RFC 9293 §3.7.1), window scale if offered, padded with a
    NOP to a 4-byte boundary (RFC 7323 §2.2), (TSval, TSecr) if offered (§3.2), and
    SACK-permitted (RFC 2018 §2) in the two bytes that pad the timestamps otherwise,
    as Linux lays them out."""
    opts = struct.pack("!BBH", 2, 4, mss)
    if wscale is not None:
        opts += struct.pack("!BBBB", 1, 3, 3, wscale)
    pad = b"\x04\x02" if sack_permitted else b"\x01\x01"
    if timestamps is not None:
        opts += pad + b"\x08\x0a" + _TS_VALUES.pack(*timestamps)
    elif sack_permitted:
        opts += b"\x01\x01\x04\x02"
    return opts


def tcp_options_sack(blocks: list[tuple[int, int]],
                     timestamps: tuple[int, int] | None = None) -> bytes:
    """Options of an ACK carrying SACK blocks (RFC 2018 §3): NOP, NOP, TS (when in
    force), then NOP, NOP, kind 5 and the (left, right) edges. The 40 bytes of option
    space hold 3 blocks beside timestamps, 4 without; the caller passes no more."""
    opts = b"" if timestamps is None else b"\x01\x01\x08\x0a" + _TS_VALUES.pack(*timestamps)
    opts += struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(blocks))
    for left, right in blocks:
        opts += _TS_VALUES.pack(left, right)
    return opts


class GuestMac:
    """The guest's Ethernet address as its relay last learned it (None: not yet), shared
    by the frame templates of all the guest's TCP flows that follow it.

    A guest that sends from a new source MAC used to have every flow's template rebuilt,
    3,000 idle flows times each new MAC: 4,000 frames of a flapping MAC held the loop
    for 46 s. Now the relay sets `mac` and each template patches its Ethernet header
    the next time it builds a frame, as passt rewrites the one header its frames share
    when the guest's address changes (tap.c, proto_update_l2_buf)."""

    __slots__ = ("mac",)

    def __init__(self, mac: bytes | None = None) -> None:
        self.mac = mac


class TcpFrameTemplate:
    """Prebuilt headers of one flow's frames toward the guest.

    `src`/`sport` are the remote end as the guest sees it, `dst`/`dport` the guest.
    `vnet_hdr_len` is 0 (no virtio-net header), 10 or 12; `offload` says the transport
    accepts NEEDS_CSUM and GSO frames (only meaningful with a vnet header).
    `timestamps`: RFC 7323 timestamps are in force, so every segment but a SYN-ACK (which
    passes its own options) carries NOP, NOP, TS (12 bytes; RFC 7323 §3.2).
    `guest`: frames go to its MAC once it has one (`dst_mac` until then), whatever it
    becomes later.
    """

    __slots__ = ("_guest", "_head", "_ip_const", "_ip_id", "_l3", "_l4", "_mac", "_offload",
                 "_params", "_pseudo_base", "_vnet_len", "ipv6", "timestamps")

    def __init__(self, *, dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, sport: int,
                 dport: int, vnet_hdr_len: int = 0, offload: bool = False,
                 timestamps: bool = False, guest: GuestMac | None = None) -> None:
        # The constructor's keyword arguments, for with_timestamps() to rebuild from.
        self._params: dict[str, Any] = {
            "dst_mac": dst_mac, "src_mac": src_mac, "src": src, "dst": dst, "sport": sport,
            "dport": dport, "vnet_hdr_len": vnet_hdr_len, "offload": offload, "guest": guest}
        self._guest = guest
        if guest is not None and guest.mac is not None:
            dst_mac = guest.mac
        self._mac = dst_mac
        self._vnet_len = vnet_hdr_len
        self._offload = offload and vnet_hdr_len > 0
        self._l3 = vnet_hdr_len + ETH_HLEN
        self.ipv6 = len(src) == 16
        self._l4 = self._l3 + (IPV6_HLEN if self.ipv6 else IPV4_HLEN)
        self.timestamps = timestamps
        head = bytearray(self._l4 + TCP_HLEN + (TS_OPTION_LEN if timestamps else 0))
        if timestamps:
            head[self._l4 + TCP_HLEN:self._l4 + TCP_HLEN + 4] = b"\x01\x01\x08\x0a"
        if self.ipv6:
            _ETH.pack_into(head, vnet_hdr_len, dst_mac, src_mac, ETHERTYPE_IPV6)
            _IPV6.pack_into(head, self._l3, _IPV6_VTF, 0, IPPROTO_TCP, 64, src, dst)
        else:
            _ETH.pack_into(head, vnet_hdr_len, dst_mac, src_mac, ETHERTYPE_IPV4)
            _IPV4.pack_into(head, self._l3, 0x45, 0, 0, 0, 0x4000, 64, IPPROTO_TCP, 0, src, dst)
        struct.pack_into("!HH", head, self._l4, sport, dport)
        self._head = head
        # Sum of the IPv4 header words that never change (length, ID, checksum = 0).
        self._ip_const = 0 if self.ipv6 else partial_sum(head[self._l3:self._l4])
        self._pseudo_base = pseudo_header_sum(src, dst, IPPROTO_TCP, 0)
        self._ip_id = 0

    @property
    def offload(self) -> bool:
        """True when frames go out with NEEDS_CSUM and may be GSO super-frames."""
        return self._offload

    def with_timestamps(self, timestamps: bool) -> TcpFrameTemplate:
        """The same flow's template with or without room for the timestamp option: an
        inbound flow offers timestamps in its SYN and learns from the guest's SYN-ACK
        whether they are in force (RFC 7323 §3.2)."""
        if timestamps == self.timestamps:
            return self
        return TcpFrameTemplate(**self._params, timestamps=timestamps)

    @property
    def dst_mac(self) -> bytes:
        """Where the next frame goes."""
        guest = self._guest
        return guest.mac if guest is not None and guest.mac is not None else self._mac

    @property
    def guest(self) -> GuestMac | None:
        """The guest MAC this template follows, if any."""
        return self._guest

    def with_guest_mac(self, mac: bytes) -> TcpFrameTemplate:
        """The same flow's template toward another guest MAC, of its own (it follows no
        `GuestMac`): the guest's was learned (a flow opened before its first frame went
        to broadcast, which the guest's TCP discards) or changed."""
        if mac == self.dst_mac and self._guest is None:
            return self
        return TcpFrameTemplate(**{**self._params, "dst_mac": mac, "guest": None},
                                timestamps=self.timestamps)

    def following(self, guest: GuestMac) -> TcpFrameTemplate:
        """The same flow's template toward whatever MAC `guest` has (its own until then):
        a flow moved here from another relay (host/flow_move.py) follows this relay's."""
        if guest is self._guest:
            return self
        return TcpFrameTemplate(**{**self._params, "dst_mac": self.dst_mac, "guest": guest},
                                timestamps=self.timestamps)

    def with_link(self, vnet_hdr_len: int, offload: bool) -> TcpFrameTemplate:
        """The same flow's template for another link's frame format: a flow moved to
        another relay (host/flow_move.py) before its transport was attached."""
        params = {**self._params, "vnet_hdr_len": vnet_hdr_len, "offload": offload}
        return TcpFrameTemplate(**params, timestamps=self.timestamps)

    @property
    def params(self) -> dict[str, Any]:
        """The constructor's keyword arguments (timestamps aside), `dst_mac` the MAC the
        next frame goes to."""
        return {**self._params, "dst_mac": self.dst_mac}

    def build(self, seq: int, ack: int, flags: int, window: int,
              payload: bytes | memoryview = b"", options: bytes | None = None, mss: int = 0,
              tsval: int = 0, tsecr: int = 0) -> bytes:
        """Return the headers (vnet header first, if any) of one segment; the payload is
        not copied in: the transport writes `header` and `payload` with one writev/sendmsg.

        `options` replaces the template's own (timestamp) option, e.g. for a SYN-ACK.
        `mss` is the payload size per segment the guest accepts; with offload, a longer
        payload is sent as one GSO frame of `mss`-sized segments.
        """
        l3, l4 = self._l3, self._l4
        guest = self._guest
        if guest is not None and (mac := guest.mac) is not None and mac is not self._mac:
            # The guest's MAC changed since the last frame (GuestMac); not in a checksum.
            self._head[self._vnet_len:self._vnet_len + 6] = mac
            self._mac = mac
        if options is None:
            head = self._head
            if self.timestamps:
                _TS_VALUES.pack_into(head, l4 + TCP_HLEN + 4, tsval, tsecr)
        else:
            head = self._head[:l4 + TCP_HLEN] + options
        tcp_hlen = len(head) - l4
        tcp_len = tcp_hlen + len(payload)
        if self.ipv6:
            # RFC 8200 §3: the payload length excludes the fixed header.
            if tcp_len > _IP_TOTLEN_MAX:
                raise ValueError(f"segment of {tcp_len} bytes does not fit one IPv6 packet")
            _U16.pack_into(head, l3 + 4, tcp_len)
        else:
            total_len = IPV4_HLEN + tcp_len
            if total_len > _IP_TOTLEN_MAX:
                raise ValueError(f"segment of {tcp_len} bytes does not fit one IPv4 packet")
            ip_id = self._ip_id
            self._ip_id = (ip_id + 1) & 0xFFFF
            _U16.pack_into(head, l3 + 2, total_len)
            _U16.pack_into(head, l3 + 4, ip_id)
            _U16.pack_into(head, l3 + 10, finish(self._ip_const + total_len + ip_id))
        _TCP_VAR.pack_into(head, l4 + 4, seq, ack, (tcp_hlen >> 2) << 4, flags, window)
        _U16.pack_into(head, l4 + _TCP_CSUM_OFFSET, 0)
        pseudo = self._pseudo_base + tcp_len
        if self._offload:
            # CHECKSUM_PARTIAL: the field holds the folded, uncomplemented pseudo-header
            # sum; the receiving kernel completes it (or trusts it) from csum_start.
            _U16.pack_into(head, l4 + _TCP_CSUM_OFFSET, fold(pseudo))
            gso = mss and len(payload) > mss
            gso_type = VIRTIO_NET_HDR_GSO_NONE
            if gso:
                gso_type = VIRTIO_NET_HDR_GSO_TCPV6 if self.ipv6 else VIRTIO_NET_HDR_GSO_TCPV4
            VNET_HDR.pack_into(head, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type,
                               l4 - self._vnet_len + tcp_hlen, mss if gso else 0,
                               l4 - self._vnet_len, _TCP_CSUM_OFFSET)
        else:
            csum = pseudo + partial_sum(head[l4:l4 + tcp_hlen])
            if payload:
                csum += partial_sum(payload)
            _U16.pack_into(head, l4 + _TCP_CSUM_OFFSET, finish(csum))
        return bytes(head)


#: ICMP destination unreachable (RFC 792) and the codes the relay sends; callers use
#: these for both families and icmp_unreachable_frame translates them for ICMPv6.
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
ICMP_HOST_UNREACH = 1
ICMP_PORT_UNREACH = 3
#: RFC 1812 §5.2.7.1: communication administratively prohibited.
ICMP_ADMIN_PROHIBITED = 13
#: ICMPv6 destination unreachable (RFC 4443 §3.1) and the code for each of the above.
ICMPV6_DEST_UNREACH = 1
_ICMPV6_CODE = {ICMP_NET_UNREACH: 0, ICMP_HOST_UNREACH: 3, ICMP_PORT_UNREACH: 4,
                ICMP_ADMIN_PROHIBITED: 1}
#: RFC 4443 §2.4(c): an ICMPv6 error must not make its packet exceed the minimum MTU.
_ICMPV6_ERROR_MAX = 1280 - IPV6_HLEN - 8
_ICMP_HEAD = struct.Struct("!BBHI")


def icmp_unreachable_frame(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes,
                           quote: bytes, code: int = ICMP_PORT_UNREACH, ident: int = 0) -> bytes:
    """A destination-unreachable frame, ICMP (RFC 792: type 3, `code`, 4 unused bytes)
    or ICMPv6 (RFC 4443 §3.1: type 1, the matching code) by the address family, then
    `quote`: the offending datagram's IP header and first bytes of its data, which is
    what the receiving kernel matches to a socket."""
    if len(src) == 16:
        icmp = bytearray(_ICMP_HEAD.pack(ICMPV6_DEST_UNREACH, _ICMPV6_CODE[code], 0, 0))
        icmp += quote[:_ICMPV6_ERROR_MAX]
        pseudo = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(icmp))
        _U16.pack_into(icmp, 2, finish(pseudo + partial_sum(icmp)))
        return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMPV6, bytes(icmp))
    icmp = bytearray(_ICMP_HEAD.pack(ICMP_DEST_UNREACH, code, 0, 0)) + quote
    _U16.pack_into(icmp, 2, finish(partial_sum(icmp)))
    return ip_frame(dst_mac, src_mac, src, dst, IPPROTO_ICMP, bytes(icmp), ident)


def udp_frame_head(dst_mac: bytes, src_mac: bytes, src: bytes, dst: bytes, sport: int,
                   dport: int, payload: bytes | memoryview, ident: int = 0,
                   vnet_hdr_len: int = 0, offload: bool = False) -> bytes:
    """The headers of a UDP frame (vnet header first, if any) for `payload`, which the
    transport writes after them, uncopied. With `offload` (a vnet header the guest
    accepts NEEDS_CSUM on), the UDP checksum field holds the folded pseudo-header sum
    and the guest's kernel takes the payload as verified (CHECKSUM_PARTIAL), as for
    TCP; otherwise the checksum is computed over the payload (RFC 768)."""
    length = 8 + len(payload)
    pseudo = pseudo_header_sum(src, dst, IPPROTO_UDP, length)
    offload = offload and vnet_hdr_len > 0
    if offload:
        udp = _UDP.pack(sport, dport, length, fold(pseudo))
        vnet = bytearray(vnet_hdr_len)
        VNET_HDR.pack_into(vnet, 0, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
                           0, 0, ETH_HLEN + ip_header_len(src), 6)
    else:
        udp0 = _UDP.pack(sport, dport, length, 0)
        udp = udp0[:6] + _U16.pack(finish(pseudo + partial_sum(udp0) + partial_sum(payload)))
        vnet = bytearray(vnet_hdr_len)
    return (bytes(vnet) + ethernet_header(dst_mac, src_mac, ethertype_of(src))
            + ip_header(src, dst, IPPROTO_UDP, length, ident) + udp)
