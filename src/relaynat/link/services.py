"""The link-level services the relay answers itself: ARP and DHCP for IPv4, neighbour
discovery, router advertisements and DHCPv6 for IPv6.

The protocol logic is in the sans-I/O servers (dhcp.py, ndp.py, dhcpv6.py beside it);
this module turns their answers into frames from the gateway's MAC and keeps the one
timer the link needs: the periodic unsolicited router advertisement.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from fractions import Fraction
from typing import Protocol

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig
from relaynat.link.dhcp import DhcpServer
from relaynat.link.dhcpv6 import Dhcpv6Server
from relaynat.link.ndp import MAX_RTR_ADV_INTERVAL_S, NDP_TYPES, RA, NdpReply, NdpResponder
from relaynat.packet_builder import BROADCAST_MAC, arp_reply, arp_request, ip_frame, udp_frame
from relaynat.ratelimit import TokenBucket
from relaynat.wire import (
    IPPROTO_ICMPV6,
    Ipv6Packet,
    MalformedFrame,
    UdpDatagram,
    parse_arp,
    parse_udp,
)

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DHCPV6_CLIENT_PORT = 546
DHCPV6_SERVER_PORT = 547
ZERO_IP = bytes(4)
BROADCAST_IP = b"\xff" * 4
ZERO_IP6 = bytes(16)


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    """What the router-advert timer needs of an event loop (asyncio's `call_later`):
    this module keeps the timer's decisions, the shell's loop runs it."""

    def call_later(self, delay: float, callback: Callable[[], None], /) -> Cancellable: ...


class LinkServices:
    """ARP, DHCP, NDP, RA and DHCPv6 for one guest; `send_frame` takes a complete
    frame without a vnet header."""

    def __init__(self, config: RelayConfig, addresses: AddressMap,
                 send_frame: Callable[[bytes], None], stats: Counter[str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._addr = addresses
        self._send_frame = send_frame
        self._stats = stats
        self.dhcp = DhcpServer(config)
        self.ndp = NdpResponder(config)
        self.dhcp6 = Dhcpv6Server(config)
        self._ra_timer: Cancellable | None = None
        self._loop: Scheduler | None = None
        self._ip_id = 0
        self._clock = clock
        # Answers to router solicitations: a booting guest sends at most
        # MAX_RTR_SOLICITATIONS (3) of them, 4 s apart (RFC 4861 §10), all answered; a
        # guest soliciting in a loop gets one RA per MIN_DELAY_BETWEEN_RAS (3 s).
        self._solicited_ras = TokenBucket(Fraction(1, 3), 3)
        # Our own solicitations for the guest's MAC: Linux's default too (neigh
        # mcast_solicit 3, retrans_time 1 s), so a host client connecting in a loop
        # before the guest's first frame makes no flood.
        self._guest_solicits = TokenBucket(Fraction(1), 3)
        #: `on_ready(source, mac, ipv4, ipv6)` hears of a lease given: "dhcp" with the
        #: leased IPv4 address (a renewal too), "dhcpv6" with the bound IPv6 address
        #: (None for a stateless reply). Set by the relay for its events.
        self.on_ready: Callable[[str, bytes, bytes | None, bytes | None], None] | None = None

    def solicit_guest(self, guest: bytes) -> None:
        """Ask the guest for its MAC (ARP request, or NS for an IPv6 `guest`): a frame
        must reach it before it sent any, a host client of a forward connecting before
        the guest spoke. Its answer teaches the relay the MAC as any frame does."""
        if not self._guest_solicits.allow(self._clock()):
            self._stats["guest_solicit_rate_limited"] += 1
            return
        self._stats["guest_solicits"] += 1
        if len(guest) == 16:
            self._send_ndp(self.ndp.neighbour_solicitation(guest))
        else:
            self._send_frame(arp_request(self.config.gateway_mac, self._addr.gateway_ip,
                                         guest))

    # -- IPv4 ----------------------------------------------------------------------------

    def arp(self, payload: memoryview) -> None:
        arp = parse_arp(payload)
        if arp.op != 1:  # only requests need an answer (RFC 826)
            return
        guest_ip = self._addr.guest_ip
        # Proxy ARP for every in-subnet address but the guest's own: a gratuitous ARP or
        # duplicate-address probe for its own address must stay unanswered.
        if not self._addr.in_subnet_v4(arp.target_ip) or arp.target_ip == guest_ip:
            self._stats["arp_ignored"] += 1
            return
        if arp.sender_ip not in (guest_ip, ZERO_IP):
            raise MalformedFrame("arp_spoofed_sender")
        self._stats["arp_replies"] += 1
        self._send_frame(arp_reply(self.config.gateway_mac, arp.target_ip, arp.sender_mac,
                                   arp.sender_ip))

    def dhcp_request(self, dgram: UdpDatagram) -> None:
        reply = self.dhcp.handle(dgram.payload)
        if reply is None:
            self._stats["dhcp_no_reply"] += 1
            return
        payload = reply.payload
        chaddr = payload[28:34]
        if reply.broadcast:
            dst_mac, dst_ip = BROADCAST_MAC, BROADCAST_IP
        else:
            dst_mac = chaddr
            dst_ip = payload[12:16] if payload[12:16] != ZERO_IP else payload[16:20]
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        self._stats["dhcp_replies"] += 1
        self._send_frame(udp_frame(dst_mac, self.config.gateway_mac, self._addr.gateway_ip,
                                   dst_ip, DHCP_SERVER_PORT, DHCP_CLIENT_PORT, payload,
                                   self._ip_id))
        if reply.lease is not None and self.on_ready is not None:
            self.on_ready("dhcp", chaddr, reply.lease, None)

    # -- IPv6 ----------------------------------------------------------------------------

    def ndp6(self, ip: Ipv6Packet, src_mac: bytes) -> bool:
        """Neighbour discovery (link/ndp.py); True when the message was NDP (answered or
        counted), False for other ICMPv6 (echo), which is relayed."""
        payload = ip.payload
        if not payload or payload[0] not in NDP_TYPES:
            return False
        if ip.src != ZERO_IP6:
            self.ndp.note_guest_address(ip.src)
        for reply in self.ndp.handle(ip.src, ip.dst, ip.ttl, payload, src_mac):
            if reply.message[0] == RA and not self._solicited_ras.allow(self._clock()):
                self._stats["ndp_ra_rate_limited"] += 1
                continue
            self._send_ndp(reply)
        return True

    def _send_ndp(self, reply: NdpReply) -> None:
        self._stats["ndp_replies"] += 1
        self._send_frame(ip_frame(reply.dst_mac, self.config.gateway_mac, reply.src,
                                  reply.dst, IPPROTO_ICMPV6, reply.message,
                                  ttl=reply.hop_limit))

    def dhcpv6_request(self, ip: Ipv6Packet, src_mac: bytes) -> bool:
        """DHCPv6 to the servers' multicast group (RFC 8415 §7.1: clients send from
        their link-local address, port 546, to ff02::1:2 port 547); True when handled.
        The reply goes from our link-local address to the client's, unicast."""
        dgram = parse_udp(ip)
        if dgram.dport != DHCPV6_SERVER_PORT or dgram.sport != DHCPV6_CLIENT_PORT:
            return False
        reply = self.dhcp6.handle(dgram.payload)
        if reply is None:
            self._stats["dhcp6_no_reply"] += 1
            return True
        self._stats["dhcp6_replies"] += 1
        self._send_frame(udp_frame(src_mac, self.config.gateway_mac,
                                   self.config.gateway_link_local.packed, ip.src,
                                   DHCPV6_SERVER_PORT, DHCPV6_CLIENT_PORT, reply))
        if self.dhcp6.last_configures and self.on_ready is not None:
            self.on_ready("dhcpv6", src_mac, None, self.dhcp6.last_bound)
        return True

    def start_router_adverts(self, loop: Scheduler) -> None:
        """Advertise now and every MAX_RTR_ADV_INTERVAL_S while a guest is attached
        (`loop`: the relay's event loop)."""
        self.stop_router_adverts()
        self._loop = loop
        self._advertise_router()

    def stop_router_adverts(self) -> None:
        if self._ra_timer is not None:
            self._ra_timer.cancel()
            self._ra_timer = None
        self._loop = None

    def _advertise_router(self) -> None:
        """Unsolicited router advertisement to all nodes (RFC 4861 §6.2.4), repeated at
        the longest interval §6.2.1 allows: a guest that missed our answer to its
        solicitation (or never sent one) still configures itself."""
        if self._loop is None:
            return
        # The next one is armed before this one is sent: sending to a guest that is
        # already gone (a stream client that connected and closed at once: EPIPE) loses
        # the transport, and the relay's detach then stops the adverts, which must find
        # this timer to cancel and leave nothing armed on a detached relay.
        self._ra_timer = self._loop.call_later(MAX_RTR_ADV_INTERVAL_S, self._advertise_router)
        self._send_ndp(self.ndp.router_advertisement())

    def counters(self) -> dict[str, int]:
        """The servers' own counters, prefixed by service, nonzero ones only."""
        out = {}
        for prefix, counters in (("dhcp", self.dhcp.counters), ("ndp", self.ndp.counters),
                                 ("dhcp6", self.dhcp6.counters)):
            for key, value in counters.items():
                if value:
                    out[f"{prefix}_{key}"] = value
        return out
