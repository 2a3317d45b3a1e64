"""`TcpHandshake`: how a relayed TCP flow is established, and the flow state it shares
with the rest of its state machine (`TcpNatEntry` in nat_entry.py, which extends it).

Outbound (the guest connects out). The guest's SYN opens the flow in CONNECTING and
tells its ISN, MSS, window scale and timestamps (`_learn_guest_syn`); the shell starts
the host connect(). Only when that succeeds does the guest get our SYN-ACK
(`on_connect_result`); a refused or timed-out connect answers the guest's SYN with a
RST (the connect deadline is `on_timer`'s, in nat_entry.py). The guest's ACK of our
SYN (SYN_RCVD -> ESTABLISHED), or its SYN again when our SYN-ACK was lost, arrives
through `on_guest_segment` like any segment and is handled there, in nat_entry.py.

Inbound (a host client on a forwarded port). `TcpNatEntry.inbound` SYNs the guest at
once (SYN_SENT); its SYN-ACK decides which options are in force and establishes the
flow, its RST refuses it (`_in_syn_sent`).

Either SYN is retransmitted on its own timer, `syn_at` (`_on_syn_timeout`, called from
`on_timer`), until SYN_RETRIES_MAX.

The class also declares every slot of the flow, once, and the primitives both halves
send and close with: `_emit` (one segment to the guest), `_abort`, `_arm_rto`.

RFCs: RFC 9293 (§3.10.7.3 SYN-SENT), RFC 7323 §2.2 and §3 (window scale and timestamps
are offered in SYNs only), RFC 6691 (the MSS excludes options), RFC 6298 (RTO).
"""

from __future__ import annotations

from typing import Self

from relaynat.ooo_queue import OooBudget, OooQueue
from relaynat.packet_builder import (
    TS_OPTION_LEN,
    TcpFrameTemplate,
    tcp_options_sack,
    tcp_options_syn,
)
from relaynat.sack_scoreboard import SackScoreboard
from relaynat.tcp_actions import M32, Action, CloseHost, SendFrame
from relaynat.tcp_state import GUEST_SENDING, TcpEvent, TcpState, next_state
from relaynat.window import (
    OUR_WSCALE,
    SYN_RETRIES_MAX,
    SocketFacts,
    advertised_window,
    encode_window,
    mss_for_guest,
    negotiate_wscale,
    rto_s,
    rtt_update,
    syn_timeout_s,
)
from relaynat.wire import ACK, RST, SYN, TcpSegment

#: SACK blocks that fit the 40 bytes of option space beside timestamps, and without
#: them (RFC 2018 §3).
SACK_BLOCKS_WITH_TS = 3
SACK_BLOCKS_NO_TS = 4

#: Largest TCP payload in one IPv4 frame without options (65535 - 20 - 20): the size of
#: a GSO super-frame toward an offloading TAP.
MAX_GSO_PAYLOAD = 65495
#: A TSecr further back than this is not one of ours from this flow's life (a guest
#: echoing garbage, or a clock wrap): no round-trip sample from it.
RTT_SAMPLE_MAX_MS = 60_000


