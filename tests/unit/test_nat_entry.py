"""TcpNatEntry, the sans-I/O TCP flow: whole conversations under loss, duplication,
reordering, short host writes and zero windows (tests/support/tcp_sim.py), plus the handshake,
reset, timer and close rules one at a time.

The conversation property: the host socket receives exactly the guest's stream, in
order, each byte once; the guest receives exactly the host's stream; no data byte is
ever sent beyond the right edge the guest advertised; the relay never acknowledges
bytes the host socket did not accept; every frame parses with valid checksums;
sequence numbers stay right across the 2**32 wrap; and with FINs from both sides, in
whatever order, the flow ends CLOSED with one non-abortive CloseHost. tcp_sim checks
the per-step invariants and raises SimFailure with a trace; the assertions here check
the end state.
"""

from __future__ import annotations

import copy
import random
from itertools import pairwise
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.tcp_sim import (
    GUEST_IP,
    GUEST_MAC,
    GUEST_PORT,
    MTU,
    RELAY_MAC,
    REMOTE_IP,
    REMOTE_PORT,
    Scenario,
    TcpSim,
)

from relaynat.checksum import pseudo_header_sum, verify
from relaynat.nat_entry import TcpNatEntry
from relaynat.ooo_queue import OooBudget
from relaynat.packet_builder import TcpFrameTemplate, tcp_options_sack, tcp_options_syn
from relaynat.tcp_actions import (
    CloseHost,
    ConsumeHost,
    ResendHost,
    RewindHost,
    SendFrame,
    ShutdownHostWrite,
    rst_for_unknown,
)
from relaynat.tcp_handshake import TcpHandshake
from relaynat.tcp_state import TcpState
from relaynat.window import (
    DATA_GIVE_UP_S,
    MIN_SND_MSS,
    RTO_MIN_S,
    SYN_RETRIES_MAX,
    TLP_MIN_S,
    WINDOW_DEFAULT,
    SocketFacts,
    TcpInfo,
)
from relaynat.wire import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpSegment,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
)

M32 = 0xFFFFFFFF

#: Initial sequence numbers: a conversation of a few KB from here crosses 2**32.
isns = st.one_of(st.integers(2**32 - 3000, 2**32 - 1), st.integers(2**32 - 100_000, 2**32 - 1),
                 st.integers(0, M32))


# -- whole conversations ------------------------------------------------------------------

@st.composite
def scenarios(draw: st.DrawFn, faults: bool = True) -> Scenario:
    size = st.one_of(st.integers(0, 3000), st.integers(0, 50_000))
    seed = draw(st.integers(0, 2**32 - 1))
    rnd = random.Random(seed)
    wscale = draw(st.one_of(st.none(), st.integers(0, 14)))
    host_data = rnd.randbytes(draw(size))
    sc = Scenario(
        guest_data=rnd.randbytes(draw(size)),
        host_data=host_data,
        guest_isn=draw(isns),
        relay_iss=draw(isns),
        # Below MIN_SND_MSS too, where the relay's segments are larger than asked.
        guest_mss=draw(st.one_of(st.integers(100, 1460), st.integers(1, 60))),
        guest_wscale=wscale,
        # Down to a byte of window, but not so small that a transfer takes forever.
        guest_rcvbuf=max(len(host_data) // 200,
                         draw(st.one_of(st.integers(1, 4000), st.integers(1, 200_000)))),
        host_sndbuf=draw(st.integers(1000, 131_072)),
        # Unbounded; a peer held to 2 KiB unread; Linux's default, which the relay grows.
        host_rcvbuf=draw(st.sampled_from([None, 4096, 131_072])),
        host_rcv_space=draw(st.integers(0, 65_535)),
        rtt_us=draw(st.integers(1, 4_000_000)),
        guest_fin=draw(st.booleans()),
        host_fin=draw(st.booleans()),
        fin_order=draw(st.sampled_from([None, "guest_first", "host_first", "crossing"])),
        offload=draw(st.booleans()),
        facts_on_connect=draw(st.booleans()),
        gather=draw(st.booleans()),
        slow_peer=draw(st.booleans()),
        guest_timestamps=draw(st.booleans()),
        guest_ts_base=draw(isns),
        guest_sack=draw(st.booleans()),
        # None held, a budget a few segments use up (drops and reneging), plenty.
        ooo_budget=draw(st.sampled_from([0, 1500, 20_000, 1 << 20])),
        seed=seed,
    )
    if faults:
        rates = st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5])
        sc.loss = draw(rates)
        sc.dup = draw(rates)
        sc.reorder = draw(rates)
        sc.short_write = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
        sc.premature_tick = draw(st.sampled_from([0.0, 0.02, 0.3]))
    else:
        sc.defer_flush = 0.0
        # A lossless link needs no zero-window probes: the relay must announce a
        # reopened window by itself.
        sc.guest_probes = draw(st.booleans())
    return sc


def check_outcome(sim: TcpSim) -> None:
    sc, e, h, g = sim.sc, sim.entry, sim.host, sim.guest
    assert e is not None
    assert bytes(h.received) == sc.guest_data
    assert bytes(g.rcv) == sc.host_data
    assert e.bytes_from_guest == len(sc.guest_data)
    assert e.bytes_to_guest == len(sc.host_data)
    assert h.consumed == len(sc.host_data)
    if sc.guest_fin and sc.host_fin:
        assert e.state is TcpState.CLOSED
        assert sim.close_actions == [CloseHost(abortive=False)]
    else:
        assert sim.close_actions == []
        expected = {(True, False): TcpState.CLOSE_WAIT, (False, True): TcpState.FIN_WAIT_2,
                    (False, False): TcpState.ESTABLISHED}[(sc.guest_fin, sc.host_fin)]
        assert e.state is expected
    if not sc.guest_fin:
        assert not h.shut_wr
    elif e.state is not TcpState.CLOSED:
        assert h.shut_wr
    # (With both FINs the host socket was shut down, or closed at the guest's FIN.)
    assert g.rcv_fin == sc.host_fin
    assert not g.reset or e.closed  # only the shell's RST after the flow is gone
    # Everything the guest sent is in the host socket: nothing left held.
    assert e.ooo is None and sim.ooo_budget.used == 0


