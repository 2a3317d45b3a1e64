"""Moving established TCP flows, host sockets included, from one relay to another
(`Relay.export_flows`, `Relay.import_flows`, `Relay.release_exported`).

Export: every ESTABLISHED flow's host socket goes into repair mode (`tcp_repair.dump`)
and its relay-side state is serialized (flow_state.py); the flow leaves the relay's
loop without a packet to the guest or to the host (no RST, no FIN). The sockets stay
open, in repair mode, in an `ExportedSockets` holder until `release` (passt's default
since 2025: a source that resets its sockets after a migration would reset the peers
of connections that live on elsewhere). Flows that cannot move (half-open,
half-closed, UDP flows, ICMP sessions, the relay's own DNS-over-TCP) are listed with
a reason and stay where they are.

Import: the whole document is checked first (format, every field, the flows' guest
addresses, no flow already here, room in the table); then every socket is restored in
repair mode, and only when all of them are does any leave repair mode (closing a
socket still in repair mode sends nothing, so a failure leaves no trace); then each
flow is served as if it had been opened here.

Live (`Relay.suspend`, `Relay.resume`, `Relay.adopt`; a handover to another process,
moving/handover.py): the flows leave the relay with their host sockets untouched, no
repair mode, for `take_live`'s caller to pass the sockets themselves on (`Suspended`);
so do UDP flows (`take_udp`: an outbound one's connected socket, an inbound one's
client, whose datagrams its forward's socket carries) and ping sessions (`take_icmp`),
with how long each has been idle, so that its timeout goes on where it was.

Three kernel facts (Linux 6.18, checked by tests/integration/test_flow_move.py and
tests/integration/test_migration.py) shape how callers must move flows:
- A socket in repair mode still accepts and acknowledges its peer's data: bytes
  arriving after the dump are acknowledged to the peer and missing from the copy. The
  host side's traffic must be held while flows move: by the network in a real
  migration (the address moves with the guest), by the caller otherwise (a qdisc or a
  firewall rule on the path, as CRIU's network lock).
- One network namespace cannot hold two connected sockets with one address and port
  pair: importing where the exported sockets still exist fails (EADDRNOTAVAIL). Within
  one namespace, `release_exported` comes before `import_flows`.
- A socket in repair mode still runs its timers: its retransmission timer fires and
  sends with the socket's live timestamp clock, newer than the TSval the document
  carries. A source that can still reach the peers would then move their PAWS
  (RFC 7323 §5) ts_recent past the target's clock, and the target's segments would
  be dropped; across hosts, the source loses its route to the peers before it exports
  (control/flows_file.py, README "Migrating a guest to another host").
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address
from typing import Any

from relaynat.flow_state import (
    LIVE_STATES,
    FlowStateError,
    LiveFlowState,
    LiveSocket,
    TcpFlowState,
    entry_from,
    live_state_of,
    make_document,
    parse_document,
    state_of,
)
from relaynat.guest_log import guest_logger
from relaynat.host.flowinfo import FlowInfo, describe_tcp, describe_udp
from relaynat.host.forward import Forward
from relaynat.host.icmp_relay import EchoSession, IcmpEchoRelay
from relaynat.host.tcp_flow import SO_PEEK_OFF, TcpFlow, close_with_reset
from relaynat.host.tcp_relay import TcpRelay
from relaynat.host.tcp_repair import (
    TCP_REPAIR,
    TCP_REPAIR_OFF_NO_WP,
    dump,
    leave_repair,
    restore,
)
from relaynat.host.udp_relay import UdpRelay
from relaynat.icmp_echo import EchoSessionState
from relaynat.repair_state import RepairError, RepairState
from relaynat.tcp_state import TcpState
from relaynat.transports.base import FrameTransport, HandoverTransport
from relaynat.udp_flow import UdpFlowState
from relaynat.udp_flow import flow_from as udp_flow_from
from relaynat.udp_flow import state_of as udp_state_of

log = guest_logger("relaynat.tcp")

_HALF_OPEN = frozenset({TcpState.CONNECTING, TcpState.SYN_SENT, TcpState.SYN_RCVD})


class ExportedSockets:
    """Host sockets of exported flows, held open in repair mode, where closing them
    sends nothing (tcp_close() in repair mode only disconnects). Held, they still
    retransmit on their timers (module docstring)."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []

    def release(self, reset: bool = False) -> int:
        """Close them all; with `reset`, their peers get a RST (for flows that did not
        live on elsewhere). Returns how many."""
        for sock in self.socks:
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
                close_with_reset(sock)
            else:
                sock.close()
        count = len(self.socks)
        self.socks.clear()
        return count