class TcpHandshake:
    """A flow's state and its establishment; `TcpNatEntry` adds the rest."""

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
        "guest_rttvar",
        "guest_srtt",
        "guest_wnd_edge",
        "guest_wscale",
        "idle_at",
        "idle_timeout_s",
        "iss",
        "last_ack_sent",
        "mss",
        "mtu",
        "now",
        "ooo",
        "ooo_budget",
        "our_mss",
        "our_wscale",
        "persist_at",
        "persist_count",
        "rcv_nxt",
        "retries",
        "rto_at",
        "rtt_exp",
        "rtt_tsecr",
        "sack_ok",
        "sacked",
        "snd_max",
        "snd_nxt",
        "snd_una",
        "stalled_since",
        "state",
        "syn_at",
        "syn_retransmitted",
        "template",
        "tlp_at",
        "ts_offset",
        "ts_recent",
        "write_blocked",
    )

    def __init__(self, syn: TcpSegment | None, *, template: TcpFrameTemplate, mtu: int,
                 iss: int, now: float, connect_timeout_s: float = 10.0,
                 idle_timeout_s: float = 7200.0, ooo_budget: OooBudget | None = None) -> None:
        """A flow opened by the guest's `syn` (outbound). `TcpNatEntry.inbound` opens
        one toward the guest instead (syn None here). `ooo_budget`: the relay's budget
        for out-of-order guest data (ooo_queue.py); None or a zero limit keeps none,
        and SACK is then not offered."""
        self.template = template
        self.ooo_budget = ooo_budget if ooo_budget is not None and ooo_budget.limit else None
        self.ooo: OooQueue | None = None
        self.sack_ok = False
        #: The guest's SACK blocks of our data (sack_scoreboard.py); made on first use.
        self.sacked: SackScoreboard | None = None
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
        #: When the data RTO first expired without an ACK since (window.DATA_GIVE_UP_S).
        self.stalled_since: float | None = None
        #: The guest's smoothed round trip and its variation, seconds (window.rto_s);
        #: None until the timestamps it echoes gave a sample.
        self.guest_srtt: float | None = None
        self.guest_rttvar = 0.0
        self.rtt_tsecr: int | None = None  # the TSecr of the last sample
        #: When a tail loss probe is due (RFC 8985 §7); None: none armed.
        self.tlp_at: float | None = None
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
                facts: SocketFacts | None, idle_timeout_s: float = 7200.0,
                ooo_budget: OooBudget | None = None) -> Self:
        """A flow a host client opened on a forwarded port: SYN the guest now, offering
        our MSS, window scale and (if `template` has room for them) timestamps; the
        guest's SYN-ACK decides what is in force (RFC 7323 §2.2, §3.2). The host socket
        is connected already, so there is no connect deadline."""
        entry = cls(None, template=template, mtu=mtu, iss=iss, now=now,
                    idle_timeout_s=idle_timeout_s, ooo_budget=ooo_budget)
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
        # RFC 2018 §2: SACK blocks may be sent once the guest's SYN permitted them (for
        # an inbound flow, its SYN-ACK answering ours); only with a queue to report.
        self.sack_ok = syn.sack_permitted and self.ooo_budget is not None
        # RFC 6691: the MSS excludes options, so each segment's payload shrinks by ours;
        # a guest's tiny MSS is raised to a floor first (window.MIN_SND_MSS).
        ts_len = TS_OPTION_LEN if self.template.timestamps else 0
        ip_hlen = 40 if self.template.ipv6 else 20
        self.mss = mss_for_guest(syn.mss, self.mtu, ip_hlen, ts_len)
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
        if self.ooo is not None and self.state not in GUEST_SENDING:
            # The guest's FIN was taken (or the flow ended): nothing held is data now.
            self.ooo.clear()
            self.ooo = None

    def _sample_rtt(self, tsecr: int | None) -> None:
        """RFC 7323 §4.1: an ACK of new data (our SYN included: it takes a sequence
        number) echoes the TSval of the segment that made it (§4.3), so now minus TSecr
        is a round trip of the guest's (RFC 6298 §2). One sample per TSval (a 1 ms
        tick), not per ACK of a download's many. A TSecr echoes one transmission, so
        Karn's rule does not hold a retransmitted SYN-ACK's back (§4.1)."""
        if tsecr is None or tsecr == self.rtt_tsecr or not self.template.timestamps:
            return
        self.rtt_tsecr = tsecr
        sample_ms = (self._tsval() - tsecr) & M32
        if sample_ms < RTT_SAMPLE_MAX_MS:
            self.guest_srtt, self.guest_rttvar = rtt_update(
                self.guest_srtt, self.guest_rttvar, sample_ms / 1000)

    def _tsval(self) -> int:
        """Our timestamp clock: milliseconds (RFC 7323 §5.4 allows 1 ms to 1 s ticks)."""
        return (int(self.now * 1000) + self.ts_offset) & M32

    def _emit(self, seq: int, flags: int, payload: bytes | memoryview = b"",
              options: bytes | None = None, window_field: int | None = None) -> None:
        field = self.adv_field if window_field is None else window_field
        if (self.ooo is not None and self.sack_ok and not payload and options is None
                and not flags & RST):
            # RFC 2018 §4: every ACK while data is held reports it. Not on data frames:
            # their size was fixed by the MSS with the timestamp option only.
            options = self._sack_options()
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

    def _sack_options(self) -> bytes | None:
        assert self.ooo is not None
        ts = self.template.timestamps
        blocks = self.ooo.sack_blocks(SACK_BLOCKS_WITH_TS if ts else SACK_BLOCKS_NO_TS)
        if not blocks:
            return None
        return tcp_options_sack(blocks, (self._tsval(), self.ts_recent) if ts else None)

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
        self.rto_at = (now + rto_s(self.retries, self.syn_retransmitted, self.guest_srtt,
                                   self.guest_rttvar) if in_flight else None)

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

    def answer_before_connect(self, now: float, deadline: float) -> None:
        """Answer the guest's SYN before any host connect: a flow whose first flight the
        shell reads before it connects (first_flight.py). `deadline` is when that first
        flight must be in; it takes the connect deadline's place, so `on_timer` resets
        the flow then unless the shell decided first (`expect_connect`)."""
        if self.state is not TcpState.CONNECTING:
            return
        self.now = now
        self.connect_deadline = deadline
        self._event(TcpEvent.CONNECT_OK)
        self._send_syn_ack(None)
        self.syn_at = now + syn_timeout_s(0)

    def expect_connect(self, deadline: float) -> None:
        """The shell began the host connect of a flow answered before it
        (`answer_before_connect`): it must end by `deadline`."""
        self.connect_deadline = deadline

    def on_late_connect(self, ok: bool, now: float) -> None:
        """The host connect of a flow answered before it ended: nothing more to do but
        stop its deadline, or reset the guest if it failed."""
        self.now = now
        self.connect_deadline = None
        if not ok:
            self._abort(rst_guest=True, abortive_host=False)

    def _send_syn(self, facts: SocketFacts | None) -> None:
        """Our SYN to the guest (inbound flows): window unscaled (RFC 7323 §2.2), and
        every option offered; timestamps only if the template has room for them."""
        window = advertised_window(facts)
        self.adv_field = min(window, 0xFFFF)
        ts = (self._tsval(), 0) if self.template.timestamps else None
        options = tcp_options_syn(self.our_mss, OUR_WSCALE, ts, self.ooo_budget is not None)
        self._emit(self.iss, SYN, options=options, window_field=self.adv_field)

    def _on_guest_syn_ack(self, seg: TcpSegment, now: float) -> None:
        """The guest answered our SYN (RFC 9293 §3.10.7.3): take its options, ACK it."""
        if seg.ack != self.snd_una:
            # Not an answer to our SYN: reset it (§3.10.7.3, "a RST with seq = SEG.ACK").
            self._emit(seg.ack, RST, window_field=0)
            return
        if seg.tsval is None and self.template.timestamps:
            self.template = self.template.with_timestamps(False)
        self._learn_guest_syn(seg)
        self._sample_rtt(seg.tsecr)
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
        self._emit(self.iss, SYN | ACK,
                   options=tcp_options_syn(self.our_mss, wscale, ts, self.sack_ok),
                   window_field=field)

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

    def on_guest_mac(self, mac: bytes, now: float) -> None:
        """The guest's Ethernet address is (newly) `mac`. Frames go there from now on (a
        template that follows the relay's `GuestMac` has it already: the relay calls
        this only on a change); an inbound SYN the guest has not answered is sent again
        at once: those before went to the broadcast address (a host client connected
        before the guest's first frame) or to a MAC the guest no longer has, and Linux's
        TCP discards segments not addressed to the host (tcp_v4_rcv: pkt_type !=
        PACKET_HOST), so waiting for the next backoff (up to 16 s) would only stall the
        client."""
        if self.closed:
            return
        if self.template.guest is None:
            template = self.template.with_guest_mac(mac)
            if template is self.template:
                return
            self.template = template
        if self.state is TcpState.SYN_SENT:
            self.now = now
            self._send_syn(None)

    def _on_syn_timeout(self, now: float, facts: SocketFacts | None) -> None:
        """`syn_at` passed: send our SYN (inbound) or SYN-ACK (outbound) again, or give
        up after SYN_RETRIES_MAX retransmissions."""
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