@settings(max_examples=200, deadline=None)
@given(scenarios())
@example(Scenario(guest_data=bytes(range(256)) * 40, host_data=bytes(range(255, -1, -1)) * 60,
                  guest_isn=M32 - 3000, relay_iss=M32 - 7000, guest_mss=100, guest_wscale=14,
                  guest_rcvbuf=3000, host_sndbuf=1000, loss=0.2, dup=0.2, reorder=0.2,
                  short_write=0.5, premature_tick=0.3, seed=7))
# The guest's last bytes and FIN, held beyond a hole, reach the host socket in a flush
# after short writes, and close the flow there: its ACK and CloseHost go at once.
@example(Scenario(guest_data=bytes(range(47)), guest_mss=129, guest_wscale=None,
                  guest_rcvbuf=1, host_sndbuf=1253, host_rcv_space=0, rtt_us=1,
                  short_write=0.5, ooo_budget=1500, seed=2))
def test_lossy_conversation(sc: Scenario) -> None:
    check_outcome(TcpSim(sc).run())


@settings(max_examples=40, deadline=None)
@given(scenarios(faults=False))
def test_clean_conversation(sc: Scenario) -> None:
    sim = TcpSim(sc).run()
    check_outcome(sim)
    assert sim.stats["lost_to_guest"] == sim.stats["lost_to_relay"] == 0
    # Nothing was lost, so nothing is sent to the guest twice.
    assert sim.stats["rewinds"] == 0


def test_gathered_writes_under_faults() -> None:
    """A shell that gathers a batch's back-to-back payloads into one host write (as
    tcp_relay does for the TAP) delivers the same bytes, through loss, duplicates,
    reordering and short writes; and it did gather."""
    gathered = 0
    for seed in range(12):
        sc = Scenario(guest_data=random.Random(seed).randbytes(60_000), host_data=b"h" * 3000,
                      guest_mss=700, host_sndbuf=20_000, gather=True, defer_flush=0.8,
                      loss=0.05 * (seed % 3), dup=0.05 * (seed % 2), reorder=0.1,
                      short_write=0.2 * (seed % 2), seed=seed)
        sim = TcpSim(sc).run()
        check_outcome(sim)
        gathered += sim.stats["gathered_writes"]
    assert gathered > 0


class CheckedEntry(TcpNatEntry):
    """A `TcpNatEntry` that runs every guest segment twice: through `on_guest_segment`
    (its data fast path included) and, on a copy taken before, through the general
    `_on_segment` alone; both must return the same bytes and leave the same state."""

    __slots__ = ()
    fast = 0
    general = 0

    def _on_segment(self, seg: TcpSegment, now: float) -> memoryview | None:
        CheckedEntry.general += 1
        return super()._on_segment(seg, now)

    def on_guest_segment(self, seg: TcpSegment, now: float) -> memoryview | None:
        twin = TcpNatEntry.__new__(TcpNatEntry)
        for name in TcpNatEntry.__slots__ + TcpHandshake.__slots__:
            setattr(twin, name, getattr(self, name))
        twin.actions = list(self.actions)
        # The queue and the relay-wide budget it charges, copied together.
        twin.ooo, twin.ooo_budget = copy.deepcopy((self.ooo, self.ooo_budget))
        twin.template = copy.deepcopy(self.template)  # it numbers the frames it builds
        twin.sacked = copy.deepcopy(self.sacked)
        general_before = CheckedEntry.general
        got = super().on_guest_segment(seg, now)
        if CheckedEntry.general == general_before:
            CheckedEntry.fast += 1
        want = TcpNatEntry._on_segment(twin, seg, now)
        assert (None if got is None else bytes(got)) == (None if want is None else bytes(want))
        for name in TcpHandshake.__slots__:
            if name not in ("actions", "ooo", "ooo_budget", "template"):
                assert getattr(self, name) == getattr(twin, name), name
        assert [_plain(a) for a in self.actions] == [_plain(a) for a in twin.actions]
        assert (self.ooo is None) == (twin.ooo is None)
        return got


def _plain(action: object) -> object:
    if isinstance(action, SendFrame):
        return action.head, bytes(action.payload)
    return action


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_data_fast_path_agrees_with_the_general_path(sc: Scenario) -> None:
    """Whole lossy conversations (tcp_sim) in which every guest segment is checked both
    ways."""
    with mock.patch("support.tcp_sim.TcpNatEntry", CheckedEntry):
        check_outcome(TcpSim(sc).run())


def test_data_fast_path_carries_an_upload() -> None:
    """An upload on a clean link goes (almost) all through the fast path, checked."""
    fast, general = CheckedEntry.fast, CheckedEntry.general
    sc = Scenario(guest_data=random.Random(5).randbytes(200_000), guest_mss=1000,
                  host_sndbuf=50_000, gather=True, fin_order="guest_first", seed=5)
    with mock.patch("support.tcp_sim.TcpNatEntry", CheckedEntry):
        check_outcome(TcpSim(sc).run())
    assert CheckedEntry.fast - fast > 150  # of the 200 data segments
    assert CheckedEntry.general - general < CheckedEntry.fast - fast


@pytest.mark.parametrize(("order", "path"), [
    ("guest_first", [TcpState.ESTABLISHED, TcpState.CLOSE_WAIT, TcpState.LAST_ACK]),
    ("host_first", [TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.FIN_WAIT_2]),
    ("crossing", [TcpState.ESTABLISHED, TcpState.FIN_WAIT_1, TcpState.CLOSING]),
])
def test_fin_orders(order: str, path: list[TcpState]) -> None:
    """Both FINs in each order end CLOSED with one orderly CloseHost, through the
    states RFC 9293 §3.3.2 names for that order."""
    hits = 0
    for seed in range(40):
        sc = Scenario(guest_data=b"g" * 3000, host_data=b"h" * 5000, guest_mss=500, seed=seed,
                      guest_isn=M32 - 1000, relay_iss=M32 - 2000, fin_order=order,
                      loss=0.05 * (seed % 3), dup=0.05 * (seed % 2))
        sim = TcpSim(sc).run()
        check_outcome(sim)
        states = [st for st in sim.states if st is not TcpState.CONNECTING]
        assert states[0] is TcpState.SYN_RCVD and states[-1] is TcpState.CLOSED
        if order == "host_first" and states[1:-1] == path[:2]:
            pass  # the guest's FIN also carried the ACK of ours: FIN_WAIT_2 not seen
        elif order != "crossing":
            assert states[1:-1] == path
        elif states[1:-1] == path:
            hits += 1
        else:  # the FINs did not cross this time: one of the other two paths
            assert states[1:-1][:2] in ([TcpState.ESTABLISHED, TcpState.CLOSE_WAIT],
                                        [TcpState.ESTABLISHED, TcpState.FIN_WAIT_1])
    assert order != "crossing" or hits >= 5


