"""`Relay`: one guest's network, executed in asyncio.

It receives the guest's frames from a transport (TAP, qemu stream socket), answers
ARP and DHCP itself, hands TCP segments to `TcpRelay`, which splices them onto host
sockets, and UDP datagrams to `UdpRelay` (one connected host socket per flow).
Everything protocol-level is decided by the sans-I/O modules (wire, dhcp, dns,
nat_entry, udp_flow); this module dispatches and executes.

Frames from anything but the guest's address are dropped (the guest may only speak as
itself), and every malformed or unsupported frame is dropped and counted under a
stable reason in `stats()`, never raised: one bad frame must not disturb any flow.

Addressing follows slirp: the gateway address answers ARP, serves DHCP, and by default
stands for the host's loopback (`map_host_loopback_v4`), as in slirp4netns and passt.
Any other destination is connected to as is, from the host's network namespace.
The DNS address (10.0.2.3) port 53, UDP and TCP, goes to the host's resolver (the
first nameserver of its resolv.conf, or `dns_upstream`), except static records, which
`dns.answer_static` answers here.

Embedding::

    async with Relay(RelayConfig()) as relay:
        relay.attach(TapTransport(fd, vnet_hdr_len, offload))
        ...
        print(relay.stats())
"""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

from relaynat.addressing import DNS_PORT, LINK_LOCAL_PREFIX, AddressMap
from relaynat.config import RelayConfig
from relaynat.errors import RelayClosedError
from relaynat.guest_log import guest_logger, guest_scope, in_guest_scope
from relaynat.host import flow_move
from relaynat.host.dns_tcp import DnsTcpResponder
from relaynat.host.forward import Forwarder
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.udp_relay import UdpRelay
from relaynat.link.dns import answer_static, host_upstream, static_table
from relaynat.link.services import (
    BROADCAST_IP,
    DHCP_SERVER_PORT,
    ZERO_IP,
    ZERO_IP6,
    LinkServices,
)
from relaynat.packet_builder import BROADCAST_MAC, ICMP_PORT_UNREACH, udp_frame
from relaynat.policy import EgressGate, Policy
from relaynat.ratelimit import TokenBucket
from relaynat.relay_forwards import RelayForwards
from relaynat.relay_moving import RelayMoving
from relaynat.transports.base import FrameTransport
from relaynat.transports.pcap import PcapWriter
from relaynat.transports.stream import StreamServer, StreamTransport
from relaynat.wire import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_PROTO_AT,
    IpPacket,
    Ipv4Packet,
    Ipv6Packet,
    MalformedFrame,
    TcpSegment,
    UdpDatagram,
    parse_ethernet,
    parse_ipv4,
    parse_ipv6,
    parse_tcp,
    parse_tcp4_fast,
    parse_udp,
    parse_udp4_fast,
)

log = guest_logger("relaynat")