@dataclass
class Suspended:
    """What `Relay.suspend` took out of service for a handover (moving/handover.py):
    for `Relay.resume` to serve again, or for another process to take over.

    - `stopped_at`: CLOCK_MONOTONIC when the relay stopped serving the guest.
    - `transport`: the guest's link, no longer the relay's, stopped reading at a frame
      boundary (what the guest sends meanwhile waits in the link); None: none attached.
    - `stream_listener`: the listening socket of `Relay.serve_stream` (None: none),
      not accepting: clients wait in its backlog.
    - `forwards`: the inbound forwards, not accepting or reading: clients wait in the
      backlog, datagrams in the socket. They stay the relay's (`close` closes them).
    - `guest_mac` (None before the guest's first frame), `guest_addr6`: as learned.
    - `flows`: the TCP flows that left the relay's table, each established or
      half-closed (`LIVE_STATES`), with its host socket, open and untouched since;
      a state's `socket.fd` is its index in this list. The bytes the guest acknowledged
      were consumed, so each socket's receive queue starts at the guest's first
      unacknowledged byte.
    - `not_moved`: the flows that stayed, each with the reason (a document's
      "not_moved" lines): half-open TCP flows, flows to the relay's own DNS-over-TCP
      responder, and UDP flows and ping sessions when they were not to move. They end
      with the relay.
    - `stats`: the relay's counters when it stopped.
    - `udp`: the UDP flows that left the relay's table, each with its socket: its own
      (connected, open and unread since: datagrams wait in it), or for an inbound flow
      (`UdpFlowState.forward`, an index in `forwards`) its forward's. A state's `fd`
      is None: whoever passes the sockets numbers them.
    - `icmp`: the ping sessions that left the relay's table, each with its ping socket
      (open and unread since), `fd` None as for `udp`.
    """

    stopped_at: float
    transport: FrameTransport | None
    stream_listener: socket.socket | None
    forwards: list[Forward]
    guest_mac: bytes | None
    guest_addr6: bytes
    flows: list[tuple[LiveFlowState, socket.socket]]
    not_moved: list[dict[str, Any]]
    stats: dict[str, int]
    udp: list[tuple[UdpFlowState, socket.socket]] = field(default_factory=list)
    icmp: list[tuple[EchoSessionState, socket.socket]] = field(default_factory=list)


def take_live(tcp: TcpRelay, now: float, dns_tcp_port: int | None
              ) -> tuple[list[tuple[LiveFlowState, socket.socket]], list[dict[str, Any]]]:
    """Take every flow of `tcp` that can move with its live socket out, silently: the
    `flows` and `not_moved` of `Suspended` (which says what holds of them)."""
    own_dns = ("127.0.0.1", dns_tcp_port) if dns_tcp_port is not None else None
    moved: list[tuple[LiveFlowState, socket.socket]] = []
    skipped: list[dict[str, Any]] = []
    for flow in list(tcp.flows.values()):
        reason = _not_live(flow, own_dns)
        if reason is None:
            try:
                peer = flow.sock.getpeername()[:2]
            except OSError as exc:
                reason = f"host socket: {exc.strerror}"
        if reason is not None:
            skipped.append(not_moved(describe_tcp(flow), reason))
            continue
        live = LiveSocket(len(moved), peer)

        def snapshot(_sock: socket.socket, flow: TcpFlow = flow,
                     live: LiveSocket = live) -> LiveFlowState:
            return live_state_of(flow.entry, flow.key, flow.inbound, now, live)

        moved.append((tcp.forget(flow, snapshot), flow.sock))
    return moved, skipped


def _not_live(flow: TcpFlow, own_dns: tuple[str, int] | None) -> str | None:
    state = flow.entry.state
    if flow.connecting or state not in LIVE_STATES:
        return f"half-open or closing ({state.value}): the guest's retransmission " \
               "opens it again"
    if own_dns is not None and tuple(flow.host_addr) == own_dns:
        return "served by the old relay's own DNS-over-TCP responder"
    return None