# -- single steps ---------------------------------------------------------------------------

GUEST_T = TcpFrameTemplate(dst_mac=RELAY_MAC, src_mac=GUEST_MAC, src=GUEST_IP, dst=REMOTE_IP,
                           sport=GUEST_PORT, dport=REMOTE_PORT)


def relay_template() -> TcpFrameTemplate:
    return TcpFrameTemplate(dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP, dst=GUEST_IP,
                            sport=REMOTE_PORT, dport=GUEST_PORT)


def guest_seg(seq: int, ack: int, flags: int, window: int = 65535, payload: bytes = b"",
              options: bytes = b"") -> TcpSegment:
    head = GUEST_T.build(seq & M32, ack & M32, flags, window, payload, options)
    return parse_tcp(parse_ipv4(parse_ethernet(memoryview(head + payload)).payload))


def sent(actions: list) -> list[TcpSegment]:
    """The frames among `actions`, parsed and checksum-verified."""
    out = []
    for a in actions:
        if isinstance(a, SendFrame):
            frame = a.head + bytes(a.payload)
            ip = parse_ipv4(parse_ethernet(memoryview(frame)).payload)
            assert verify(ip.payload, pseudo_header_sum(REMOTE_IP, GUEST_IP, 6,
                                                             len(ip.payload)))
            seg = parse_tcp(ip)
            assert (seg.sport, seg.dport) == (REMOTE_PORT, GUEST_PORT)
            out.append(seg)
    return out


def syn(isn: int, wscale: int | None = 7, mss: int = 1460, window: int = 65535) -> TcpSegment:
    return guest_seg(isn, 0, SYN, window, options=tcp_options_syn(mss, wscale))


def established(isn: int, iss: int, wscale: int | None = 7, mss: int = 1460,
                window: int = 65535) -> TcpNatEntry:
    e = TcpNatEntry(syn(isn, wscale, mss), template=relay_template(), mtu=MTU, iss=iss, now=0.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK, window), 0.0)
    assert e.state is TcpState.ESTABLISHED
    assert e.take_actions() == []
    return e


@given(isns, isns, st.one_of(st.none(), st.integers(0, 14)), st.integers(1, 65535))
@example(M32, M32, 7, 1460)
@example(M32, 0, None, 536)
def test_handshake(isn: int, iss: int, wscale: int | None, mss: int) -> None:
    e = TcpNatEntry(syn(isn, wscale, mss), template=relay_template(), mtu=MTU, iss=iss, now=0.0)
    assert e.state is TcpState.CONNECTING
    assert e.take_actions() == []  # nothing until the host connect() is done
    # A retransmitted SYN while connecting changes nothing.
    assert e.on_guest_segment(syn(isn, wscale, mss), 0.5) is None
    assert e.take_actions() == []
    e.on_connect_result(True, None, 1.0)
    assert e.state is TcpState.SYN_RCVD
    (sa,) = sent(e.take_actions())
    assert sa.flags == SYN | ACK
    assert (sa.seq, sa.ack) == (iss, (isn + 1) & M32)
    assert sa.mss == MTU - 40
    assert sa.wscale == (8 if wscale is not None else None)
    assert sa.window == WINDOW_DEFAULT  # unscaled in a SYN (RFC 7323 §2.2)
    # The guest lost it and sends its SYN again: the same SYN-ACK.
    e.on_guest_segment(syn(isn, wscale, mss), 1.5)
    (again,) = sent(e.take_actions())
    assert (again.flags, again.seq, again.ack) == (SYN | ACK, iss, (isn + 1) & M32)
    # An ACK of something else does not complete the handshake.
    e.on_guest_segment(guest_seg(isn + 1, iss + 2, ACK), 1.6)
    assert e.state is TcpState.SYN_RCVD
    e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK, 1000), 2.0)
    assert e.state is TcpState.ESTABLISHED
    assert e.take_actions() == []
    assert e.mss == max(MIN_SND_MSS, min(mss, MTU - 40))
    assert e.host_read_budget() == 1000 << (min(wscale, 14) if wscale is not None else 0)
    assert e.syn_at is None and e.connect_deadline is None


def test_syn_ack_retransmission_and_limit() -> None:
    e = TcpNatEntry(syn(100), template=relay_template(), mtu=MTU, iss=200, now=0.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    t, expiries = 0.0, 0
    while not e.closed:
        t = e.next_deadline()
        e.on_timer(t, None)
        segs = sent(e.take_actions())
        expiries += 1
        if expiries <= SYN_RETRIES_MAX:
            assert [(s.flags, s.seq) for s in segs] == [(SYN | ACK, 200)]
    assert expiries == SYN_RETRIES_MAX + 1
    assert t == sum(1 << i for i in range(SYN_RETRIES_MAX + 1))  # 1+2+4+8+16 s


def test_connect_refused_and_timeout() -> None:
    e = TcpNatEntry(syn(M32), template=relay_template(), mtu=MTU, iss=5, now=0.0)
    e.on_connect_result(False, None, 0.1)
    acts = e.take_actions()
    (rst,) = sent(acts)
    assert (rst.flags, rst.seq, rst.ack) == (RST | ACK, 0, 0)  # ack = isn + 1 wraps to 0
    assert acts[-1] == CloseHost(abortive=False)
    assert e.closed

    e = TcpNatEntry(syn(7), template=relay_template(), mtu=MTU, iss=5, now=0.0,
                    connect_timeout_s=10.0)
    assert e.next_deadline() == 10.0
    e.on_timer(9.99, None)
    assert e.take_actions() == [] and not e.closed
    e.on_timer(10.0, None)
    acts = e.take_actions()
    (rst,) = sent(acts)
    assert (rst.flags, rst.ack) == (RST | ACK, 8)
    assert acts[-1] == CloseHost(abortive=False)


@given(isns, isns, st.integers(-(2**31), 2**31 - 1))
@example(M32, M32, 0)
@example(M32, 0, 1)
@example(0, 0, -1)
def test_guest_rst_only_at_rcv_nxt(isn: int, iss: int, delta: int) -> None:
    """RFC 5961 §3.2: a RST resets only at exactly rcv_nxt; then abortively."""
    e = established(isn, iss)
    e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK, payload=b"abc"), 0.1)
    e.on_host_accepted(3, 0.1)
    e.take_actions()
    rcv_nxt = (isn + 4) & M32
    assert e.rcv_nxt == rcv_nxt
    e.on_guest_segment(guest_seg(rcv_nxt + delta, iss + 1, RST | ACK), 0.2)
    acts = e.take_actions()
    if delta == 0:
        assert acts == [CloseHost(abortive=True)]
        assert e.state is TcpState.CLOSED
        # Nothing afterwards.
        assert e.on_guest_segment(guest_seg(rcv_nxt, iss + 1, ACK, payload=b"x"), 0.3) is None
        e.on_timer(1e9, None)
        assert e.take_actions() == []
    else:
        assert acts == []
        assert e.state is TcpState.ESTABLISHED


