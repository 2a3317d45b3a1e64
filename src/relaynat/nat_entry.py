"""`TcpNatEntry`: one guest-initiated TCP flow's state machine, with no I/O at all.

The relay terminates the guest's TCP connection itself and splices it onto a host
socket, like passt's tcp.c, without a payload buffer of its own:

Guest -> host. `on_guest_segment` returns the in-order part of the payload that is
new; the shell writes it straight into the host socket and reports how much the
socket accepted with `on_host_accepted`. Only accepted bytes are acknowledged, so the
guest's own retransmission queue is the buffer: a duplicate or a full socket gets a
duplicate ACK and the guest resends. Nothing is ever written twice, because
`rcv_nxt` only advances by accepted bytes. A segment beyond a hole is the exception:
it is held in a bounded out-of-order queue (ooo_queue.py) and reported to the guest in
SACK blocks (RFC 2018); once the hole fills, `host_backlog()` hands the now in-order
data to the shell, which writes it and reports with `on_host_accepted` as well. Held
data is not acknowledged (cumulatively) until the host socket took it. The shell may
also gather the payloads of back-to-back segments from one wakeup and write them with
one sendmsg (`continues_pending`), reporting once.

Host -> guest. The shell peeks (`MSG_PEEK` at `SO_PEEK_OFF`) at most
`host_read_budget()` bytes, the guest's window minus what is in flight, and passes
them to `on_host_data`, which cuts them into segments. Bytes leave the host socket
(`ConsumeHost`, done with `recv(MSG_TRUNC)`) only once the guest ACKs them: the
kernel's receive queue is the retransmission queue. A hole the guest's SACK blocks
reveal is peeked again at its offset and sent alone (`ResendHost`, then
`on_host_resend`; sack_scoreboard.py says when); without SACK, or on the RTO, the
retransmission is a rewind of the peek offset to snd_una (`RewindHost`, go-back-N).
A flight whose tail was lost leaves the guest nothing to SACK: two round trips after
the last ACK, the last segment goes out again as a probe (RFC 8985 §7), whose SACK
then shows the hole, instead of waiting for the RTO.

Everything else the entry decides arrives as actions in `actions` (frames for the
guest, bytes to drop from the host socket, shutdown, close) that the shell executes
in order, and as one deadline (`next_deadline()`) at which the shell calls
`on_timer`. Time is always a parameter, so hypothesis can drive thousands of lossy,
reordered conversations without a kernel or a clock (tests/unit/test_nat_entry.py).

The machine is in two modules. tcp_handshake.py (`TcpHandshake`, the base class)
establishes the flow: the guest's SYN, the host connect() result and our SYN-ACK
(outbound), our SYN and the guest's SYN-ACK (inbound), and the SYN retransmission
timer; it also declares the flow's state and the primitives that emit segments and
abort. This module is the rest: `on_guest_segment` (which hands a segment that
arrives in SYN-SENT to the handshake), data both ways, FINs, the flush, and the
timers (`on_timer` leaves the SYN's to the handshake).

RFCs: RFC 9293 (TCP: §3.4 sequence numbers, §3.10.7 segment arrival, §3.8.6.1 zero
window probing), RFC 7323 §2 (window scale), RFC 6298 (RTO), RFC 5681 §3.2 (fast
retransmit on three duplicate ACKs), RFC 2018 and RFC 6675 (SACK and recovery with it),
RFC 8985 §7 (tail loss probe),
RFC 5961 §3.2 (RST only at the exact sequence).
"""

from __future__ import annotations

