"""`TcpNatEntry`: one guest-initiated TCP flow's state machine, with no I/O at all.

The relay terminates the guest's TCP connection itself and splices it onto a host
socket, like passt's tcp.c, without a payload buffer of its own:

Guest -> host. `on_guest_segment` returns the in-order part of the payload that is
new; the shell writes it straight into the host socket and reports how much the
socket accepted with `on_host_accepted`. Only accepted bytes are acknowledged, so the
guest's own retransmission queue is the buffer: a gap, a duplicate or a full socket
gets a duplicate ACK and the guest resends. Nothing is ever written twice, because
`rcv_nxt` only advances by accepted bytes.

Host -> guest. The shell peeks (`MSG_PEEK` at `SO_PEEK_OFF`) at most
`host_read_budget()` bytes, the guest's window minus what is in flight, and passes
them to `on_host_data`, which cuts them into segments. Bytes leave the host socket
(`ConsumeHost`, done with `recv(MSG_TRUNC)`) only once the guest ACKs them, and a
retransmission is a rewind of the peek offset (`RewindHost`): the kernel's receive
queue is the retransmission queue.

Everything else the entry decides arrives as actions in `actions` (frames for the
guest, bytes to drop from the host socket, shutdown, close) that the shell executes
in order, and as one deadline (`next_deadline()`) at which the shell calls
`on_timer`. Time is always a parameter, so hypothesis can drive thousands of lossy,
reordered conversations without a kernel or a clock (tests/test_nat_entry.py).

RFCs: RFC 9293 (TCP: §3.4 sequence numbers, §3.10.7 segment arrival, §3.8.6.1 zero
window probing), RFC 7323 §2 (window scale), RFC 6298 (RTO), RFC 5681 §3.2 (fast
retransmit on three duplicate ACKs), RFC 5961 §3.2 (RST only at the exact sequence).
"""

from __future__ import annotations

from relaynat.packet_builder import TS_OPTION_LEN, TcpFrameTemplate, tcp_options_syn
from relaynat.tcp_actions import (
    M32,
    Action,
    CloseHost,
    ConsumeHost,
    RewindHost,
    SendFrame,
    ShutdownHostWrite,
)
from relaynat.tcp_state import GUEST_SENDING, HOST_SENDING, TcpEvent, TcpState, next_state
from relaynat.window import (
    ACK_CHECK_IDLE_MAX_S,
    ACK_CHECK_MAX_S,
    DATA_RETRIES_MAX,
    DUP_ACK_THRESHOLD,
    OUR_WSCALE,
    SYN_RETRIES_MAX,
    SocketFacts,
    ack_check_interval_s,
    advertised_window,
    encode_window,
    mss_for_guest,
    negotiate_wscale,
    rto_s,
    rtt_exponent,
    syn_timeout_s,
)
from relaynat.wire import ACK, FIN, PSH, RST, SYN, TcpSegment, seq_diff, seq_le, seq_lt

#: Largest TCP payload in one IPv4 frame without options (65535 - 20 - 20): the size of
#: a GSO super-frame toward an offloading TAP.
MAX_GSO_PAYLOAD = 65495


