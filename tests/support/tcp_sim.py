"""A simulated guest, lossy link and host socket around one `TcpNatEntry`.

A testing kit for the sans-I/O TCP core: `TcpSim(Scenario(...)).run()` drives a whole
conversation through one entry with a fake clock, no kernel and no event loop, and
raises `SimFailure` (an AssertionError, with a trace of the last events) the moment
any invariant breaks. tests/unit/test_nat_entry.py feeds it hypothesis-chosen scenarios.

The pieces:

* `GuestTcp`: the guest's end, a small but honest TCP: RFC 9293 acceptability rules
  (with Linux's leniency: a segment without data is acceptable from the last window
  update's rcv_nxt up to the advertised right edge), an in-order receiver that ACKs
  every data segment at once and never shrinks its window, window scaling, go-back-N
  retransmission on RTO and on three duplicate ACKs, zero-window probes at
  snd_una - 1 (as Linux's tcp_probe_timer sends them), and rate-limited answers to
  out-of-window segments (Linux's tcp_invalid_ratelimit). Optionally timestamps, and
  SACK (RFC 2018): a scoreboard of the blocks the relay reports, skipped when it
  retransmits, and cleared on an RTO (§8: the receiver may renege).
* `HostSocket`: the host socket with Linux's semantics, and the shell's record of the
  flow beside it: host/tcp_flow.py's `HostFlow`, which `TcpFlow` implements on a
  kernel socket. Writes take some prefix (bounded by the send buffer, or any length
  the scenario's short-write rate picks; nothing at all is EAGAIN); the receive queue
  is peeked at `SO_PEEK_OFF` semantics (peeking advances the offset, dropping bytes
  from the head moves it back with them, never below 0, a rewind sets it to 0; a peek
  with nothing new is EAGAIN, or EOF after the peer's last byte).
* The relay's out-of-order queue (ooo_queue.py) gets its own `OooBudget`.
* The shell is the relay's own: host/flow_executor.py's `FlowExecutor` (with
  host/pump.py) carries out the entry's actions on the `HostSocket`, handles each
  guest segment, the flow's turn in a flush, the end of its connect() and its
  deadlines, as it does for `TcpRelay`. `TcpSim` plays `TcpRelay`'s part around it:
  the flow table of one flow, readiness, when a flush and a timer run.
* `TcpSim`: links in both directions that lose, duplicate and reorder frames, and a
  scheduler that runs a chaos phase (random event order, faults, a flush that finds
  the relay's time slice spent) and then a reliable phase until the conversation is
  complete.

Checked on every step (see `TcpSim._check_frame`, `_before_actions`, `_after_entry`,
and `HostSocket`'s calls), around the executor's calls, not in a copy of it:
every frame toward the guest parses with relaynat.wire and has valid checksums (or,
with offload, the partial one and a consistent virtio-net header); every data byte
sent to the guest is the right byte of the host stream and lies inside the right edge
the guest advertised; the relay never acknowledges guest bytes the host socket has not
accepted; the host socket receives the guest's stream in order, each byte once; the
peek offset, once the acknowledged bytes the shell has yet to drop are dropped, equals
`bytes_in_flight`, and is exactly that whenever it peeks (a resend's peek puts it back);
`ConsumeHost` only drops bytes the guest has received; a peek's buffer is overwritten
once its actions ran, so the entry cannot keep it; nothing happens after `CloseHost`,
and an orderly close leaves no unread byte (else close() resets the peer); when the
shell returns to the loop, no action is left queued; the out-of-order queue holds
exactly the guest's bytes at their offsets, beyond rcv_nxt, within its budget (which
is all given back once the guest can send no more); SACK blocks go out only when
negotiated, on segments without data, and cover only bytes the guest sent and the
relay holds or delivered.
"""

from __future__ import annotations

import random
import struct
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import cast

from relaynat.checksum import fold, pseudo_header_sum, verify
from relaynat.host.flow_executor import TURN_DONE, TURN_WAIT, FlowExecutor
from relaynat.nat_entry import TcpNatEntry
from relaynat.ooo_queue import CHUNK_OVERHEAD, OooBudget
from relaynat.packet_builder import (
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VNET_HDR,
    TcpFrameTemplate,
    tcp_options_sack,
    tcp_options_syn,
)
from relaynat.tcp_actions import (
    CloseHost,
    ConsumeHost,
    ResendHost,
    RewindHost,
    SendFrame,
    ShutdownHostWrite,
    rst_for_unknown,
)
from relaynat.tcp_state import GUEST_SENDING, TcpState
from relaynat.window import MIN_SND_MSS, OUR_WSCALE, SocketFacts, TcpInfo
from relaynat.wire import (
    ACK,
    ETHERTYPE_IPV4,
    FIN,
    IPPROTO_TCP,
    RST,
    SYN,
    MalformedFrame,
    TcpSegment,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
    seq_diff,
    seq_le,
    seq_lt,
)

M32 = 0xFFFFFFFF
MTU = 65520
GUEST_MAC = bytes.fromhex("525400123456")
RELAY_MAC = bytes.fromhex("525400000002")
GUEST_IP = bytes((10, 0, 2, 15))
REMOTE_IP = bytes((93, 184, 216, 34))
GUEST_PORT = 40000
REMOTE_PORT = 443
TS_PREFIX = b"\x01\x01\x08\x0a"
#: The most a short peek returns during chaos (the relay's buffer is larger).
PEEK_BUF = 65536
#: One traced event: when, what (a str.format template, or "relay> "/"guest> " for a
#: segment), and its arguments. Formatted only when a check fails: most conversations
#: never show their trace, and formatting every frame's cost a tenth of a run.
TraceEvent = tuple[float, str, tuple[object, ...]]


class SimFailure(AssertionError):
    """An invariant broke; the message carries the scenario, the state and a trace."""


@dataclass
class Scenario:
    """One conversation. Offsets and sizes are in bytes, times in seconds."""

    guest_data: bytes = b""
    host_data: bytes = b""
    guest_isn: int = 1000
    relay_iss: int = 5000
    #: The guest's MSS option (also its own sending segment size).
    guest_mss: int = 1460
    #: Window scale the guest's SYN offers (None: no option, no scaling either way).
    guest_wscale: int | None = 7
    #: The guest's receive buffer: the window it advertises when its app keeps up.
    guest_rcvbuf: int = 65535
    #: Usable bytes of the host socket's send buffer (SO_SNDBUF reports twice this).
    host_sndbuf: int = 65536
    #: What the host socket's SO_RCVBUF says at first; the peer's unread bytes stay
    #: within half of it (the rest is the kernel's overhead), so that a long flight toward
    #: the guest gets through as the shell grows it (host/pump.py). None: unbounded.
    host_rcvbuf: int | None = None
    host_rcv_space: int = 14600
    rtt_us: int = 1000
    guest_fin: bool = True
    host_fin: bool = True
    #: With both FINs: None (any order), "guest_first" (the host peer closes only
    #: once the relay shut the host socket down), "host_first" (the guest app closes
    #: only after the guest received the relay's FIN) or "crossing" (the host peer
    #: closes right after the guest sent its FIN, so the two FINs may cross).
    fin_order: str | None = None
    #: Fault rates, per frame (loss, dup, reorder) and per host write (short_write).
    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    short_write: float = 0.0
    #: Weight of "advance the clock now" among the other events during the chaos
    #: phase, so timers fire while frames are still in flight.
    premature_tick: float = 0.0
    #: Probability that the shell defers its end-of-batch flush during chaos.
    defer_flush: float = 0.3
    #: Probability that a flush during chaos finds the relay's time slice spent by
    #: other flows: the flow waits for the next one, its ACK too (host/pump.py).
    slice_spent: float = 0.05
    #: Frames carry a virtio-net header and use checksum/segmentation offload.
    offload: bool = False
    #: The host peer reads at most once per instant of the fake clock, so a full send
    #: buffer (a zero window toward the guest) lasts until timers have run.
    slow_peer: bool = False
    #: The guest sends zero-window probes. Without them, a guest facing a closed window
    #: depends on the relay announcing the reopened window by itself.
    guest_probes: bool = True
    #: The guest's SYN offers RFC 7323 timestamps (TSval clock: ms + guest_ts_base).
    guest_timestamps: bool = False
    guest_ts_base: int = 0
    #: The guest's SYN offers SACK (RFC 2018 §2).
    guest_sack: bool = False
    #: The relay's budget for out-of-order data (0: it holds none and offers no SACK).
    ooo_budget: int = 1 << 20
    #: Pass SocketFacts (instead of None) with the connect result.
    facts_on_connect: bool = False
    #: The shell gathers back-to-back payloads and writes them at the end of the batch,
    #: as tcp_relay does for a transport that keeps its frames.
    gather: bool = False
    chaos_events: int = 3000
    max_events: int = 200_000
    #: Fail when nothing moves (bytes, acknowledgements, states) for this long.
    stall_s: float = 600.0
    seed: int = 0