def test_rst_in_syn_rcvd_and_connecting() -> None:
    e = TcpNatEntry(syn(10), template=relay_template(), mtu=MTU, iss=20, now=0.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(12345, 0, RST), 0.1)  # any sequence in SYN_RCVD
    assert e.take_actions() == [CloseHost(abortive=True)] and e.closed

    e = TcpNatEntry(syn(10), template=relay_template(), mtu=MTU, iss=20, now=0.0)
    e.on_guest_segment(guest_seg(12345, 0, RST), 0.1)
    assert e.take_actions() == [] and e.state is TcpState.CONNECTING
    e.on_guest_segment(guest_seg(11, 0, RST), 0.1)
    assert e.take_actions() == [CloseHost(abortive=True)] and e.closed


@given(isns, isns, st.sampled_from([ACK | FIN, ACK | PSH | FIN, ACK | PSH, ACK]),
       st.integers(1, 5), st.binary(max_size=64))
def test_segment_whose_ack_does_not_complete_the_handshake_is_not_accepted(
        isn: int, iss: int, flags: int, off: int, payload: bytes) -> None:
    """Data or FIN with an ACK of something other than our SYN-ACK, in SYN_RCVD (a
    fuzzing guest did this): dropped, the handshake still open; the right ACK then
    completes it. It used to raise TcpStateError (GUEST_FIN in SYN_RCVD)."""
    e = TcpNatEntry(syn(isn), template=relay_template(), mtu=MTU, iss=iss, now=0.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    assert e.on_guest_segment(guest_seg(isn + 1, iss + 1 + off, flags, payload=payload),
                              0.1) is None
    assert e.state is TcpState.SYN_RCVD and not e.closed
    assert [a for a in e.take_actions() if isinstance(a, CloseHost)] == []
    e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK), 0.2)
    assert e.state is TcpState.ESTABLISHED


@given(isns, isns, st.sampled_from([0, SYN, FIN, SYN | FIN, ACK, ACK | FIN, ACK | PSH, RST,
                                    RST | ACK, SYN | ACK]),
       st.integers(0, 3000))
@example(M32, 77, SYN | FIN, 0)
@example(M32 - 2, 77, FIN, 2)
def test_rst_for_unknown(seq: int, ack: int, flags: int, length: int) -> None:
    """RFC 9293 §3.10.7.1 (CLOSED state)."""
    seg = guest_seg(seq, ack, flags, payload=bytes(length))
    answer = rst_for_unknown(seg)
    if flags & RST:
        assert answer is None
    elif flags & ACK:
        assert answer == (ack, 0, RST)
    else:
        seg_len = length + bool(flags & SYN) + bool(flags & FIN)
        assert answer == (0, (seq + seg_len) % 2**32, RST | ACK)


def test_host_reset_resets_guest() -> None:
    e = established(M32 - 1, M32 - 1)
    e.on_host_data(memoryview(b"x" * 10), 0.1)
    e.take_actions()
    e.on_host_reset(0.2)
    acts = e.take_actions()
    (rst,) = sent(acts)
    assert rst.flags == RST | ACK
    assert rst.seq == (M32 - 1 + 1 + 10) & M32  # the highest sequence sent
    assert rst.ack == M32  # guest isn + 1
    assert acts[-1] == CloseHost(abortive=False)


def test_host_data_respects_window_and_mss() -> None:
    e = established(1000, M32 - 500, wscale=2, mss=300, window=100)  # 400 bytes of window
    assert e.host_read_budget() == 400
    e.on_host_data(memoryview(bytes(range(256)) * 2)[:400], 0.0)
    segs = sent(e.take_actions())
    assert [len(s.payload) for s in segs] == [300, 100]
    assert [s.seq for s in segs] == [M32 - 499, (M32 - 199) & M32]
    assert segs[0].flags == ACK and segs[1].flags == ACK | PSH
    assert e.host_read_budget() == 0 and e.bytes_in_flight == 400
    # A partial ACK across the wrap consumes exactly the acknowledged bytes.
    e.on_guest_segment(guest_seg(1001, M32 - 499 + 300, ACK, 100), 0.1)
    assert e.take_actions() == [ConsumeHost(300)]
    assert e.host_read_budget() == 300


def test_zero_window_persist_probe() -> None:
    e = established(1, 1, wscale=None, window=0)
    assert e.host_read_budget() == 0
    e.on_host_blocked(5.0)
    assert e.next_deadline() == 6.0  # RTO base, no data in flight
    e.on_timer(6.0, None)
    (probe,) = sent(e.take_actions())
    assert (probe.flags, probe.seq, len(probe.payload)) == (ACK, 1, 0)  # snd_una - 1
    e.on_host_blocked(6.0)
    assert e.next_deadline() == 8.0  # backed off
    # The guest answers with an open window.
    e.on_guest_segment(guest_seg(2, 2, ACK, 500), 6.5)
    assert e.host_read_budget() == 500
    # With the guest's round trip measured, the interval is that RTO, backed off alike.
    e = established(1, 1, wscale=None, window=0)
    e.guest_srtt, e.guest_rttvar = 0.002, 0.001
    e.on_host_blocked(5.0)
    assert e.next_deadline() == pytest.approx(5.0 + 0.002 + RTO_MIN_S)
    e.on_timer(5.0 + 0.002 + RTO_MIN_S, None)
    e.take_actions()
    e.on_host_blocked(5.5)
    assert e.next_deadline() == pytest.approx(5.5 + 2 * (0.002 + RTO_MIN_S))


