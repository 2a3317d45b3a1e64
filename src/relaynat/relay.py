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
first nameserver of its resolv.conf, followed as the file changes, or `dns_upstream`),
except static records, which `dns.answer_static` answers here.

Embedding::

    async with Relay(RelayConfig()) as relay:
        relay.attach(TapTransport(fd, vnet_hdr_len, offload))
        ...
        print(relay.stats())
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable

from relaynat.addressing import DNS_PORT, AddressMap
from relaynat.config import ConfigError, RelayConfig
from relaynat.counters import with_zeros
from relaynat.domains import NameTable
from relaynat.egress_gate import EgressGate
from relaynat.errors import RelayClosedError
from relaynat.event_hub import DEFAULT_MAXSIZE, EventHub, EventStream
from relaynat.events import Event
from relaynat.flow_info import FlowInfo
from relaynat.guest_log import guest_logger, guest_scope, in_guest_scope
from relaynat.host import flow_move
from relaynat.host.dns_tcp import DnsTcpResponder
from relaynat.host.forward import Forward, Forwarder, ForwardError, SockAddr, client_address
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.host.splice import LoopbackDatagrams, SocketSource, Splicer
from relaynat.host.tcp_flow import close_with_reset
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.udp_relay import UdpRelay
from relaynat.link.dns import (
    FileVersion,
    HeldResolvConf,
    ResolvConfWatch,
    read_resolv_conf,
    resolv_conf_version,
    static_table,
)
from relaynat.link.services import ZERO_IP, LinkServices
from relaynat.policy import Policy
from relaynat.ratelimit import TokenBucket
from relaynat.relay_dispatch import RelayDispatch
from relaynat.relay_moving import RelayMoving
from relaynat.transports.base import FrameTransport
from relaynat.transports.pcap import PcapWriter
from relaynat.transports.stream import StreamServer, StreamTransport
from relaynat.wire import (
    ETHERTYPE_ARP,
    ETHERTYPE_IPV4,
    ETHERTYPE_IPV6,
    IPPROTO_ICMP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    IPV4_PROTO_AT,
    MalformedFrame,
    TcpSegment,
    parse_ethernet,
    parse_ipv4,
    parse_ipv6,
    parse_tcp,
    parse_tcp4_fast,
)

log = guest_logger("relaynat")


