"""`UdpRelay`: the guest's UDP flows on connected, non-blocking host sockets.

Each flow (udp_flow.py) gets its own socket, connected to where the guest's destination
is on the host, so the kernel filters replies to that peer (as a NAT would) and reports
an ICMP port unreachable from it as ECONNREFUSED on the next send or recv (udp(7)).
We turn that back into an ICMP port unreachable toward the guest (RFC 792, RFC 1122
§4.1.3.1), quoting the guest's last datagram of the flow, so a connected guest socket
sees ECONNREFUSED too, as it would on a real network.

Datagrams are never fragmented: the guest can send at most its MTU, and a host datagram
that does not fit the guest's MTU in one frame is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections import Counter
from collections.abc import Callable

from relaynat.addressing import DNS_PORT, inbound_flow_key
from relaynat.config import RelayConfig
from relaynat.domains import NameTable
from relaynat.egress_gate import EgressGate, Verdict
from relaynat.events import (
    SILENT,
    Endpoint,
    EventSink,
    FlowClosed,
    FlowOpened,
    endpoint,
    sockaddr_endpoint,
)
from relaynat.guest_log import guest_logger
from relaynat.host.flowinfo import FlowInfo, describe_udp
from relaynat.host.forward import SockAddr
from relaynat.host.sockets import count_socket_failure, size_udp_rcvbuf
from relaynat.packet_builder import (
    ICMP_ADMIN_PROHIBITED,
    ICMP_HOST_UNREACH,
    ICMP_NET_UNREACH,
    ICMP_PORT_UNREACH,
    icmp_unreachable_frame,
    udp_frame_head,
)
from relaynat.ratelimit import TokenBucket
from relaynat.udp_flow import UdpFlow, UdpFlowTable
from relaynat.wire import IPPROTO_UDP, IpPacket, UdpDatagram

log = guest_logger("relaynat.udp")

#: Datagrams read per flow per wakeup before other work gets its turn.
_RECV_ROUNDS = 64
_RECV_SIZE = 65536
#: IP header (IPv4 without options, IPv6 without extensions) + UDP header, per datagram
#: toward the guest.
_OVERHEAD_V4 = 20 + 8
_OVERHEAD_V6 = 40 + 8
ICMP_ERRORS_PER_S = 1000
ICMP_ERRORS_BURST = 50
#: Host errors meaning "no route", and the ICMP unreachable code for each (RFC 792).
_NO_ROUTE_CODES = {errno.ENETUNREACH: ICMP_NET_UNREACH, errno.EHOSTUNREACH: ICMP_HOST_UNREACH}


class UdpRelay:
    """All UDP flows of one guest. `send_frame` takes a complete frame without a vnet
    header; `send_raw(head, payload)` headers as the link wants them (see set_link)."""

    def __init__(self, config: RelayConfig, loop: asyncio.AbstractEventLoop,
                 send_frame: Callable[[bytes], None],
                 send_raw: Callable[[bytes, bytes | memoryview], None],
                 stats: Counter[str]) -> None:
        self._config = config
        self._loop = loop
        self._send_frame = send_frame
        self._send_raw = send_raw
        self._vnet_hdr_len = 0
        self._offload = False
        self.stats = stats
        self.table = UdpFlowTable(config.max_udp_flows, config.udp_idle_timeout_s,
                                  config.udp_stream_timeout_s)
        self._gateway_ip = config.gateway_ipv4.packed
        self._gateway_ip6 = config.gateway_ipv6.packed
        self._max_payload_v4 = config.mtu - _OVERHEAD_V4
        self._max_payload_v6 = config.mtu - _OVERHEAD_V6
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._ip_id = 0
        # ICMP errors toward the guest are rate limited, as RFC 4443 §2.4(f) requires
        # for ICMPv6 and RFC 1812 §4.3.2.8 allows for IPv4, at Linux's defaults
        # (net.ipv4.icmp_msgs_per_sec, icmp_msgs_burst): a guest spraying closed ports
        # gets no more than that back.
        self._icmp_errors = TokenBucket(ICMP_ERRORS_PER_S, ICMP_ERRORS_BURST)
        self.guest_mac: bytes | None = None
        #: Inbound flows by (forward socket, client socket address).
        self._inbound: dict[tuple[socket.socket, SockAddr], UdpFlow] = {}
        #: The egress policy's gate for a new flow; set by the relay when a policy is
        #: in force.
        self.gate: EgressGate | None = None
        #: The guest's DNS answers: an outbound flow's destination is held there while
        #: it lives, so that it stays valid for its names (set by the relay).
        self.names: NameTable | None = None
        #: The guest's new-flow rate, shared with TCP and ICMP (set by the relay; None:
        #: unlimited). Inbound flows (on_forwarded) never spend it.
        self.rate_limit: TokenBucket | None = None
        #: Where flows opening and closing are told (set by the relay).
        self.events: EventSink = SILENT
        #: When each flow opened (loop time), for its duration when it closes.
        self._opened_at: dict[UdpFlow, float] = {}
        #: Hears every answer of the DNS address's upstream on its way to the guest,
        #: which goes on unchanged (set by the relay: the policy's domain rules learn
        #: the addresses it gives).
        self.dns_answered: Callable[[bytes], None] | None = None
        self._dns_addresses = (config.dns_ipv4.packed, config.dns_ipv6.packed)

    def set_link(self, vnet_hdr_len: int, offload: bool) -> None:
        """Frame format of the attached transport."""
        self._vnet_hdr_len = vnet_hdr_len
        self._offload = offload

    # -- guest -> host ---------------------------------------------------------------

    def on_datagram(self, ip: IpPacket, dgram: UdpDatagram, host_ip: str | None,
                    fixed_timeout: float | None = None) -> None:
        """A guest datagram to `dgram.dst`, which is `host_ip` on the host (None only
        for a flow that exists: an inbound one's far end may be nowhere outbound); a new
        flow gets `fixed_timeout` instead of the idle/stream timeouts when given."""
        key = (dgram.sport, dgram.dst, dgram.dport, dgram.src)
        now = self._loop.time()
        hlen = len(ip.packet) - len(ip.payload)
        quote = bytes(ip.packet[:hlen + 8])
        flow = self.table.get(key)
        if flow is None:
            verdict = None
            if self.gate is not None:
                verdict = self.gate.judge(IPPROTO_UDP, dgram.dst, dgram.dport, now)
                if not verdict.allow:
                    self.refuse(ip, ICMP_ADMIN_PROHIBITED)  # RFC 1812 §5.2.7.1
                    return
            assert host_ip is not None
            flow = self._open(key, host_ip, dgram.dport, now, fixed_timeout, quote, verdict)
            if flow is None:
                return
        self._relay(flow, dgram, now, quote)

    def on_known(self, dgram: UdpDatagram, packet: memoryview) -> bool:
        """Relay `dgram` (IPv4 `packet`, without options) on its flow and return True, or
        return False if it has none (then `on_datagram`, which opens one)."""
        flow = self.table.get((dgram.sport, dgram.dst, dgram.dport, dgram.src))
        if flow is None:
            return False
        self._relay(flow, dgram, self._loop.time(), bytes(packet[:28]))
        return True

    def _relay(self, flow: UdpFlow, dgram: UdpDatagram, now: float, quote: bytes) -> None:
        stats = self.stats
        flow.from_guest(now, quote)
        try:
            if flow.peer is None:
                flow.sock.send(dgram.payload)
            else:  # a forwarded port's client: answered from the port it sent to
                flow.sock.sendto(dgram.payload, flow.peer)
        except ConnectionRefusedError:  # an earlier datagram's ICMP error, reported now
            self._unreachable(flow)
            return
        except BlockingIOError:  # the socket's send buffer is full: UDP may drop
            stats["udp_drop_host_busy"] += 1
            return
        except OSError as exc:
            if exc.errno in _NO_ROUTE_CODES:
                self._report_no_route(exc.errno, dgram.src, quote)
                return
            stats["udp_send_errors"] += 1
            return
        stats["udp_to_host"] += 1
        stats["udp_to_host_bytes"] += len(dgram.payload)
        flow.bytes_from_guest += len(dgram.payload)

    def _open(self, key: tuple[int, bytes, int, bytes], host_ip: str, host_port: int,
              now: float, fixed_timeout: float | None, quote: bytes,
              verdict: Verdict | None = None) -> UdpFlow | None:
        flow = self.table.open(key, now, fixed_timeout)
        if flow is None:
            self.stats["udp_drop_flow_limit"] += 1
            return None
        if self.rate_limit is not None and not self.rate_limit.allow(now):
            # Dropped silently, as a congested path would: an ICMP error would tell a
            # scanner what it wants to know, and the guest's UDP stack retries anyway.
            self.table.remove(flow)
            self.stats["udp_drop_rate_limit"] += 1
            return None
        # The host side's family follows the host address, not the guest's: a guest's
        # IPv6 query to the DNS address may go to an IPv4 resolver and back.
        family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:  # EMFILE/ENFILE/EAFNOSUPPORT: drop this flow, keep the rest
            self.table.remove(flow)
            count_socket_failure(self.stats, exc, "udp_drop_fd_limit", "udp_socket_failed",
                                 "UDP")
            return None
        sock.setblocking(False)
        size_udp_rcvbuf(sock)
        try:
            sock.connect((host_ip, host_port))  # UDP: no packet, just routing and binding
        except OSError as exc:
            sock.close()
            self.table.remove(flow)
            self.stats["udp_connect_failed"] += 1
            if exc.errno in _NO_ROUTE_CODES:
                self._report_no_route(exc.errno, key[3], quote)
            return None
        flow.sock = sock
        self._loop.add_reader(sock.fileno(), self._on_readable, flow)
        self.stats["udp_flows_opened"] += 1
        self._opened_at[flow] = now
        if self.names is not None:
            self.names.hold(key[1], now)
        if self.events.listening:
            self._opened(flow, Endpoint(host_ip, host_port), verdict)
        self._arm_timer(flow.deadline(self.table.idle_s, self.table.stream_s))
        return flow

    # -- host -> guest ---------------------------------------------------------------

    def _on_readable(self, flow: UdpFlow) -> None:
        sock = flow.sock
        stats = self.stats
        for _ in range(_RECV_ROUNDS):
            try:
                data = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                return
            except ConnectionRefusedError:
                self._unreachable(flow)
                continue
            except OSError:
                stats["udp_recv_errors"] += 1
                return
            self._to_guest(flow, data)

    def _to_guest(self, flow: UdpFlow, data: bytes) -> None:
        """One host datagram of `flow` toward the guest, from the address and port the
        guest sees the flow's far end at."""
        stats = self.stats
        guest_port, src, src_port, guest_ip = flow.key
        limit = self._max_payload_v6 if len(src) == 16 else self._max_payload_v4
        if len(data) > limit:
            stats["udp_drop_too_big_for_mtu"] += 1
            return
        flow.from_host(self._loop.time())
        if self.guest_mac is None:
            stats["udp_drop_no_guest_mac"] += 1
            return
        if (self.dns_answered is not None and src_port == DNS_PORT and flow.peer is None
                and src in self._dns_addresses):
            self.dns_answered(data)
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        self._send_raw(udp_frame_head(self.guest_mac, self._config.gateway_mac, src,
                                      guest_ip, src_port, guest_port, data,
                                      self._ip_id, self._vnet_hdr_len, self._offload),
                       data)
        stats["udp_to_guest"] += 1
        stats["udp_to_guest_bytes"] += len(data)
        flow.bytes_to_guest += len(data)

    # -- inbound: clients of forwarded ports -----------------------------------------

    def on_forwarded(self, sock: socket.socket, peer: SockAddr, data: bytes,
                     guest_ip: bytes, guest_port: int, src_ip: bytes, src_port: int) -> None:
        """A datagram from host client `peer` to the forward socket `sock`: toward
        `guest_ip:guest_port`, seen by the guest as from `src_ip:src_port`. The client's
        first datagram opens the flow; `src_port` is a wish, and if another client holds
        that flow key already, another port is chosen (as TcpRelay.open_inbound)."""
        flow = self._inbound.get((sock, peer))
        if flow is None:
            now = self._loop.time()
            key = inbound_flow_key(guest_ip, guest_port, src_ip, src_port, self.table.flows)
            flow = self.table.open(key, now, self._config.udp_inbound_timeout_s)
            if flow is None:
                self.stats["udp_inbound_drop_flow_limit"] += 1
                return
            flow.sock, flow.peer = sock, peer
            self._inbound[(sock, peer)] = flow
            self.stats["udp_inbound_opened"] += 1
            self._opened_at[flow] = now
            if self.events.listening:
                self._opened(flow, sockaddr_endpoint(peer))
            self._arm_timer(flow.deadline(self.table.idle_s, self.table.stream_s))
        self._to_guest(flow, data)

    def forward_closed(self, sock: socket.socket) -> None:
        """The forward owning `sock` was removed: its clients' flows end with it."""
        for (owner, _peer), flow in list(self._inbound.items()):
            if owner is sock:
                self._end(flow, "detached")

    def _unreachable(self, flow: UdpFlow) -> None:
        """The host peer's port is closed: tell the guest with ICMP port unreachable,
        from the address the guest sent to (as that host's kernel would)."""
        if self.guest_mac is None or not flow.quote:
            self.stats["udp_refused_unreported"] += 1
            return
        self._send_icmp(flow.key[1], flow.key[3], flow.quote, ICMP_PORT_UNREACH)
        self.stats["udp_icmp_port_unreachable"] += 1

    def refuse(self, ip: IpPacket, code: int = ICMP_PORT_UNREACH) -> None:
        """No host destination for this guest datagram: ICMP port unreachable (or
        `code`) from the address it was sent to (udp(7): a connected guest socket sees
        ECONNREFUSED)."""
        if self.guest_mac is None:
            return
        hlen = len(ip.packet) - len(ip.payload)
        self._send_icmp(ip.dst, ip.src, bytes(ip.packet[:hlen + 8]), code)
        self.stats["udp_refused_unmapped"] += 1

    def _report_no_route(self, err: int, guest_ip: bytes, quote: bytes) -> None:
        """The host has no route to the destination: ICMP net/host unreachable from
        the gateway, as a router would send (RFC 1812 §5.2.7.1). Linux reports these
        to a UDP socket only with IP_RECVERR (udp(7)); others time out as before."""
        if self.guest_mac is None:
            return
        gateway = self._gateway_ip6 if len(guest_ip) == 16 else self._gateway_ip
        self._send_icmp(gateway, guest_ip, quote, _NO_ROUTE_CODES[err])
        self.stats["udp_icmp_no_route"] += 1

    def _send_icmp(self, src: bytes, dst: bytes, quote: bytes, code: int) -> None:
        assert self.guest_mac is not None
        if not self._icmp_errors.allow(self._loop.time()):
            self.stats["udp_icmp_rate_limited"] += 1
            return
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        self._send_frame(icmp_unreachable_frame(self.guest_mac, self._config.gateway_mac,
                                                src, dst, quote, code,
                                                ident=self._ip_id))

    # -- timeouts and teardown ---------------------------------------------------------

    def _arm_timer(self, deadline: float | None = None) -> None:
        """Wake up at the earliest deadline: `deadline` of a new flow, or the table's."""
        if deadline is None:
            deadline = self.table.next_deadline()
        if deadline is None or (self._timer is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        # At least 1 s apart: timeouts are tens of seconds, sweeping is O(flows).
        self._timer_at = max(deadline, self._loop.time() + 1.0)
        self._timer = self._loop.call_at(self._timer_at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        for flow in self.table.expired(self._loop.time()):
            self._close_sock(flow)
            self._ended(flow, "timeout")
            self.stats["udp_flows_expired"] += 1
        self._arm_timer()

    def _close_sock(self, flow: UdpFlow) -> None:
        if flow.peer is not None:  # the forward's socket stays; only the flow ends
            self._inbound.pop((flow.sock, flow.peer), None)
            flow.sock = None
            return
        if flow.sock is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(flow.sock.fileno())
            flow.sock.close()
            flow.sock = None

    def _end(self, flow: UdpFlow, how: str) -> None:
        """Close `flow` now (its socket, or its share of a forward's) and forget it; `how`
        it ended, in events.py's words."""
        self._close_sock(flow)
        self.table.remove(flow)
        self._ended(flow, how)

    def _opened(self, flow: UdpFlow, peer: Endpoint | None,
                verdict: Verdict | None = None) -> None:
        """Tell `events` that `flow` opened, with the policy's `verdict` on it (the rule
        and the names its destination was learned for) when one was asked."""
        guest_port, far, far_port, guest = flow.key
        names: tuple[str, ...] = ()
        rule, comment = -1, ""
        if verdict is not None:
            names, rule, comment = verdict.names, verdict.rule, verdict.comment
        self.events.emit(FlowOpened(time.time(), self.events.guest, "udp",
                                    "outbound" if flow.peer is None else "inbound",
                                    endpoint(guest, guest_port), endpoint(far, far_port), peer,
                                    names, None, rule, comment))

    def _ended(self, flow: UdpFlow, how: str) -> None:
        """`flow` left the table: its opening time is forgotten, `events` told."""
        opened_at = self._opened_at.pop(flow, None)
        if self.names is not None and flow.peer is None:
            self.names.release(flow.key[1], self._loop.time())
        if not self.events.listening:
            return
        guest_port, far, far_port, guest = flow.key
        duration = 0.0 if opened_at is None else max(0.0, self._loop.time() - opened_at)
        self.events.emit(FlowClosed(time.time(), self.events.guest, "udp",
                                    "outbound" if flow.peer is None else "inbound",
                                    endpoint(guest, guest_port), endpoint(far, far_port),
                                    flow.bytes_from_guest, flow.bytes_to_guest, duration, how))

    # -- moving flows to another relay (host/flow_move.py) ----------------------------------

    def take(self, flow: UdpFlow) -> float:
        """Take `flow` out of this relay, its socket open and no longer read (datagrams
        arriving meanwhile wait in it), as if it ended here ("detached"); returns the
        loop time it opened. An inbound flow leaves its forward's socket to the forward."""
        opened_at = self._opened_at.get(flow, self._loop.time())
        if flow.peer is None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(flow.sock.fileno())
        else:
            self._inbound.pop((flow.sock, flow.peer), None)
        self.table.remove(flow)
        self._ended(flow, "detached")
        return opened_at

    def adopt(self, flow: UdpFlow, sock: socket.socket, opened_at: float) -> None:
        """Serve `flow` (moved here from another relay, or given back to this one) on
        `sock`: its own connected, non-blocking socket, or an inbound flow's (`peer`
        set) forward's; `opened_at`: when it opened, in this loop's time. The caller
        checked that the table has room and no flow with its key."""
        flow.sock = sock
        self.table.insert(flow)
        if flow.peer is None:
            self._loop.add_reader(sock.fileno(), self._on_readable, flow)
            peer = sockaddr_endpoint(sock.getpeername()) if self.events.listening else None
        else:
            self._inbound[(sock, flow.peer)] = flow
            peer = sockaddr_endpoint(flow.peer)
        self._opened_at[flow] = opened_at
        if self.names is not None and flow.peer is None:
            self.names.hold(flow.key[1], self._loop.time())
        if self.events.listening:
            self._opened(flow, peer)
        self._arm_timer(flow.deadline(self.table.idle_s, self.table.stream_s))

    def describe_flows(self) -> list[FlowInfo]:
        return [describe_udp(flow) for flow in self.table.flows.values()]

    def cut(self, denied: Callable[[int, bytes, int], bool]) -> int:
        """Close every guest-opened flow that `denied(17, dst, dport)` now refuses
        (UDP has nothing to reset: the next datagram opens a flow, which the policy
        refuses); returns how many."""
        gone = [flow for flow in self.table.flows.values()
                if flow.peer is None and denied(17, flow.key[1], flow.key[2])]
        for flow in gone:
            self._end(flow, "policy_cut")
        return len(gone)

    def abort_all(self) -> None:
        """Close every flow (the guest went away)."""
        for flow in list(self.table.flows.values()):
            self._end(flow, "detached")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    close = abort_all