class Relay(RelayForwards, RelayMoving):
    """The network of one guest: one transport at a time, any number of flows.

    `config` (default `RelayConfig()`) is validated here (ConfigError says what is
    wrong); `policy` (None: allow everything) governs the guest's new flows. Use as
    `async with Relay(config) as relay:` (or `start()` and `close()` in a running event
    loop), then `attach` a transport or `serve_stream`.

    `relay.config` is the validated configuration. `relay.transport_lost_event` is set
    when the attached transport goes away (the guest exited or its link failed) and
    cleared by the next `attach`: `await relay.transport_lost_event.wait()`.
    """

    def __init__(self, config: RelayConfig | None = None, policy: Policy | None = None,
                 name: str | None = None) -> None:
        #: The guest's name in log lines (guest_log.py); `Guests` sets it.
        self.name = name
        self.config = (config or RelayConfig()).validate()
        # Bound to this relay's addressing, whatever config it was built with (policy.py).
        self._policy = policy.bound_to(self.config) if policy is not None else None
        self._stats: Counter[str] = Counter()
        self._transport: FrameTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tcp: TcpRelay | None = None
        self._udp_relay: UdpRelay | None = None
        self._icmp: IcmpEchoRelay | None = None
        self._dns_tcp: DnsTcpResponder | None = None
        self._forwarder: Forwarder | None = None
        #: The guest's IPv6 address as last seen (SLAAC picks it; passt's addr_seen):
        #: where inbound IPv6 connections go.
        self._guest_addr6 = self.config.guest_ipv6.packed
        self._pcap: PcapWriter | None = None
        self._stream: StreamServer | None = None
        self._guest_mac: bytes | None = None
        #: Verify the guest's TCP checksums: on transports without a virtio-net header
        #: (stream and datagram sockets, a plain TAP) the guest's frames carry full
        #: checksums, and nothing else would catch a frame damaged on the way.
        self._verify_tcp = False
        self._ip_id = 0
        c = self.config
        upstream = c.dns_upstream or host_upstream()
        if upstream is None:
            with guest_scope(name):
                log.warning("no nameserver in /etc/resolv.conf and no dns_upstream: DNS "
                            "queries to the relay's DNS address are dropped (static "
                            "records still answer)")
        self._addr = AddressMap(c, str(upstream) if upstream is not None else None)
        self._guest_ip = self._addr.guest_ip
        #: IPv4 TCP frames of known flows take `parse_tcp4_fast` (IPv4 may be off).
        self._fast_ipv4 = c.ipv4
        self._prefix6 = self._addr.prefix6
        self._link = LinkServices(c, self._addr, self._send_frame, self._stats)
        self._dns_static = static_table(c.dns_records)
        self.transport_lost_event = asyncio.Event()
        self._exported = flow_move.ExportedSockets()
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, call: str) -> None:
        """Refuse `call` on a closed relay, or on one not started yet, where it is made."""
        if self._closed:
            raise RelayClosedError(f"Relay.{call}(): the relay is closed")
        if self._tcp is None:
            raise RuntimeError(f"Relay.start() (or `async with`) must come before {call}()")

    @in_guest_scope
    def start(self) -> None:
        """Bind to the running loop. Called by `async with`; a closed relay does not
        start again (RelayClosedError)."""
        if self._closed:
            raise RelayClosedError("Relay.start(): the relay is closed")
        self._loop = asyncio.get_running_loop()
        self._tcp = TcpRelay(self.config, self._loop, self._send_raw, self._stats)
        self._udp_relay = UdpRelay(self.config, self._loop, self._send_frame, self._send_raw,
                                   self._stats)
        self._icmp = IcmpEchoRelay(self.config, self._loop, self._send_frame, self._stats)
        # One bucket for all three: the rate bounds the guest's new flows, whatever protocol.
        self._tcp.rate_limit = self._udp_relay.rate_limit = self._icmp.rate_limit = (
            TokenBucket.from_limits(self.config.new_flow_rate, self.config.new_flow_burst))
        self.set_policy(self._policy)
        self._forwarder = Forwarder(self._loop, self._open_inbound, self._forwarded_datagram)
        if self._dns_static:
            self._dns_tcp = DnsTcpResponder(self._dns_static, self._addr.dns_upstream, self._loop,
                                            self._stats)
            # It serves no one but this guest: the relay names its sockets (host/dns_tcp.py).
            self._tcp.watch_connects(self._dns_tcp.address, self._dns_tcp.expect)
        if self.config.pcap_path:
            self._pcap = PcapWriter(self.config.pcap_path)

    @in_guest_scope
    def close(self) -> None:
        """Detach the guest, stop every forward and listener (removing the socket file
        of `serve_stream`) and close the host sockets. Called by `async with`. Exported
        sockets are released silently. Afterwards the relay refuses to be used
        (RelayClosedError); closing it again does nothing."""
        self._closed = True
        self.detach()
        self._exported.release()
        if self._stream is not None:
            self._stream.close(unlink=True)
            self._stream = None
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        if self._udp_relay is not None:
            self._udp_relay.close()
            self._udp_relay = None
        if self._icmp is not None:
            self._icmp.close()
            self._icmp = None
        if self._pcap is not None:
            self._pcap.close()
            self._pcap = None
        if self._dns_tcp is not None:
            self._dns_tcp.close()
            self._dns_tcp = None
        if self._forwarder is not None:
            self._forwarder.close()
            self._forwarder = None

    @in_guest_scope
    def attach(self, transport: FrameTransport) -> None:
        """Serve the guest behind `transport`; replaces (and closes) a previous one."""
        self._check_open("attach")
        assert self._tcp is not None
        if self._transport is not None:  # flows imported without a transport stay
            self.detach()
        self._transport = transport
        self._verify_tcp = transport.vnet_hdr_len == 0
        # getattr: a transport written before `keeps_frames` existed keeps nothing.
        self._tcp.set_link(transport.vnet_hdr_len, transport.offload,
                           getattr(transport, "keeps_frames", False))
        if self._udp_relay is not None:
            self._udp_relay.set_link(transport.vnet_hdr_len, transport.offload)
        self.transport_lost_event.clear()
        transport.start(self)
        # A transport lost in start has detached the relay already: no adverts then.
        if self.config.ipv6 and self._transport is transport:
            assert self._loop is not None
            self._link.start_router_adverts(self._loop)

    @in_guest_scope
    def detach(self, keep_transport: bool = False) -> FrameTransport | None:
        """Drop the current transport and every flow of its guest (reset toward hosts);
        `keep_transport`: only stop it and return it, for another relay's `attach`."""
        self._link.stop_router_adverts()
        transport = flow_move.let_go(self._transport, keep_transport)
        self._transport = None
        if self._tcp is not None:
            self._tcp.abort_all()
        if self._udp_relay is not None:
            self._udp_relay.abort_all()
        self._guest_mac = None
        return transport

    @property
    def transport(self) -> FrameTransport | None:
        """The guest's transport; None while none is attached (or `suspend`ed)."""
        return self._transport

    # -- egress policy -------------------------------------------------------------------

    @property
    def policy(self) -> Policy | None:
        """The egress policy in force (None: every new flow is allowed)."""
        return self._policy

    @in_guest_scope
    def set_policy(self, policy: Policy | None, cut: bool = False) -> int:
        """Put `policy` in force for new guest flows (None: allow everything). Flows
        already open stay as they are, unless `cut`: then the guest-opened flows the new
        policy denies end now (TCP: RST to the guest and to the host peer; UDP and ICMP
        sessions: closed), counted as `policy_cut_<proto>`. Returns how many ended.

        The policy is enforced bound to this relay's configuration (`Policy.bound_to`):
        its `host`, `loopback` and `dns` groups are this relay's addresses, whatever
        configuration it was built with; `policy` afterwards returns the bound one."""
        if self._closed:
            raise RelayClosedError("Relay.set_policy(): the relay is closed")
        if policy is not None:
            policy = policy.bound_to(self.config)
        self._policy = policy
        gate = None if policy is None else EgressGate(
            policy, (self._addr.dns_ip, self._addr.dns_ip6), self._stats)
        parts = (("tcp", self._tcp), ("udp", self._udp_relay), ("icmp", self._icmp))
        for _name, part in parts:
            if part is not None:
                part.admit = gate.admit if gate is not None else None
        if not cut or gate is None:
            return 0
        ended = 0
        for name, part in parts:
            if part is not None:
                n = part.cut(gate.denies)
                self._stats[f"policy_cut_{name}"] += n
                ended += n
        return ended

    # -- socket transports -------------------------------------------------------------

    @in_guest_scope
    def serve_stream(self, path: str, listener: socket.socket | None = None) -> StreamServer:
        """Listen on unix socket `path` (or serve `listener`, listening on it already)
        for qemu stream clients, one guest at a time (`StreamServer`).

        A second client while one is served is closed at once with a logged warning;
        when the served client goes away its flows are closed and the next is accepted.
        `close()` removes the socket file.
        """
        self._check_open("serve_stream")
        assert self._loop is not None
        if self._stream is not None:
            raise RuntimeError(f"Relay.serve_stream(): already serving {self._stream.path}")
        self._stream = StreamServer(self, path, listener, self._loop)
        return self._stream

    @in_guest_scope
    def attach_stream_fd(self, fd: int) -> StreamTransport:
        """Serve an already-connected qemu stream socket (`--fd N`)."""
        self._check_open("attach_stream_fd")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError(f"fd {fd} is not a unix stream socket")
        transport = StreamTransport(sock, self.config.guest_queue_limit, self._loop)
        self.attach(transport)
        return transport

    def transport_lost(self, transport: FrameTransport, reason: str) -> None:
        """`FrameSink`: the guest's transport closed itself; its flows are reset and
        `transport_lost_event` is set."""
        if transport is not self._transport:
            return
        log.info("guest transport lost: %s", reason)
        self._stats["transport_lost"] += 1
        self._transport = None
        self.detach()
        self.transport_lost_event.set()

    # -- frames from the guest -----------------------------------------------------------

    def handle_frame(self, frame: memoryview) -> None:
        """`FrameSink`: one frame from the guest. A frame the relay cannot use is dropped
        and counted in `stats()` under its reason, never raised."""
        stats = self._stats
        stats["frames_in"] += 1
        if self._pcap is not None:
            self._pcap.write(frame)
        try:
            # The data path first: one unpack for a plain IPv4 TCP segment from the
            # guest, handed to its flow; anything else, or anything the fast parser
            # does not vouch for, takes the general path, which parses it afresh.
            if self._fast_ipv4 and len(frame) > IPV4_PROTO_AT:
                proto = frame[IPV4_PROTO_AT]
                if proto == IPPROTO_TCP:
                    fast = parse_tcp4_fast(frame, self._verify_tcp)
                    if (fast is not None and fast[0] == self._guest_mac
                            and fast[1].src == self._guest_ip):
                        self._tcp_segment(fast[1])
                        return
                elif proto == IPPROTO_UDP and self._known_udp(frame):
                    return
            self._dispatch(frame)
        except MalformedFrame as exc:
            stats["drop_" + exc.reason] += 1
        except Exception:  # a relay bug on one frame must not end the other flows
            log.exception("internal error on a guest frame; dropped")
            stats["drop_internal_error"] += 1

    def _dispatch(self, frame: memoryview) -> None:
        eth = parse_ethernet(frame)
        src_mac = eth.src_mac
        if src_mac[0] & 1 or src_mac == self.config.gateway_mac:
            raise MalformedFrame("eth_bad_source")
        if src_mac != self._guest_mac:
            self._learn_guest_mac(src_mac)
        ethertype = eth.ethertype
        if ethertype == ETHERTYPE_IPV6:
            if not self.config.ipv6:
                raise MalformedFrame("ipv6_disabled")
            self._ipv6(parse_ipv6(eth.payload), src_mac)
        elif ethertype == ETHERTYPE_IPV4:
            if not self.config.ipv4:
                raise MalformedFrame("ipv4_disabled")
            ip = parse_ipv4(eth.payload)
            if ip.src != self._guest_ip:
                if ip.proto == IPPROTO_UDP and ip.src == ZERO_IP:
                    self._udp(ip)  # DHCP before the guest has an address
                    return
                raise MalformedFrame("ip_spoofed_source")
            if ip.proto == IPPROTO_TCP:
                seg = parse_tcp(ip, self._verify_tcp)
                assert self._tcp is not None
                self._tcp_segment(seg)
            elif ip.proto == IPPROTO_UDP:
                self._udp(ip)
            elif ip.proto == IPPROTO_ICMP:
                assert self._icmp is not None
                # Echo only; port 0 maps nothing special (the DNS address has no echo).
                self._icmp.on_packet(ip, self._addr.host_ip_for(ip.dst, 0, self._stats), src_mac)
            else:
                raise MalformedFrame("ip_proto_unsupported")
        elif ethertype == ETHERTYPE_ARP:
            if not self.config.ipv4:
                raise MalformedFrame("ipv4_disabled")
            self._link.arp(eth.payload)
        else:
            raise MalformedFrame("ethertype_unsupported")

    def end_of_batch(self) -> None:
        """`FrameSink`: the transport delivered what one wakeup had; coalesced ACKs and
        host data go out now."""
        if self._tcp is not None:
            self._tcp.flush()

    def _learn_guest_mac(self, mac: bytes) -> None:
        self._guest_mac = mac
        if self._tcp is not None:
            self._tcp.set_guest_mac(mac)
        if self._udp_relay is not None:
            self._udp_relay.guest_mac = mac

    def _tcp_segment(self, seg: TcpSegment) -> None:
        """TCP of either family. With static DNS records, a connection to a DNS address
        port 53 goes to our own DNS-over-TCP server (host/dns_tcp.py), which answers them
        and forwards the rest, as the UDP path does."""
        assert self._tcp is not None
        if self._tcp.on_known(seg):  # a flow's segment: where it maps is settled
            return
        if (self._dns_tcp is not None and seg.dport == DNS_PORT
                and seg.dst in (self._addr.dns_ip, self._addr.dns_ip6)):
            self._tcp.on_segment(seg, *self._dns_tcp.address)
            return
        self._tcp.on_segment(seg, self._addr.host_ip_for(seg.dst, seg.dport, self._stats))

    # -- IPv6 ----------------------------------------------------------------------------

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
        """A unicast guest datagram of either family: static DNS answers, else relayed."""
        dns_ip = self._addr.dns_ip6 if len(dgram.dst) == 16 else self._addr.dns_ip
        if dgram.dst == dns_ip and dgram.dport == DNS_PORT and self._dns_static:
            answer = answer_static(dgram.payload, self._dns_static)
            if answer is not None:
                self._stats["dns_static_answers"] += 1
                self._ip_id = (self._ip_id + 1) & 0xFFFF
                self._send_frame(udp_frame(self._guest_mac or BROADCAST_MAC,
                                           self.config.gateway_mac, dns_ip, dgram.src,
                                           DNS_PORT, dgram.sport, answer, self._ip_id))
                return
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

    # -- frames to the guest -------------------------------------------------------------

    def _send_frame(self, frame: bytes) -> None:
        """A complete frame built without a vnet header (services, not the TCP path)."""
        transport = self._transport
        if transport is None:
            return
        if transport.vnet_hdr_len:
            self._send_raw(bytes(transport.vnet_hdr_len) + frame, b"")
        else:
            self._send_raw(frame, b"")

    def _send_raw(self, head: bytes, payload: bytes | memoryview) -> None:
        transport = self._transport
        if transport is None:
            self._stats["frames_out_no_guest"] += 1
            return
        self._stats["frames_out"] += 1
        if self._pcap is not None:
            self._pcap.write_parts(head[transport.vnet_hdr_len:], payload)
        transport.send(head, payload)

    # -- introspection -------------------------------------------------------------------

    def flows(self) -> list[dict[str, object]]:
        """Every open flow as a dict (host/flowinfo.py lists the keys): protocol, direction,
        both ends as the guest sees them, the host-side peer, state, bytes each way,
        the guest's window and, for TCP, the host socket's RTT as the kernel measured
        it (TCP_INFO's tcpi_rtt, microseconds)."""
        out: list[dict[str, object]] = []
        for part in (self._tcp, self._udp_relay, self._icmp):
            if part is not None:
                out.extend(part.describe_flows())
        return out

    def stats(self) -> dict[str, int]:
        """Counters (frames, drops by reason, flows) and gauges, as a plain dict."""
        out = dict(self._stats)
        out["tcp_flows"] = len(self._tcp.flows) if self._tcp is not None else 0
        out["udp_flows"] = len(self._udp_relay.table) if self._udp_relay is not None else 0
        out["icmp_sockets"] = self._icmp.socket_count if self._icmp is not None else 0
        out.update(self._link.counters())
        return out

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name` of `stats()`: for what serves the relay from
        outside it (a `StreamServer`, a handover) and counts there."""
        self._stats[name] += n
