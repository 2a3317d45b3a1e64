"""The per-flow half of the TCP shell: what a flow's `TcpNatEntry` decided, carried out on
its host socket in the order the core's contract (nat_entry.py, tcp_actions.py) needs.

`TcpRelay` (host/tcp_relay.py) keeps the flow table, host readiness, the timer heap and
the flows' turns; for one flow it calls a `FlowExecutor`: a guest segment (`segment`),
the flow's turn in a flush (`flush_flow`), the end of its connect() (`connected`), a
deadline (`timer`). Each ends by running the actions the entry queued (`execute`):
frames to the guest, acknowledged bytes to drop (once per batch, host/pump.py), a
rewind or the resend of one hole, a half-close, a close.

The executor reaches a flow and its host socket only through `HostFlow`
(host/tcp_flow.py). `TcpFlow` is that on a kernel socket; tests/support/tcp_sim.py runs
this same executor around a simulated guest and socket, so what its invariants check
is the shell the relay runs, not a copy of it.

`segment` and `execute` run for every frame: one `type(x) is` chain dispatches the
actions, and what runs per frame is called as a method of an object the executor
holds (`turns.mark`), which CPython 3.11 calls faster than a bound method kept in an
attribute.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from relaynat.guest_log import guest_logger
from relaynat.host.pump import HostPump
from relaynat.host.tcp_flow import HostFlow
from relaynat.tcp_actions import (
    CloseHost,
    ConsumeHost,
    ResendHost,
    RewindHost,
    SendFrame,
    ShutdownHostWrite,
)
from relaynat.tcp_state import GUEST_SENDING
from relaynat.transports.base import slice_clock
from relaynat.wire import seq_diff

if TYPE_CHECKING:
    from relaynat.nat_entry import TcpNatEntry
    from relaynat.window import SocketFacts
    from relaynat.wire import TcpSegment

log = guest_logger("relaynat.tcp")

F = TypeVar("F", bound=HostFlow)
F_contra = TypeVar("F_contra", bound=HostFlow, contravariant=True)
SendToGuest = Callable[[bytes, "bytes | memoryview"], None]

#: What `flush_flow` says of the flow's next turn: none needed; none was had (the
#: relay's share of the wakeup was spent before it), so it goes first in the next
#: flush; it used its own share and goes again after the others (host/flow_turns.py).
TURN_DONE, TURN_WAIT, TURN_AGAIN = 0, 1, 2


def _flush_needs_facts(entry: TcpNatEntry) -> bool:
    """Whether `entry.flush` has a use for the socket's facts (three syscalls: TCP_INFO,
    SO_SNDBUF, SIOCOUTQ, and their parsing): an ACK it owes, which carries a fresh
    window, or a guest held by the window it was told (under two segments left, and
    more than half of it used), whose update is due as soon as the socket has room.

    Otherwise the facts would only refresh the window of the frames the next pump
    sends, which the next ACK refreshes anyway. A guest with most of its window left
    is not held by it even when that window is under two segments, as every fresh
    loopback peer's 64 KiB is at MTU 65520: the entry still arms its window check for
    such a flow, and the check reads the facts itself (`timer`). Most flushes of a
    connect-heavy or request-response flow owe nothing: the one after the SYN-ACK,
    after a response went out with the ACK on it (strace of the CRR benchmark: six
    facts reads a connection, 18 of its 49 syscalls)."""
    if entry.ack_pending or entry.dup_acks_to_send:
        return True
    if entry.state not in GUEST_SENDING:
        return False
    room = seq_diff(entry.adv_edge, entry.rcv_nxt)
    return room < 2 * entry.mss and 2 * room <= seq_diff(entry.adv_edge, entry.last_ack_sent)


class Turns(Protocol[F_contra]):
    """Who gives the flows their turns in a flush (host/flow_turns.py's `FlowTurns`)."""

    def mark(self, flow: F_contra) -> None:
        """Give `flow` a turn in the next flush."""
        ...


class FlowExecutor(Generic[F]):
    """Carries out the entries' actions for the flows of one guest.

    `send_to_guest(head, payload)` writes a frame to the guest; `turns.mark(flow)` asks
    for the flow's turn in the next flush; `untrack(flow)` takes a closing flow out of
    the relay's tables, False if it was not in them; `failed(flow)` handles a bug that
    surfaced while a guest segment was handled (None: the exception propagates).
    `slice_clock` is the clock of the relay's time slice (host/pump.py)."""

    def __init__(self, stats: Counter[str], send_to_guest: SendToGuest, turns: Turns[F],
                 untrack: Callable[[F], bool], failed: Callable[[F], None] | None,
                 slice_clock: Callable[[], float] = slice_clock) -> None:
        self.stats = stats
        self._send = send_to_guest
        self._turns = turns
        self._untrack = untrack
        self._failed = failed
        self.pump: HostPump[F] = HostPump(stats, self.execute, slice_clock)
        #: The transport's frames stay valid until its end of batch (`TcpRelay.set_link`),
        #: so a flow's payloads of one wakeup are gathered and written with one sendmsg.
        self.gather = False

    # -- guest segments ----------------------------------------------------------------

    def segment(self, flow: F, seg: TcpSegment, now: float) -> None:
        """A guest segment of `flow`: its new in-order payload goes to the host socket,
        what the entry decided is done, and the flow is marked for the flush."""
        entry = flow.entry
        pump = self.pump
        try:
            if flow.gathered is not None and not entry.continues_pending(seg):
                pump.write_gathered(flow, now)
            data = entry.on_guest_segment(seg, now)
            if data is not None:
                if self.gather and not entry.closed:
                    # Written at flush with the rest of this wakeup's payloads: one
                    # syscall, one push and one wakeup of the peer for them all, where
                    # a send() per 64 KiB frame spent a tenth of the relay's time
                    # waking the host peer (perf, iperf3 guest->host).
                    if flow.gathered is None:
                        flow.gathered = [data]
                    else:
                        flow.gathered.append(data)
                else:
                    entry.on_host_accepted(pump.write(flow, data, now), now)
                    pump.write_backlog(flow, now)
            self.execute(flow)
        except Exception:
            if self._failed is None:
                raise
            self._failed(flow)
            return
        self._turns.mark(flow)

    # -- the flush -----------------------------------------------------------------------

    def flush_flow(self, flow: F, now: float) -> int:
        """`flow`'s turn in a flush (the end of a batch): the payloads it gathered are
        written, then held data a filled hole made in order, then host data is peeked
        toward the guest within the wakeup's share (host/pump.py), then the ACK it owes
        goes out with a fresh window. Returns TURN_DONE, TURN_WAIT or TURN_AGAIN."""
        entry = flow.entry
        pump = self.pump
        if flow.gathered is not None:
            pump.write_gathered(flow, now)
        if flow.connecting or entry.closed:
            return TURN_DONE
        if entry.ooo is not None:
            # Held data, if the socket has room now. What writing it decided is done
            # now: with the guest's FIN held behind it, the ACK of that FIN and the
            # shutdown or close of the host socket, which left queued would wait for
            # the guest to send that FIN again (and a guest that is gone never does).
            pump.write_backlog(flow, now)
            self.execute(flow)
            if entry.closed:
                return TURN_DONE
        if flow.host_readable and not pump.share_left:
            # Its ACK too waits for its turn: first in the next flush, not the socket's
            # facts read for every flow in every round.
            return TURN_WAIT
        turn = TURN_AGAIN if pump.pump(flow, now) else TURN_DONE
        if not entry.closed:
            entry.flush(flow.facts() if _flush_needs_facts(entry) else None, now)
            self.execute(flow)
        return turn

    # -- the host socket's events ------------------------------------------------------

    def connected(self, flow: F, ok: bool, now: float,
                  facts: SocketFacts | None = None) -> None:
        """The host connect() of `flow` ended (`ok`: it succeeded): the guest's SYN is
        answered, with a SYN-ACK or a RST. `facts`: the socket's, if already read."""
        flow.connecting = False
        if ok and facts is None:
            facts = flow.facts()
        flow.entry.on_connect_result(ok, facts if ok else None, now)
        self.execute(flow)

    def timer(self, flow: F, now: float) -> bool:
        """A deadline of `flow` passed (`TcpNatEntry.next_deadline`). True if the entry
        acted: then the flow wants its turn in a flush; if not, only its next deadline."""
        entry = flow.entry
        if entry.rto_at is not None and entry.rto_at <= now:
            # Counted here rather than by RewindHost: a first expiry in SACK recovery
            # resends the holes, not everything in flight.
            self.stats["tcp_rto_expiries"] += 1
            board = entry.sacked
            log.debug("RTO on the flow to %s:%d after %d expiries: %d bytes in flight, "
                      "guest window %d, SACKed %s, holes resent below %d",
                      *flow.host_addr, entry.retries, entry.bytes_in_flight,
                      seq_diff(entry.guest_wnd_edge, entry.snd_una),
                      board.blocks if board is not None else None,
                      board.rxt_next if board is not None else 0)
        # The facts serve a SYN sent again and the window check of a guest that may
        # still send; the other deadlines (RTO, loss probe, zero-window probe, idle,
        # connect) do without, and the window check often comes due after the guest's
        # FIN (CRR benchmark: a third of the deadlines run, 0.36 facts reads a
        # connection, were such).
        wants_facts = not flow.connecting and (
            (entry.syn_at is not None and entry.syn_at <= now)
            or (entry.ack_check_at is not None and entry.ack_check_at <= now
                and entry.state in GUEST_SENDING))
        entry.on_timer(now, flow.facts() if wants_facts else None)
        acted = bool(entry.actions)
        self.execute(flow)
        return acted

    # -- actions -------------------------------------------------------------------------

    def execute(self, flow: F) -> None:
        """Carry out the actions `flow`'s entry queued, in order."""
        entry = flow.entry
        if not entry.actions:
            return
        for action in entry.take_actions():
            if type(action) is SendFrame:
                self._send(action.head, action.payload)
            elif type(action) is ConsumeHost:
                flow.consume_pending += action.nbytes
                self._turns.mark(flow)
            elif type(action) is RewindHost:
                self.pump.rewind(flow)
                self._turns.mark(flow)
            elif type(action) is ResendHost:
                self.pump.resend(flow, action.offset, action.length, action.probe)
            elif type(action) is ShutdownHostWrite:
                with contextlib.suppress(OSError):
                    flow.shutdown_write()
            elif type(action) is CloseHost:
                self.close(flow, action.abortive)

    def close(self, flow: F, abortive: bool, counter: str = "tcp_flows_closed") -> None:
        """`flow` is over: out of the relay's tables (`untrack`; nothing more if it was
        not in them), and its host socket closed, `abortive`ly with a RST."""
        if not self._untrack(flow):
            return
        self.release(flow)
        if abortive:
            self.stats["tcp_host_resets"] += 1
            flow.close_socket(True)
        else:
            if flow.consume_pending:
                # Bytes the guest acknowledged may still sit in the receive queue
                # (dropped once per batch): close() with unread data sends the peer a
                # RST instead of a FIN (tcp(7), RFC 2525 §2.17), which would destroy our
                # last data in flight.
                self.pump.consume(flow)
            flow.close_socket(False)
        self.stats[counter] += 1

    def release(self, flow: F) -> None:
        """`flow` leaves this shell (closed, or moved to another relay): its receive
        buffer's growth leaves the relay's budget, and payloads it gathered but did not
        write are let go (unacknowledged, so the guest sends them again)."""
        self.pump.release(flow)
        if flow.gathered is not None:
            flow.gathered = None
            flow.entry.drop_pending()
