"""`Relay`'s surface for moving its guest elsewhere: established TCP flows to another
relay in any process (`export_flows`, `import_flows`: TCP_REPAIR, host/flow_move.py),
and the whole guest to another relaynat process on the same host (`suspend`, `resume`,
`cannot_adopt`, `adopt`: what moving/handover.py builds its handover on).

`RelayMoving` is a base class of `Relay`, kept in a module of its own so that relay.py
stays about the guest's traffic. It declares the parts of the relay it works on, which
`Relay` builds (`Relay.start`); it is not meant to be used alone.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from ipaddress import ip_address
from typing import TYPE_CHECKING

from relaynat.addressing import AddressMap
from relaynat.config import RelayConfig
from relaynat.flow_state import LiveFlowState
from relaynat.guest_log import in_guest_scope
from relaynat.host import flow_move
from relaynat.host.dns_tcp import DnsTcpResponder
from relaynat.host.flow_move import Suspended
from relaynat.host.flowinfo import FlowInfo
from relaynat.host.forward import Forward, Forwarder
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.udp_relay import UdpRelay
from relaynat.icmp_echo import EchoSessionState
from relaynat.link.services import LinkServices
from relaynat.transports.base import FrameTransport, HandoverTransport
from relaynat.transports.stream import StreamServer
from relaynat.udp_flow import UdpFlowState


class RelayMoving:
    """Moving flows, and handing the guest over; see the module docstring."""

    # The parts of the relay this works on (`Relay.__init__` and `Relay.start`).
    name: str | None
    config: RelayConfig
    _stats: Counter[str]
    _loop: asyncio.AbstractEventLoop | None
    _transport: FrameTransport | None
    _tcp: TcpRelay | None
    _udp_relay: UdpRelay | None
    _icmp: IcmpEchoRelay | None
    _dns_tcp: DnsTcpResponder | None
    _forwarder: Forwarder | None
    _stream: StreamServer | None
    _link: LinkServices
    _addr: AddressMap
    _guest_mac: bytes | None
    _guest_addr6: bytes
    _exported: flow_move.ExportedSockets

    if TYPE_CHECKING:
        def attach(self, transport: FrameTransport) -> None: ...

        def _learn_guest_mac(self, mac: bytes) -> None: ...

    # -- moving flows to another relay (host/flow_move.py) ---------------------------

    @in_guest_scope
    def export_flows(self) -> dict[str, object]:
        """Take every ESTABLISHED TCP flow out, silently, as a "relaynat-flows" document
        for `import_flows` (others stay, under "not_moved"); see host/flow_move.py."""
        assert self._tcp is not None and self._loop is not None, "start() first"
        return flow_move.export_flows(self._tcp, self._loop.time(), self._exported,
                                      self._other_flows(), self._dns_tcp_port())

    @in_guest_scope
    def release_exported(self, reset: bool = False) -> int:
        """Close the exported host sockets (silently; `reset`: RST their peers)."""
        return self._exported.release(reset)

    @in_guest_scope
    def import_flows(self, doc: object) -> list[FlowInfo]:
        """Serve the flows of an `export_flows` document, checked whole first (else
        FlowStateError, a ValueError, and nothing imported); returns them described,
        as `flows()` does."""
        assert self._tcp is not None and self._loop is not None, "start() first"
        c = self.config
        return flow_move.import_flows(self._tcp, doc, self._loop.time(), self._addr.is_guest,
                                      mtu=c.mtu, max_flows=c.max_tcp_flows,
                                      idle_timeout_s=c.tcp_idle_timeout_s)

    def _other_flows(self) -> list[FlowInfo]:
        return [f for p in (self._udp_relay, self._icmp) if p for f in p.describe_flows()]

    def _dns_tcp_port(self) -> int | None:
        return self._dns_tcp.port if self._dns_tcp else None

    # -- handing the guest to another process (moving/handover.py) ------------------------

    @in_guest_scope
    def suspend(self, datagrams: bool = True) -> Suspended:
        """Stop serving the guest and take out what a handover moves (`Suspended` says
        what, and in which state): with `datagrams`, the UDP flows and ping sessions as
        well (a relay that does not take them over lets them end here). All of it
        happens before this returns: from then on nothing of the guest is read, no
        router advert goes out, the forwards and the stream listener accept nothing,
        and the flows taken out are in none of the relay's tables (their entries
        closed: a timer left armed does nothing), so the loop may run before `resume`.
        What stays (`Suspended.not_moved`) runs on without a guest: frames toward it
        are dropped, counted as frames_out_no_guest. Raises TypeError, with nothing
        changed, for a transport that is no HandoverTransport."""
        tcp, forwarder, loop = self._tcp, self._forwarder, self._loop
        udp, icmp = self._udp_relay, self._icmp
        assert tcp is not None and forwarder is not None and loop is not None, "start() first"
        assert udp is not None and icmp is not None
        transport = self._transport
        if transport is not None and not isinstance(transport, HandoverTransport):
            raise TypeError(f"a {type(transport).__name__} cannot be handed over")
        stopped_at = time.monotonic()
        self._transport = None
        if transport is not None:
            transport.stop()
        self._link.stop_router_adverts()
        forwarder.pause()
        if self._stream is not None:
            self._stream.pause()
        now = loop.time()
        forwards = [f for f in forwarder.forwards if f.sock is not None]
        flows, not_moved = flow_move.take_live(tcp, now, self._dns_tcp_port())
        moved_udp: list[tuple[UdpFlowState, socket.socket]] = []
        moved_icmp: list[tuple[EchoSessionState, socket.socket]] = []
        if datagrams:
            moved_udp, skipped = flow_move.take_udp(udp, now, forwards)
            not_moved += skipped
            moved_icmp = flow_move.take_icmp(icmp, now)
            # A session on the process's shared raw socket (no ping socket of its own)
            # has nothing to pass over: it ends with this relay, and the guest's next
            # echo opens one at the new relay.
            not_moved += flow_move.left_behind(
                icmp.describe_raw_flows(), "ping sessions on the shared raw ICMP socket "
                "do not move: the guest's next echo opens one at the new relay")
        else:
            not_moved += flow_move.left_behind(
                self._other_flows(), "the new relay does not take UDP flows and ping "
                "sessions over: they end with the old relay")
        return Suspended(
            stopped_at, transport, self._stream.sock if self._stream else None, forwards,
            self._guest_mac, self._guest_addr6, flows, not_moved, dict(self._stats),
            moved_udp, moved_icmp)

    @in_guest_scope
    def resume(self, suspended: Suspended) -> None:
        """Serve again what `suspend` took out, as before it: the transport attached
        (`attach`), the flows on their sockets, which must be as `suspend` left them
        (nothing read from them or written), the forwards and the stream listener
        accepting."""
        assert self._tcp is not None and self._forwarder is not None and self._loop
        assert self._udp_relay is not None and self._icmp is not None
        if suspended.transport is not None:
            self.attach(suspended.transport)
        c = self.config
        now = self._loop.time()
        flow_move.adopt_live(self._tcp, suspended.flows, now, mtu=c.mtu,
                             idle_timeout_s=c.tcp_idle_timeout_s)
        flow_move.adopt_udp(self._udp_relay, suspended.udp, now)
        flow_move.adopt_icmp(self._icmp, suspended.icmp, now)
        self._forwarder.resume()
        if self._stream is not None:
            self._stream.resume()

    def release_listener(self) -> None:
        """The stream listener serves another relay now (a handover took it): close this
        relay's copy and forget it, leaving the socket file, which is the other's."""
        if self._stream is not None:
            self._stream.close(unlink=False)
            self._stream = None

    def cannot_adopt(self, flows: Sequence[LiveFlowState],
                     udp: Sequence[UdpFlowState] = (),
                     icmp: Sequence[EchoSessionState] = ()) -> str | None:
        """Why `adopt` could not serve `flows`, `udp` and `icmp` (one is not this relay's
        guest's or is open here already, or they do not fit in max_tcp_flows,
        max_udp_flows or max_icmp_flows beside the flows open), or None. It only reads,
        so a thread other than the loop's may ask (the handover checks in one)."""
        tcp, udp_relay, icmp_relay = self._tcp, self._udp_relay, self._icmp
        assert tcp is not None and udp_relay is not None and icmp_relay is not None, \
            "start() first"
        c = self.config
        parts: list[tuple[str, Sequence[LiveFlowState | UdpFlowState | EchoSessionState],
                          Collection[object], int]] = [
            ("tcp", flows, tcp.flows.keys(), c.max_tcp_flows),
            ("udp", udp, udp_relay.table.flows.keys(), c.max_udp_flows),
            ("icmp", icmp, {key for key, _ in icmp_relay.sessions.items()},
             icmp_relay.sessions.capacity)]
        for name, states, open_now, limit in parts:
            for i, state in enumerate(states):
                if not self._addr.is_guest(ip_address(state.guest[0]).packed):
                    return f"{name} flows[{i}]: {state.guest[0]} is not this relay's guest"
                if state.key in open_now:
                    return f"{name} flows[{i}]: {state.guest} -> {state.far} is open here"
            if states and len(open_now) + len(states) > limit:
                what = {"tcp": "TCP flows", "udp": "UDP flows", "icmp": "ping sessions"}[name]
                return f"{len(states)} {what} do not fit max_{name}_flows {limit}"
        return None

    @in_guest_scope
    def adopt(self, *, guest_mac: bytes | None, guest_addr6: bytes,
              flows: Sequence[tuple[LiveFlowState, socket.socket]],
              forwards: Sequence[Forward], stats: Mapping[str, int],
              udp: Sequence[tuple[UdpFlowState, socket.socket]] = (),
              icmp: Sequence[tuple[EchoSessionState, socket.socket]] = ()) -> None:
        """Serve what another relay's `suspend` took out, once the guest's transport is
        attached here (the flows' frames take its link format): the guest's MAC and
        IPv6 address as it learned them, the flows on their sockets (connected and
        non-blocking; `cannot_adopt` says none is refused), the forwards on theirs
        (bound, and listening for TCP), the UDP flows on theirs (an outbound flow's
        own, connected; an inbound flow's the socket of `forwards[state.forward]`),
        the ping sessions on their ping sockets, and its counters, which this relay's
        continue (added to its own)."""
        assert self._tcp is not None and self._forwarder is not None and self._loop
        assert self._udp_relay is not None and self._icmp is not None
        self._stats.update(stats)
        if guest_mac is not None:
            self._learn_guest_mac(guest_mac)
        self._guest_addr6 = guest_addr6
        c = self.config
        now = self._loop.time()
        flow_move.adopt_live(self._tcp, flows, now, mtu=c.mtu,
                             idle_timeout_s=c.tcp_idle_timeout_s)
        for f in forwards:
            assert f.sock is not None
            self._forwarder.adopt(f.proto, f.host_addr, f.guest_port, f.interface, f.sock)
        flow_move.adopt_udp(self._udp_relay, udp, now)
        flow_move.adopt_icmp(self._icmp, icmp, now)