def take_udp(udp: UdpRelay, now: float, forwards: Sequence[Forward]
             ) -> tuple[list[tuple[UdpFlowState, socket.socket]], list[dict[str, Any]]]:
    """Take every UDP flow out of `udp` with its socket, silently: `Suspended.udp`, and
    the lines of the flows that stay (`not_moved`). `forwards`: the forwards that move,
    in the order their records go (an inbound flow names its own by index)."""
    index = {f.sock: i for i, f in enumerate(forwards) if f.sock is not None}
    moved: list[tuple[UdpFlowState, socket.socket]] = []
    skipped: list[dict[str, Any]] = []
    for flow in list(udp.table.flows.values()):
        sock = flow.sock
        forward = None
        if flow.peer is None:
            try:
                peer = sock.getpeername()[:2]
            except OSError as exc:
                skipped.append(not_moved(describe_udp(flow), f"host socket: {exc.strerror}"))
                continue
        else:
            forward = index.get(sock)
            if forward is None:
                skipped.append(not_moved(describe_udp(flow), "its forward does not move"))
                continue
            peer = flow.peer
        opened_at = udp.take(flow)
        moved.append((udp_state_of(flow, now, opened_at, peer, forward), sock))
    return moved, skipped


def take_icmp(icmp: IcmpEchoRelay, now: float) -> list[tuple[EchoSessionState, socket.socket]]:
    """Take every ping session out of `icmp` with its socket, silently: `Suspended.icmp`."""
    moved: list[tuple[EchoSessionState, socket.socket]] = []
    for _key, session in list(icmp.sessions.items()):
        last_seen = icmp.take(session)
        ident, far, guest = session.key
        moved.append((EchoSessionState(
            guest=(str(ip_address(guest)), ident), far=str(ip_address(far)),
            host=str(ip_address(session.host_ip)), guest_mac=session.guest_mac, fd=None,
            idle_s=max(0.0, now - last_seen), age_s=max(0.0, now - session.opened_at),
            bytes_from_guest=session.bytes_from_guest,
            bytes_to_guest=session.bytes_to_guest), session.sock))
    return moved


def adopt_udp(udp: UdpRelay, flows: Sequence[tuple[UdpFlowState, socket.socket]],
              now: float) -> None:
    """Serve each UDP flow in `udp` on its socket (its own, connected and non-blocking,
    or an inbound flow's forward's), going on from its record at `now`."""
    for state, sock in flows:
        udp.adopt(udp_flow_from(state, now), sock, now - state.age_s)


def adopt_icmp(icmp: IcmpEchoRelay, sessions: Sequence[tuple[EchoSessionState, socket.socket]],
               now: float) -> None:
    """Serve each ping session in `icmp` on its ping socket (non-blocking), going on from
    its record at `now`."""
    for state, sock in sessions:
        session = EchoSession(state.key, sock, state.host, ip_address(state.guest[0]).packed,
                              state.guest_mac, state.bytes_from_guest, state.bytes_to_guest,
                              opened_at=now - state.age_s)
        icmp.adopt(session, now - state.idle_s)


def left_behind(infos: Sequence[FlowInfo], reason: str) -> list[dict[str, Any]]:
    """The `not_moved` lines of flows that stay, each with `reason`."""
    return [not_moved(info, reason) for info in infos]


def adopt_live(tcp: TcpRelay, flows: Sequence[tuple[LiveFlowState, socket.socket]],
               now: float, *, mtu: int, idle_timeout_s: float) -> None:
    """Serve each live flow in `tcp` on its socket (connected, non-blocking)."""
    for state, sock in flows:
        adopt_flow(tcp, state, sock, now, mtu=mtu, idle_timeout_s=idle_timeout_s,
                   host_addr=state.socket.peer)


def let_go(transport: FrameTransport | None, keep: bool) -> FrameTransport | None:
    """A relay lets its transport go: closed, or (`keep`) only stopped and returned,
    its link open for another relay."""
    if transport is None or not keep:
        if transport is not None:
            transport.close()
        return None
    if not isinstance(transport, HandoverTransport):
        raise TypeError(f"{type(transport).__name__} cannot be handed to another relay")
    transport.stop()
    return transport


def not_moved(info: FlowInfo, reason: str) -> dict[str, Any]:
    """One line of a document's "not_moved" list (its ends as [addr, port] lists)."""
    ends = info.to_dict()
    return {"protocol": info.protocol, "guest": ends["guest"], "far": ends["far"],
            "reason": reason}


def _unmovable(flow: TcpFlow, own_service: tuple[str, int] | None) -> str | None:
    state = flow.entry.state
    if flow.connecting or state in _HALF_OPEN:
        return f"half-open ({state.value})"
    if state is not TcpState.ESTABLISHED:
        return f"half-closed ({state.value})"
    if own_service is not None and tuple(flow.host_addr) == own_service:
        return "served by this relay's own DNS-over-TCP responder"
    return None


def _give_back(flow: TcpFlow) -> None:
    """A dump failed half-way: out of repair mode, the peek offset where the flow has it
    (dump switched it off), so the flow goes on here."""
    with contextlib.suppress(OSError):
        flow.sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, TCP_REPAIR_OFF_NO_WP)
        if flow.peek_offset_supported:
            flow.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, flow.entry.bytes_in_flight)