def _expire_until_reset(e: TcpNatEntry) -> list[float]:
    """Let the data RTO expire until the flow is reset; the expiry times."""
    e.on_host_data(memoryview(b"z" * 100), e.now)
    e.take_actions()
    times = []
    while not e.closed:
        now = e.next_deadline()
        assert now is not None
        e.on_timer(now, None)
        times.append(now)
        acts = e.take_actions()
        if not e.closed:
            assert acts == [RewindHost()]
            assert e.bytes_in_flight == 0 and e.host_read_budget() > 0
            e.on_host_data(memoryview(b"z" * 100), now)  # what the shell does after it
            assert [len(s.payload) for s in sent(e.take_actions())] == [100]
        else:
            assert sent(acts)[0].flags == RST | ACK
            assert acts[-1] == CloseHost(abortive=True)
    return times


def test_data_retransmission_limit() -> None:
    """RFC 6298 from 1 s, doubling to 60 s; reset once DATA_GIVE_UP_S passed since the
    first expiry: the ninth."""
    times = _expire_until_reset(established(1, 1))
    assert [round(b - a, 3) for a, b in pairwise(times)] == [
        2, 4, 8, 16, 32, 60, 60, 60]
    assert times[-1] - times[0] >= DATA_GIVE_UP_S > times[-2] - times[0]


@pytest.mark.parametrize("mss", [1, 12, 13, 47])
@pytest.mark.parametrize("timestamps", [False, True])
def test_a_tiny_mss_is_raised_to_the_floor(mss: int, timestamps: bool) -> None:
    """An MSS below Linux's tcp_min_snd_mss (48) is raised to it before
    the timestamp option comes off, so every data segment carries 48 (36) bytes. Before,
    an MSS of 12 with timestamps left segments of 0 bytes (a ValueError, the flow reset as
    an internal error), one below it a negative size (the flow never sent)."""
    tmpl = relay_template().with_timestamps(timestamps)
    e = TcpNatEntry(guest_seg(1, 0, SYN, options=tcp_options_syn(
        mss, 14, (1000, 0) if timestamps else None)), template=tmpl, mtu=MTU, iss=1, now=0.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(2, 2, ACK, options=ts_opt(1001, 0) if timestamps else b""),
                       0.0)
    assert e.state is TcpState.ESTABLISHED
    size = MIN_SND_MSS - (12 if timestamps else 0)
    assert e.mss == e.frame_payload_max == size
    e.on_host_data(memoryview(bytes(1000)), 0.0)
    lengths = [len(seg.payload) for seg in sent(e.take_actions())]
    assert sum(lengths) == 1000 and max(lengths) == size


def test_rto_from_the_guests_round_trip() -> None:
    """With timestamps, ACKs of new data echo our TSval: the RTO follows the guest's
    round trip (RFC 6298 §2.3) with Linux's 200 ms floor under the variation, and a
    silent guest is given as long as with the 1 s RTO all the same."""
    tmpl = TcpFrameTemplate(dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP, dst=GUEST_IP,
                            sport=REMOTE_PORT, dport=GUEST_PORT, timestamps=True)
    e = TcpNatEntry(guest_seg(1, 0, SYN, options=tcp_options_syn(1460, 7, (1000, 0))),
                    template=tmpl, mtu=MTU, iss=1, now=0.0)
    e.on_connect_result(True, None, 0.0)
    synack = sent(e.take_actions())[0]
    assert synack.tsval is not None
    ts = ts_opt
    e.on_guest_segment(guest_seg(2, 2, ACK, options=ts(1001, synack.tsval)), 0.003)
    e.take_actions()
    # Our SYN takes a sequence number: the ACK of the SYN-ACK is the first sample, as
    # in Linux (tcp_synack_rtt_meas), so a first data loss waits SRTT + 200 ms, not 1 s.
    assert e.guest_srtt == pytest.approx(0.003)
    now = 0.01
    for _ in range(4):  # data, and its ACK 2 ms later
        e.on_host_data(memoryview(b"d" * 100), now)
        data = sent(e.take_actions())[0]
        assert e.rto_at is not None
        now += 0.002
        e.on_guest_segment(guest_seg(2, data.seq + 100, ACK, options=ts(1002, data.tsval)),
                           now)
        assert e.take_actions() == [ConsumeHost(100)]
    assert e.guest_srtt == pytest.approx(0.002, abs=0.0011)
    e.on_host_data(memoryview(b"d" * 100), now)
    e.take_actions()
    assert e.guest_srtt is not None
    assert e.rto_at == pytest.approx(now + e.guest_srtt + RTO_MIN_S)
    times = _expire_until_reset(e)
    assert times[0] == pytest.approx(now + e.guest_srtt + RTO_MIN_S)
    assert times[-1] - times[0] >= DATA_GIVE_UP_S > times[-2] - times[0]


def test_fast_retransmit_on_three_dup_acks() -> None:
    e = established(1, 1)
    e.on_host_data(memoryview(b"a" * 3000), 0.0)
    e.take_actions()
    for _ in range(2):
        e.on_guest_segment(guest_seg(2, 2, ACK, 65535), 0.1)
        assert e.take_actions() == []
    e.on_guest_segment(guest_seg(2, 2, ACK, 65535), 0.1)
    assert e.take_actions() == [RewindHost()]
    assert e.bytes_in_flight == 0


def sack_established(mss: int) -> TcpNatEntry:
    """`established(1, 1)` with SACK permitted by the guest and an out-of-order queue,
    so SACK is in force both ways."""
    e = TcpNatEntry(guest_seg(1, 0, SYN, options=tcp_options_syn(mss, 7, None, True)),
                    template=relay_template(), mtu=MTU, iss=1, now=0.0,
                    ooo_budget=OooBudget(1 << 20))
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(2, 2, ACK), 0.0)
    assert e.state is TcpState.ESTABLISHED and e.sack_ok
    assert e.take_actions() == []
    return e