class Relay(RelayDispatch, RelayMoving):
    """The network of one guest: one transport at a time, any number of flows.

    `config` (default `RelayConfig()`) is validated here (ConfigError says what is
    wrong); `policy` (None: allow everything) governs the guest's new flows;
    `allow_domains` instead of it is `--allow-domain`'s policy for those names
    (`Policy.allow_domains`). Use as
    `async with Relay(config) as relay:` (or `start()` and `close()` in a running event
    loop), then `attach` a transport or `serve_stream`.

    `relay.config` is the validated configuration. `relay.transport_lost_event` is set
    when the attached transport goes away (the guest exited or its link failed) and
    cleared by the next `attach`: `await relay.transport_lost_event.wait()`.
    """

    def __init__(self, config: RelayConfig | None = None, policy: Policy | None = None,
                 name: str | None = None, *,
                 allow_domains: Iterable[str] | None = None) -> None:
        #: The guest's name in log lines (guest_log.py); `Guests` sets it.
        self.name = name
        self.config = (config or RelayConfig()).validate()
        if allow_domains is not None:
            # `--allow-domain`: only these names, on TCP 80 and 443 (Policy.allow_domains).
            if policy is not None:
                raise ConfigError("Relay(): give a policy or allow_domains, not both")
            policy = Policy.allow_domains(allow_domains, self.config)
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
        #: Spliced forwards (host/splice.py), once `splice_forwards` gave a socket source.
        self._splicer: Splicer | None = None
        self._loopback_udp: list[LoopbackDatagrams] = []
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
        self._addr = AddressMap(c, str(c.dns_upstream) if c.dns_upstream is not None else None)
        #: The host's resolv.conf, followed unless `dns_upstream` is set (link/dns.py).
        self._resolv = ResolvConfWatch() if c.dns_upstream is None else None
        #: resolv.conf's directories as descriptors, once prepare_confinement ran.
        self._resolv_dir: HeldResolvConf | None = None
        if self._resolv is not None:
            with guest_scope(name):
                self._resolv_conf_read(self._resolv, resolv_conf_version(c.resolv_conf), True)
        self._guest_ip = self._addr.guest_ip
        #: IPv4 TCP frames of known flows take `parse_tcp4_fast` (IPv4 may be off).
        self._fast_ipv4 = c.ipv4
        self._prefix6 = self._addr.prefix6
        self._link = LinkServices(c, self._addr, self._send_frame, self._stats)
        self._hub = EventHub(name, self._stats)
        self._link.on_ready = self._hub.guest_ready
        self._dns_static = static_table(c.dns_records)
        #: The DNS answers this guest got, for the policy's domain rules (domains.py).
        self._names = NameTable(c.max_dns_names, c.dns_ttl_min_s, c.dns_ttl_max_s,
                                c.dns_names_grace_s)
        self._gate: EgressGate | None = None
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
        self._tcp.events = self._udp_relay.events = self._icmp.events = self._hub
        self._tcp.names = self._udp_relay.names = self._icmp.names = self._names
        # One bucket for all three: the rate bounds the guest's new flows, whatever protocol.
        self._tcp.rate_limit = self._udp_relay.rate_limit = self._icmp.rate_limit = (
            TokenBucket.from_limits(self.config.new_flow_rate, self.config.new_flow_burst))
        self._udp_relay.dns_answered = self._dns_answered
        self.set_policy(self._policy)
        self._forwarder = Forwarder(self._loop, self._open_inbound, self._forwarded_datagram)
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
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None
        for datagrams in self._loopback_udp:
            datagrams.close()
        self._loopback_udp.clear()
        self._hub.close()
        if self._resolv_dir is not None:
            self._resolv_dir.close()
            self._resolv_dir = None

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
            policy, (self._addr.dns_ip, self._addr.dns_ip6), self._stats, self._hub.denied,
            self._names)
        self._gate = gate
        self._serve_dns_tcp()  # domain rules screen DNS over TCP too
        loop = self._loop
        parts = (("tcp", self._tcp), ("udp", self._udp_relay), ("icmp", self._icmp))
        for _name, part in parts:
            if part is not None:
                part.gate = gate
        if not cut or gate is None or loop is None:
            return 0
        now = loop.time()
        ended = 0
        for name, part in parts:
            if part is not None:
                n = part.cut(lambda proto, dst, dport: gate.denies(proto, dst, dport, now))
                self._stats[f"policy_cut_{name}"] += n
                ended += n
        return ended

    # -- inbound forwards ----------------------------------------------------------------

    @in_guest_scope
    def add_forward(self, proto: str, host_addr: str | None, host_port: int,
                    guest_port: int, interface: str | None = None) -> Forward:
        """Forward `proto` ("tcp" or "udp") host `host_addr` (None: all, both families)
        port `host_port` (0: pick one; the returned Forward says which) to the guest's
        `guest_port`. Raises ForwardError saying why not (port in use, bad address,
        unknown protocol, already forwarded)."""
        self._check_open("add_forward")
        assert self._forwarder is not None
        return self._forwarder.add(proto, host_addr, host_port, guest_port, interface)

    @in_guest_scope
    def remove_forward(self, proto: str | None = None, host_addr: str | None = None,
                       host_port: int | None = None, *,
                       forward_id: int | None = None) -> Forward:
        """Stop forwarding: the forward with `forward_id`, or the one on (proto,
        host_addr, host_port). TCP connections already open stay, the UDP flows of the
        forward end with its socket. Raises ForwardError."""
        if self._closed:
            raise RelayClosedError("Relay.remove_forward(): the relay is closed")
        if self._forwarder is None:
            raise ForwardError("the relay is not running")
        forward = self._forwarder.lookup(proto, host_addr, host_port, forward_id)
        if forward.sock is not None and self._udp_relay is not None:
            self._udp_relay.forward_closed(forward.sock)
        self._forwarder.remove(forward)
        return forward

    @in_guest_scope
    def splice_forwards(self, source: SocketSource) -> None:
        """Serve forwarded TCP clients on the host's loopback by splicing them to the
        guest's loopback (host/splice.py), with sockets of the guest's namespace from
        `source` (netns.ns_sockets.NamespaceSockets); other clients, and all of them
        once `source` gives no socket or with `inbound_source` "client", go through
        the guest's link as before."""
        self._check_open("splice_forwards")
        assert self._loop is not None and self._forwarder is not None
        if self._splicer is None:
            self._splicer = Splicer(self._loop, self._stats, source, self.config.max_tcp_flows)
        # With inbound_source "client" the guest is to see who connects (a loopback
        # client as the gateway): only the guest's link can show it that.
        if self.config.inbound_source != "client":
            self._forwarder.splice = self._splicer.open_inbound

    @in_guest_scope
    def add_loopback_forward(self, proto: str, sock: socket.socket, host_port: int) -> None:
        """Forward the guest's loopback port of `sock` (bound in the guest's namespace:
        listening for "tcp", a datagram socket for "udp") to the host's loopback
        `host_port` in the same family, pasta's -T and -U. TCP needs `splice_forwards`
        first."""
        self._check_open("add_loopback_forward")
        assert self._loop is not None
        v6 = sock.family == socket.AF_INET6
        if proto == "tcp":
            if self._splicer is None:
                raise ForwardError("TCP loopback forwards need splice_forwards() first")
            self._splicer.add_reverse(sock, v6, host_port)
        elif proto == "udp":
            self._loopback_udp.append(LoopbackDatagrams(self._loop, self._stats, sock, v6,
                                                        host_port))
        else:
            raise ForwardError(f"protocol {proto!r} cannot be forwarded (tcp or udp)")

    def forwards(self) -> list[dict[str, object]]:
        """The forwards in force, with the host ports the kernel chose for port 0."""
        if self._forwarder is None:
            return []
        return [f.describe() for f in self._forwarder.forwards]

    def _inbound_ends(self, client: bytes) -> tuple[bytes, bytes] | None:
        """(guest address, source the guest sees) for a client of a forward: the guest
        is reached in the client's family (the other one if it runs only that), passt's
        rule. None when no guest is attached. A guest that has not spoken yet is asked
        for its MAC (LinkServices.solicit_guest): the flow's first frame is on its way."""
        if self._transport is None:
            return None
        c = self.config
        v6 = (len(client) == 16 and c.ipv6) or not c.ipv4
        guest = self._guest_addr6 if v6 else self._guest_ip
        if self._guest_mac is None:
            self._link.solicit_guest(guest)
        return guest, self._addr.inbound_source(client, v6)

    def _open_inbound(self, sock: socket.socket, client: bytes, client_port: int,
                      guest_port: int) -> bool:
        ends = self._inbound_ends(client)
        if ends is None or self._tcp is None:
            self._stats["tcp_inbound_no_guest"] += 1
            close_with_reset(sock)
            return False
        return self._tcp.open_inbound(sock, ends[0], guest_port, ends[1], client_port)

    def _forwarded_datagram(self, forward: Forward, data: bytes,
                            peer: SockAddr) -> None:
        ends = self._inbound_ends(client_address(peer))
        if ends is None or self._udp_relay is None or forward.sock is None:
            self._stats["udp_inbound_no_guest"] += 1
            return
        self._udp_relay.on_forwarded(forward.sock, peer, data, ends[0], forward.guest_port,
                                     ends[1], peer[1])

    # -- events (events.py, event_hub.py) --------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call `callback(event)` for each of this guest's events from now on (guest
        ready, flow opened, denied and closed, transport lost; events.py); returns the
        callable that unsubscribes. It runs inside the relay's data path: quick, no
        blocking, no calls back into the relay. One that raises is logged and dropped."""
        if self._closed:
            raise RelayClosedError("Relay.subscribe(): the relay is closed")
        return self._hub.subscribe(callback)

    def events(self, maxsize: int = DEFAULT_MAXSIZE) -> EventStream:
        """This guest's events from now on as an async iterator (`async for event in
        relay.events():`), ending when the relay closes. At most `maxsize` wait: a
        consumer that falls behind loses the newer ones, counted as `events_dropped`."""
        if self._closed:
            raise RelayClosedError("Relay.events(): the relay is closed")
        return self._hub.events(maxsize)

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

    @property
    def stream_server(self) -> StreamServer | None:
        """What `serve_stream` serves (None: nothing), its listening socket among it."""
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
        self._hub.transport_lost(reason)  # before the flows it ends (their FlowClosed)
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
        self._hub.guest_ready("mac", mac)
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
        if seg.dport == DNS_PORT and seg.dst in (self._addr.dns_ip, self._addr.dns_ip6):
            if self._dns_tcp is not None:
                self._tcp.on_segment(seg, *self._dns_tcp.address)
                return
            self._dns_upstream()  # a new flow: to the upstream the host names now
        self._tcp.on_segment(seg, self._addr.host_ip_for(seg.dst, seg.dport, self._stats))

    # -- the upstream resolver -------------------------------------------------------------

    def _dns_upstream(self) -> str | None:
        """Where a new DNS flow goes now: `dns_upstream`, or the first nameserver of the
        host's resolv.conf, looked at again when that is due (link/dns.py)."""
        watch = self._resolv
        if watch is not None and self._loop is not None and watch.due(self._loop.time()):
            version = (self._resolv_dir.version() if self._resolv_dir is not None
                       else resolv_conf_version(self.config.resolv_conf))
            if watch.changed(version):
                self._resolv_conf_read(watch, version)
        return self._addr.dns_upstream

    def prepare_confinement(self) -> list[int]:
        """Ready this relay for a process that is about to leave the filesystem and
        drop its privileges (relaynat.confine): resolv.conf (followed unless
        `dns_upstream` is set) is read from now on through a descriptor of the
        directories of the path and of the file its link leads to now (a file or link
        replaced there, as network managers do by rename, is still followed; a link
        pointed at another directory later is not; a file mounted there is held open:
        link/dns.py HeldResolvConf).
        Returns the directory descriptors (the relay's, closed with it), for the
        Landlock rule that lets them be read."""
        self._check_open("prepare_confinement")
        if self._resolv is None:
            return []
        if self._resolv_dir is None:
            self._resolv_dir = HeldResolvConf(self.config.resolv_conf)
        return self._resolv_dir.descriptors()

    def prepare_raw_icmp(self) -> bool:
        """Open the raw ICMP sockets now if ping sockets are refused to this process
        as it is now (host/icmp_relay.py); True if pings have a way out."""
        self._check_open("prepare_raw_icmp")
        assert self._icmp is not None
        return self._icmp.prepare_raw()

    def _resolv_conf_read(self, watch: ResolvConfWatch, version: FileVersion,
                          at_start: bool = False) -> None:
        path = self.config.resolv_conf
        held = self._resolv_dir
        if held is not None and not held.reachable() and not at_start:
            log.warning("%s now leads to a directory this confined relay did not open "
                        "before it left the filesystem: it cannot be read", path)
        text = held.read() if held is not None else read_resolv_conf(path)
        outcome = watch.read(version, text, time.time_ns())
        if outcome == "changed":
            self._addr.dns_upstream = str(watch.upstream)
            if not at_start:
                self._stats["dns_upstream_changes"] += 1
                log.info("%s names %s now: new DNS flows go there", path, watch.upstream)
        elif outcome == "unusable":
            if at_start:
                log.warning("no nameserver in %s and no dns_upstream: DNS queries to the "
                            "relay's DNS address are dropped (static records still answer) "
                            "until the file names one", path)
            else:
                self._stats["dns_resolv_conf_unusable"] += 1
                log.warning("%s changed and names no nameserver: DNS still goes to %s",
                            path, self._addr.dns_upstream or "nowhere (queries dropped)")

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

    def flows(self) -> list[FlowInfo]:
        """Every open flow as a `FlowInfo` (relaynat.flow_info documents the fields):
        protocol, direction, both ends as the guest sees them (`Endpoint`s, so
        `str(info.far)` reads "10.0.2.2:80"), the host-side peer, state, bytes each way,
        the guest's window and, for TCP, the host socket's RTT as the kernel measured
        it (TCP_INFO's tcpi_rtt, microseconds). `info.to_dict()` is the control
        socket's JSON form."""
        out: list[FlowInfo] = []
        for part in (self._tcp, self._udp_relay, self._icmp, self._splicer):
            if part is not None:
                out.extend(part.describe_flows())
        return out

    def stats(self) -> dict[str, int]:
        """Every counter `relaynat.counters.COUNTERS` names (docs/stats.md says what each
        counts), 0 where nothing was counted, and those of `PATTERNS` that counted
        something (`policy_denied_rule3`). The gauges (`tcp_flows`, `udp_flows`,
        `icmp_sockets`) and the TCP byte totals are as of this call. A new dict each
        call."""
        stats = with_zeros(self._stats)
        tcp, udp, icmp = self._tcp, self._udp_relay, self._icmp
        stats["tcp_flows"] = len(tcp.flows) if tcp is not None else 0
        stats["udp_flows"] = len(udp.table) if udp is not None else 0
        stats["icmp_sockets"] = icmp.socket_count if icmp is not None else 0
        stats["splice_flows"] = len(self._splicer.connections) if self._splicer else 0
        if tcp is not None:
            # The closed flows' bytes were added as each closed; the open ones' now.
            from_guest, to_guest = tcp.open_bytes()
            stats["tcp_bytes_from_guest"] += from_guest
            stats["tcp_bytes_to_guest"] += to_guest
            stats["tcp_first_flight_bytes"] = tcp.first_flight_bytes
        stats.update(self._link.counters())
        return stats

    def count(self, name: str, n: int = 1) -> None:
        """Add `n` to the counter `name` of `stats()`: for what serves the relay from
        outside it (a `StreamServer`, a handover) and counts there."""
        self._stats[name] += n
