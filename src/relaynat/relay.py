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
import contextlib
import logging
import socket
from collections import Counter
from ipaddress import IPv4Address

from relaynat.config import RelayConfig
from relaynat.dhcp import DhcpServer
from relaynat.dns import answer_static, host_upstream, static_table
from relaynat.icmp_echo import IcmpEchoRelay
from relaynat.packet_builder import BROADCAST_MAC, arp_reply, udp_frame
from relaynat.pcap import PcapWriter
from relaynat.stream import StreamTransport, bind_unix_listener
from relaynat.tcp_relay import TcpRelay
from relaynat.transport import FrameTransport
from relaynat.udp_relay import UdpRelay
from relaynat.wire import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    Ipv4Packet,
    MalformedFrame,
    UdpDatagram,
    parse_arp,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
    parse_udp,
)

log = logging.getLogger("relaynat")

DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
DNS_PORT = 53
_ZERO_IP = bytes(4)
_BROADCAST_IP = b"\xff" * 4


class Relay:
    """The network of one guest: one transport at a time, any number of flows."""

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = (config or RelayConfig()).validate()
        self._stats: Counter[str] = Counter()
        self._transport: FrameTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tcp: TcpRelay | None = None
        self._udp_relay: UdpRelay | None = None
        self._icmp: IcmpEchoRelay | None = None
        self._dhcp = DhcpServer(self.config)
        self._pcap: PcapWriter | None = None
        self._listener: socket.socket | None = None
        self._guest_mac: bytes | None = None
        self._ip_id = 0
        c = self.config
        self._guest_ip = c.guest_ipv4.packed
        self._gateway_ip = c.gateway_ipv4.packed
        self._net = int(c.network_v4.network_address)
        self._mask = int(c.network_v4.netmask)
        self._map_from = c.map_host_loopback_v4.packed if c.map_host_loopback_v4 else None
        self._host_loopback = str(c.host_loopback_v4)
        self._dns_ip = c.dns_ipv4.packed
        upstream = c.dns_upstream or host_upstream()
        self._dns_upstream = str(upstream) if upstream is not None else None
        if upstream is None:
            log.warning("no IPv4 nameserver in /etc/resolv.conf and no dns_upstream: "
                        "DNS queries to %s are dropped (static records still answer)",
                        c.dns_ipv4)
        self._dns_static = static_table(c.dns_records)
        self.transport_lost_event = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Relay:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Bind to the running loop. Called by `async with`."""
        self._loop = asyncio.get_running_loop()
        self._tcp = TcpRelay(self.config, self._loop, self._send_raw, self._stats)
        self._udp_relay = UdpRelay(self.config, self._loop, self._send_frame, self._send_raw,
                                   self._stats)
        self._icmp = IcmpEchoRelay(self.config, self._loop, self._send_frame, self._stats)
        if self.config.pcap_path:
            self._pcap = PcapWriter(self.config.pcap_path)

    def close(self) -> None:
        self.detach()
        if self._listener is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._listener.fileno())  # type: ignore[union-attr]
            self._listener.close()
            self._listener = None
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

    def attach(self, transport: FrameTransport) -> None:
        """Serve the guest behind `transport`; replaces (and closes) a previous one."""
        if self._tcp is None:
            raise RuntimeError("Relay.start() (or `async with`) must come before attach()")
        self.detach()
        self._transport = transport
        self._tcp.set_link(transport.vnet_hdr_len, transport.offload)
        if self._udp_relay is not None:
            self._udp_relay.set_link(transport.vnet_hdr_len, transport.offload)
        self.transport_lost_event.clear()
        transport.start(self)

    def detach(self) -> None:
        """Drop the current transport and every flow of its guest (reset toward hosts)."""
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._tcp is not None:
            self._tcp.abort_all()
        if self._udp_relay is not None:
            self._udp_relay.abort_all()
        self._guest_mac = None

    # -- socket transports -------------------------------------------------------------

    def serve_stream(self, path: str) -> None:
        """Listen on unix socket `path` for qemu stream clients, one guest at a time.

        A second client while one is served is closed at once with a logged warning;
        when the served client goes away its flows are closed and the next is accepted.
        """
        assert self._loop is not None, "start() first"
        self._listener = bind_unix_listener(path)
        self._loop.add_reader(self._listener.fileno(), self._on_stream_client)

    def attach_stream_fd(self, fd: int) -> StreamTransport:
        """Serve an already-connected qemu stream socket (`--fd N`)."""
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or sock.family != socket.AF_UNIX:
            sock.detach()
            raise ValueError(f"fd {fd} is not a unix stream socket")
        transport = StreamTransport(sock, self.config.guest_queue_limit, self._loop)
        self.attach(transport)
        return transport

    def _on_stream_client(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._transport is not None:
            log.warning("a second guest tried to connect while one is served; refused")
            self._stats["stream_clients_refused"] += 1
            client.close()
            return
        log.info("guest connected on the stream socket")
        self._stats["stream_clients"] += 1
        self.attach(StreamTransport(client, self.config.guest_queue_limit, self._loop))

    def transport_lost(self, transport: FrameTransport, reason: str) -> None:
        if transport is not self._transport:
            return
        log.info("guest transport lost: %s", reason)
        self._stats["transport_lost"] += 1
        self._transport = None
        self.detach()
        self.transport_lost_event.set()

    # -- frames from the guest -----------------------------------------------------------

    def handle_frame(self, frame: memoryview) -> None:
        stats = self._stats
        stats["frames_in"] += 1
        if self._pcap is not None:
            self._pcap.write(frame)
        try:
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
        if ethertype == ETHERTYPE_IPV4:
            ip = parse_ipv4(eth.payload)
            if ip.src != self._guest_ip:
                if ip.proto == IPPROTO_UDP and ip.src == _ZERO_IP:
                    self._udp(ip)  # DHCP before the guest has an address
                    return
                raise MalformedFrame("ip_spoofed_source")
            if ip.proto == IPPROTO_TCP:
                seg = parse_tcp(ip)
                assert self._tcp is not None
                self._tcp.on_segment(seg, self._host_ip_for(seg.dst, seg.dport))
            elif ip.proto == IPPROTO_UDP:
                self._udp(ip)
            elif ip.proto == IPPROTO_ICMP:
                assert self._icmp is not None
                # Echo only; port 0 maps nothing special (the DNS address has no echo).
                self._icmp.on_packet(ip, self._host_ip_for(ip.dst, 0), src_mac)
            else:
                raise MalformedFrame("ip_proto_unsupported")
        elif ethertype == ETHERTYPE_ARP:
            self._arp(eth.payload)
        elif ethertype == ETHERTYPE_IPV6:
            raise MalformedFrame("ipv6_unsupported")
        else:
            raise MalformedFrame("ethertype_unsupported")

    def end_of_batch(self) -> None:
        if self._tcp is not None:
            self._tcp.flush()

    def _learn_guest_mac(self, mac: bytes) -> None:
        self._guest_mac = mac
        if self._tcp is not None:
            self._tcp.guest_mac = mac
        if self._udp_relay is not None:
            self._udp_relay.guest_mac = mac

    def _host_ip_for(self, dst: bytes, dport: int) -> str | None:
        """Where a guest destination is on the host: the mapped address goes to host
        loopback, the DNS address port 53 to the upstream resolver, everything else
        stays itself. None: nothing there (the gateway when the mapping is off, the
        guest's own address, the DNS address on another port or without upstream)."""
        if dst == self._map_from:
            return self._host_loopback
        if dst == self._dns_ip:
            return self._dns_upstream if dport == DNS_PORT else None
        if dst == self._gateway_ip or dst == self._guest_ip:
            return None
        return str(IPv4Address(dst))

    def _arp(self, payload: memoryview) -> None:
        arp = parse_arp(payload)
        if arp.op != 1:  # only requests need an answer (RFC 826)
            return
        target = int.from_bytes(arp.target_ip, "big")
        # Proxy ARP for every in-subnet address but the guest's own: a gratuitous ARP or
        # duplicate-address probe for its own address must stay unanswered.
        if target & self._mask != self._net or arp.target_ip == self._guest_ip:
            self._stats["arp_ignored"] += 1
            return
        if arp.sender_ip not in (self._guest_ip, _ZERO_IP):
            raise MalformedFrame("arp_spoofed_sender")
        self._stats["arp_replies"] += 1
        self._send_frame(arp_reply(self.config.gateway_mac, arp.target_ip, arp.sender_mac,
                                   arp.sender_ip))

    def _udp(self, ip: Ipv4Packet) -> None:
        dgram = parse_udp(ip)
        if dgram.dport == DHCP_SERVER_PORT and (ip.src == _ZERO_IP or dgram.dst
                                                in (self._gateway_ip, _BROADCAST_IP)):
            self._dhcp_request(dgram)
            return
        if ip.src == _ZERO_IP:
            raise MalformedFrame("ip_spoofed_source")
        if dgram.dst == _BROADCAST_IP or dgram.dst[0] >= 224:
            raise MalformedFrame("udp_multicast_or_broadcast")
        if dgram.dst == self._dns_ip and dgram.dport == DNS_PORT and self._dns_static:
            answer = answer_static(dgram.payload, self._dns_static)
            if answer is not None:
                self._stats["dns_static_answers"] += 1
                self._ip_id = (self._ip_id + 1) & 0xFFFF
                self._send_frame(udp_frame(self._guest_mac or BROADCAST_MAC,
                                           self.config.gateway_mac, self._dns_ip,
                                           self._guest_ip, DNS_PORT, dgram.sport, answer,
                                           self._ip_id))
                return
        host_ip = self._host_ip_for(dgram.dst, dgram.dport)
        assert self._udp_relay is not None
        if host_ip is None:
            if dgram.dst == self._guest_ip:
                raise MalformedFrame("udp_unmapped_destination")
            # Nothing listens there (gateway without the mapping, the DNS address on
            # another port or without upstream): port unreachable, as TCP gets a RST.
            self._udp_relay.refuse(ip)
            return
        if dgram.dst == self._dns_ip:
            self._stats["dns_forwarded_udp"] += 1
            self._udp_relay.on_datagram(ip, dgram, host_ip, self.config.dns_udp_timeout_s)
        else:
            self._udp_relay.on_datagram(ip, dgram, host_ip)

    def _dhcp_request(self, dgram: UdpDatagram) -> None:
        reply = self._dhcp.handle(dgram.payload)
        if reply is None:
            self._stats["dhcp_no_reply"] += 1
            return
        payload = reply.payload
        chaddr = payload[28:34]
        if reply.broadcast:
            dst_mac, dst_ip = BROADCAST_MAC, _BROADCAST_IP
        else:
            dst_mac = chaddr
            dst_ip = payload[12:16] if payload[12:16] != _ZERO_IP else payload[16:20]
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        self._stats["dhcp_replies"] += 1
        self._send_frame(udp_frame(dst_mac, self.config.gateway_mac, self._gateway_ip, dst_ip,
                                   DHCP_SERVER_PORT, DHCP_CLIENT_PORT, payload, self._ip_id))

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

    def stats(self) -> dict[str, int]:
        """Counters (frames, drops by reason, flows) and gauges, as a plain dict."""
        out = dict(self._stats)
        out["tcp_flows"] = len(self._tcp.flows) if self._tcp is not None else 0
        out["udp_flows"] = len(self._udp_relay.table) if self._udp_relay is not None else 0
        out["icmp_sockets"] = self._icmp.socket_count if self._icmp is not None else 0
        for key, value in self._dhcp.counters.items():
            if value:
                out[f"dhcp_{key}"] = value
        return out