def test_sack_resends_the_hole_and_nothing_else() -> None:
    """RFC 6675 with the guest's SACK blocks: the frame lost at snd_una is sent again
    alone, from the host socket's queue, once; no go-back-N rewind."""
    e = sack_established(1460)
    e.on_host_data(memoryview(b"x" * 14600), 0.0)  # ten segments, 2 .. 14602
    assert len(sent(e.take_actions())) == 10
    # The guest lost the second segment (1462 .. 2922): it acks the first, then the
    # next one comes with a block beyond the hole. The link to the guest keeps order,
    # so the hole is lost (RACK), without waiting for three duplicates.
    e.on_guest_segment(guest_seg(2, 1462, ACK), 0.1)
    assert e.take_actions() == [ConsumeHost(1460)]
    e.on_guest_segment(guest_seg(2, 1462, ACK, options=tcp_options_sack([(2922, 4382)])), 0.1)
    assert e.take_actions() == [ResendHost(0, 1460)]
    e.on_host_resend(0, memoryview(b"y" * 1460))
    again = sent(e.take_actions())
    assert [(s.seq, len(s.payload)) for s in again] == [(1462, 1460)]
    assert bytes(again[0].payload) == b"y" * 1460
    assert e.bytes_in_flight == 14600 - 1460  # the send position did not move back
    for right in (8762, 10222, 11682):  # more duplicates: the hole is not sent twice
        e.on_guest_segment(guest_seg(2, 1462, ACK, options=tcp_options_sack([(2922, right)])),
                           0.1)
        assert e.take_actions() == []
    # The resend arrives: everything up to the highest SACKed byte is acked.
    e.on_guest_segment(guest_seg(2, 11682, ACK), 0.1)
    assert e.take_actions() == [ConsumeHost(11682 - 1462)]
    assert e.sacked is not None and e.sacked.blocks == []


def test_sack_recovery_resends_each_hole_of_a_flight() -> None:
    """Two holes; a partial ACK that fills the first leaves the second to resend, and a
    block beyond what we sent, or below snd_una (a D-SACK, RFC 2883), counts for nothing."""
    e = sack_established(1000)
    e.on_host_data(memoryview(bytes(10000)), 0.0)  # 2 .. 10002 in ten segments
    e.take_actions()
    bogus = [(10002, 20002), (1, 2)]
    e.on_guest_segment(guest_seg(2, 2, ACK, options=tcp_options_sack(bogus)), 0.1)
    assert e.take_actions() == []
    # Holes 2 .. 1002 and 4002 .. 5002; held 1002 .. 4002 and 5002 .. 10002.
    blocks = [(5002, 10002), (1002, 4002)]
    e.on_guest_segment(guest_seg(2, 2, ACK, options=tcp_options_sack(blocks)), 0.1)
    assert e.take_actions() == [ResendHost(0, 1000), ResendHost(4000, 1000)]
    # A partial ACK that ends at the second hole does not send it a second time.
    e.on_guest_segment(guest_seg(2, 4002, ACK, options=tcp_options_sack([(5002, 10002)])),
                       0.2)
    assert e.take_actions() == [ConsumeHost(4000)]
    e.on_guest_segment(guest_seg(2, 10002, ACK), 0.3)
    assert e.take_actions() == [ConsumeHost(6000)]


def test_rto_in_sack_recovery_resends_the_holes_then_rewinds() -> None:
    """A resend lost with nothing sent after it: the RTO sends the holes again and keeps
    what the guest SACKed (as Linux's tcp_enter_loss does); a second expiry in a row
    rewinds, in case the guest dropped what it SACKed (RFC 2018 §8)."""
    e = sack_established(1000)
    e.on_host_data(memoryview(bytes(5000)), 0.0)  # 2 .. 5002
    e.take_actions()
    e.on_guest_segment(guest_seg(2, 2, ACK, options=tcp_options_sack([(1002, 5002)])), 0.1)
    assert e.take_actions() == [ResendHost(0, 1000)]
    e.on_host_resend(0, memoryview(bytes(1000)))
    e.take_actions()
    deadline = e.next_deadline()
    assert deadline is not None
    e.on_timer(deadline, None)
    assert e.take_actions() == [ResendHost(0, 1000)]
    assert e.bytes_in_flight == 5000  # no rewind: the guest's blocks still count
    e.on_host_resend(0, memoryview(bytes(1000)))
    e.take_actions()
    deadline = e.next_deadline()
    assert deadline is not None
    e.on_timer(deadline, None)
    assert e.take_actions() == [RewindHost()]
    assert e.bytes_in_flight == 0 and e.sacked is not None and e.sacked.blocks == []


def test_tail_loss_probe_sends_the_last_segment_and_its_sack_shows_the_hole() -> None:
    """RFC 8985 §7: the tail of a flight is lost, so the guest has nothing beyond it to
    SACK. Two round trips (at least TLP_MIN_S) after the last ACK, the last segment goes
    out again, once; the guest's SACK of it marks the hole lost, long before the RTO."""
    e = sack_established(1000)
    e.guest_srtt, e.guest_rttvar = 0.002, 0.001  # as the guest's timestamps measured
    e.on_host_data(memoryview(bytes(5000)), 0.0)  # 2 .. 5002 in five segments
    e.take_actions()
    e.on_guest_segment(guest_seg(2, 3002, ACK), 0.002)  # 3002 .. 5002 were lost
    assert e.take_actions() == [ConsumeHost(3000)]
    assert e.rto_at == pytest.approx(0.002 + 0.002 + RTO_MIN_S)
    assert e.next_deadline() == pytest.approx(0.002 + TLP_MIN_S)
    e.on_timer(0.002 + TLP_MIN_S, None)
    assert e.take_actions() == [ResendHost(1000, 1000, probe=True)]
    e.on_host_resend(1000, memoryview(b"p" * 1000))
    [probe] = sent(e.take_actions())
    assert (probe.seq, len(probe.payload)) == (4002, 1000)
    assert e.tlp_at is None  # one probe per flight: the RTO is next
    e.on_guest_segment(guest_seg(2, 3002, ACK, options=tcp_options_sack([(4002, 5002)])),
                       0.014)
    assert e.take_actions() == [ResendHost(0, 1000)]
    e.on_host_resend(0, memoryview(bytes(1000)))
    e.take_actions()
    e.on_guest_segment(guest_seg(2, 5002, ACK), 0.016)
    assert e.take_actions() == [ConsumeHost(2000)]
    assert e.tlp_at is None and e.rto_at is None and e.bytes_in_flight == 0


