"""The first-flight hold: the TCP shell's side of a flow whose name is checked on the wire.

A domain rule that allows a flow on one of its inspected ports (`policy.Decision.inspect`)
has the relay answer the guest's handshake itself, before any host connect, and hold what
the guest sends first until first_flight.py can name the server it asks for (TLS SNI,
HTTP/1 Host) or say why no name will come. Then the policy judges the name: the flow is
reset with the reason counted and reported, or the host connect begins and the held bytes
are the first written to the host socket, after which the flow goes on as any other.

`FirstFlightHolds` keeps that part of a flow's life (`TcpFlow.first` is its
`FirstFlightHold` meanwhile) and the relay's gauge of the bytes held; the flow table,
the epoll set and the host connect itself stay `TcpRelay`'s (host/tcp_relay.py), reached
through `HoldingRelay`.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relaynat.first_flight import FirstFlight
from relaynat.host.tcp_flow import FirstFlightHold
from relaynat.tcp_state import GUEST_SENDING
from relaynat.wire import FIN, IPPROTO_TCP

if TYPE_CHECKING:
    from collections import Counter

    from relaynat.config import RelayConfig
    from relaynat.egress_gate import EgressGate, Verdict
    from relaynat.events import EventSink
    from relaynat.first_flight import Outcome
    from relaynat.host.flow_executor import FlowExecutor
    from relaynat.host.flow_timers import FlowTimers
    from relaynat.host.flow_turns import FlowTurns
    from relaynat.host.tcp_flow import TcpFlow
    from relaynat.wire import TcpSegment

#: The counter of each reason a flow's first flight is refused for
#: (first_flight.DENY_REASONS).
_DENIED_COUNTER = {
    "name_mismatch": "policy_denied_name_mismatch",
    "no_sni": "policy_denied_no_sni",
    "no_host": "policy_denied_no_host",
    "ech": "policy_denied_ech",
    "unknown_protocol": "policy_denied_unknown_protocol",
    "first_flight_timeout": "policy_denied_first_flight_timeout",
    "first_flight_too_big": "policy_denied_first_flight_too_big",
}


class HoldingRelay(Protocol):
    """What of the relay a held flow needs: its table and its host connect."""

    #: Where flows opening, closing and being denied are told.
    events: EventSink

    def track_held(self, flow: TcpFlow) -> None:
        """Put `flow` in the table, not yet in the epoll set, as a pending connect."""
        ...

    def connect_held(self, flow: TcpFlow, verdict: Verdict, wire_name: str | None,
                     now: float) -> None:
        """Begin the host connect of `flow`, whose first flight named `wire_name`."""
        ...


@dataclass(slots=True, eq=False)
class FirstFlightHolds:
    """The flows of one relay whose first flight is held before their host connect: the
    relay's configuration and counters, its executor, timers and turns, and itself."""

    config: RelayConfig
    stats: Counter[str]
    executor: FlowExecutor[TcpFlow]
    timers: FlowTimers
    turns: FlowTurns
    relay: HoldingRelay
    #: Guest bytes the flows hold now (`tcp_first_flight_bytes`, a gauge: not a
    #: counter a handover carries).
    held_bytes: int = 0

    def hold(self, flow: TcpFlow, gate: EgressGate, verdict: Verdict, now: float) -> None:
        """A domain rule allowed `flow` on one of its inspected ports: answer the guest's
        handshake now, before any host connect, and hold its first flight until it names
        the server (`segment`). The flow counts as a pending connect meanwhile, so
        `max_pending_connects` bounds the bytes held by the relay's flows together
        (`FIRST_FLIGHT_MAX` each)."""
        deadline = now + self.config.first_flight_timeout_s
        flow.first = FirstFlightHold(gate, verdict, FirstFlight(), deadline)
        self.relay.track_held(flow)
        self.stats["tcp_first_flights"] += 1
        flow.entry.answer_before_connect(now, deadline)
        self.executor.execute(flow)
        self.timers.schedule(flow)

    def segment(self, flow: TcpFlow, hold: FirstFlightHold, seg: TcpSegment,
                now: float) -> None:
        """A guest segment of a flow whose first flight is held: its payload is held (and
        acknowledged) until the name is read; once decided, nothing more is taken (the
        guest sends it again) until the held bytes are in the host socket."""
        entry = flow.entry
        if hold.decided and seg.flags & FIN and not seg.payload:
            # A bare FIN after the first flight, while the host connect or the write of
            # the held bytes is under way: refused as data is. Taken now, its
            # shutdown(SHUT_WR) would reach the host socket first, and in SYN-SENT
            # that ends the connect (tcp_shutdown: SYN-SENT closes without a FIN).
            entry.hold_back()
            return
        data = entry.on_guest_segment(seg, now)
        if data is not None:
            taken = 0 if hold.decided else hold.flight.feed(data)
            self.held_bytes += taken
            entry.on_host_accepted(taken, now)
        if not hold.decided and entry.state not in GUEST_SENDING:
            hold.flight.feed(b"", final=True)  # its FIN: nothing more will come
        outcome = hold.flight.outcome()
        if hold.decided or outcome is None:
            # The ACK of what was held (the rest of a split hello is on its way), or
            # of what was refused while the host connects. A first flight that decides
            # here is acknowledged once the host took it (one frame less a flow on a
            # connect that ends at once, the usual case; CRR benchmark), or now if the
            # connect takes longer (`TcpRelay.connect_held`).
            entry.flush(None, now)
        self.executor.execute(flow)
        if not hold.decided and outcome is not None and not entry.closed:
            self._decide(flow, hold, outcome, now)

    def expire(self, flow: TcpFlow, hold: FirstFlightHold, now: float) -> bool:
        """The flow's deadlines passed: if its first flight's did, undecided, it is
        refused ("first_flight_timeout") and True is returned; False: the deadline is
        the entry's own."""
        if hold.decided or hold.deadline > now:
            return False
        self._decide(flow, hold, hold.flight.expire(), now)
        return True

    def _decide(self, flow: TcpFlow, hold: FirstFlightHold, outcome: Outcome,
                now: float) -> None:
        """The first flight named its server (or cannot): connect and write it, or reset
        the guest and say why."""
        hold.decided = True
        hold.wire_name = outcome.name
        dst = flow.key[1]
        reason = outcome.reason
        if reason is None and not hold.gate.name_ok(hold.verdict, dst, outcome.name, now):
            reason = "name_mismatch"
        if reason is not None:
            self.stats[_DENIED_COUNTER[reason]] += 1
            verdict = hold.verdict
            self.relay.events.denied(IPPROTO_TCP, dst, flow.key[2], verdict.rule,
                                     verdict.comment, reason=reason, names=verdict.names,
                                     wire_name=outcome.name)
            flow.end_how = "policy_cut"
            flow.entry.on_cut(now)  # a RST to the guest, and the close
            self.executor.close(flow, abortive=True, counter="tcp_first_flights_denied")
            self.executor.execute(flow)
            return
        hold.announced = True  # its FlowOpened goes out as the connect begins
        self.relay.connect_held(flow, hold.verdict, outcome.name, now)

    def connected(self, flow: TcpFlow, hold: FirstFlightHold, ok: bool, now: float) -> None:
        """The host connect of a flow whose first flight is held ended: write it first."""
        flow.entry.on_late_connect(ok, now)
        if ok:
            hold.unsent = memoryview(hold.flight.take())
            self.write(flow, hold, now)
        self.executor.execute(flow)

    def write(self, flow: TcpFlow, hold: FirstFlightHold, now: float) -> None:
        """Write the held first flight (what is left of it); once all of it is in the
        host socket, the flow goes on as any other."""
        unsent = hold.unsent
        assert unsent is not None
        entry = flow.entry
        try:
            sent = flow.sock.send(unsent) if unsent else 0
        except BlockingIOError:
            sent = 0
        except OSError:
            self.stats["tcp_host_errors"] += 1
            flow.end_how = "reset_by_host"
            entry.on_host_reset(now)
            return
        self.held_bytes -= sent
        hold.unsent = unsent = unsent[sent:]
        if unsent:
            return  # the rest when the socket has room (EPOLLOUT, `TcpRelay._host_event`)
        flow.first = None
        if entry.state not in GUEST_SENDING and not entry.closed:
            with contextlib.suppress(OSError):
                flow.sock.shutdown(socket.SHUT_WR)  # the guest's FIN came with it
        # What the guest sent after the first flight was not taken: it sends it again.
        entry.on_host_writable(now)
        self.turns.mark(flow)

    def release(self, flow: TcpFlow, hold: FirstFlightHold) -> None:
        """`flow` left the table while its first flight was held: its bytes are no
        longer held."""
        self.held_bytes -= hold.held_bytes()
        flow.first = None