class GuestTcp:
    """The guest's TCP endpoint (see the module docstring)."""

    RTO_S = 0.2
    RTO_MAX_S = 10.0
    OOW_ACK_INTERVAL_S = 0.5

    def __init__(self, sim: TcpSim, sc: Scenario) -> None:
        self.sim = sim
        self.data = sc.guest_data
        self.isn = sc.guest_isn & M32
        self.mss = sc.guest_mss
        self.offer_ws = sc.guest_wscale
        ws = sc.guest_wscale or 0
        self.rcvbuf = max(1, min(sc.guest_rcvbuf, 0xFFFF << ws))
        self.template = TcpFrameTemplate(dst_mac=RELAY_MAC, src_mac=GUEST_MAC, src=GUEST_IP,
                                         dst=REMOTE_IP, sport=GUEST_PORT, dport=REMOTE_PORT)
        self.state = "CLOSED"
        self.reset = False
        # Send side, as offsets from isn + 1; the FIN takes offset len(data).
        self.written = 0
        self.fin_wanted = False
        self.una = self.nxt = self.max_sent = 0
        self.snd_mss = self.mss
        self.peer_ws = 0
        self.peer_edge = 0
        self.dupacks = 0
        self.backoff = 0
        self.rto_at: float | None = None
        self.persist_at: float | None = None
        self.persist_backoff = 0
        self.syn_at: float | None = None
        self.syn_tries = 0
        # Receive side, as offsets from irs + 1.
        self.irs: int | None = None
        self.ws = 0
        self.rcv = bytearray()
        self.rcv_nxt = 0
        self.rcv_fin = False
        self.rcv_wup = 0
        self.unread = 0
        self.adv_edge = 0
        self.last_oow_ack = float("-inf")
        # RFC 7323 timestamps.
        self.ts_on = False
        self.ts_base = sc.guest_ts_base
        self.ts_recent = 0
        self.tsvals_sent: set[int] = set()
        # RFC 2018 SACK: in force, and the scoreboard as sorted [start, end) offsets.
        self.sack_on = False
        self.sacked: list[tuple[int, int]] = []
        # As a SACK receiver: data beyond a hole, {offset: bytes}, the FIN's offset if it
        # came beyond one, and the offset of the newest such arrival (RFC 2018 §4 puts
        # its block first).
        self.held: dict[int, bytes] = {}
        self.held_fin: int | None = None
        self.held_newest = 0
        self.now = 0.0

    # -- helpers ------------------------------------------------------------------------

    @property
    def fin_sent(self) -> bool:
        return self.max_sent > len(self.data)

    def next_deadline(self) -> float | None:
        times = [t for t in (self.syn_at, self.rto_at, self.persist_at) if t is not None]
        return min(times) if times and not self.reset else None

    def _rto(self) -> float:
        return min(self.RTO_S * (1 << min(self.backoff, 16)), self.RTO_MAX_S)

    def _window_field(self) -> int:
        """Advertise what the buffer has room for, never pulling the right edge back
        (RFC 9293 §3.8.6.2.2), rounded up to the shift's unit so it cannot shrink."""
        room = max(0, self.rcvbuf - self.unread)
        edge = max(self.adv_edge, self.rcv_nxt + room)
        need = max(0, edge - self.rcv_nxt)
        fld = min(-(-need >> self.ws), 0xFFFF)
        self.adv_edge = max(self.adv_edge, self.rcv_nxt + (fld << self.ws))
        self.rcv_wup = self.rcv_nxt
        return fld

    def _tsval(self) -> int:
        tsval = (int(self.now * 1000) + self.ts_base) & M32
        self.tsvals_sent.add(tsval)
        return tsval

    def _send(self, off: int, flags: int, payload: bytes = b"") -> None:
        assert self.irs is not None
        seq = (self.isn + 1 + off) & M32
        ack = (self.irs + 1 + self.rcv_nxt) & M32
        blocks = self._sack_blocks() if not payload else []
        if blocks:
            opts = tcp_options_sack(blocks, (self._tsval(), self.ts_recent)
                                    if self.ts_on else None)
        else:
            opts = (TS_PREFIX + struct.pack("!II", self._tsval(), self.ts_recent)
                    if self.ts_on else b"")
        head = self.template.build(seq, ack, flags, self._window_field(), payload, opts)
        self.sim.guest_sends(head + payload)

    def _sack_blocks(self) -> list[tuple[int, int]]:
        """What we hold beyond a hole, as RFC 2018 §4 orders it: the block holding the
        newest arrival first, then the others (highest first), as many as fit."""
        if not self.held:
            return []
        ranges: list[list[int]] = []
        for off in sorted(self.held):
            end = off + len(self.held[off])
            if ranges and off <= ranges[-1][1]:
                ranges[-1][1] = max(ranges[-1][1], end)
            else:
                ranges.append([off, end])
        newest = [r for r in ranges if r[0] <= self.held_newest < r[1]]
        ordered = newest + [r for r in reversed(ranges) if r not in newest]
        assert self.irs is not None
        irs1 = (self.irs + 1) & M32
        fit = 3 if self.ts_on else 4
        return [((irs1 + lo) & M32, (irs1 + hi) & M32) for lo, hi in ordered[:fit]]

    def _send_ack(self) -> None:
        # Like Linux, a segment without data carries snd_nxt, which never moves back.
        self._send(self.max_sent, ACK)

    # -- application ------------------------------------------------------------------

    def connect(self, now: float) -> None:
        self.now = now
        self.state = "SYN_SENT"
        self._send_syn()
        self.syn_at = now + 1.0

    def _send_syn(self) -> None:
        window = min(self.rcvbuf, 0xFFFF)  # RFC 7323 §2.2: never scaled in a SYN
        self.adv_edge = max(self.adv_edge, window)
        ts = (self._tsval(), 0) if self.sim.sc.guest_timestamps else None
        head = self.template.build(self.isn, 0, SYN, window, b"",
                                   tcp_options_syn(self.mss, self.offer_ws, ts,
                                                   self.sim.sc.guest_sack))
        self.sim.guest_sends(head)

    def app_write(self, nbytes: int, now: float) -> None:
        self.now = now
        self.written = min(len(self.data), self.written + nbytes)
        self.output(now)

    def app_close(self, now: float) -> None:
        self.now = now
        assert self.written == len(self.data)
        self.fin_wanted = True
        self.output(now)

    def app_read(self, nbytes: int, now: float) -> None:
        self.now = now
        window_before = self.adv_edge - self.rcv_nxt
        self.unread -= min(nbytes, self.unread)
        if self.state != "ESTABLISHED" or self.reset or self.rcv_fin:
            return
        # tcp_cleanup_rbuf: announce a window that at least doubled.
        room = self.rcvbuf - self.unread
        if (2 * window_before <= self.rcvbuf and room >> self.ws
                and room >= 2 * window_before and self.rcv_nxt + room > self.adv_edge):
            self._send_ack()

    # -- sending ---------------------------------------------------------------------------

    def output(self, now: float) -> None:
        if self.state != "ESTABLISHED" or self.reset:
            return
        end = len(self.data)
        while True:
            limit = min(self.written, self.peer_edge)
            skip = self._sacked_end(self.nxt) if self.nxt < self.max_sent else None
            if skip is not None:
                self.nxt = skip  # the relay holds these bytes: resend only the holes
                continue
            if self.nxt < limit:
                n = min(self.snd_mss, limit - self.nxt)
                fin = self.fin_wanted and self.nxt + n == end
                self._send(self.nxt, ACK | FIN if fin else ACK, self.data[self.nxt:self.nxt + n])
                self.nxt += n + fin
            elif self.fin_wanted and self.nxt == end:
                self._send(self.nxt, ACK | FIN)
                self.nxt += 1
            else:
                break
            self.max_sent = max(self.max_sent, self.nxt)
            if self.rto_at is None:
                self.rto_at = now + self._rto()
        # Zero window, nothing in flight, data waiting: probe (RFC 9293 §3.8.6.1).
        if (self.una == self.nxt and self.nxt < self.written and self.peer_edge <= self.nxt
                and self.sim.sc.guest_probes):
            if self.persist_at is None:
                self.persist_at = now + min(self.RTO_S * (1 << self.persist_backoff),
                                            self.RTO_MAX_S)
        else:
            self.persist_at = None
            self.persist_backoff = 0

    def _sacked_end(self, off: int) -> int | None:
        for start, end in self.sacked:
            if start <= off < end:
                return end
        return None

    def _on_sack(self, blocks: list[tuple[int, int]], ack: int) -> None:
        isn1 = (self.isn + 1) & M32
        for left, right in blocks:
            lo, hi = seq_diff(left, isn1), seq_diff(right, isn1)
            self.sim.check(ack <= lo < hi <= min(self.max_sent, len(self.data)),
                           f"SACK block +{lo}..+{hi} outside what the guest sent "
                           f"(ack +{ack}, sent +{self.max_sent})")
            self.sacked.append((lo, hi))
        merged: list[tuple[int, int]] = []
        for start, end in sorted(self.sacked):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
            else:
                merged.append((start, end))
        self.sacked = merged

    def on_timer(self, now: float) -> None:
        self.now = now
        if self.reset:
            return
        if self.syn_at is not None and self.syn_at <= now:
            self.syn_tries += 1
            self._send_syn()
            self.syn_at = now + (1 << self.syn_tries)
        if self.rto_at is not None and self.rto_at <= now:
            self.backoff += 1
            # Linux gives up after tcp_retries2 = 15 expiries without progress.
            self.sim.check(self.backoff <= 15, "the guest's retransmissions made no progress")
            self.rto_at = None
            self.nxt = self.una  # go-back-N
            self.sacked.clear()  # RFC 2018 §8: the relay may have reneged
            self.dupacks = 0
            self.output(now)
            if self.rto_at is None and self.una < self.max_sent:
                self.rto_at = now + self._rto()
        if self.persist_at is not None and self.persist_at <= now:
            self.persist_at = None
            self.persist_backoff += 1
            self._send(self.una - 1, ACK)  # Linux's zero-window probe: an old sequence
            self.sim.stats["guest_window_probes"] += 1
            self.output(now)

    # -- receiving ---------------------------------------------------------------------

    def on_segment(self, seg: TcpSegment, now: float) -> None:
        self.now = now
        if self.reset:
            return
        flags = seg.flags
        if self.state == "SYN_SENT":
            if flags & RST:
                if flags & ACK and seg.ack == (self.isn + 1) & M32:
                    self.reset = True
                return
            if flags & SYN and flags & ACK and seg.ack == (self.isn + 1) & M32:
                self.irs = seg.seq
                # Linux's floor as well (tcp_min_snd_mss): a guest with a tiny MSS of
                # its own still sends no segments below 48 bytes.
                self.snd_mss = max(MIN_SND_MSS, min(self.mss, seg.mss or 536))
                if self.sim.sc.guest_timestamps and seg.tsval is not None:
                    self.ts_on = True
                    self.ts_recent = seg.tsval
                    self.snd_mss -= len(TS_PREFIX) + 8  # RFC 6691
                if self.offer_ws is not None and seg.wscale is not None:
                    self.peer_ws, self.ws = seg.wscale, self.offer_ws
                self.sack_on = self.sim.sc.guest_sack and seg.sack_permitted
                self.peer_edge = seg.window  # unscaled in a SYN
                self.state = "ESTABLISHED"
                self.syn_at = None
                self._send_ack()
                self.output(now)
            return
        assert self.irs is not None
        off = seq_diff(seg.seq, (self.irs + 1) & M32)
        if self.ts_on and not flags & RST and seg.tsval is not None:
            # RFC 7323 §5.3 (PAWS): an older TSval than TS.Recent is a stale segment.
            if seq_lt(seg.tsval, self.ts_recent):
                self.sim.stats["paws_drops"] += 1
                return
            # §4.3: TS.Recent follows the segment at the left edge we acknowledge.
            if off <= self.rcv_wup:
                self.ts_recent = seg.tsval
        if flags & RST:
            if off == self.rcv_nxt:  # RFC 5961 §3.2: only the exact sequence
                self.reset = True
            return
        if flags & SYN:
            self._send_ack()  # the relay lost our ACK of its SYN-ACK
            return
        if flags & ACK:
            self._on_ack(seg, now)
        self._on_data(seg, off, now)
        self.output(now)

    def _on_ack(self, seg: TcpSegment, now: float) -> None:
        ack = seq_diff(seg.ack, (self.isn + 1) & M32)
        edge = ack + (seg.window << self.peer_ws)
        if seg.sack:
            self.sim.check(self.sack_on, "SACK blocks without SACK-permitted both ways")
            self._on_sack(seg.sack, ack)
        if ack > self.una:
            self.una = ack
            self.sacked = [(max(a, ack), b) for a, b in self.sacked if b > ack]
            self.nxt = max(self.nxt, ack)
            self.dupacks = 0
            self.backoff = 0
            self.peer_edge = edge
            self.rto_at = now + self._rto() if self.una < self.max_sent else None
        elif ack == self.una:
            if (not seg.payload and not seg.flags & FIN and self.una < self.max_sent
                    and edge == self.peer_edge):
                self.dupacks += 1
                if self.dupacks == 3:
                    self.nxt = self.una  # fast retransmit, go-back-N
            self.peer_edge = edge

    def _on_data(self, seg: TcpSegment, off: int, now: float) -> None:
        n = len(seg.payload)
        fin = bool(seg.flags & FIN)
        if not n and not fin:
            # Unacceptable (a probe, or an old sequence): a rate-limited duplicate ACK.
            if (not self.rcv_wup <= off <= self.adv_edge
                    and now - self.last_oow_ack >= self.OOW_ACK_INTERVAL_S):
                self.last_oow_ack = now
                self._send_ack()
            return
        if (self.sack_on and not self.rcv_fin and off > self.rcv_nxt
                and off + n <= self.adv_edge):
            # Beyond a hole: held, and reported in SACK blocks (RFC 2018), as Linux's
            # out-of-order queue does.
            if n:
                self.held[off] = bytes(seg.payload)
                self.held_newest = off
            if fin:
                self.held_fin = off + n
        if n and off <= self.rcv_nxt < off + n and not self.rcv_fin:
            new = seg.payload[self.rcv_nxt - off:]
            self.rcv += new
            self.unread += len(new)
            self.rcv_nxt = off + n
            self._take_held()
        if fin and not self.rcv_fin and self.rcv_nxt == off + n:
            self.rcv_fin = True
            self.rcv_nxt += 1
        self._send_ack()

    def _take_held(self) -> None:
        """The hole before held data filled: receive what now follows in order."""
        moved = True
        while moved:
            moved = False
            for off in sorted(self.held):
                data = self.held[off]
                if off + len(data) <= self.rcv_nxt:
                    del self.held[off]
                elif off <= self.rcv_nxt:
                    del self.held[off]
                    new = data[self.rcv_nxt - off:]
                    self.rcv += new
                    self.unread += len(new)
                    self.rcv_nxt = off + len(data)
                    moved = True
        if self.held_fin is not None and self.held_fin == self.rcv_nxt and not self.rcv_fin:
            self.rcv_fin = True
            self.rcv_nxt += 1
            self.held.clear()