def test_no_tail_loss_probe_where_it_would_not_come_before_the_rto() -> None:
    """No probe without SACK or a measured round trip, for a single segment in flight
    (the guest may delay its ACK, WCDelAckT, which leaves the RTO first), in SACK
    recovery, or after an RTO until an ACK of new data."""
    plain = established(1, 1)
    plain.guest_srtt = 0.002
    plain.on_host_data(memoryview(bytes(5000)), 0.0)
    assert plain.tlp_at is None
    e = sack_established(1000)
    e.on_host_data(memoryview(bytes(5000)), 0.0)
    assert e.tlp_at is None  # no round trip measured yet
    e.guest_srtt = 0.002
    e.on_guest_segment(guest_seg(2, 4002, ACK), 0.001)
    assert e.bytes_in_flight == 1000 and e.tlp_at is None
    e = sack_established(1000)
    e.guest_srtt = 0.002
    e.on_host_data(memoryview(bytes(5000)), 0.0)
    assert e.tlp_at == pytest.approx(TLP_MIN_S)
    e.on_guest_segment(guest_seg(2, 1002, ACK, options=tcp_options_sack([(2002, 3002)])),
                       0.001)
    assert e.tlp_at is None  # recovery: the holes are resent from the SACK blocks
    e = sack_established(1000)
    e.guest_srtt = 0.002
    e.on_host_data(memoryview(bytes(5000)), 0.0)
    e.take_actions()
    e.tlp_at = None
    deadline = e.next_deadline()
    assert deadline is not None
    e.on_timer(deadline, None)  # the RTO
    assert e.take_actions() == [RewindHost()]
    e.on_host_data(memoryview(bytes(5000)), deadline)
    assert e.tlp_at is None


def test_sack_recovery_sends_less_than_go_back_n() -> None:
    """Whole downloads over a link that loses 5% of frames (tcp_sim's guest holds data
    beyond a hole and reports it, as Linux does): with SACK the relay resends holes,
    without it the flight from the first loss on. Same seeds, same data."""
    frames = {}
    for sack in (False, True):
        total = resends = 0
        for seed in range(6):
            sc = Scenario(host_data=random.Random(seed).randbytes(300_000), guest_mss=1460,
                          guest_rcvbuf=65535, guest_wscale=7, loss=0.05, guest_sack=sack,
                          host_sndbuf=1 << 20, seed=seed)
            sim = TcpSim(sc).run()
            check_outcome(sim)
            total += sim.stats["relay_frames"]
            resends += sim.stats["tcp_sack_resends"]
        frames[sack] = total
        assert (resends > 0) == sack
    assert frames[True] < 0.8 * frames[False], frames


def test_a_held_back_peer_gets_through_as_the_receive_buffer_grows() -> None:
    """A host peer held to what its socket's receive buffer takes (Linux's default
    128 KiB) and a guest with a wide window: the flight fills the buffer, the relay's
    pump grows it (host/pump.py), and the downloads arrive whole."""
    grown = 0
    for seed in range(4):
        sc = Scenario(host_data=random.Random(seed).randbytes(1_000_000), guest_mss=1460,
                      guest_rcvbuf=1 << 20, guest_wscale=7, host_rcvbuf=131_072, loss=0.02,
                      guest_sack=True, host_sndbuf=1 << 20, seed=seed)
        sim = TcpSim(sc).run()
        check_outcome(sim)
        grown += sim.stats["tcp_rcvbuf_grown"]
    assert grown > 0


def test_data_lost_before_our_fin_is_sent_again() -> None:
    """Regression: after our FIN, a rewind must still let the data before it out, then
    the FIN again (this used to stall until the flow was reset)."""
    e = established(1, M32 - 10)
    e.on_host_data(memoryview(b"0123456789ABCDEFGHIJ"), 0.0)
    e.on_host_eof(0.0)
    segs = sent(e.take_actions())
    assert segs[-1].flags == FIN | ACK and segs[-1].seq == (M32 - 10 + 1 + 20) & M32
    assert e.state is TcpState.FIN_WAIT_1
    assert e.host_read_budget() == 0
    # The guest got the first 5 bytes only; RTO.
    e.on_guest_segment(guest_seg(2, M32 - 10 + 1 + 5, ACK), 0.1)
    assert e.take_actions() == [ConsumeHost(5)]
    e.on_timer(e.rto_at, None)
    assert e.take_actions() == [RewindHost()]
    assert e.host_read_budget() == 15
    e.on_host_data(memoryview(b"56789ABCDEFGHIJ-EOF-is-not-data"), 2.0)
    segs = sent(e.take_actions())
    assert bytes(segs[0].payload) == b"56789ABCDEFGHIJ"
    assert segs[-1].flags == FIN | ACK and segs[-1].seq == (M32 - 10 + 1 + 20) & M32
    assert e.host_read_budget() == 0
    e.on_guest_segment(guest_seg(2, M32 - 10 + 1 + 21, ACK), 2.1)
    assert e.take_actions() == [ConsumeHost(15)]
    assert e.state is TcpState.FIN_WAIT_2 and e.host_read_budget() == 0


def test_short_host_write_acks_only_accepted() -> None:
    e = established(M32 - 2, 1)
    data = e.on_guest_segment(guest_seg(M32 - 1, 2, ACK | PSH, payload=b"hello world"), 0.0)
    assert bytes(data) == b"hello world"
    e.on_host_accepted(4, 0.0)
    e.flush(None, 0.0)
    (ack,) = sent(e.take_actions())
    assert ack.ack == (M32 - 1 + 4) & M32
    # The guest resends from there; overlapping bytes are not returned twice.
    data = e.on_guest_segment(guest_seg(M32 - 1, 2, ACK, payload=b"hello world!"), 0.1)
    assert bytes(data) == b"o world!"
    e.on_host_accepted(len(data), 0.1)
    # Once the socket is writable again: a window update and three duplicate ACKs.
    e.on_guest_segment(guest_seg(M32 - 1 + 12, 2, ACK, payload=b"more"), 0.2)
    e.on_host_accepted(0, 0.2)
    e.take_actions()
    e.on_host_writable(0.3)
    e.flush(None, 0.3)
    acks = sent(e.take_actions())
    assert len(acks) == 4 and {a.ack for a in acks} == {(M32 - 1 + 12) & M32}


def test_window_from_socket_facts() -> None:
    e = established(1, 1, wscale=7)
    info = TcpInfo(rtt_us=2000, rcv_space=10_000, snd_wnd=300_000)
    e.on_guest_segment(guest_seg(2, 2, ACK, payload=b"q"), 0.0)
    e.on_host_accepted(1, 0.0)
    e.flush(SocketFacts(info, sndbuf=1_000_000, outq=100_000), 0.0)
    (ack,) = sent(e.take_actions())
    assert ack.window == 300_000 >> 8  # our shift is 8
    # A full send buffer closes the window; the ACK check timer watches it.
    e.on_guest_segment(guest_seg(3, 2, ACK, payload=b"r"), 0.0)
    e.on_host_accepted(1, 0.0)
    e.flush(SocketFacts(info, sndbuf=1_000_000, outq=500_000), 0.0)
    (ack,) = sent(e.take_actions())
    assert ack.window == 0
    assert e.ack_check_at == pytest.approx(0.0016)  # RTT 2 ms kept as 3.2 ms; half
    e.on_timer(0.0016, SocketFacts(info, sndbuf=1_000_000, outq=0))
    (update,) = sent(e.take_actions())
    assert update.window == 300_000 >> 8 and update.ack == 4


