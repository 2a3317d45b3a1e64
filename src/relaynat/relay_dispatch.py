"""`Relay`'s dispatch of IPv6 packets and of UDP datagrams: neighbour discovery and
DHCPv6 answered on the link, DHCPv4 requests, static DNS answers, and everything else
handed to the host relays (TCP, UDP, ICMPv6 echo) as for IPv4.

`RelayDispatch` is a base class of `Relay`, kept in a module of its own so that relay.py
stays within reach of one reading; `Relay.handle_frame` and its IPv4 dispatch call it
per frame. It declares the parts of the relay it works on, which `Relay` builds
(`Relay.__init__`, `Relay.start`); it is not meant to be used alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from ipaddress import ip_address
from typing import TYPE_CHECKING

from relaynat.addressing import DNS_PORT, LINK_LOCAL_PREFIX, AddressMap
from relaynat.config import RelayConfig
from relaynat.domains import NameTable
from relaynat.egress_gate import EgressGate
from relaynat.event_hub import EventHub
from relaynat.events import DnsQuery
from relaynat.host.dns_tcp import DnsTcpResponder
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.udp_relay import UdpRelay
from relaynat.link.dns import answer_static
from relaynat.link.dns_filter import DnsFilter, type_name
from relaynat.link.services import (
    BROADCAST_IP,
    DHCP_SERVER_PORT,
    ZERO_IP,
    ZERO_IP6,
    LinkServices,
)
from relaynat.packet_builder import BROADCAST_MAC, ICMP_PORT_UNREACH, udp_frame
from relaynat.policy import Policy
from relaynat.wire import (
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IpPacket,
    Ipv4Packet,
    Ipv6Packet,
    MalformedFrame,
    TcpSegment,
    UdpDatagram,
    parse_tcp,
    parse_udp,
    parse_udp4_fast,
)

#: What reads answers while no policy is in force (only listeners want them then).
_NO_POLICY = Policy()


class RelayDispatch:
    """IPv6 and UDP dispatch; see the module docstring."""

    # The parts of the relay this works on (`Relay.__init__` and `Relay.start`).
    config: RelayConfig
    _stats: Counter[str]
    _tcp: TcpRelay | None
    _udp_relay: UdpRelay | None
    _icmp: IcmpEchoRelay | None
    _link: LinkServices
    _addr: AddressMap
    _guest_mac: bytes | None
    _guest_ip: bytes
    _guest_addr6: bytes
    _prefix6: bytes
    _verify_tcp: bool
    _dns_static: dict[str, dict[int, list[bytes]]]
    _ip_id: int
    _names: NameTable
    _gate: EgressGate | None
    _hub: EventHub
    _dns_tcp: DnsTcpResponder | None
    _loop: asyncio.AbstractEventLoop | None
    #: The current policy's DNS filter (made on first use, `_dns_filter_for`).
    _dns_filter: DnsFilter | None = None

    if TYPE_CHECKING:
        def _tcp_segment(self, seg: TcpSegment) -> None: ...

        def _dns_upstream(self) -> str | None: ...

        def _send_frame(self, frame: bytes) -> None: ...

    def _ipv6(self, ip: Ipv6Packet, src_mac: bytes) -> None:
        """Dispatch one IPv6 packet: neighbour discovery and DHCPv6 are answered here,
        TCP/UDP/ICMPv6 echo go through the same relays as IPv4.

        The guest may use any address of the prefix (SLAAC picks its own interface
        identifier, RFC 4862 §5.5.3; privacy addresses, RFC 8981), its link-local
        address, and for neighbour discovery and DHCPv6 only :: (DAD, RFC 4862 §5.4)."""
        src, proto = ip.src, ip.proto
        link_local = src[:8] == LINK_LOCAL_PREFIX
        if src[:8] != self._prefix6 and not link_local and src != ZERO_IP6:
            raise MalformedFrame("ip_spoofed_source")
        if proto == IPPROTO_ICMPV6 and self._link.ndp6(ip, src_mac):
            return
        if ip.dst[0] == 0xFF:
            if proto == IPPROTO_UDP and self._link.dhcpv6_request(ip, src_mac):
                return
            # MLD reports, mDNS, LLMNR...: meant for the link, nothing to relay.
            self._stats["ipv6_multicast_ignored"] += 1
            return
        if src == ZERO_IP6:
            raise MalformedFrame("ip6_unspecified_source")
        # A guest whose global address is still tentative (RFC 4862 §5.4) speaks from
        # its link-local one: relayed as well, and answered at that address.
        if not link_local:
            self._guest_addr6 = src
        if proto == IPPROTO_TCP:
            seg = parse_tcp(ip, self._verify_tcp)
            assert self._tcp is not None
            self._tcp_segment(seg)
        elif proto == IPPROTO_UDP:
            self._udp_relayed(ip, parse_udp(ip))
        elif proto == IPPROTO_ICMPV6:
            assert self._icmp is not None
            self._icmp.on_packet(ip, self._addr.host_ip_for(ip.dst, 0, self._stats), src_mac)
        else:
            raise MalformedFrame("ip_proto_unsupported")

    def _known_udp(self, frame: memoryview) -> bool:
        """Relay a guest datagram of an open IPv4 flow straight away (parse_udp4_fast);
        False if it is anything else. The DNS address and the DHCP port are left to the
        general path: static records answer there, its DNS flows count what they
        forward, and a datagram to port 67 of the gateway is a DHCP request."""
        fast = parse_udp4_fast(frame)
        if fast is None:
            return False
        src_mac, dgram, packet = fast
        if (src_mac != self._guest_mac or dgram.src != self._guest_ip
                or dgram.dst == self._addr.dns_ip or dgram.dport == DHCP_SERVER_PORT):
            return False
        assert self._udp_relay is not None
        return self._udp_relay.on_known(dgram, packet)

    def _udp(self, ip: Ipv4Packet) -> None:
        dgram = parse_udp(ip)
        if dgram.dport == DHCP_SERVER_PORT and (ip.src == ZERO_IP or dgram.dst
                                                in (self._addr.gateway_ip, BROADCAST_IP)):
            self._link.dhcp_request(dgram)
            return
        if ip.src == ZERO_IP:
            raise MalformedFrame("ip_spoofed_source")
        if dgram.dst == BROADCAST_IP or dgram.dst[0] >= 224:
            raise MalformedFrame("udp_multicast_or_broadcast")
        self._udp_relayed(ip, dgram)

    def _udp_relayed(self, ip: IpPacket, dgram: UdpDatagram) -> None:
        """A unicast guest datagram of either family: static DNS answers, queries the
        policy's domain rules refuse, else relayed."""
        dns_ip = self._addr.dns_ip6 if len(dgram.dst) == 16 else self._addr.dns_ip
        if dgram.dst == dns_ip and dgram.dport == DNS_PORT:
            answer = None
            if self._dns_static:
                answer = answer_static(dgram.payload, self._dns_static)
                if answer is not None:
                    self._stats["dns_static_answers"] += 1
                    self._dns_answered(answer, "static")
            if answer is None:
                answer = self._dns_screen(dgram.payload)
            if answer is not None:
                if answer:  # b"": dropped
                    self._ip_id = (self._ip_id + 1) & 0xFFFF
                    self._send_frame(udp_frame(self._guest_mac or BROADCAST_MAC,
                                               self.config.gateway_mac, dns_ip, dgram.src,
                                               DNS_PORT, dgram.sport, answer, self._ip_id))
                return
            self._dns_upstream()  # a new flow would go to the upstream the host names now
        host_ip = self._addr.host_ip_for(dgram.dst, dgram.dport, self._stats)
        assert self._udp_relay is not None
        if host_ip is None and (dgram.sport, dgram.dst, dgram.dport,
                                dgram.src) not in self._udp_relay.table.flows:
            if dgram.dst == self._guest_ip or dgram.dst[:8] == LINK_LOCAL_PREFIX:
                raise MalformedFrame("udp_unmapped_destination")
            # Nothing listens there (gateway without the mapping, the DNS address on
            # another port or without upstream, a host-local address): port unreachable,
            # as TCP gets a RST.
            self._udp_relay.refuse(ip, ICMP_PORT_UNREACH)
            return
        if dgram.dst == dns_ip:
            self._stats["dns_forwarded_udp"] += 1
            self._udp_relay.on_datagram(ip, dgram, host_ip, self.config.dns_udp_timeout_s)
        else:
            self._udp_relay.on_datagram(ip, dgram, host_ip)

    # -- DNS under domain rules (link/dns_filter.py, domains.py) ---------------------------

    def _dns_screen(self, query: bytes | memoryview) -> bytes | None:
        """The relay's own reply to a guest query the policy keeps from the upstream
        (REFUSED, or NODATA for HTTPS/SVCB; b"": dropped unanswered), or None to forward
        it. Both transports ask (UDP here, TCP in host/dns_tcp.py)."""
        gate = self._gate
        if gate is None or not gate.policy.filters_dns:
            return None
        screened = self._dns_filter_for(gate.policy).screen(query)
        if screened.action == "forwarded":
            return None
        if screened.action == "refused":
            self._stats["dns_refused"] += 1
        elif screened.action == "empty":
            self._stats["dns_empty"] += 1
        else:
            self._stats["dns_dropped"] += 1
        hub = self._hub
        if hub.listening and screened.reply is not None:
            hub.emit(DnsQuery(time.time(), hub.guest, screened.name,
                              type_name(screened.qtype), (), screened.action))
        return b"" if screened.reply is None else screened.reply

    def _dns_answered(self, reply: bytes | memoryview, action: str = "forwarded") -> None:
        """An answer on its way to the guest (from the upstream, or the static records):
        its addresses learned for the name asked while a policy has domain rules, and
        a DnsQuery event. The reply itself goes on unchanged."""
        gate = self._gate
        learning = gate is not None and gate.policy.has_domains
        hub = self._hub
        if not (learning or hub.listening):
            return
        answer = self._dns_filter_for(gate.policy if gate is not None else None).read(reply)
        if answer is None:
            self._stats["dns_answers_unread"] += 1
            return
        if learning and answer.addrs and self._loop is not None:
            names = self._names
            evicted = names.evicted
            names.learn(answer.name, answer.addrs, answer.ttl, self._loop.time())
            self._stats["dns_addresses_learned"] += len(answer.addrs)
            if names.evicted != evicted:
                self._stats["dns_names_evicted"] += names.evicted - evicted
        if hub.listening:
            hub.emit(DnsQuery(time.time(), hub.guest, answer.name, type_name(answer.qtype),
                              answer.addr_texts(), action))

    def _dns_filter_for(self, policy: Policy | None) -> DnsFilter:
        """The DNS filter of `policy`, made anew when the policy changed (its memo of
        verdicts belongs to one policy)."""
        policy = policy or _NO_POLICY
        dns_filter = self._dns_filter
        if dns_filter is None or dns_filter.policy is not policy:
            dns_filter = self._dns_filter = DnsFilter(policy)
        return dns_filter

    def _serve_dns_tcp(self) -> None:
        """Run the DNS-over-TCP responder (host/dns_tcp.py) if the guest's DNS over TCP
        needs more than relaying: static records to answer, or a policy with domain
        rules to screen queries and learn answers."""
        if self._dns_tcp is not None or self._loop is None or self._tcp is None:
            return
        gate = self._gate
        if not self._dns_static and (gate is None or not gate.policy.has_domains):
            return
        self._dns_tcp = DnsTcpResponder(self._dns_static, self._dns_upstream, self._loop,
                                        self._stats, self._dns_screen, self._dns_answered)
        # It serves no one but this guest: the relay names its sockets (host/dns_tcp.py).
        self._tcp.watch_connects(self._dns_tcp.address, self._dns_tcp.expect)

    def learned_names(self) -> list[dict[str, object]]:
        """The names the guest's DNS answers gave addresses for that are still valid
        (for the policy's domain rules), oldest learned first: name, address, seconds
        left of the answer's TTL (0: valid only while a flow uses it, or in the grace
        after) and the flows open to the address."""
        if self._loop is None:
            return []
        return [{"name": e.name, "addr": str(ip_address(e.addr)),
                 "expires_in": round(e.expires_in, 1), "flows": e.flows}
                for e in self._names.entries(self._loop.time())]