@dataclass(eq=False)
class HostSocket:
    """The host socket, and the shell's record of the flow (see the module docstring).

    The second group of fields is host/tcp_flow.py's `HostFlow`, as `TcpFlow` has them:
    `FlowExecutor` keeps them, `TcpSim` only plays readiness (`host_readable`). The
    methods are `HostSocket`'s calls, each checking how the shell uses the socket."""

    sim: TcpSim
    capacity: int
    data: bytes
    received: bytearray = field(default_factory=bytearray)
    outq: int = 0
    shut_wr: bool = False
    closed: bool | None = None
    want_writable: bool = False
    produced: int = 0
    consumed: int = 0
    peek_off: int = 0
    eof: bool = False
    #: What SO_RCVBUF reports (`Scenario.host_rcvbuf`, else Linux's default tcp_rmem).
    rcvbuf_size: int = 131_072
    #: The next `facts()` says nothing (the connect result of `Scenario.facts_on_connect`).
    facts_refused: bool = False

    entry: TcpNatEntry | None = None
    connecting: bool = True
    host_readable: bool = False
    consume_pending: int = 0
    gathered: list[memoryview] | None = None
    rcvbuf_watch: int = 1 << 16
    rcvbuf_granted: int = 0
    host_addr: tuple[str, int] = ("93.184.216.34", REMOTE_PORT)

    def room(self) -> int:
        """What the peer may send now: the rest of its data, within the receive buffer
        when the scenario bounds it."""
        left = len(self.data) - self.produced
        if self.sim.sc.host_rcvbuf is None:
            return left
        return min(left, self.rcvbuf_size // 2 - (self.produced - self.consumed))

    def peek(self, view: memoryview, nbytes: int, send_pos: int) -> memoryview:
        sim = self.sim
        sim.check(self.closed is None, "peek after close")
        sim.check(send_pos == self.peek_off and not self.consume_pending,
                  f"peek at +{send_pos} in flight, the peek offset is at +{self.peek_off} "
                  f"with {self.consume_pending} acknowledged bytes not dropped")
        start = self.consumed + self.peek_off
        cap = sim.rng.randint(1, PEEK_BUF) if sim.chaos and sim.rng.random() < 0.3 \
            else len(view)
        n = min(nbytes, self.produced - start, cap, len(view))
        if n <= 0:
            if self.eof:
                return view[:0]
            raise BlockingIOError
        self.peek_off += n
        view[:n] = self.data[start:start + n]
        sim.peeked.append(view[:n])
        return view[:n]

    def peek_at(self, offset: int, length: int, view: memoryview, send_pos: int
                ) -> memoryview:
        sim = self.sim
        sim.check(sim.guest.sack_on, "a SACK resend without SACK in force")
        sim.check(send_pos == self.peek_off and not self.consume_pending,
                  f"resend with the send position at +{send_pos}, the peek offset at "
                  f"+{self.peek_off}, {self.consume_pending} acknowledged bytes not dropped")
        sim.check(length > 0 and offset >= 0 and offset + length <= self.peek_off,
                  f"ResendHost({offset}, {length}) outside the bytes in flight "
                  f"({self.peek_off})")
        n = min(length, len(view))
        start = self.consumed + offset
        view[:n] = self.data[start:start + n]
        sim.peeked.append(view[:n])
        sim.trace.append((sim.now, "peek {} at +{} for a resend", (n, offset)))
        return view[:n]

    def write(self, data: memoryview | list[bytes] | list[memoryview]) -> int:
        sim, sc = self.sim, self.sim.sc
        sim.check(self.closed is None and not self.shut_wr, "write after shutdown or close")
        chunks = [data] if type(data) is memoryview else data
        start = len(self.received)
        claimed = sim.stream_offset(data)
        sim.check(claimed == start, f"entry returned bytes at +{claimed}, the host has {start}")
        joined = b"".join(chunks)
        n = min(len(joined), max(0, self.capacity - self.outq))
        if sim.chaos and sim.rng.random() < sc.short_write:
            n = sim.rng.randint(0, n)
        if n < len(joined):
            self.want_writable = True
            sim.stats["short_writes"] += 1
        sim.trace.append((sim.now, "host write {}/{} at +{}", (n, len(joined), start)))
        if not n:
            raise BlockingIOError  # a full send buffer takes nothing: EAGAIN
        self.received += joined[:n]
        sim.check(self.received[start:] == sc.guest_data[start:start + n],
                  f"host got wrong bytes at +{start}")
        self.outq += n
        return n

    def discard(self, nbytes: int, scratch: bytearray) -> None:
        if not nbytes:
            return
        sim = self.sim
        sim.check(self.closed is None, "recv after close")
        sim.check(self.consumed + nbytes <= len(sim.guest.rcv),
                  "ConsumeHost of bytes the guest has not received")
        self.consumed += nbytes
        self.peek_off = max(0, self.peek_off - nbytes)
        sim.trace.append((sim.now, "consume {}", (nbytes,)))

    def rewind(self) -> None:
        sim = self.sim
        sim.check(not self.consume_pending,
                  "rewind before the acknowledged bytes were dropped (it counts from the head)")
        self.peek_off = 0
        sim.stats["rewinds"] += 1
        sim.trace.append((sim.now, "rewind", ()))

    def shutdown_write(self) -> None:
        sim = self.sim
        sim.check(not self.shut_wr and self.closed is None, "second shutdown")
        sim.check(len(self.received) == len(sim.sc.guest_data) and sim.guest.fin_sent,
                  "shutdown before the guest's last byte")
        self.shut_wr = True
        sim.trace.append((sim.now, "shutdown host write", ()))

    def close_socket(self, abortive: bool) -> None:
        sim = self.sim
        sim.check(self.closed is None, "second CloseHost")
        self.closed = abortive
        sim.close_actions.append(CloseHost(abortive))
        sim.trace.append((sim.now, "close host abortive={}", (abortive,)))
        sim.check(not abortive, "abortive close")
        if not abortive:
            # close() with unread data sends the peer a RST, not a FIN (tcp(7)).
            sim.check(self.consumed == self.produced,
                      f"orderly close with {self.produced - self.consumed} bytes unread")

    def facts(self) -> SocketFacts | None:
        sim = self.sim
        if self.facts_refused or (sim.chaos and sim.rng.random() < 0.1):
            self.facts_refused = False
            return None
        snd_wnd = sim.rng.randint(0, 2 * self.capacity) if sim.chaos else self.capacity
        return SocketFacts(TcpInfo(sim.sc.rtt_us, sim.sc.host_rcv_space, snd_wnd),
                           2 * self.capacity, self.outq)

    def rcvbuf(self) -> int:
        return self.rcvbuf_size

    def set_rcvbuf(self, size: int, force: bool) -> None:
        sim = self.sim
        sim.check(size > self.rcvbuf_size, f"receive buffer set from {self.rcvbuf_size} to {size}")
        self.rcvbuf_size = size
        sim.stats["rcvbuf_set"] += 1
        sim.trace.append((sim.now, "receive buffer {}", (size,)))


class SimExecutor(FlowExecutor[HostSocket]):
    """The relay's `FlowExecutor`, with the simulator's checks before and after every
    run of an entry's actions (the executor runs them after each peek, write and
    resend, so they are checked as often as they change); an exception propagates
    (`failed=None`) instead of resetting the flow."""

    def __init__(self, sim: TcpSim) -> None:
        super().__init__(sim.stats, sim._to_guest, sim, sim._untrack, None,
                         slice_clock=sim._slice_clock)
        self.sim = sim

    def execute(self, flow: HostSocket) -> None:
        self.sim._before_actions()
        super().execute(flow)
        self.sim._after_actions()


class TcpSim:
    """One conversation through one `TcpNatEntry` (see the module docstring)."""

    def __init__(self, sc: Scenario) -> None:
        self.sc = sc
        self.rng = random.Random(sc.seed)
        self.now = 0.0
        self.chaos = True
        self.guest = GuestTcp(self, sc)
        self.host = HostSocket(self, capacity=sc.host_sndbuf, data=sc.host_data)
        if sc.host_rcvbuf is not None:
            self.host.rcvbuf_size = sc.host_rcvbuf
        self.entry: TcpNatEntry | None = None
        self.ooo_budget = OooBudget(sc.ooo_budget)
        self.relay_template = self._template(timestamps=False)
        self.ts_in_use = False
        self.last_relay_tsval: int | None = None
        self.to_relay: list[bytes] = []
        self.to_guest: list[tuple[bytes, TcpSegment]] = []
        self.connect_pending = False
        self.dirty = False
        self.events = 0
        self.close_actions: list[CloseHost] = []
        self.stats: Counter[str] = Counter()
        #: Every state the entry was seen in, in order of first appearance.
        self.states: dict[TcpState, None] = {}
        self.trace: deque[TraceEvent] = deque(maxlen=60)
        self._drained_at = -1.0
        #: The relay's shell for this flow (host/flow_executor.py), checked around.
        self.executor = SimExecutor(self)
        self.executor.gather = sc.gather
        #: The flow left the shell's table (its CloseHost ran).
        self.untracked = False
        #: Views of the executor's peek buffer that the latest peeks filled: overwritten
        #: once their actions ran (`_after_actions`).
        self.peeked: list[memoryview] = []
        #: The relay's time slice is spent (`Scenario.slice_spent`) in this flush.
        self.slice_over = False
        #: Where the payloads the shell gathered start in the guest's stream, and the
        #: list it gathers them in; where the segment being handled ends.
        self.gathered_at: list[int] = []
        self.gathered_list: list[memoryview] | None = None
        self.seg_end: int | None = None
        #: A guest segment arrived that RFC 9293 §3.10.7.4 says must be acknowledged
        #: (data, FIN, or a sequence below rcv_nxt such as a zero-window probe); the
        #: entry owes an ACK by the end of the batch.
        self.owed_ack: TraceEvent | None = None

    def _template(self, timestamps: bool) -> TcpFrameTemplate:
        return TcpFrameTemplate(
            dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP, dst=GUEST_IP, sport=REMOTE_PORT,
            dport=GUEST_PORT, vnet_hdr_len=10 if self.sc.offload else 0,
            offload=self.sc.offload, timestamps=timestamps)

    # -- reporting ------------------------------------------------------------------------

    def fail(self, msg: str) -> None:
        sc = self.sc
        e, g, h = self.entry, self.guest, self.host
        lines = [
            msg,
            f"scenario: {replace(sc, guest_data=b'', host_data=b'')} "
            f"len(guest_data)={len(sc.guest_data)} len(host_data)={len(sc.host_data)}",
            f"now={self.now:.4f} events={self.events} chaos={self.chaos} stats={dict(self.stats)}",
        ]
        if e is not None:
            iss1, isn1 = (sc.relay_iss + 1) & M32, (sc.guest_isn + 1) & M32
            rel = {"snd_una": iss1, "snd_nxt": iss1, "snd_max": iss1, "guest_wnd_edge": iss1,
                   "rcv_nxt": isn1, "adv_edge": isn1}
            parts = [f"state={e.state.value}"]
            for name in (*rel, "fin_seq", "retries", "rto_at", "persist_at", "ack_check_at",
                         "write_blocked"):
                value = getattr(e, name, "?")  # the kit outlives renames in the core
                if name in rel and isinstance(value, int):
                    value = f"+{seq_diff(value, rel[name])}"
                parts.append(f"{name}={value}")
            parts.append(f"next_deadline={e.next_deadline()}")
            lines.append("entry: " + " ".join(parts))
        lines.append(
            f"guest: state={g.state} reset={g.reset} una={g.una} nxt={g.nxt} "
            f"max_sent={g.max_sent} written={g.written} fin_wanted={g.fin_wanted} "
            f"peer_edge={g.peer_edge} rcv_nxt={g.rcv_nxt} rcv_fin={g.rcv_fin} "
            f"adv_edge={g.adv_edge} unread={g.unread} rto_at={g.rto_at} "
            f"persist_at={g.persist_at}")
        lines.append(
            f"host: received={len(h.received)} outq={h.outq}/{h.capacity} shut_wr={h.shut_wr} "
            f"closed={h.closed} produced={h.produced} consumed={h.consumed} "
            f"peek_off={h.peek_off} eof={h.eof} host_readable={h.host_readable} "
            f"consume_pending={h.consume_pending} connecting={h.connecting} "
            f"untracked={self.untracked}")
        lines.append(f"links: to_relay={len(self.to_relay)} to_guest={len(self.to_guest)}")
        lines.append("last events:")
        lines.extend("  " + self.event_text(event) for event in self.trace)
        raise SimFailure("\n".join(lines))

    def check(self, cond: object, msg: str) -> None:
        if not cond:
            self.fail(msg)

    @staticmethod
    def seg_fields(seg: TcpSegment, base_seq: int, base_ack: int) -> tuple[object, ...]:
        """A segment as a trace event's arguments (flags, relative seq and ack, window,
        length): cheap to keep, formatted by `event_text` only if a check fails."""
        return (seg.flags, seq_diff(seg.seq, base_seq), seq_diff(seg.ack, base_ack),
                seg.window, len(seg.payload))

    @staticmethod
    def event_text(event: TraceEvent) -> str:
        now, what, args = event
        if what in ("relay> ", "guest> "):
            flags, seq, ack, window, length = cast("tuple[int, int, int, int, int]", args)
            names = "".join(c for c, bit in zip("FSRPAU", (1, 2, 4, 8, 16, 32), strict=True)
                            if flags & bit)
            return f"{now:.3f} {what}{names} seq+{seq} ack+{ack} win={window} len={length}"
        return f"{now:.3f} " + what.format(*args)

    # -- the guest's side of the link ---------------------------------------------------------

    def guest_sends(self, frame: bytes) -> None:
        self.to_relay.append(frame)
        self.stats["guest_frames"] += 1

    # -- the relay's frames ------------------------------------------------------------------

    def _check_frame(self, frame: bytes) -> TcpSegment:
        sc = self.sc
        g, h = self.guest, self.host
        vlen = 10 if sc.offload else 0
        try:
            eth = parse_ethernet(memoryview(frame)[vlen:])
            ip = parse_ipv4(eth.payload)
            seg = parse_tcp(ip)
        except MalformedFrame as exc:
            self.fail(f"the entry sent a frame that does not parse: {exc.reason}")
        self.check((eth.dst_mac, eth.src_mac, eth.ethertype) == (GUEST_MAC, RELAY_MAC,
                                                                 ETHERTYPE_IPV4), "ethernet")
        self.check((seg.src, seg.dst, seg.sport, seg.dport) == (
            REMOTE_IP, GUEST_IP, REMOTE_PORT, GUEST_PORT), "addresses or ports")
        pseudo = pseudo_header_sum(REMOTE_IP, GUEST_IP, IPPROTO_TCP, len(ip.payload))
        n = len(seg.payload)
        if sc.offload:
            vflags, gso_type, hdr_len, gso_size, csum_start, csum_off = VNET_HDR.unpack_from(frame)
            gso = n > self.entry_mss()
            self.check(vflags == VIRTIO_NET_HDR_F_NEEDS_CSUM and csum_start == 34
                       and csum_off == 16 and hdr_len == len(ip.payload) - n + 34,
                       "virtio-net header")
            self.check((gso_type, gso_size) == ((VIRTIO_NET_HDR_GSO_TCPV4, self.entry_mss())
                                                if gso else (VIRTIO_NET_HDR_GSO_NONE, 0)),
                       "virtio-net GSO fields")
            csum = int.from_bytes(ip.payload[16:18], "big")
            self.check(csum == fold(pseudo), "partial checksum")
        else:
            self.check(verify(ip.payload, pseudo), "TCP checksum")
            self.check(n <= self.entry_mss(), "segment larger than the guest's MSS")
        iss1 = (sc.relay_iss + 1) & M32
        isn1 = (sc.guest_isn + 1) & M32
        self.trace.append((self.now, "relay> ", self.seg_fields(seg, iss1, isn1)))
        if self.ts_in_use and seg.flags & ACK:
            self.check(seg.tsval is not None, "no timestamp option (RFC 7323 §3.2)")
            self.check(self.last_relay_tsval is None or seq_le(self.last_relay_tsval, seg.tsval),
                       "TSval went backwards (the guest's PAWS would drop it)")
            self.last_relay_tsval = seg.tsval
            self.check(seg.tsecr in g.tsvals_sent, f"TSecr {seg.tsecr} the guest never sent")
        elif not self.ts_in_use:
            self.check(seg.tsval is None, "timestamps the guest did not offer")
        if seg.flags & RST:
            self.check(False, "the entry reset the flow")
        if seg.flags & SYN:
            self.check(seg.flags == SYN | ACK and seg.seq == sc.relay_iss & M32
                       and seg.ack == isn1 and not n, "SYN-ACK")
            self.check(seg.mss == MTU - 40, "SYN-ACK MSS")
            self.check(seg.wscale == (OUR_WSCALE if sc.guest_wscale is not None else None),
                       "SYN-ACK window scale")
            self.check(seg.sack_permitted == (sc.guest_sack and sc.ooo_budget > 0),
                       "SYN-ACK SACK-permitted")
            return seg
        off = seq_diff(seg.seq, iss1)
        if n:
            self.check(off >= 0 and off + n <= h.produced, "data the host never sent")
            self.check(bytes(seg.payload) == sc.host_data[off:off + n],
                       f"wrong bytes at offset {off}")
            self.check(off + n <= g.adv_edge,
                       f"data up to +{off + n} beyond the guest's right edge +{g.adv_edge}")
        if seg.flags & FIN:
            self.check(h.eof and off + n == len(sc.host_data), "FIN at the wrong place")
        elif off < h.consumed + h.consume_pending:
            self.stats["relay_window_probes"] += 1
        if not seg.window:
            self.stats["relay_zero_windows"] += 1
        if seg.flags & ACK:
            ack = seq_diff(seg.ack, isn1)
            fin_ok = g.fin_sent and len(h.received) == len(sc.guest_data)
            self.check(ack <= len(h.received) + fin_ok,
                       f"ACK +{ack} of bytes the host socket did not accept "
                       f"({len(h.received)})")
        if seg.sack is not None:
            self._check_sack(seg, n)
        return seg

    def _check_sack(self, seg: TcpSegment, n: int) -> None:
        """SACK blocks (RFC 2018 §3, §4): negotiated, on segments without data (their
        size left no room), as many as fit, each held by the relay or delivered."""
        e, isn1 = self.entry, (self.sc.guest_isn + 1) & M32
        self.check(self.sc.guest_sack and not n and 0 < len(seg.sack) <= (
            3 if self.ts_in_use else 4), f"SACK option {seg.sack} on {seg}")
        held = [] if e is None or e.ooo is None else [
            (seq_diff(a, isn1), seq_diff(b, isn1)) for a, b, _ in e.ooo.blocks()]
        for left, right in seg.sack:
            lo, hi = seq_diff(left, isn1), seq_diff(right, isn1)
            self.check(hi <= len(self.host.received) or any(
                a <= max(lo, len(self.host.received)) and hi <= b for a, b in held),
                f"SACK block +{lo}..+{hi}: the relay holds {held}, "
                f"the host has {len(self.host.received)}")

    def entry_mss(self) -> int:
        """Payload per segment toward the guest (RFC 6691: options come off the MSS, after
        a tiny MSS was raised to Linux's tcp_min_snd_mss)."""
        mss = max(MIN_SND_MSS, min(self.sc.guest_mss, MTU - 40))
        return mss - (12 if self.ts_in_use else 0)

    # -- around the executor (SimExecutor) ------------------------------------------------

    def _to_guest(self, head: bytes, payload: bytes | memoryview) -> None:
        """The executor's frame toward the guest (`SendFrame`), onto the link."""
        frame = head + bytes(payload)
        seg = self._check_frame(frame)
        if seg.flags & ACK:
            self.owed_ack = None
        self.stats["relay_frames"] += 1
        self.to_guest.append((frame, seg))

    def _before_actions(self) -> None:
        """The actions the executor is about to carry out, checked as the entry queued
        them."""
        e, h = self.entry, self.host
        assert e is not None
        actions = e.actions
        if not actions:
            return
        if h.closed is not None:
            self.fail(f"actions after CloseHost: {actions}")
        acked = h.consumed + h.consume_pending
        for a in actions:
            if type(a) is ConsumeHost:
                self.check(a.nbytes > 0, "ConsumeHost(0)")
                acked += a.nbytes
                self.check(acked <= len(self.guest.rcv),
                           "ConsumeHost of bytes the guest has not received")
            elif type(a) not in (SendFrame, ResendHost, RewindHost, ShutdownHostWrite,
                                 CloseHost):
                self.fail(f"unknown action {a!r}")

    def _after_actions(self) -> None:
        """The actions ran: the buffer they were peeked into is someone else's now."""
        for view in self.peeked:
            view[:] = b"\xa5" * len(view)
        self.peeked.clear()
        self._after_entry()

    def _settled(self, where: str) -> None:
        """The executor returned to the loop: whatever the entry decided was done. An
        action left queued waits for the flow's next event, which may never come."""
        e = self.entry
        if e is not None:
            self.check(not e.actions, f"actions left queued after {where}: {e.actions}")

    def mark(self, flow: HostSocket) -> None:
        """The executor asks for the flow's turn in the next flush (as of `FlowTurns`)."""
        self.dirty = True

    def _untrack(self, flow: HostSocket) -> bool:
        """The executor closes the flow: out of the (one-flow) table."""
        self.check(not self.untracked, "second CloseHost")
        self.untracked = True
        return True

    def _slice_clock(self) -> float:
        """The clock of the relay's time slice: past its end when other flows spent it."""
        return self.now + (1.0 if self.slice_over else 0.0)

    def stream_offset(self, data: memoryview | list[bytes] | list[memoryview]) -> int:
        """Where in the guest's stream the entry says the bytes the executor writes
        start: payloads it gathered, the payload of the segment being handled, or held
        data (from rcv_nxt)."""
        gathered = self.gathered_list
        if gathered is not None and (data is gathered
                                     or (len(gathered) == 1 and data is gathered[0])):
            start = self.gathered_at[0]
            self.stats["gathered_writes" if len(gathered) > 1 else "single_writes"] += 1
            self.gathered_list, self.gathered_at = None, []
            return start
        if type(data) is memoryview:
            assert self.seg_end is not None, "a single payload written outside a segment"
            return self.seg_end - len(data)
        e = self.entry
        assert e is not None
        self.stats["backlog_writes"] += 1
        return seq_diff(e.rcv_nxt, (self.sc.guest_isn + 1) & M32)

    def _note_gathered(self, seg_end: int) -> None:
        """After a guest segment: where the payload the executor gathered from it starts,
        back to back with the ones before it."""
        gathered = self.host.gathered
        if gathered is None:
            return
        if gathered is not self.gathered_list:
            self.gathered_list, self.gathered_at = gathered, []
        if len(gathered) > len(self.gathered_at):
            start = seg_end - len(gathered[-1])
            if self.gathered_at:
                prev = self.gathered_at[-1] + len(gathered[-2])
                self.check(prev == start, f"gathered payloads not back to back at +{start}")
            self.gathered_at.append(start)

    def _after_entry(self) -> None:
        e = self.entry
        if e is None:
            return
        self.states.setdefault(e.state)
        if e.closed:
            self.check(e.ooo is None and self.ooo_budget.used == 0,
                       "held data outlived the flow")
            return
        h, g, sc = self.host, self.guest, self.sc
        iss1 = (sc.relay_iss + 1) & M32
        # The shell drops acknowledged bytes once per batch (ConsumeHost): the peek offset
        # is what it will be once they are dropped (it moves back with them, not below 0).
        self.check(max(0, h.peek_off - h.consume_pending) == e.bytes_in_flight,
                   f"peek offset {h.peek_off} less {h.consume_pending} acknowledged "
                   f"!= bytes_in_flight {e.bytes_in_flight}")
        self.check(seq_diff(e.snd_una, iss1) == h.consumed + h.consume_pending,
                   "snd_una != bytes consumed")
        self.check(seq_diff(e.snd_nxt, iss1) <= g.adv_edge,
                   "bytes in flight beyond the guest's window")
        self.check(e.bytes_from_guest == len(h.received), "bytes_from_guest")
        self._check_ooo()

    def _check_ooo(self) -> None:
        e, b, sc = self.entry, self.ooo_budget, self.sc
        assert e is not None
        if e.ooo is None:
            self.check(b.used == 0, f"budget {b.used} used with nothing held")
            return
        self.check(e.state in GUEST_SENDING, "data held after the guest's FIN")
        isn1 = (sc.guest_isn + 1) & M32
        rcv = seq_diff(e.rcv_nxt, isn1)
        cost = 0
        for start, end, data in e.ooo.blocks():
            off = seq_diff(start, isn1)
            self.check(rcv <= off and seq_diff(end, start) == len(data) > 0
                       and off + len(data) <= len(sc.guest_data),
                       f"held block +{off}..+{off + len(data)} (rcv_nxt +{rcv})")
            self.check(data == sc.guest_data[off:off + len(data)], f"held wrong bytes at +{off}")
        for chunks in e.ooo._chunks:
            cost += sum(map(len, chunks)) + CHUNK_OVERHEAD * len(chunks)
        self.check(b.used == cost <= b.limit, f"budget {b.used} for {cost} (limit {b.limit})")

    # -- TcpRelay's part: the flow table, readiness, flushes, timers ------------------------

    def _deliver_to_relay(self, frame: bytes) -> None:
        sc = self.sc
        try:
            seg = parse_tcp(parse_ipv4(parse_ethernet(memoryview(frame)).payload))
        except MalformedFrame as exc:  # pragma: no cover - the guest builds valid frames
            self.fail(f"guest frame does not parse: {exc.reason}")
        self.trace.append((self.now, "guest> ", self.seg_fields(
            seg, (sc.guest_isn + 1) & M32, (sc.relay_iss + 1) & M32)))
        if self.entry is None:
            if seg.flags & (SYN | ACK | RST) == SYN:
                # As tcp_relay: timestamps are in force when the SYN offered them.
                self.ts_in_use = seg.tsval is not None
                self.relay_template = self._template(self.ts_in_use)
                self.entry = self.host.entry = TcpNatEntry(
                    seg, template=self.relay_template, mtu=MTU, iss=sc.relay_iss,
                    now=self.now, ooo_budget=self.ooo_budget)
                self.connect_pending = True
            else:
                self._reply_rst(seg)
            return
        e = self.entry
        if self.untracked:  # as tcp_relay, once the flow's CloseHost ran
            self._reply_rst(seg)
            return
        if (e.state not in (TcpState.CONNECTING, TcpState.SYN_RCVD) and not seg.flags & (SYN | RST)
                and (seg.payload or seg.flags & FIN or (
                    # A zero-window probe: only while the guest may still send data.
                    e.state in GUEST_SENDING and seq_diff(seg.seq, e.rcv_nxt) < 0))):
            self.owed_ack = self.trace[-1]
        self.seg_end = seq_diff(seg.seq, (sc.guest_isn + 1) & M32) + len(seg.payload)
        self.executor.segment(self.host, seg, self.now)
        self._note_gathered(self.seg_end)
        self.seg_end = None
        self._settled("a guest segment")

    def _write_gathered(self) -> None:
        """The end of a batch came: the payloads gathered in it are written (the first
        thing a flush does, host/flow_executor.py)."""
        if self.host.gathered is not None:
            self.executor.pump.write_gathered(self.host, self.now)
            self._settled("the gathered write")

    def _reply_rst(self, seg: TcpSegment) -> None:
        answer = rst_for_unknown(seg)
        if answer is None:
            return
        seq, ack, flags = answer
        head = self.relay_template.build(seq, ack, flags, 0)
        vlen = 10 if self.sc.offload else 0
        reply = parse_tcp(parse_ipv4(parse_ethernet(memoryview(head)[vlen:]).payload))
        self.stats["unknown_flow_rst"] += 1
        self.to_guest.append((head, reply))

    def _flush(self) -> None:
        """tcp_relay.TcpRelay.flush for our one flow: a new wakeup, the flow's turn."""
        self.dirty = False
        e, h = self.entry, self.host
        if e is None or self.untracked:
            return
        executor = self.executor
        executor.pump.new_wakeup()
        self.slice_over = self.chaos and self.rng.random() < self.sc.slice_spent
        turn = executor.flush_flow(h, self.now)
        self.slice_over = False
        self._settled("the flow's turn in a flush")
        if turn != TURN_DONE:
            self.dirty = True  # host/flow_turns.py: it goes again in the next flush
        if turn != TURN_WAIT and not e.closed and not h.connecting:
            self.check(self.owed_ack is None,
                       f"no ACK at the end of the batch for: "
                       f"{self.event_text(self.owed_ack) if self.owed_ack else None}")

    def _connect(self) -> None:
        """The host connect() ended (tcp_relay.TcpRelay._connect_done)."""
        self.connect_pending = False
        self.host.facts_refused = not self.sc.facts_on_connect
        self.executor.connected(self.host, True, self.now)
        self.host.facts_refused = False
        self._settled("the connect result")
        self.dirty = True

    def _tick(self) -> bool:
        """Advance the clock to the next deadline and run what is due."""
        if self.dirty:
            self._flush()
        if self.connect_pending:
            self._connect()
            return True
        e = self.entry
        times = []
        gd = self.guest.next_deadline()
        if gd is not None:
            times.append(gd)
        if e is not None and not e.closed:
            ed = e.next_deadline()
            if ed is not None and ed < e.idle_at:
                times.append(ed)
        if not times:
            return False
        self.now = max(self.now, min(times))
        self.trace.append((self.now, "tick", ()))
        self.stats["ticks"] += 1
        self.guest.on_timer(self.now)
        if e is not None and not e.closed:
            ed = e.next_deadline()
            if ed is not None and ed <= self.now:
                if self.executor.timer(self.host, self.now):
                    self.dirty = True  # as tcp_relay: a timer that did nothing wants no flush
                self._settled("a timer")
        if self.dirty:
            self._flush()
        return True

    # -- the scheduler ---------------------------------------------------------------------

    def _calm(self) -> bool:
        """Faults stop while the entry or the guest is close to giving up."""
        e, g = self.entry, self.guest
        return (g.backoff < 3 and g.syn_tries < 2
                and (e is None or (e.retries < 3 and e.persist_count < 4)))

    def _pick(self, link_len: int) -> tuple[int, bool, bool]:
        """(index, keep a copy, lose it) for the next delivery from a link."""
        sc, rng = self.sc, self.rng
        if not self.chaos:
            return 0, False, False
        i = rng.randrange(link_len) if link_len > 1 and rng.random() < sc.reorder else 0
        return i, rng.random() < sc.dup, rng.random() < sc.loss

    def finished(self) -> bool:
        e, g, h, sc = self.entry, self.guest, self.host, self.sc
        if e is None or g.state != "ESTABLISHED":
            return False
        if e.state in (TcpState.CONNECTING, TcpState.SYN_RCVD):
            return False
        if len(h.received) < len(sc.guest_data) or len(g.rcv) < len(sc.host_data):
            return False
        if h.consumed < len(sc.host_data):
            return False
        if g.una < len(sc.guest_data) + sc.guest_fin and not (e.closed and g.reset):
            return False
        if sc.guest_fin and not (h.shut_wr or h.closed is not None):
            return False
        if sc.host_fin and not (g.rcv_fin and (e.fin_acked or e.closed)):
            return False
        if sc.host_fin and sc.guest_fin:
            return e.closed
        return True

    def step(self) -> None:
        sc, g, h, rng = self.sc, self.guest, self.host, self.rng
        order = sc.fin_order if sc.guest_fin and sc.host_fin else None
        self.events += 1
        self.chaos = self.events <= sc.chaos_events and self._calm()
        options: list[tuple[str, float]] = []
        if self.to_relay:
            options.append(("to_relay", 6.0))
        if self.to_guest:
            options.append(("to_guest", 6.0))
        if self.connect_pending:
            options.append(("connect", 2.0))
        if h.produced < len(h.data):
            if h.room() > 0:
                options.append(("peer_send", 1.0))
        elif sc.host_fin and not h.eof and (
                order is None or order == "host_first" or (order == "guest_first" and h.shut_wr)
                or (order == "crossing" and g.fin_sent)):
            options.append(("peer_close", 5.0 if order == "crossing" else 0.3))
        if h.outq and not (sc.slow_peer and self._drained_at == self.now):
            options.append(("peer_drain", 1.0))
        if h.want_writable and h.outq < h.capacity and self.entry is not None:
            options.append(("writable", 1.0))
        if g.written < len(g.data):
            options.append(("app_write", 1.0))
        elif sc.guest_fin and not g.fin_wanted and (order != "host_first" or g.rcv_fin):
            options.append(("app_close", 0.3))
        if g.unread:
            options.append(("app_read", 1.0))
        if not options and self.dirty:
            self._flush()  # a deferred end of batch; it may have queued frames
            return
        if not options:
            if not self._tick():
                self.fail("stalled: nothing to deliver and no timer pending")
            return
        if self.chaos and sc.premature_tick:
            options.append(("tick", sc.premature_tick))
        if self.chaos:
            kind = rng.choices([o[0] for o in options], [o[1] for o in options])[0]
        else:
            kind = options[rng.randrange(len(options))][0]
        if kind != "to_relay":
            # Only guest frames arrive within a batch; anything else (a timer, the
            # host socket) comes after its end, when the relay wrote what it gathered.
            self._write_gathered()
        getattr(self, "_ev_" + kind)()
        if self.dirty and (not self.chaos or rng.random() >= sc.defer_flush):
            self._flush()

    def _progress(self) -> tuple:
        e, g, h = self.entry, self.guest, self.host
        return (len(h.received), len(g.rcv), h.consumed, g.una, g.rcv_fin, h.shut_wr,
                None if e is None else e.state)

    def run(self) -> TcpSim:
        self.guest.connect(self.now)
        last, since = self._progress(), self.now
        while not self.finished():
            if self.events >= self.sc.max_events:
                self.fail("no convergence within max_events")
            self.step()
            progress = self._progress()
            if progress != last:
                last, since = progress, self.now
            elif self.now - since > self.sc.stall_s:
                self.fail(f"stalled: no progress for {self.now - since:.0f} s")
        return self

    # -- events ------------------------------------------------------------------------------

    def _ev_to_relay(self) -> None:
        i, keep, lose = self._pick(len(self.to_relay))
        frame = self.to_relay[i] if keep else self.to_relay.pop(i)
        if lose:
            self.stats["lost_to_relay"] += 1
            return
        self._deliver_to_relay(frame)

    def _ev_to_guest(self) -> None:
        i, keep, lose = self._pick(len(self.to_guest))
        _frame, seg = self.to_guest[i] if keep else self.to_guest.pop(i)
        if lose:
            self.stats["lost_to_guest"] += 1
            return
        self.guest.on_segment(seg, self.now)

    def _ev_connect(self) -> None:
        self._connect()

    def _ev_peer_send(self) -> None:
        h = self.host
        left = h.room()
        h.produced += self.rng.randint(1, left) if self.chaos else left
        h.host_readable = True
        self.dirty = self.entry is not None

    def _ev_peer_close(self) -> None:
        self.host.eof = True
        self.host.host_readable = True
        self.trace.append((self.now, "host peer EOF", ()))
        self.dirty = self.entry is not None

    def _ev_peer_drain(self) -> None:
        h = self.host
        self._drained_at = self.now
        h.outq -= self.rng.randint(1, h.outq) if self.chaos else h.outq
        if h.want_writable:
            self._ev_writable()

    def _ev_writable(self) -> None:
        e = self.entry
        self.host.want_writable = False
        if e is not None and not self.untracked:
            # tcp_relay._host_event: EPOLLOUT tells the entry and asks for a turn.
            e.on_host_writable(self.now)
            self._after_entry()
            self.dirty = True

    def _ev_app_write(self) -> None:
        g = self.guest
        left = len(g.data) - g.written
        g.app_write(self.rng.randint(1, left) if self.chaos else left, self.now)

    def _ev_app_close(self) -> None:
        self.trace.append((self.now, "guest app close", ()))
        self.guest.app_close(self.now)

    def _ev_app_read(self) -> None:
        g = self.guest
        g.app_read(self.rng.randint(1, g.unread) if self.chaos else g.unread, self.now)

    def _ev_tick(self) -> None:
        self._tick()