def test_window_check_keeps_watching_a_host_socket_that_drains() -> None:
    """A guest held by a full host socket sends nothing, like an idle one; but while the
    socket holds unacknowledged data the checks must not back off to the idle 1 s:
    the window reopens as it drains, and only our update tells the guest."""
    e = established(1, 1, wscale=7)
    info = TcpInfo(rtt_us=2000, rcv_space=10_000, snd_wnd=300_000)
    full = SocketFacts(info, sndbuf=1_000_000, outq=500_000)
    e.on_guest_segment(guest_seg(2, 2, ACK, payload=b"r"), 0.0)
    e.on_host_accepted(1, 0.0)
    e.flush(full, 0.0)
    (ack,) = sent(e.take_actions())
    assert ack.window == 0
    # The peer reads nothing for 50 ms, then everything.
    now = 0.0
    while True:
        assert e.ack_check_at is not None
        now = e.ack_check_at
        e.on_timer(now, full if now < 0.05 else SocketFacts(info, 1_000_000, 0))
        if updates := sent(e.take_actions()):
            break
    assert updates[0].window == 300_000 >> 8
    assert now < 0.2  # doubling from RTT/2: 0.1008 s; idle backoff: 1.0016 s


def test_guest_fin_then_host_fin() -> None:
    e = established(M32, M32)
    assert e.on_guest_segment(guest_seg(0, 0, ACK | FIN), 0.0) is None
    acts = e.take_actions()
    assert acts[0] == ShutdownHostWrite()
    (ack,) = sent(acts)
    assert ack.ack == 1 and e.state is TcpState.CLOSE_WAIT
    e.on_host_eof(0.1)
    (fin,) = sent(e.take_actions())
    assert fin.flags == FIN | ACK and fin.seq == 0 and e.state is TcpState.LAST_ACK
    e.on_guest_segment(guest_seg(1, 1, ACK), 0.2)
    assert e.take_actions() == [CloseHost(abortive=False)]
    assert e.state is TcpState.CLOSED


def ts_opt(tsval: int, tsecr: int) -> bytes:
    return b"\x01\x01\x08\x0a" + tsval.to_bytes(4, "big") + tsecr.to_bytes(4, "big")


@given(isns, isns, isns)
@example(M32, M32, M32 - 1)
def test_timestamps(isn: int, iss: int, guest_ts: int) -> None:
    """RFC 7323: with timestamps offered, every segment carries TSval (a ms clock that
    never goes back) and TSecr = TS.Recent, which only follows the segment at the left
    edge of what we acknowledge (§4.3); the payload per segment loses the option's 12
    bytes (RFC 6691)."""
    ts = lambda k: (guest_ts + k) & M32  # noqa: E731
    syn_seg = guest_seg(isn, 0, SYN, 65535, options=tcp_options_syn(1460, 7, (ts(0), 0)))
    assert syn_seg.tsval == ts(0)
    tmpl = TcpFrameTemplate(dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP, dst=GUEST_IP,
                            sport=REMOTE_PORT, dport=GUEST_PORT, timestamps=True)
    e = TcpNatEntry(syn_seg, template=tmpl, mtu=MTU, iss=iss, now=0.0)
    assert e.mss == 1460 - 12
    e.on_connect_result(True, None, 0.0)
    (sa,) = sent(e.take_actions())
    assert (sa.flags, sa.tsecr, sa.mss, sa.wscale) == (SYN | ACK, ts(0), MTU - 40, 8)
    first_tsval = sa.tsval
    e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK, 1000, options=ts_opt(ts(5), sa.tsval)),
                       0.010)
    assert e.state is TcpState.ESTABLISHED
    data = e.on_guest_segment(guest_seg(isn + 1, iss + 1, ACK, 1000, b"0123456789",
                                        ts_opt(ts(10), sa.tsval)), 0.020)
    e.on_host_accepted(len(data), 0.020)
    e.flush(None, 0.020)
    (ack,) = sent(e.take_actions())
    assert (ack.ack, ack.tsecr) == ((isn + 11) & M32, ts(10))
    assert (ack.tsval - first_tsval) & M32 == 20  # milliseconds
    # Out of order (a gap before it): the duplicate ACK still echoes the left edge's TSval.
    e.on_guest_segment(guest_seg(isn + 31, iss + 1, ACK, 1000, b"x" * 10,
                                 ts_opt(ts(30), sa.tsval)), 0.030)
    (dup,) = sent(e.take_actions())
    assert (dup.ack, dup.tsecr) == ((isn + 11) & M32, ts(10))
    # Host data: segments of mss - 12 bytes, each with the option.
    e.on_host_data(memoryview(bytes(3000)), 2.5)
    segs = sent(e.take_actions())
    assert [len(s.payload) for s in segs] == [1448, 1448, 104]
    assert all(s.tsecr == ts(10) and (s.tsval - first_tsval) & M32 == 2500 for s in segs)


def test_idle_timeout_resets_both_ways_and_traffic_postpones_it() -> None:
    e = TcpNatEntry(syn(5000, 7, 1460), template=relay_template(), mtu=MTU, iss=9000,
                    now=0.0, idle_timeout_s=30.0)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(5001, 9001, ACK, 65535), 1.0)
    assert e.state is TcpState.ESTABLISHED
    e.on_guest_segment(guest_seg(5001, 9001, ACK, 65535, b"hi"), 20.0)
    e.on_host_accepted(2, 20.0)
    e.flush(None, 20.0)
    e.take_actions()
    assert e.next_deadline() == 50.0  # 30 s after the last guest segment
    e.on_timer(49.9, None)
    assert e.state is TcpState.ESTABLISHED and e.take_actions() == []
    e.on_timer(50.0, None)
    acts = e.take_actions()
    (rst,) = sent(acts)
    assert rst.flags == RST | ACK and rst.seq == 9001 and rst.ack == 5003
    assert acts[-1] == CloseHost(abortive=True)
    assert e.state is TcpState.CLOSED