from relaynat.ooo_queue import OooQueue
from relaynat.sack_scoreboard import SackScoreboard
from relaynat.tcp_actions import (
    M32,
    Action,
    CloseHost,
    ConsumeHost,
    ResendHost,
    RewindHost,
    ShutdownHostWrite,
)
from relaynat.tcp_handshake import TcpHandshake
from relaynat.tcp_state import GUEST_SENDING, HOST_SENDING, TcpEvent, TcpState
from relaynat.window import (
    ACK_CHECK_IDLE_MAX_S,
    ACK_CHECK_MAX_S,
    DATA_GIVE_UP_S,
    DUP_ACK_THRESHOLD,
    SocketFacts,
    ack_check_interval_s,
    advertised_window,
    encode_window,
    pto_s,
    rto_s,
    rtt_exponent,
)
from relaynat.wire import ACK, FIN, PSH, RST, SYN, TcpSegment, seq_diff, seq_le, seq_lt

_ESTABLISHED = TcpState.ESTABLISHED


class TcpNatEntry(TcpHandshake):
    """One flow; see the module docstring for the protocol between it and the shell.

    Its state and handshake come from `TcpHandshake` (tcp_handshake.py)."""

    __slots__ = ()  # all declared in TcpHandshake

    # -- guest -> host ------------------------------------------------------------

    def on_guest_segment(self, seg: TcpSegment, now: float) -> memoryview | None:
        """Process one guest segment. Returns the new in-order payload to write to the
        host socket (then call `on_host_accepted`), or None."""
        if (self.state is _ESTABLISHED and seg.flags & ~PSH == ACK and seg.ack == self.snd_una
                and seg.payload and seg.seq == (self.rcv_nxt + self._pending_len) & M32):
            # What a guest's upload is made of: in-order data on an established flow
            # that acknowledges nothing new. This is what `_on_segment` does with it,
            # without the checks that cannot apply (tests/unit/test_nat_entry.py proves the
            # two agree): 0.8-1.3 µs here with on_host_accepted, against 3.4-4.4 µs.
            self.now = now
            self.idle_at = now + self.idle_timeout_s
            tsval = seg.tsval
            if (tsval is not None and seq_le(seg.seq, self.last_ack_sent)
                    and seq_le(self.ts_recent, tsval)):
                self.ts_recent = tsval
            self.guest_wnd_edge = (seg.ack + (seg.window << self.guest_wscale)) & M32
            self._pending_fin = False
            self._pending_len += len(seg.payload)
            return seg.payload
        return self._on_segment(seg, now)

    def _on_segment(self, seg: TcpSegment, now: float) -> memoryview | None:
        """`on_guest_segment` for every segment."""
        if self.closed:
            return None
        self.now = now
        self.idle_at = now + self.idle_timeout_s
        flags = seg.flags
        # RFC 7323 §4.3: remember the TSval of the segment at the left edge of what we
        # acknowledge, so the guest's RTT sample measures the segment we really ACK.
        tsval = seg.tsval
        if (tsval is not None and seq_le(seg.seq, self.last_ack_sent)
                and seq_le(self.ts_recent, tsval)):
            self.ts_recent = tsval
        if self.state is TcpState.SYN_SENT:
            self._in_syn_sent(seg, now)
            return None
        if flags & RST:
            # RFC 5961 §3.2: only a RST at exactly rcv_nxt resets; others are ignored.
            if seg.seq == self.rcv_nxt or self.state is TcpState.SYN_RCVD:
                self._abort(rst_guest=False, abortive_host=True)
            return None
        if flags & SYN:
            if self.state is TcpState.SYN_RCVD and seg.seq == self.guest_isn:
                self._send_syn_ack(None)  # the guest lost our SYN-ACK
            elif self.state is not TcpState.CONNECTING:
                self._emit(self._ack_seq(), ACK)  # RFC 5961 §4: challenge ACK
            return None
        if self.state is TcpState.CONNECTING or not flags & ACK:
            return None
        self._process_ack(seg, now)
        if self.state is TcpState.SYN_RCVD:
            # The ACK did not complete the handshake (RFC 9293 §3.10.7.4: text and FIN
            # are processed only once ESTABLISHED); a FIN here hit the state machine as
            # GUEST_FIN in SYN_RCVD and reset the flow as an internal error.
            return None
        if self.closed or self.state not in GUEST_SENDING:
            if flags & FIN or seg.payload:
                self._emit(self._ack_seq(), ACK)  # retransmitted FIN/data after guest FIN
            return None
        return self._accept_payload(seg)

    def _process_ack(self, seg: TcpSegment, now: float) -> None:
        ack = seg.ack
        if self.state is TcpState.SYN_RCVD:
            if ack != self.snd_una:
                return
            self._event(TcpEvent.ACK_OF_SYN)
            self.syn_at = None
            self.retries = 0
            self._sample_rtt(seg.tsecr)  # our SYN-ACK's round trip, as Linux's first
        window = seg.window << self.guest_wscale
        fin_seq = self.fin_seq
        fin_end = None if fin_seq is None else (fin_seq + 1) & M32
        highest = fin_end if fin_end is not None else self.snd_max
        if seq_lt(self.snd_una, ack) and seq_le(ack, highest):
            if fin_seq is not None and ack == fin_end:
                data_ack = fin_seq
                if not self.fin_acked:
                    self.fin_acked = True
                    self._event(TcpEvent.OUR_FIN_ACKED)
            else:
                data_ack = ack
            acked = (data_ack - self.snd_una) & M32
            if acked:
                self.actions.append(ConsumeHost(acked))
                self.bytes_to_guest += acked
            self.snd_una = data_ack
            self._sample_rtt(seg.tsecr)
            if seq_lt(self.snd_nxt, self.snd_una):
                self.snd_nxt = self.snd_una  # acked beyond a rewind point
            if self.sacked is not None:
                self.sacked.advance(acked)
            if seg.sack is not None and self.sack_ok and self.bytes_in_flight:
                self._on_sack(seg.sack)  # a partial ACK: what is still missing
            self.retries = 0
            self.dup_acks = 0
            self.persist_count = 0
            self.persist_at = None
            self.guest_wnd_edge = (self.snd_una + window) & M32
            self._arm_rto(now)
            self._arm_tlp(now)
            if self.closed:
                self.actions.append(CloseHost(False))
            return
        if ack == self.snd_una:
            new_edge = (ack + window) & M32
            dup = (self.bytes_in_flight and not seg.payload and not seg.flags & FIN
                   and new_edge == self.guest_wnd_edge)
            if dup:
                self.dup_acks += 1
            if seg.sack is not None and self.sack_ok and self.bytes_in_flight:
                self._on_sack(seg.sack)
            elif dup and self.dup_acks == DUP_ACK_THRESHOLD:
                # RFC 5681 §3.2 fast retransmit, go-back-N: the guest reports no SACK
                # blocks, so which bytes it misses is unknown.
                self._rewind()
            self.guest_wnd_edge = new_edge

    def _on_sack(self, sack: list[tuple[int, int]]) -> None:
        """RFC 6675 §5 with the guest's SACK blocks: resend the holes that are lost, as
        many as one ACK may (sack_scoreboard.py), from the host socket's queue."""
        board = self.sacked
        if board is None:
            board = self.sacked = SackScoreboard()
        sent = (self.snd_max - self.snd_una) & M32
        board.add(sack, self.snd_una, sent)
        for start, end in board.lost_holes(self.bytes_in_flight, sent, self.frame_payload_max):
            self.actions.append(ResendHost(start, end - start))

    def _accept_payload(self, seg: TcpSegment) -> memoryview | None:
        payload = seg.payload
        fin = bool(seg.flags & FIN)
        # Past what the shell already holds for one write (`continues_pending`).
        offset = seq_diff((self.rcv_nxt + self._pending_len) & M32, seg.seq)
        if offset < 0:
            # A gap: data after a loss, or one that overtook another. Hold what fits the
            # window we advertised (RFC 9293 §3.10.7.4), then a duplicate ACK right away
            # (RFC 5681 §4.2, not coalesced), its SACK blocks saying what we hold.
            if self.ooo_budget is not None and (payload or fin):
                if self.ooo is None:
                    self.ooo = OooQueue(self.ooo_budget, self.rcv_nxt)
                self.ooo.insert(seg.seq, payload, fin, self.adv_edge)
                if not self.ooo:
                    self.ooo = None
            self._emit(self._ack_seq(), ACK)
            return None
        if offset >= len(payload) and not (fin and offset == len(payload)):
            if payload or fin:
                self._emit(self._ack_seq(), ACK)  # old duplicate
            elif offset > 0:
                # A segment below rcv_nxt without data is the guest's zero-window probe
                # or keepalive (seq = rcv_nxt - 1): RFC 9293 §3.10.7.4 wants an ACK, and it
                # must carry a fresh window, so it goes out at flush with the socket facts.
                self.ack_pending = True
            return None
        self._pending_fin = fin
        if offset == len(payload):  # a bare FIN, nothing held before it
            self.on_host_accepted(0, self.now)
            return None
        self._pending_len += len(payload) - offset
        return payload[offset:]

    def continues_pending(self, seg: TcpSegment) -> bool:
        """`seg` is plain data (ACK, maybe PSH) that starts right where the payload the
        shell holds but has not written ends: `on_guest_segment` may hand its payload
        out too, and one `on_host_accepted` then reports on all of it. Anything else
        must wait until the shell has written and reported what it holds."""
        return (seg.flags & ~PSH == ACK and bool(seg.payload) and not self._pending_fin
                and seg.seq == (self.rcv_nxt + self._pending_len) & M32)

    def on_host_accepted(self, nbytes: int, now: float) -> None:
        """The host socket took `nbytes` of what `on_guest_segment` returned (of all
        of it, when the shell wrote several segments' payloads at once)."""
        self.now = now
        self.rcv_nxt = (self.rcv_nxt + nbytes) & M32
        self.bytes_from_guest += nbytes
        if nbytes:
            self.ack_pending = True
            if self.ooo is not None:
                self.ooo.advance(self.rcv_nxt)
                if not self.ooo:
                    self.ooo = None
        if nbytes < self._pending_len:
            # Socket full: the rest is dropped unacknowledged; the guest retransmits it.
            self.write_blocked = True
            self.ack_pending = True
        elif self._pending_fin:
            self.rcv_nxt = (self.rcv_nxt + 1) & M32
            self._event(TcpEvent.GUEST_FIN)
            if self.closed:
                self._emit(self._ack_seq(), ACK)
                self.actions.append(CloseHost(False))
            else:
                self.actions.append(ShutdownHostWrite())
                self._emit(self._ack_seq(), ACK)
        self._pending_len = 0
        self._pending_fin = False

    def hold_back(self) -> None:
        """The shell cannot take the guest's data or FIN now (a flow whose first flight
        is not in the host socket yet, host/first_flight_hold.py): as with a full socket,
        nothing of it is acknowledged, and `on_host_writable` asks the guest to send it
        again."""
        self.write_blocked = True

    def drop_pending(self) -> None:
        """The shell let go of the payload it held unwritten (the flow is leaving it):
        nothing of it was acknowledged, so the guest sends it again, to whoever."""
        self._pending_len = 0
        self._pending_fin = False

    def host_backlog(self) -> list[bytes] | None:
        """Held out-of-order data that is in order now (a hole filled): the shell
        writes these chunks (one sendmsg) and reports `on_host_accepted`, and asks
        again until None. An empty list: only the guest's FIN was waiting."""
        ooo = self.ooo
        if ooo is None or self.write_blocked or self.state not in GUEST_SENDING:
            return None
        ready = ooo.ready()
        if ready is None:
            return None
        chunks, self._pending_fin = ready
        self._pending_len = sum(map(len, chunks))
        return chunks

    def on_host_writable(self, now: float) -> None:
        """The host socket has room again after a short write: tell the guest."""
        del now
        if self.write_blocked and not self.closed:
            self.write_blocked = False
            self.ack_pending = True
            if self.ooo is None or self.ooo.ready() is None:
                # A window update plus duplicate ACKs, so the guest retransmits what we
                # dropped without waiting for its RTO (RFC 5681 §3.2). Not when what
                # follows rcv_nxt is held here: the shell writes it (host_backlog).
                self.dup_acks_to_send = DUP_ACK_THRESHOLD

    # -- host -> guest ------------------------------------------------------------

    def host_read_budget(self) -> int:
        """Bytes the shell may peek from the host socket now: the guest's window minus
        bytes in flight. Once our FIN is out, only data before it that a rewind left to
        send again (the FIN does not make those bytes any less lost)."""
        if self.closed or self.fin_acked:
            return 0
        budget = seq_diff(self.guest_wnd_edge, self.snd_nxt)
        if self.fin_seq is not None:
            budget = min(budget, seq_diff(self.fin_seq, self.snd_nxt))
        elif self.state not in HOST_SENDING:
            return 0
        return max(0, budget)

    def on_host_data(self, data: memoryview, now: float) -> None:
        """`data` was peeked from the host socket at the current offset: send it."""
        if not data or self.closed or self.fin_acked:
            return
        self.now = now
        if self.fin_seq is not None:
            data = data[:max(0, seq_diff(self.fin_seq, self.snd_nxt))]  # a retransmission
            if not data:
                return
        elif self.state not in HOST_SENDING:
            return
        self._emit_data(self.snd_nxt, data)
        self.snd_nxt = (self.snd_nxt + len(data)) & M32
        if seq_lt(self.snd_max, self.snd_nxt):
            self.snd_max = self.snd_nxt
        if self.fin_seq is not None and self.snd_nxt == self.fin_seq:
            self._emit(self.fin_seq, FIN | ACK)  # retransmitted data caught up with the FIN
        if self.rto_at is None:
            self._arm_rto(now)
        self._arm_tlp(now)  # RFC 8985 §7.2: after new data, from the last one sent

    def _arm_tlp(self, now: float) -> None:
        """Schedule a tail loss probe (RFC 8985 §7.2): with SACK and a measured round
        trip, data in flight, not in recovery (no blocks, no RTO since the last ACK),
        before our FIN, and only if it comes before the RTO."""
        self.tlp_at = None
        srtt = self.guest_srtt
        rto_at = self.rto_at
        if (srtt is None or rto_at is None or not self.sack_ok or self.retries
                or self.fin_seq is not None):
            return
        flight = self.bytes_in_flight
        board = self.sacked
        if not flight or (board is not None and len(board)):
            return
        at = now + pto_s(srtt, flight, self.mss)
        if at < rto_at:
            self.tlp_at = at

    def on_host_blocked(self, now: float) -> None:
        """The host has data but `host_read_budget()` is 0: probe a zero window."""
        if (self.persist_at is None and not self.bytes_in_flight
                and self.state in HOST_SENDING):
            # RFC 9293 §3.8.6.1 leaves the interval to the RTO; Linux's is the flow's RTO,
            # backed off (tcp_probe0_base), so the guest's measured round trip counts.
            self.persist_at = now + rto_s(self.persist_count, False, self.guest_srtt,
                                          self.guest_rttvar)

    def on_host_eof(self, now: float) -> None:
        """The peer closed its side and every byte of it has been sent: FIN the guest.

        Once: a retransmitted FIN goes out from `_rewind` or `on_host_data`, because the
        shell never peeks past the FIN again (`host_read_budget` stops there)."""
        if self.state not in HOST_SENDING or self.fin_seq is not None:
            return
        self.now = now
        self.fin_seq = self.snd_nxt
        self._event(TcpEvent.OUR_FIN_SENT)
        self._emit(self.fin_seq, FIN | ACK)
        self._arm_rto(now)

    def on_host_reset(self, now: float) -> None:
        """The peer reset the connection (or it failed): reset the guest."""
        self.now = now
        self._abort(rst_guest=True, abortive_host=False)

    def on_cut(self, now: float) -> None:
        """The relay ends the flow on its own (a policy change): reset both ways."""
        self.now = now
        self._abort(rst_guest=True)

    def on_guest_gone(self) -> None:
        """The guest's transport went away: nothing more to send it; forget the flow."""
        if not self.closed:
            self._event(TcpEvent.ABORT)
        self.actions.clear()

    def on_host_resend(self, offset: int, data: memoryview) -> None:
        """`data` was peeked at `offset` from snd_una for a `ResendHost`: send it again."""
        if self.closed or not data:
            return
        seq = (self.snd_una + offset) & M32
        if offset == 0:
            # The head went out again: its RTO counts from now, as Linux rearms it
            # (tcp_xmit_retransmit_queue); the old deadline is the original's.
            self._arm_rto(self.now)
        self._emit_data(seq, data)

    def _emit_data(self, seq: int, data: memoryview) -> None:
        """`data` from `seq` on, in frames of at most `frame_payload_max`, PSH on the
        last."""
        step = self.frame_payload_max
        end = len(data)
        for start in range(0, end, step):
            self._emit((seq + start) & M32, ACK | PSH if start + step >= end else ACK,
                       data[start:start + step])

    def _rewind(self) -> None:
        if self.sacked is not None:
            # Without blocks, or at a second RTO in a row: the guest may have dropped
            # what it SACKed (RFC 2018 §8), so none of it counts (RFC 6675 §5.1).
            self.sacked.clear()
        self.snd_nxt = self.snd_una
        self.actions.append(RewindHost())
        if self.fin_seq is not None and not self.fin_acked and self.snd_una == self.fin_seq:
            self._emit(self.fin_seq, FIN | ACK)

    # -- flush and timers -------------------------------------------------------------

    def flush(self, facts: SocketFacts | None, now: float) -> None:
        """End of a batch: send the ACK this flow owes, with a fresh window."""
        if self.state in (TcpState.CONNECTING, TcpState.SYN_SENT, TcpState.CLOSED):
            return
        self.now = now
        if facts is not None:
            self._update_window(facts)
        if self.ack_pending or self.dup_acks_to_send or self._window_update_due():
            self._emit(self._ack_seq(), ACK)
            while self.dup_acks_to_send > 0:
                self.dup_acks_to_send -= 1
                self._emit(self._ack_seq(), ACK)
            self.ack_check_s = 0.0
        # The guest has (nearly) used up the window it was told: look for a wider one
        # at RTT/2 (the peer cannot have acked more sooner).
        if self._window_limited():
            soon = now + ack_check_interval_s(self.rtt_exp)
            # New guest data pulls a check that an idle spell pushed far out back in.
            if self.ack_check_at is None or (self.rcv_nxt != self.ack_check_rcv
                                             and soon < self.ack_check_at):
                self.ack_check_at = soon
                self.ack_check_rcv = self.rcv_nxt
                self.ack_check_s = 0.0

    def _window_limited(self) -> bool:
        """The guest has less than two segments of the window we announced left."""
        return (self.state in GUEST_SENDING
                and seq_diff(self.adv_edge, self.rcv_nxt) < 2 * self.mss)

    def _window_update_due(self) -> bool:
        """A window-limited guest would be told more than it was: send an update."""
        new_edge = (self.rcv_nxt + (self.adv_field << self.our_wscale)) & M32
        return self._window_limited() and seq_lt(self.adv_edge, new_edge)

    def _update_window(self, facts: SocketFacts) -> None:
        if facts.info is not None:
            self.rtt_exp = rtt_exponent(facts.info.rtt_us)
        self.adv_field = encode_window(advertised_window(facts), self.our_wscale)

    def next_deadline(self) -> float | None:
        """The earliest time at which `on_timer` has something to do."""
        best = self.idle_at
        for t in (self.connect_deadline, self.syn_at, self.rto_at, self.persist_at,
                  self.ack_check_at, self.tlp_at):
            if t is not None and t < best:
                best = t
        return best

    def on_timer(self, now: float, facts: SocketFacts | None) -> None:
        """Run whatever deadline has passed."""
        if self.closed:
            return
        self.now = now
        if self.idle_at <= now:
            self._abort(rst_guest=True)
            return
        if self.connect_deadline is not None and self.connect_deadline <= now:
            self.connect_deadline = None
            self._abort(rst_guest=True, abortive_host=False)
            return
        if self.syn_at is not None and self.syn_at <= now:
            self._on_syn_timeout(now, facts)
            if self.closed:
                return
        if self.tlp_at is not None and self.tlp_at <= now:
            self.tlp_at = None  # one probe until an ACK of new data (RFC 8985 §7.3)
            flight = self.bytes_in_flight
            if flight and self.state in HOST_SENDING:
                # RFC 8985 §7.3: new data if the window allows, else the last segment
                # again. The shell sends new data whenever the host has some and the
                # window room, so what is left to probe with is the last segment.
                length = min(self.mss, flight)
                self.actions.append(ResendHost(flight - length, length, probe=True))
                self._arm_rto(now)
        if self.rto_at is not None and self.rto_at <= now:
            self.tlp_at = None
            if self.retries == 0 or self.stalled_since is None:
                self.stalled_since = now
            self.retries += 1
            if now - self.stalled_since >= DATA_GIVE_UP_S:
                self._abort(rst_guest=True)
                return
            board = self.sacked
            if self.retries == 1 and board is not None and len(board):
                # The guest said what it holds: what is lost is the holes (a resend of
                # one lost again, with nothing sent after it to tell). Send them all
                # again, as Linux marks only un-SACKed data lost at an RTO
                # (tcp_enter_loss); RFC 6675 §5.1 keeps the SACK information in use
                # after an RTO too. Should the guest have dropped what it SACKed
                # (reneging, RFC 2018 §8), the next expiry rewinds.
                board.restart()
                self._on_sack([])
            else:
                self._rewind()
            self._arm_rto(now)
        if self.persist_at is not None and self.persist_at <= now:
            # RFC 9293 §3.8.6.1: probe with an old sequence number; the guest answers
            # with its current window. Backoff as the RTO, without a reset limit.
            self.persist_count += 1
            self.persist_at = None
            self._emit((self.snd_una - 1) & M32, ACK)
        if self.ack_check_at is not None and self.ack_check_at <= now:
            self.ack_check_at = None
            if facts is not None:
                self._update_window(facts)
            if self._window_update_due():
                self._emit(self._ack_seq(), ACK)  # window update
                self.ack_check_s = 0.0
            if self._window_limited():
                # Still closed: check again, backing off (doubling) so that a peer that
                # stopped reading costs a wakeup every ACK_CHECK_MAX_S, not every RTT/2.
                # A guest that sent nothing since the last check may simply be idle (a
                # fresh loopback peer's 64 KiB is under two segments at MTU 65520, so
                # every idle flow looks limited): back off from 1 s to ACK_CHECK_IDLE_MAX_S
                # instead; measured with 10,000 idle flows, the RTT/2 checks took 3/4 of
                # the relay's time. Its next segment brings the short interval back.
                # But while the host socket still holds unacknowledged data the guest is
                # held by us, not idle: the window reopens as that data drains, and
                # only a check tells it so. Left to its own zero-window probe (RFC 9293
                # §3.8.6.1, at least Linux's 200 ms RTO) or a TSO send it defers until
                # an ACK (tcp_tso_should_defer), the guest stalled for 0.2 s several
                # times a second whenever the host peer was descheduled for a moment.
                host_draining = facts is not None and facts.outq > 0
                if self.rcv_nxt != self.ack_check_rcv or host_draining:
                    base = ack_check_interval_s(self.rtt_exp)
                    self.ack_check_s = min(max(base, self.ack_check_s * 2), ACK_CHECK_MAX_S)
                else:
                    self.ack_check_s = min(max(1.0, self.ack_check_s * 2),
                                           ACK_CHECK_IDLE_MAX_S)
                self.ack_check_at = now + self.ack_check_s
                self.ack_check_rcv = self.rcv_nxt

    def take_actions(self) -> list[Action]:
        actions, self.actions = self.actions, []
        return actions
