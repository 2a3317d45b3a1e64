"""The I/O side of TCP: host sockets, readiness, timers, executing `TcpNatEntry` actions.

Readiness uses an edge-triggered epoll of our own, nested in the asyncio loop (its
fd is registered with `loop.add_reader`). Edge triggering is not an optimisation
here but a requirement of the no-buffer design: bytes sent to the guest stay in the
host socket's receive queue until the guest ACKs them, so a level-triggered reader
(asyncio's `add_reader`) would report the socket readable forever and spin. With
EPOLLET we hear about *new* data only, and remember per flow whether the socket may
still hold unread bytes (`host_readable`), clearing it when a peek returns EAGAIN.
One nested epoll also batches: a single loop callback drains events for all flows.

Per-flow timers live in one heap with lazy deletion (host/flow_timers.py); new flows open
at a bounded rate, the SYNs beyond waiting in a backlog (syn_backlog.py).

What one flow's entry decided is carried out by host/flow_executor.py (guest segments,
a flow's turn in a flush, the end of its connect(), its deadlines, the actions); the data
on the host socket both ways (guest data written, peeks toward the guest within each
wakeup's share, SACK resends, dropping acknowledged bytes) is host/pump.py. A flow's
record and the calls on its host socket are in host/tcp_flow.py. A flow whose first
flight is held for its name to be read (first_flight.py) is in host/first_flight_hold.py's
hands until its host connect begins. What a flow's opening and end tell the relay's
events, and how it ended, is host/tcp_events.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import select
import socket
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from relaynat.addressing import inbound_flow_key
from relaynat.events import SILENT, EventSink
from relaynat.flow_state import relink
from relaynat.guest_log import guest_logger
from relaynat.host.first_flight_hold import FirstFlightHolds
from relaynat.host.flow_executor import TURN_AGAIN, TURN_WAIT, SendToGuest
from relaynat.host.flow_timers import FlowTimers
from relaynat.host.flow_turns import FlowTurns
from relaynat.host.flowinfo import FlowInfo, describe_tcp
from relaynat.host.sockets import count_socket_failure
from relaynat.host.tcp_events import EndNotingExecutor, flow_closed, flow_opened
from relaynat.host.tcp_flow import (
    FlowKey,
    TcpFlow,
    close_with_reset,
    connect_ended,
    set_up_host_socket,
)
from relaynat.nat_entry import TcpNatEntry
from relaynat.ooo_queue import OooBudget
from relaynat.packet_builder import BROADCAST_MAC, GuestMac, TcpFrameTemplate
from relaynat.syn_backlog import (
    BACKLOG_TIMER_MIN_S,
    BACKLOG_TIMER_OPENS,
    BACKLOG_TIMER_S,
    Deferred,
    SynBacklog,
)
from relaynat.tcp_actions import rst_for_unknown
from relaynat.wire import ACK, IPPROTO_TCP, RST, SYN

if TYPE_CHECKING:
    from relaynat.config import RelayConfig
    from relaynat.domains import NameTable
    from relaynat.egress_gate import EgressGate, Verdict
    from relaynat.ratelimit import TokenBucket
    from relaynat.window import SocketFacts
    from relaynat.wire import TcpSegment

log = guest_logger("relaynat.tcp")

_EPOLL_FLAGS = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET

T = TypeVar("T")


class TcpRelay:
    """All TCP flows of one guest."""

    def __init__(self, config: RelayConfig, loop: asyncio.AbstractEventLoop,
                 send_to_guest: SendToGuest, stats: Counter[str]) -> None:
        self._config = config
        self._loop = loop
        self._send = send_to_guest
        self.stats = stats
        self.ooo_budget = OooBudget(config.tcp_ooo_budget, stats)  # for all flows' held data
        self.flows: dict[FlowKey, TcpFlow] = {}
        self._by_fd: dict[int, TcpFlow] = {}
        self._pending_connects = 0
        self._epoll = select.epoll()
        loop.add_reader(self._epoll.fileno(), self._on_epoll)
        self._timers = FlowTimers(loop, self._on_timers, lambda: len(self.flows))
        self._turns = FlowTurns(loop, self.flush)
        self._backlog = SynBacklog(stats, config.syn_rate)
        self._backlog_timer: asyncio.TimerHandle | None = None
        self._exec = EndNotingExecutor(stats, send_to_guest, self._turns, self._untrack,
                               self._fail_flow)
        self._vnet_hdr_len = 0
        self._offload = False
        #: The guest's MAC, which the templates of its flows follow (packet_builder.py).
        self._guest_mac = GuestMac()
        #: Inbound flows whose SYN may have gone to a MAC the guest does not have: sent
        #: again at once when the MAC is learned or changes, once a flow (a guest whose
        #: MAC flaps gets the rest from the SYN timer, not one SYN a flow per frame).
        self._syn_unheard: dict[TcpFlow, None] = {}
        #: The egress policy's gate for new guest connections; set by the relay when a
        #: policy is in force.
        self.gate: EgressGate | None = None
        #: The guest's DNS answers (domains.py): the destinations of open flows are
        #: held there, so that they stay valid for their names (set by the relay).
        self.names: NameTable | None = None
        #: The guest's new-flow rate, shared with UDP and ICMP (set by the relay; None:
        #: unlimited). Spent only by SYNs that passed every other check.
        self.rate_limit: TokenBucket | None = None
        self._connect_watch: dict[tuple[str, int], Callable[[socket.socket], None]] = {}
        #: Where flows opening and closing are told (set by the relay).
        self.events: EventSink = SILENT
        #: The flows whose first flight is held before their host connect.
        self._holds = FirstFlightHolds(config, stats, self._exec, self._timers, self._turns,
                                       self)

    def watch_connects(self, host_addr: tuple[str, int],
                       callback: Callable[[socket.socket], None]) -> None:
        """Call `callback` with the host socket of every new guest flow connecting to
        `host_addr`, once its connect() began (its own address is bound then)."""
        self._connect_watch[host_addr] = callback

    def set_link(self, vnet_hdr_len: int, offload: bool, keeps_frames: bool = False) -> None:
        """Frame format of the attached transport, for new flows and for the flows
        imported before it was attached (host/flow_move.py). `keeps_frames`: its frames stay
        valid until its end of batch (`FrameTransport.keeps_frames`), so a flow's
        payloads from one wakeup are gathered and written with one sendmsg."""
        self._vnet_hdr_len = vnet_hdr_len
        self._offload = offload
        self._exec.gather = keeps_frames
        for flow in self.flows.values():
            relink(flow.entry, vnet_hdr_len, offload)

    def set_guest_mac(self, mac: bytes) -> None:
        """The relay learned the guest's MAC (its first frame, or a new one): every
        flow's frames go there from now on, as their templates follow `_guest_mac`;
        inbound SYNs the guest may not have heard go again (TcpHandshake.on_guest_mac)."""
        self._guest_mac.mac = mac
        if not self._syn_unheard:
            return
        unheard, self._syn_unheard = self._syn_unheard, {}
        now = self._loop.time()
        for flow in unheard:
            flow.entry.on_guest_mac(mac, now)
            self._exec.execute(flow)

    @property
    def link(self) -> tuple[int, bool]:
        """(vnet header length, offload) of the frames toward the guest."""
        return self._vnet_hdr_len, self._offload

    # -- guest segments ----------------------------------------------------------------

    def on_segment(self, seg: TcpSegment, host_ip: str | None,
                   host_port: int | None = None) -> None:
        """A guest segment; `host_ip` is where its destination maps on the host (None:
        nowhere, so a new connection is refused), at `host_port` (default: the
        segment's destination port)."""
        key = (seg.sport, seg.dst, seg.dport, seg.src)
        flow = self.flows.get(key)
        if flow is not None and flow.first is not None:
            self._holds.segment(flow, flow.first, seg, self._loop.time())
            return
        if flow is None:
            now = self._loop.time()
            if seg.flags & (SYN | ACK | RST) == SYN and not self._backlog.may_open(now):
                self._backlog.defer(seg, host_ip, host_port)
                # The oldest waiting SYN opens now if a token came: in this guest's own
                # turn, under its transport's time slice (transport.WAKEUP_SLICE_S),
                # so a flooding guest's opens are not taken from the other guests.
                self._open_waiting(self._backlog.ready(now, limit=1))
                return
            self._new_flow(seg, key, host_ip, seg.dport if host_port is None else host_port,
                           now)
            return
        self._exec.segment(flow, seg, self._loop.time())

    def on_known(self, seg: TcpSegment) -> bool:
        """Hand `seg` to its flow and return True, or return False if it has none (then
        `on_segment`, with where a new flow would go)."""
        flow = self.flows.get((seg.sport, seg.dst, seg.dport, seg.src))
        if flow is None:
            return False
        if flow.first is not None:
            self._holds.segment(flow, flow.first, seg, self._loop.time())
            return True
        self._exec.segment(flow, seg, self._loop.time())
        return True

    def _open_waiting(self, waiting: list[Deferred]) -> None:
        for seg, host_ip, host_port in waiting:
            key = (seg.sport, seg.dst, seg.dport, seg.src)
            flow = self.flows.get(key)
            if flow is not None:  # the guest sent its SYN again while the first waited
                if flow.first is not None:
                    self._holds.segment(flow, flow.first, seg, self._loop.time())
                else:
                    self._exec.segment(flow, seg, self._loop.time())
            else:
                self._new_flow(seg, key, host_ip,
                               seg.dport if host_port is None else host_port,
                               self._loop.time())

    def _new_flow(self, seg: TcpSegment, key: FlowKey, host_ip: str | None, host_port: int,
                  now: float) -> None:
        if seg.flags & (SYN | ACK | RST) != SYN:
            self.stats["tcp_unknown_flow"] += 1
            self._reply_rst(seg)
            return
        if host_ip is None:
            self.stats["tcp_refused_unmapped"] += 1
            self._reply_rst(seg)
            return
        gate = self.gate
        verdict = None if gate is None else gate.judge(IPPROTO_TCP, seg.dst, seg.dport, now)
        if verdict is not None and not verdict.allow:
            self._reply_rst(seg)  # as a refused connection: the guest sees ECONNREFUSED
            return
        if len(self.flows) >= self._config.max_tcp_flows:
            self.stats["tcp_refused_flow_limit"] += 1
            self._reply_rst(seg)
            return
        if self._pending_connects >= self._config.max_pending_connects:
            self.stats["tcp_refused_connect_limit"] += 1
            self._reply_rst(seg)
            return
        if self.rate_limit is not None and not self.rate_limit.allow(now):
            self.stats["tcp_refused_rate_limit"] += 1
            self._reply_rst(seg)  # ECONNREFUSED at once, rather than a SYN timeout
            return
        # The host side's family follows the host address, not the guest's (a guest's
        # IPv6 DNS-over-TCP query may go to an IPv4 resolver).
        family = socket.AF_INET6 if ":" in host_ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:  # EMFILE/ENFILE/ENOBUFS: refuse this flow, keep the rest
            count_socket_failure(self.stats, exc, "tcp_refused_fd_limit",
                                 "tcp_refused_socket", "TCP")
            self._reply_rst(seg)
            return
        peek_offset = set_up_host_socket(sock)
        template = self._template_answering(seg, timestamps=seg.tsval is not None)
        entry = TcpNatEntry(seg, template=template, mtu=self._config.mtu,
                            iss=random.getrandbits(32), now=now,
                            connect_timeout_s=self._config.connect_timeout_s,
                            idle_timeout_s=self._config.tcp_idle_timeout_s,
                            ooo_budget=self.ooo_budget)
        flow = TcpFlow(key, entry, sock, host_addr=(host_ip, host_port),
                       peek_offset_supported=peek_offset, opened_at=now)
        if verdict is not None and verdict.inspect and gate is not None:
            self._holds.hold(flow, gate, verdict, now)
            return
        err = sock.connect_ex(flow.host_addr)
        if err not in (0, errno.EINPROGRESS):
            self.stats["tcp_connect_failed"] += 1
            self._exec.connected(flow, False, now)
            sock.close()
            if self.events.listening:  # never in the table: opened and refused at once
                flow_opened(self.events, flow, verdict)
                flow.end_how = "refused"
                flow_closed(self.events, flow, self._loop.time())
            return
        self._track(flow)
        if self.events.listening:
            flow_opened(self.events, flow, verdict)
        if self._connect_watch and (watch := self._connect_watch.get(flow.host_addr)):
            watch(sock)
        self._pending_connects += 1
        self.stats["tcp_flows_opened"] += 1
        facts = flow.facts_if_connected()
        if facts is not None or connect_ended(sock):
            # A peer on this host usually finishes the handshake inside connect(),
            # though a non-blocking connect still says EINPROGRESS: answer the guest in
            # this wakeup rather than after another epoll round (CRR benchmark, SYN
            # bucket lifted: 2634 -> 3024 connections a second). TCP_INFO tells it and
            # gives the SYN-ACK's facts at once (CRR under load 1,862 -> 2,169 a second).
            self.stats["tcp_connects_at_once"] += 1
            if self._connect_done(flow, now, facts):
                self._turns.mark(flow)
            return
        self._timers.schedule(flow)

    # -- flows whose name is checked on the wire (host/first_flight_hold.py) -------------

    @property
    def first_flight_bytes(self) -> int:
        """Guest bytes the flows whose first flight is read before their connect hold
        now (`tcp_first_flight_bytes`, a gauge: not a counter a handover carries)."""
        return self._holds.held_bytes

    def track_held(self, flow: TcpFlow) -> None:
        """`flow`'s first flight is held before its host connect: in the table, not yet
        in the epoll set (an unconnected TCP socket polls as hung up), and counted as a
        pending connect."""
        self._track(flow, register=False)
        self._pending_connects += 1

    def connect_held(self, flow: TcpFlow, verdict: Verdict, wire_name: str | None,
                     now: float) -> None:
        """The first flight held for `flow` named a server its `verdict` allows: begin
        its host connect (then the held bytes are written first)."""
        sock = flow.sock
        err = sock.connect_ex(flow.host_addr)
        self.stats["tcp_flows_opened"] += 1
        if self.events.listening:
            flow_opened(self.events, flow, verdict, wire_name)
        if err not in (0, errno.EINPROGRESS):
            self.stats["tcp_connect_failed"] += 1
            flow.end_how = "refused"
            flow.connecting = False
            self._pending_connects -= 1
            flow.entry.on_late_connect(False, now)
            self._exec.execute(flow)
            return
        fd = sock.fileno()
        self._by_fd[fd] = flow
        self._epoll.register(fd, _EPOLL_FLAGS)
        flow.entry.expect_connect(now + self._config.connect_timeout_s)
        if self._connect_watch and (watch := self._connect_watch.get(flow.host_addr)):
            watch(sock)
        if connect_ended(sock):
            self.stats["tcp_connects_at_once"] += 1
            self._connect_done(flow, now)
            return
        flow.entry.flush(None, now)  # the first flight's ACK, not held up by the connect
        self._exec.execute(flow)
        self._timers.schedule(flow)

    def open_inbound(self, sock: socket.socket, guest_ip: bytes, guest_port: int,
                     src_ip: bytes, src_port: int) -> bool:
        """A host client connected to a forwarded port (`sock`, accepted): open the
        guest side with our own SYN from `src_ip` (as the guest will see it) to
        `guest_ip:guest_port`. `src_port` is a wish: if that flow key is taken, another
        port is chosen. False (and `sock` closed) when the table is full."""
        if len(self.flows) >= self._config.max_tcp_flows:
            self.stats["tcp_inbound_refused_flow_limit"] += 1
            close_with_reset(sock)
            return False
        key = inbound_flow_key(guest_ip, guest_port, src_ip, src_port, self.flows)
        now = self._loop.time()
        sock.setblocking(False)
        peek_offset = set_up_host_socket(sock)
        template = TcpFrameTemplate(dst_mac=BROADCAST_MAC, src_mac=self._config.gateway_mac,
                                    src=src_ip, dst=guest_ip, sport=key[2], dport=guest_port,
                                    vnet_hdr_len=self._vnet_hdr_len, offload=self._offload,
                                    timestamps=True, guest=self._guest_mac)
        flow = TcpFlow(key, TcpNatEntry.inbound(template=template, mtu=self._config.mtu,
                                                iss=random.getrandbits(32), now=now,
                                                facts=None, ooo_budget=self.ooo_budget,
                                                idle_timeout_s=self._config.tcp_idle_timeout_s),
                       sock, connecting=False, host_addr=sock.getpeername()[:2], inbound=True,
                       peek_offset_supported=peek_offset, opened_at=now)
        self._track(flow)
        if self.events.listening:
            flow_opened(self.events, flow)
        self._syn_unheard[flow] = None
        self.stats["tcp_inbound_opened"] += 1
        self._exec.execute(flow)
        self._timers.schedule(flow)
        return True

    def _template_answering(self, seg: TcpSegment, timestamps: bool) -> TcpFrameTemplate:
        """Headers of frames toward the guest on the connection `seg` belongs to."""
        return TcpFrameTemplate(dst_mac=BROADCAST_MAC, src_mac=self._config.gateway_mac,
                                src=seg.dst, dst=seg.src, sport=seg.dport, dport=seg.sport,
                                vnet_hdr_len=self._vnet_hdr_len, offload=self._offload,
                                timestamps=timestamps, guest=self._guest_mac)

    def _reply_rst(self, seg: TcpSegment) -> None:
        answer = rst_for_unknown(seg)
        if answer is None:
            return
        seq, ack, flags = answer
        self._send(self._template_answering(seg, False).build(seq, ack, flags, 0), b"")
        self.stats["tcp_rst_sent"] += 1

    # -- host readiness ------------------------------------------------------------------

    def _on_epoll(self) -> None:
        now = self._loop.time()
        try:
            events = self._epoll.poll(0, 1024)
        except InterruptedError:
            return
        for fd, ev in events:
            flow = self._by_fd.get(fd)
            if flow is None:
                continue
            try:
                self._host_event(flow, ev, now)
            except Exception:
                self._fail_flow(flow)
        self.flush()

    def _host_event(self, flow: TcpFlow, ev: int, now: float) -> None:
        entry = flow.entry
        if flow.connecting:
            if not ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                return
            if not self._connect_done(flow, now):
                return
        elif ev & select.EPOLLERR:
            err = flow.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.stats["tcp_host_errors"] += 1
                flow.end_how = "reset_by_host"
                entry.on_host_reset(now)
                self._exec.execute(flow)
                return
        if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP):
            flow.host_readable = True
        if ev & select.EPOLLOUT:
            hold = flow.first
            if hold is not None and hold.unsent is not None:
                self._holds.write(flow, hold, now)
                self._exec.execute(flow)
                if entry.closed:
                    return
            entry.on_host_writable(now)
        self._turns.mark(flow)

    def _connect_done(self, flow: TcpFlow, now: float,
                      facts: SocketFacts | None = None) -> bool:
        """The host connect() ended: answer the guest's SYN (SYN-ACK or RST). False if
        it failed (the flow is closed then). `facts`: the socket's, read by a caller that
        saw the connection established (then it did not fail)."""
        flow.connecting = False
        self._pending_connects -= 1
        err = 0 if facts is not None else flow.sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_ERROR)
        if err:
            self.stats["tcp_connect_failed"] += 1
            flow.end_how = "refused"
        hold = flow.first
        if hold is not None:
            self._holds.connected(flow, hold, not err, now)
        else:
            self._exec.connected(flow, not err, now, facts)
        return not err

    def _fail_flow(self, flow: TcpFlow) -> None:
        """A bug surfaced while handling one flow: reset that flow both ways, keep the
        others running, and say so (logged with the traceback, counted)."""
        log.exception("internal error on the TCP flow to %s:%d; resetting it", *flow.host_addr)
        self.stats["tcp_internal_errors"] += 1
        entry = flow.entry
        with contextlib.suppress(Exception):
            self._send(entry.template.build(entry.snd_max, entry.rcv_nxt, RST | ACK, 0), b"")
        entry.on_guest_gone()
        flow.end_how = "error"
        self._close(flow, abortive=True)

    def flush(self) -> None:
        """End of a batch: move host data to the guest and send owed ACKs."""
        now = self._loop.time()
        executor = self._exec
        executor.pump.new_wakeup()
        # Flows that got no turn, the relay's share of this wakeup spent before them, and
        # flows that used their own share (host/pump.py) go again (host/flow_turns.py).
        waiting: list[TcpFlow] = []
        used: list[TcpFlow] = []
        for flow in self._turns.take():
            flow.dirty = False
            try:
                turn = executor.flush_flow(flow, now)
                if turn == TURN_WAIT:
                    waiting.append(flow)
                elif turn == TURN_AGAIN:
                    used.append(flow)
                self._timers.schedule(flow)
            except Exception:
                self._fail_flow(flow)
        self._turns.again(waiting, used)
        if self._backlog.waiting and self._backlog_timer is None:
            # SYNs wait for the new-flow bucket (syn_backlog.py); a guest that goes on
            # sending opens them in its turn, one that went quiet gets them opened here
            # when the next token is due. Pulls so far are this batch's own.
            self._backlog.take_pulled()
            delay = max(BACKLOG_TIMER_MIN_S, self._backlog.wait_s(now))
            self._backlog_timer = self._loop.call_later(delay, self._backlog_due)

    def _backlog_due(self) -> None:
        self._backlog_timer = None
        if self._backlog.take_pulled():
            # The guest sent since: its frames open what waits, in its own turn.
            self._backlog_timer = self._loop.call_later(BACKLOG_TIMER_S, self._backlog_due)
        else:
            self._open_waiting(self._backlog.ready(self._loop.time(), limit=BACKLOG_TIMER_OPENS))
        self.flush()

    # -- the flow table ------------------------------------------------------------------

    def _track(self, flow: TcpFlow, register: bool = True) -> None:
        """Put `flow` in the table; `register`: its socket in the epoll set too (not
        before the connect of a flow whose first flight is held: an unconnected TCP
        socket polls as hung up)."""
        self.flows[flow.key] = flow
        if self.names is not None and not flow.inbound:
            self.names.hold(flow.key[1], self._loop.time())
        if register:
            self._by_fd[flow.sock.fileno()] = flow
            self._epoll.register(flow.sock.fileno(), _EPOLL_FLAGS)

    def _untrack(self, flow: TcpFlow) -> bool:
        """Take `flow` out of the tables and the epoll set, its socket open; False if it
        was not in them (closed already, or never tracked)."""
        if self.flows.get(flow.key) is not flow:
            return False
        del self.flows[flow.key]
        if self.names is not None and not flow.inbound:
            self.names.release(flow.key[1], self._loop.time())
        self._syn_unheard.pop(flow, None)
        fd = flow.sock.fileno()
        self._by_fd.pop(fd, None)
        if flow.connecting:
            self._pending_connects -= 1
            flow.connecting = False
        with contextlib.suppress(OSError):
            self._epoll.unregister(fd)
        # The relay's byte totals, as each flow leaves (stats() adds the open ones'):
        # nothing per segment.
        entry = flow.entry
        self.stats["tcp_bytes_from_guest"] += entry.bytes_from_guest
        self.stats["tcp_bytes_to_guest"] += entry.bytes_to_guest
        hold = flow.first
        if hold is not None:
            self._holds.release(flow, hold)
        if self.events.listening and (hold is None or hold.announced):
            flow_closed(self.events, flow, self._loop.time())
        return True

    def open_bytes(self) -> tuple[int, int]:
        """Payload bytes (from the guest, to the guest) of the flows open now; the closed
        ones' are in the stats already (`tcp_bytes_from_guest`, `tcp_bytes_to_guest`)."""
        from_guest = to_guest = 0
        for flow in self.flows.values():
            from_guest += flow.entry.bytes_from_guest
            to_guest += flow.entry.bytes_to_guest
        return from_guest, to_guest

    def _close(self, flow: TcpFlow, abortive: bool, counter: str = "tcp_flows_closed") -> None:
        self._exec.close(flow, abortive, counter)

    # -- timers --------------------------------------------------------------------------

    def _on_timers(self, due: list[TcpFlow], now: float) -> None:
        """FlowTimers: the deadlines of `due` passed."""
        executor = self._exec
        executor.cause = "timeout"  # what a deadline closes, it closes for lack of time
        try:
            for flow in due:
                entry = flow.entry
                if entry.closed:  # closed by an earlier flow's handling in this run
                    continue
                hold = flow.first
                if hold is not None and self._holds.expire(flow, hold, now):
                    continue
                try:
                    acted = executor.timer(flow, now)
                except Exception:
                    self._fail_flow(flow)
                    continue
                if entry.closed:
                    continue
                if acted:
                    self._turns.mark(flow)
                else:
                    # A window check that found nothing to say (most of them: a ping-pong
                    # flow at MTU 65520 always looks window-limited and is checked every
                    # millisecond): the next deadline is all it needs, not a flush that
                    # reads the socket's facts a second time.
                    self._timers.schedule(flow)
        finally:
            executor.cause = None
        self.flush()

    # -- control -------------------------------------------------------------------------

    def describe_flows(self) -> list[FlowInfo]:
        return [describe_tcp(flow) for flow in self.flows.values()]

    def cut(self, denied: Callable[[int, bytes, int], bool]) -> int:
        """Reset (guest and host peer) every guest-opened flow that `denied(IPPROTO_TCP, dst,
        dport)` now refuses; returns how many."""
        now = self._loop.time()
        cut = 0
        for flow in list(self.flows.values()):
            if flow.inbound or flow.entry.closed:
                continue
            if not denied(IPPROTO_TCP, flow.key[1], flow.key[2]):
                continue
            flow.end_how = "policy_cut"
            flow.entry.on_cut(now)
            self._exec.execute(flow)  # the RST to the guest, then CloseHost(abortive)
            cut += 1
        return cut

    # -- moving flows (host/flow_move.py) ---------------------------------------------------------

    def forget(self, flow: TcpFlow, dump: Callable[[socket.socket], T]) -> T:
        """Take `flow` out, its socket open and without a packet either way, and return
        `dump(socket)`: its state, for another relay. The bytes the guest acknowledged
        are dropped before the dump, so the socket's receive queue starts at the guest's
        first unacknowledged byte. If `dump` raises, the flow stays here."""
        self._exec.pump.consume(flow)
        state = dump(flow.sock)
        flow.entry.on_guest_gone()
        flow.end_how = "detached"
        self._untrack(flow)
        # The flow goes on in another relay with its byte counts (flow_move.py), and is
        # counted where it ends: its bytes leave this relay's totals again.
        self.stats["tcp_bytes_from_guest"] -= flow.entry.bytes_from_guest
        self.stats["tcp_bytes_to_guest"] -= flow.entry.bytes_to_guest
        self._exec.release(flow)
        self.stats["tcp_flows_exported"] += 1
        return state

    def adopt(self, flow: TcpFlow) -> None:
        """Serve `flow` (moved here from another relay) as if it had been opened here."""
        flow.entry.template = flow.entry.template.following(self._guest_mac)
        flow.opened_at = self._loop.time()
        self._track(flow)
        if self.events.listening:
            flow_opened(self.events, flow)
        self.stats["tcp_flows_imported"] += 1
        self._turns.mark(flow)
        self._timers.schedule(flow)

    # -- teardown ------------------------------------------------------------------------

    def abort_all(self) -> None:
        """The guest is gone: close every flow toward the host with a reset."""
        for flow in list(self.flows.values()):
            flow.entry.on_guest_gone()
            flow.end_how = "detached"
            self._close(flow, abortive=True, counter="tcp_flows_closed_on_detach")
        self._timers.clear()
        self._backlog.clear()

    def close(self) -> None:
        self.abort_all()
        self._timers.cancel()
        if self._backlog_timer is not None:
            self._backlog_timer.cancel()
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