def export_flows(tcp: TcpRelay, now: float, held: ExportedSockets, others: list[FlowInfo],
                 dns_tcp_port: int | None) -> dict[str, Any]:
    """Export every ESTABLISHED flow of `tcp` (sockets into `held`); `others` (UDP and
    ICMP flows) and flows to the relay's own DNS-over-TCP responder on 127.0.0.1
    `dns_tcp_port` are listed as not moved. Returns the document."""
    own_service = ("127.0.0.1", dns_tcp_port) if dns_tcp_port is not None else None
    states: list[TcpFlowState] = []
    skipped = [not_moved(info, f"{info.protocol} flows do not move") for info in others]
    for flow in list(tcp.flows.values()):
        reason = _unmovable(flow, own_service)
        if reason is None:
            try:
                repair = tcp.forget(flow, dump)
            except RepairError as exc:
                _give_back(flow)
                reason = f"host socket: {exc}"
        if reason is not None:
            skipped.append(not_moved(describe_tcp(flow), reason))
            continue
        states.append(state_of(flow.entry, flow.key, flow.inbound, now, repair))
        held.socks.append(flow.sock)
    return make_document(states, skipped)


def import_flows(tcp: TcpRelay, doc: Any, now: float, is_guest: Callable[[bytes], bool], *,
                 mtu: int, max_flows: int, idle_timeout_s: float) -> list[FlowInfo]:
    """Check `doc` entirely, then serve its flows in `tcp`; returns them described.
    FlowStateError (nothing imported) for a document that does not fit, RepairError
    (nothing imported either) when the kernel refuses a socket."""
    states = parse_document(doc)
    for i, state in enumerate(states):
        if not is_guest(state.key[3]):
            raise FlowStateError(f"flows[{i}]: {state.guest[0]} is not this relay's guest")
        if state.key in tcp.flows:
            raise FlowStateError(f"flows[{i}]: {state.guest} -> {state.far} is open here")
    if len(tcp.flows) + len(states) > max_flows:
        raise FlowStateError(f"{len(states)} flows do not fit: {len(tcp.flows)} of "
                             f"max_tcp_flows {max_flows} are open")
    socks: list[socket.socket] = []
    try:
        for state in states:
            socks.append(restore(state.socket, stay_in_repair=True))
    except RepairError:
        for sock in socks:
            sock.close()  # still in repair mode: the peers see nothing
        raise
    imported: list[FlowInfo] = []
    for state, sock in zip(states, socks, strict=True):
        flow = _serve(tcp, state, sock, now, mtu, idle_timeout_s)
        if flow is not None:
            imported.append(describe_tcp(flow))
    return imported


def _serve(tcp: TcpRelay, state: TcpFlowState, sock: socket.socket, now: float, mtu: int,
           idle_timeout_s: float) -> TcpFlow | None:
    repair: RepairState = state.socket
    try:
        leave_repair(sock, repair)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        # The peers of the flows already served must not pay for this one: it alone
        # ends, reset so that its peer knows.
        log.warning("imported flow %s -> %s failed to leave repair mode: %s", state.guest,
                    state.far, exc)
        tcp.stats["tcp_import_failed"] += 1
        close_with_reset(sock)
        return None
    return adopt_flow(tcp, state, sock, now, mtu=mtu, idle_timeout_s=idle_timeout_s,
                      host_addr=repair.peer)


def adopt_flow(tcp: TcpRelay, state: TcpFlowState, sock: socket.socket, now: float, *,
               mtu: int, idle_timeout_s: float, host_addr: tuple[str, int]) -> TcpFlow:
    """Serve `state`'s flow in `tcp` on `sock`, connected and non-blocking: restored
    here, or passed live from another process (moving/handover.py)."""
    vnet_hdr_len, offload = tcp.link
    entry = entry_from(state, mtu=mtu, vnet_hdr_len=vnet_hdr_len, offload=offload, now=now,
                       idle_timeout_s=idle_timeout_s, ooo_budget=tcp.ooo_budget)
    flow = TcpFlow(state.key, entry, sock, connecting=False, host_readable=True,
                   host_addr=host_addr, inbound=state.inbound)
    try:
        # What was sent to the guest and not acknowledged heads the socket's receive
        # queue: peek past it, as the source did.
        sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, entry.bytes_in_flight)
    except OSError:
        flow.peek_offset_supported = False
    tcp.adopt(flow)
    return flow