class TcpNatEntry:
    """One flow; see the module docstring for the protocol between it and the shell."""

    __slots__ = (
        "_pending_fin",
        "_pending_len",
        "ack_check_at",
        "ack_check_rcv",
        "ack_check_s",
        "ack_pending",
        "actions",
        "adv_edge",
        "adv_field",
        "bytes_from_guest",
        "bytes_to_guest",
        "connect_deadline",
        "dup_acks",
        "dup_acks_to_send",
        "fin_acked",
        "fin_seq",
        "frame_payload_max",
        "guest_isn",
        "guest_wnd_edge",
        "guest_wscale",
        "idle_at",
        "idle_timeout_s",
        "iss",
        "last_ack_sent",
        "mss",
        "mtu",
        "now",
        "our_mss",
        "our_wscale",
        "persist_at",
        "persist_count",
        "rcv_nxt",
        "retries",
        "rto_at",
        "rtt_exp",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "state",
        "syn_at",
        "syn_retransmitted",
        "template",
        "ts_offset",
        "ts_recent",
        "write_blocked",
    )

    def __init__(self, syn: TcpSegment | None, *, template: TcpFrameTemplate, mtu: int,
                 iss: int, now: float, connect_timeout_s: float = 10.0,
                 idle_timeout_s: float = 7200.0) -> None:
        """A flow opened by the guest's `syn` (outbound). `TcpNatEntry.inbound` opens
        one toward the guest instead (syn None here)."""
        self.template = template
        self.state = TcpState.CONNECTING
        self.actions: list[Action] = []
        self.now = now
        self.mtu = mtu
        self.ts_offset = (iss * 0x9E3779B1) & M32  # per-flow TSval offset (RFC 7323 §5.4)
        self.our_mss = min(mtu - (40 if template.ipv6 else 20) - 20, 0xFFFF)
        self.iss = iss & M32
        # Data sequence space toward the guest starts after our SYN.
        self.snd_una = self.snd_nxt = self.snd_max = (self.iss + 1) & M32
        self.fin_seq: int | None = None
        self.fin_acked = False
        self.dup_acks = 0
        self.dup_acks_to_send = 0
        self.ack_pending = False
        self.adv_field = 0
        self.ack_check_s = 0.0
        self.ack_check_rcv = 0
        self.write_blocked = False
        self.retries = 0
        self.syn_retransmitted = False
        self.rtt_exp = 0
        self.persist_count = 0
        self.connect_deadline: float | None = now + connect_timeout_s
        self.syn_at: float | None = None
        self.rto_at: float | None = None
        self.persist_at: float | None = None
        self.ack_check_at: float | None = None
        self.idle_timeout_s = idle_timeout_s
        self.idle_at = now + idle_timeout_s
        self.bytes_from_guest = 0
        self.bytes_to_guest = 0
        self._pending_len = 0
        self._pending_fin = False
        self.guest_isn = self.rcv_nxt = self.last_ack_sent = self.adv_edge = 0
        self.our_wscale = self.guest_wscale = 0
        self.ts_recent = 0
        self.mss = self.frame_payload_max = 0
        self.guest_wnd_edge = self.snd_una
        if syn is not None:
            self._learn_guest_syn(syn)

    @classmethod
    def inbound(cls, *, template: TcpFrameTemplate, mtu: int, iss: int, now: float,
                facts: SocketFacts | None, idle_timeout_s: float = 7200.0) -> TcpNatEntry:
        """A flow a host client opened on a forwarded port: SYN the guest now, offering
        our MSS, window scale and (if `template` has room for them) timestamps; the
        guest's SYN-ACK decides what is in force (RFC 7323 §2.2, §3.2). The host socket
        is connected already, so there is no connect deadline."""
        entry = cls(None, template=template, mtu=mtu, iss=iss, now=now,
                    idle_timeout_s=idle_timeout_s)
        entry.state = TcpState.SYN_SENT
        entry.connect_deadline = None
        entry.our_wscale = OUR_WSCALE
        entry._send_syn(facts)
        entry.syn_at = now + syn_timeout_s(0)
        return entry

    def _learn_guest_syn(self, syn: TcpSegment) -> None:
        """What the guest's SYN (outbound) or SYN-ACK (inbound) tells: its ISN, options
        and window."""
        self.guest_isn = syn.seq
        self.rcv_nxt = self.last_ack_sent = self.adv_edge = (syn.seq + 1) & M32
        self.our_wscale, self.guest_wscale = negotiate_wscale(syn.wscale)
        # RFC 7323 §3: timestamps are in force when the guest's SYN offered them (the
        # shell then built the template with room for the option). They matter for a
        # relay that keeps no out-of-order data: every ACK of retransmitted data still
        # gives the guest a valid RTT sample (TSecr), which is what resets its RTO
        # backoff (RFC 6298 §5.7, Karn's rule otherwise forbids the sample).
        self.ts_recent = syn.tsval if syn.tsval is not None else 0
        # RFC 6691: the MSS excludes options, so each segment's payload shrinks by ours.
        ts_len = TS_OPTION_LEN if self.template.timestamps else 0
        ip_hlen = 40 if self.template.ipv6 else 20
        self.mss = mss_for_guest(syn.mss, self.mtu, ip_hlen) - ts_len
        # Payload of one frame we send: an MSS-sized segment, or with offload a GSO
        # super-frame as large as one IPv4 packet holds (IPv6 could hold 20 bytes more).
        self.frame_payload_max = (MAX_GSO_PAYLOAD - ts_len if self.template.offload
                                  else self.mss)
        # RFC 7323 §2.2: the window field of a SYN is never scaled.
        self.guest_wnd_edge = (self.snd_una + syn.window) & M32

    # -- helpers -----------------------------------------------------------------

    @property
    def bytes_in_flight(self) -> int:
        """Data bytes sent to the guest and not yet acknowledged."""
        return (self.snd_nxt - self.snd_una) & M32

    @property
    def closed(self) -> bool:
        return self.state is TcpState.CLOSED

    def _ack_seq(self) -> int:
        """Sequence number for a segment without data: the highest we sent, FIN
        included. The guest drops (and answers with a duplicate ACK) any segment
        whose sequence is below what it already received (RFC 9293 §3.10.7.4), which
        after a rewind `snd_nxt` can be."""
        if self.fin_seq is not None:
            return (self.fin_seq + 1) & M32
        return self.snd_max

    def _event(self, event: TcpEvent) -> None:
        self.state = next_state(self.state, event)

    def _tsval(self) -> int:
        """Our timestamp clock: milliseconds (RFC 7323 §5.4 allows 1 ms to 1 s ticks)."""
        return (int(self.now * 1000) + self.ts_offset) & M32

    def _emit(self, seq: int, flags: int, payload: bytes | memoryview = b"",
              options: bytes | None = None, window_field: int | None = None) -> None:
        field = self.adv_field if window_field is None else window_field
        head = self.template.build(seq, self.rcv_nxt, flags, field, payload, options, self.mss,
                                   self._tsval(), self.ts_recent)
        self.actions.append(SendFrame(head, payload))
        if flags & ACK:
            self.last_ack_sent = self.rcv_nxt
            self.ack_pending = False
            # What the guest now believes it may send up to (RFC 7323 §2.2: the window
            # of a SYN is never scaled).
            shift = 0 if flags & SYN else self.our_wscale
            self.adv_edge = (self.rcv_nxt + (field << shift)) & M32

    def _abort(self, rst_guest: bool, abortive_host: bool = True) -> None:
        """Reset the flow both ways (or only toward the host when the guest reset it)."""
        if self.closed:
            return
        if rst_guest and self.state is not TcpState.CONNECTING:
            self._emit(self._ack_seq(), RST | ACK)
        elif rst_guest:
            self._emit(0, RST | ACK)
        self._event(TcpEvent.ABORT)
        self.actions.append(CloseHost(abortive_host))

    def _arm_rto(self, now: float) -> None:
        in_flight = self.bytes_in_flight or (self.fin_seq is not None and not self.fin_acked)
        self.rto_at = now + rto_s(self.retries, self.syn_retransmitted) if in_flight else None

    def next_deadline(self) -> float | None:
        """The earliest time at which `on_timer` has something to do."""
        best = self.idle_at
        for t in (self.connect_deadline, self.syn_at, self.rto_at, self.persist_at,
                  self.ack_check_at):
            if t is not None and t < best:
                best = t
        return best

    # -- handshake -----------------------------------------------------------------

    def on_connect_result(self, ok: bool, facts: SocketFacts | None, now: float) -> None:
        """The host connect() finished: SYN-ACK the guest, or refuse it with RST."""
        if self.state is not TcpState.CONNECTING:
            return
        self.now = now
        self.connect_deadline = None
        if not ok:
            self._abort(rst_guest=True, abortive_host=False)
            return
        self._event(TcpEvent.CONNECT_OK)
        self._send_syn_ack(facts)
        self.syn_at = now + syn_timeout_s(0)

    def _send_syn(self, facts: SocketFacts | None) -> None:
        """Our SYN to the guest (inbound flows): window unscaled (RFC 7323 §2.2), and
        every option offered; timestamps only if the template has room for them."""
        window = advertised_window(facts)
        self.adv_field = min(window, 0xFFFF)
        ts = (self._tsval(), 0) if self.template.timestamps else None
        self._emit(self.iss, SYN, options=tcp_options_syn(self.our_mss, OUR_WSCALE, ts),
                   window_field=self.adv_field)

    def _on_guest_syn_ack(self, seg: TcpSegment, now: float) -> None:
        """The guest answered our SYN (RFC 9293 §3.10.7.3): take its options, ACK it."""
        if seg.ack != self.snd_una:
            # Not an answer to our SYN: reset it (§3.10.7.3, "a RST with seq = SEG.ACK").
            self._emit(seg.ack, RST, window_field=0)
            return
        if seg.tsval is None and self.template.timestamps:
            self.template = self.template.with_timestamps(False)
        self._learn_guest_syn(seg)
        self._event(TcpEvent.GUEST_SYN_ACK)
        self.syn_at = None
        self.retries = 0
        self.adv_field = encode_window(self.adv_field, self.our_wscale)
        self._emit(self.snd_nxt, ACK)
        self._arm_rto(now)

    def _send_syn_ack(self, facts: SocketFacts | None) -> None:
        window = advertised_window(facts)
        field = min(window, 0xFFFF)  # unscaled in a SYN (RFC 7323 §2.2)
        self.adv_field = encode_window(window, self.our_wscale)
        wscale = self.our_wscale if self.guest_wscale or self.our_wscale else None
        ts = (self._tsval(), self.ts_recent) if self.template.timestamps else None
        self._emit(self.iss, SYN | ACK, options=tcp_options_syn(self.our_mss, wscale, ts),
                   window_field=field)

    # -- guest -> host ------------------------------------------------------------

    def on_guest_segment(self, seg: TcpSegment, now: float) -> memoryview | None:
        """Process one guest segment. Returns the new in-order payload to write to the
        host socket (then call `on_host_accepted`), or None."""
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
        if self.closed or self.state not in GUEST_SENDING:
            if flags & FIN or seg.payload:
                self._emit(self._ack_seq(), ACK)  # retransmitted FIN/data after guest FIN
            return None
        return self._accept_payload(seg)

    def _in_syn_sent(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.3: in SYN-SENT a RST counts only if it acknowledges our SYN
        (the guest refused: the host client is reset at once), and only a SYN-ACK
        establishes; anything else is dropped."""
        flags = seg.flags
        if flags & RST:
            if flags & ACK and seg.ack == self.snd_una:
                self._abort(rst_guest=False, abortive_host=True)
            return
        if flags & SYN and flags & ACK:
            self._on_guest_syn_ack(seg, now)

    def _process_ack(self, seg: TcpSegment, now: float) -> None:
        ack = seg.ack
        if self.state is TcpState.SYN_RCVD:
            if ack != self.snd_una:
                return
            self._event(TcpEvent.ACK_OF_SYN)
            self.syn_at = None
            self.retries = 0
        window = seg.window << self.guest_wscale
        fin_end = None if self.fin_seq is None else (self.fin_seq + 1) & M32
        highest = fin_end if fin_end is not None else self.snd_max
        if seq_lt(self.snd_una, ack) and seq_le(ack, highest):
            if fin_end is not None and ack == fin_end:
                data_ack = self.fin_seq
                if not self.fin_acked:
                    self.fin_acked = True
                    self._event(TcpEvent.OUR_FIN_ACKED)
            else:
                data_ack = ack
            acked = (data_ack - self.snd_una) & M32  # type: ignore[operator]
            if acked:
                self.actions.append(ConsumeHost(acked))
                self.bytes_to_guest += acked
            self.snd_una = data_ack  # type: ignore[assignment]
            if seq_lt(self.snd_nxt, self.snd_una):
                self.snd_nxt = self.snd_una  # acked beyond a rewind point
            self.retries = 0
            self.dup_acks = 0
            self.persist_count = 0
            self.persist_at = None
            self.guest_wnd_edge = (self.snd_una + window) & M32
            self._arm_rto(now)
            if self.closed:
                self.actions.append(CloseHost(False))
            return
        if ack == self.snd_una:
            new_edge = (ack + window) & M32
            if (self.bytes_in_flight and not seg.payload and not seg.flags & FIN
                    and new_edge == self.guest_wnd_edge):
                self.dup_acks += 1
                if self.dup_acks == DUP_ACK_THRESHOLD:
                    self._rewind()  # RFC 5681 §3.2 fast retransmit (go-back-N, no SACK)
            self.guest_wnd_edge = new_edge

    def _accept_payload(self, seg: TcpSegment) -> memoryview | None:
        payload = seg.payload
        fin = bool(seg.flags & FIN)
        offset = seq_diff(self.rcv_nxt, seg.seq)
        if offset < 0:
            # A gap: data after a loss. Duplicate ACK right away (not coalesced) so the
            # guest's fast retransmit sees one per out-of-order segment.
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
        self._pending_len = len(payload) - offset
        if self._pending_len == 0:
            self.on_host_accepted(0, self.now)
            return None
        return payload[offset:]

    def on_host_accepted(self, nbytes: int, now: float) -> None:
        """The host socket took `nbytes` of what `on_guest_segment` returned."""
        self.now = now
        self.rcv_nxt = (self.rcv_nxt + nbytes) & M32
        self.bytes_from_guest += nbytes
        if nbytes:
            self.ack_pending = True
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

    def on_host_writable(self, now: float) -> None:
        """The host socket has room again after a short write: tell the guest."""
        del now
        if self.write_blocked and not self.closed:
            self.write_blocked = False
            # A window update plus duplicate ACKs, so the guest retransmits what we
            # dropped without waiting for its RTO (RFC 5681 §3.2).
            self.ack_pending = True
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
        step = self.frame_payload_max
        end = len(data)
        for start in range(0, end, step):
            chunk = data[start:start + step]
            flags = ACK | PSH if start + step >= end else ACK
            self._emit(self.snd_nxt, flags, chunk)
            self.snd_nxt = (self.snd_nxt + len(chunk)) & M32
        if seq_lt(self.snd_max, self.snd_nxt):
            self.snd_max = self.snd_nxt
        if self.fin_seq is not None and self.snd_nxt == self.fin_seq:
            self._emit(self.fin_seq, FIN | ACK)  # retransmitted data caught up with the FIN
        if self.rto_at is None:
            self._arm_rto(now)

    def on_host_blocked(self, now: float) -> None:
        """The host has data but `host_read_budget()` is 0: probe a zero window."""
        if (self.persist_at is None and not self.bytes_in_flight
                and self.state in HOST_SENDING):
            self.persist_at = now + rto_s(self.persist_count, False)

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

    def on_guest_gone(self) -> None:
        """The guest's transport went away: nothing more to send it; forget the flow."""
        if not self.closed:
            self._event(TcpEvent.ABORT)
        self.actions.clear()

    def _rewind(self) -> None:
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
            self.retries += 1
            if self.retries > SYN_RETRIES_MAX:
                # Inbound: the guest never answered; the host client is reset. Nothing
                # toward a guest that has no connection yet.
                self._abort(rst_guest=self.state is not TcpState.SYN_SENT)
                return
            self.syn_retransmitted = True
            if self.state is TcpState.SYN_SENT:
                self._send_syn(facts)
            else:
                self._send_syn_ack(facts)
            self.syn_at = now + syn_timeout_s(self.retries)
        if self.rto_at is not None and self.rto_at <= now:
            self.retries += 1
            if self.retries > DATA_RETRIES_MAX:
                self._abort(rst_guest=True)
                return
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
                # the relay's time. Its next segment brings the short interval back, and
                # a guest held at zero window probes us itself (RFC 9293 §3.8.6.1).
                if self.rcv_nxt != self.ack_check_rcv:
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
