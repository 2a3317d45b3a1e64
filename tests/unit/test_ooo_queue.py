"""The out-of-order queue for guest -> host data (ooo_queue.py) and SACK (RFC 2018),
through `TcpNatEntry` and on its own.

The stream property: cut a byte stream into random segments, deliver them in any
order with duplicates (and, optionally, host writes that take only part): the host
side receives exactly the stream, the cumulative ACK never covers a byte the host
did not take, and every SACK block is held data, the first one holding the segment
that triggered it (RFC 2018 §4). The bounds: nothing beyond the advertised window, at
most MAX_BLOCKS blocks, and the byte budget shared by many flows is never exceeded,
what does not fit is dropped or reneged and counted, and all of it is given back when
the flows end.
"""

from __future__ import annotations

import random
import time
from itertools import pairwise

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from support.tcp_sim import GUEST_IP, GUEST_MAC, MTU, RELAY_MAC, REMOTE_IP

from relaynat.nat_entry import TcpNatEntry
from relaynat.ooo_queue import (
    CHUNK_OVERHEAD,
    COALESCE_BYTES,
    MAX_BLOCKS,
    OooBudget,
    OooQueue,
)
from relaynat.packet_builder import TcpFrameTemplate, tcp_options_sack, tcp_options_syn
from relaynat.tcp_state import TcpState
from relaynat.window import SocketFacts, TcpInfo
from relaynat.wire import (
    ACK,
    FIN,
    SYN,
    TcpSegment,
    parse_ethernet,
    parse_ipv4,
    parse_tcp,
    seq_diff,
)
from unit.test_nat_entry import guest_seg, isns, relay_template, sent

M32 = 0xFFFFFFFF
ISS = 5000
#: Socket facts that open a 1 MiB window (window.py: min(sndbuf/2 - outq, rcv_space)).
WIDE = SocketFacts(TcpInfo(rtt_us=1000, rcv_space=1 << 20, snd_wnd=1 << 20), 4 << 20, 0)


def open_flow(isn: int, budget: OooBudget | None, sack: bool = True,
              timestamps: bool = False, wide: bool = True) -> TcpNatEntry:
    """An ESTABLISHED entry whose guest offered SACK (or not), with a 1 MiB window."""
    ts = (1, 0) if timestamps else None
    syn = guest_seg(isn, 0, SYN, 65535, options=tcp_options_syn(1460, 7, ts, sack))
    template = relay_template().with_timestamps(timestamps)
    e = TcpNatEntry(syn, template=template, mtu=MTU, iss=ISS, now=0.0, ooo_budget=budget)
    e.on_connect_result(True, None, 0.0)
    e.take_actions()
    e.on_guest_segment(guest_seg(isn + 1, ISS + 1, ACK), 0.0)
    assert e.state is TcpState.ESTABLISHED
    if wide:
        e.flush(WIDE, 0.0)  # records the wide window ...
        e.on_guest_segment(guest_seg(isn, ISS + 1, ACK), 0.0)  # ... a probe's ACK says it
        e.flush(WIDE, 0.0)
        e.take_actions()
        assert seq_diff(e.adv_edge, e.rcv_nxt) >= 1 << 19
    return e


def deliver(e: TcpNatEntry, seg: TcpSegment, host: bytearray,
            accept: random.Random | None = None) -> list[TcpSegment]:
    """What tcp_relay does with one guest segment: write the in-order data, then what
    the queue made in order, each write taking all (or a random part with `accept`);
    returns the frames the entry sent."""
    def write(data: bytes) -> int:
        n = len(data)
        if accept is not None and accept.random() < 0.5:
            n = accept.randint(0, n)
        host.extend(data[:n])
        return n

    data = e.on_guest_segment(seg, 0.1)
    if data is not None:
        e.on_host_accepted(write(bytes(data)), 0.1)
    while (chunks := e.host_backlog()) is not None:
        e.on_host_accepted(write(b"".join(chunks)) if chunks else 0, 0.1)
    e.flush(WIDE, 0.1)
    return sent(e.take_actions())


def held(e: TcpNatEntry) -> list[tuple[int, int]]:
    return [] if e.ooo is None else [(a, b) for a, b, _ in e.ooo.blocks()]


def check_sack(e: TcpNatEntry, ack: TcpSegment, isn1: int, stream: bytes,
               trigger: tuple[int, int] | None) -> None:
    blocks = ack.sack or []
    assert len(blocks) <= (3 if e.template.timestamps else 4)
    if not e.sack_ok:
        assert not blocks
        return
    holding = held(e)
    for left, right in blocks:
        # Each block is one whole held block (maximal: blocks never touch) ...
        assert (left, right) in holding, (blocks, holding)
        lo = seq_diff(left, isn1)
        assert seq_diff(ack.ack, isn1) <= lo
    assert len(set(blocks)) == len(blocks)
    assert len(blocks) == min(len(holding), 3 if e.template.timestamps else 4)
    if trigger is not None and blocks:
        # ... and the first holds the segment that triggered this ACK (RFC 2018 §4).
        left, right = blocks[0]
        assert seq_diff(trigger[0], left) >= 0 and seq_diff(right, trigger[1]) >= 0, (
            blocks, trigger)
    for left, right, data in e.ooo.blocks() if e.ooo is not None else []:
        lo = seq_diff(left, isn1)
        assert data == stream[lo:lo + len(data)]
        assert seq_diff(right, left) == len(data)


@st.composite
def shuffled_segments(draw: st.DrawFn) -> tuple[bytes, list[tuple[int, int]], bool]:
    size = draw(st.integers(1, 40_000))
    stream = random.Random(size).randbytes(size)
    cuts = sorted(draw(st.sets(st.integers(1, size - 1), max_size=80)) if size > 1 else set())
    edges = [0, *cuts, size]
    segs = list(pairwise(edges))
    # Retransmissions that span several original segments, and duplicates.
    for _ in range(draw(st.integers(0, 10))):
        a = draw(st.integers(0, len(segs) - 1))
        b = draw(st.integers(a, len(segs) - 1))
        segs.append((segs[a][0], segs[b][1]))
    order = draw(st.permutations(segs))
    return stream, list(order), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(shuffled_segments(), isns, st.booleans(), st.booleans(), st.integers(0, 2**32 - 1))
@example((bytes(range(256)) * 8, [(1024, 2048), (0, 1024)], True), M32 - 1500, True, False, 0)
def test_any_segmentation_order_and_duplication_delivers_the_stream(
        case: tuple[bytes, list[tuple[int, int]], bool], isn: int, sack: bool,
        short_writes: bool, seed: int) -> None:
    stream, order, fin = case
    budget = OooBudget(4 << 20)
    e = open_flow(isn, budget, sack=sack)
    isn1 = (isn + 1) & M32
    host = bytearray()
    accept = random.Random(seed) if short_writes else None
    end = len(stream)
    # Short writes lose the unaccepted rest of in-order data (the guest resends it):
    # go round again until the stream is through, as the guest's retransmissions would.
    for _ in range(60 if short_writes else 1):
        for lo, hi in order:
            if e.state is not TcpState.ESTABLISHED:
                break
            flags = ACK | FIN if fin and hi == end else ACK
            seg = guest_seg(isn1 + lo, ISS + 1, flags, payload=stream[lo:hi])
            rcv_before = seq_diff(e.rcv_nxt, isn1)
            frames = deliver(e, seg, host, accept)
            assert bytes(host) == stream[:len(host)]
            assert budget.used <= budget.limit
            # An out-of-order segment is answered at once, its block first in the SACK.
            trigger = ((isn1 + lo) & M32, (isn1 + hi) & M32) if hi > lo > rcv_before else None
            for i, f in enumerate(frames):
                # Nothing acknowledged before the host took it (the FIN after the last byte).
                assert seq_diff(f.ack, isn1) <= len(host) + (len(host) == end and fin)
                check_sack(e, f, isn1, stream, trigger if i == 0 else None)
            if e.write_blocked:
                e.on_host_writable(0.1)
                deliver(e, guest_seg(isn1 - 1, ISS + 1, ACK), host, accept)
        if len(host) == end:
            break
    assert bytes(host) == stream
    if fin:
        assert e.state is TcpState.CLOSE_WAIT
    assert e.ooo is None and budget.used == 0


def test_sack_blocks_most_recent_first_and_as_many_as_fit() -> None:
    budget = OooBudget(1 << 20)
    for timestamps, room in ((False, 4), (True, 3)):
        e = open_flow(100, budget, timestamps=timestamps)
        base = 101
        order = [(1000, 1100), (3000, 3100), (2000, 2100), (5000, 5100), (4000, 4100)]
        for lo, hi in order:
            (ack,) = deliver(e, guest_seg(base + lo, ISS + 1, ACK, payload=bytes(hi - lo)),
                             bytearray())
            assert ack.ack == base
        expect = [(base + lo, base + hi) for lo, hi in reversed(order)]
        assert ack.sack == expect[:room]
        # A segment that extends the oldest block puts it first (it triggered the ACK).
        (ack,) = deliver(e, guest_seg(base + 1100, ISS + 1, ACK, payload=bytes(50)),
                         bytearray())
        assert ack.sack == [(base + 1000, base + 1150), *expect[:room - 1]]
        # Two blocks joined by the segment between them: one block, reported first.
        (ack,) = deliver(e, guest_seg(base + 2100, ISS + 1, ACK, payload=bytes(900)),
                         bytearray())
        assert ack.sack[0] == (base + 2000, base + 3100)
        assert len(set(ack.sack)) == len(ack.sack) == room
        e.on_guest_gone()
    assert budget.used == 0


def test_hole_filled_writes_held_data_and_acks_it_only_then() -> None:
    budget = OooBudget(1 << 20)
    e = open_flow(M32 - 10, budget)  # the stream crosses 2**32
    isn1 = (M32 - 10 + 1) & M32
    host = bytearray()
    (ack,) = deliver(e, guest_seg(isn1 + 100, ISS + 1, ACK | FIN, payload=b"b" * 100), host)
    assert ack.ack == isn1 and ack.sack == [((isn1 + 100) & M32, (isn1 + 200) & M32)]
    assert host == b"" and e.state is TcpState.ESTABLISHED
    frames = deliver(e, guest_seg(isn1, ISS + 1, ACK, payload=b"a" * 100), host)
    assert host == b"a" * 100 + b"b" * 100
    # The FIN that arrived out of order went with its data: half-close, ACK of the FIN.
    assert e.state is TcpState.CLOSE_WAIT
    assert frames[-1].ack == (isn1 + 201) & M32 and frames[-1].sack is None
    assert e.ooo is None and budget.used == 0


def test_short_write_of_held_data_keeps_the_rest() -> None:
    budget = OooBudget(1 << 20)
    e = open_flow(0, budget)
    deliver(e, guest_seg(1 + 10, ISS + 1, ACK, payload=b"y" * 90), bytearray())
    data = e.on_guest_segment(guest_seg(1, ISS + 1, ACK, payload=b"x" * 10), 0.2)
    e.on_host_accepted(len(data), 0.2)
    chunks = e.host_backlog()
    assert chunks == [b"y" * 90]
    e.on_host_accepted(40, 0.2)  # the socket is full after 40 of them
    assert e.write_blocked and e.host_backlog() is None
    assert held(e) == [(51, 101)]
    e.on_host_writable(0.3)
    assert e.host_backlog() == [b"y" * 50]  # no retransmission needed
    e.on_host_accepted(50, 0.3)
    e.flush(WIDE, 0.3)
    acks = sent(e.take_actions())
    # Only the window update: no duplicate ACKs asking for data that was never lost.
    assert [a.ack for a in acks] == [101] and e.ooo is None


def test_data_beyond_the_window_is_not_held() -> None:
    budget = OooBudget(1 << 20)
    e = open_flow(0, budget, wide=False)
    window = seq_diff(e.adv_edge, e.rcv_nxt)
    deliver(e, guest_seg(1 + window, ISS + 1, ACK, payload=b"z" * 100), bytearray())
    assert e.ooo is None and budget.counters["tcp_ooo_drop_window"] == 1
    window = seq_diff(e.adv_edge, e.rcv_nxt)  # as the duplicate ACK just said it
    deliver(e, guest_seg(1 + window - 60, ISS + 1, ACK, payload=b"z" * 100), bytearray())
    assert held(e) == [(1 + window - 60, 1 + window)]  # trimmed to the window
    assert budget.counters["tcp_ooo_drop_window"] == 2


def test_one_byte_holes_hold_at_most_max_blocks() -> None:
    budget = OooBudget(1 << 20)
    e = open_flow(0, budget)
    for i in range(MAX_BLOCKS + 50):
        deliver(e, guest_seg(1 + 2 + 2 * i, ISS + 1, ACK, payload=b"q"), bytearray())
    assert len(held(e)) == MAX_BLOCKS
    assert budget.counters["tcp_ooo_drop_blocks"] == 50
    assert budget.used == MAX_BLOCKS * (1 + CHUNK_OVERHEAD)


def test_memory_pressure_reneges_the_farthest_data_first() -> None:
    seg_cost = 1000 + CHUNK_OVERHEAD
    budget = OooBudget(2 * seg_cost)
    e = open_flow(0, budget)
    for lo in (5000, 9000):
        deliver(e, guest_seg(1 + lo, ISS + 1, ACK, payload=bytes(1000)), bytearray())
    assert held(e) == [(5001, 6001), (9001, 10001)]
    # Nearer the hole and no room: the farthest block goes (RFC 2018 §8), counted.
    (ack,) = deliver(e, guest_seg(1 + 2000, ISS + 1, ACK, payload=bytes(1000)), bytearray())
    assert held(e) == [(2001, 3001), (5001, 6001)]
    assert budget.counters["tcp_ooo_reneged_bytes"] == 1000
    assert ack.sack == [(2001, 3001), (5001, 6001)] and ack.ack == 1
    # Farther than anything held and no room: the segment itself is dropped.
    deliver(e, guest_seg(1 + 20_000, ISS + 1, ACK, payload=bytes(1000)), bytearray())
    assert held(e) == [(2001, 3001), (5001, 6001)]
    assert budget.counters["tcp_ooo_drop_budget"] == 1
    assert budget.used == 2 * seg_cost


def test_a_flood_across_many_flows_stays_within_the_budget() -> None:
    """Many flows of one guest sending only data beyond a hole, never filling it: the
    shared budget holds, every flow stays inside its window, the excess is counted,
    and all of it comes back as the flows end."""
    limit = 300_000
    budget = OooBudget(limit)
    rnd = random.Random(1)
    flows = [open_flow(rnd.getrandbits(32), budget, sack=bool(i % 2)) for i in range(100)]
    for _ in range(3000):
        e = rnd.choice(flows)
        isn1 = e.guest_isn + 1
        lo = rnd.randrange(1, 1 << 20)
        deliver(e, guest_seg(isn1 + lo, ISS + 1, ACK, payload=bytes(rnd.randint(1, 1400))),
                bytearray())
        assert budget.used <= limit
        assert all(seq_diff(b, e.adv_edge) <= 0 for _, b in held(e))
    counters = budget.counters
    assert counters["tcp_ooo_drop_budget"] + counters["tcp_ooo_reneged_bytes"] > 0
    assert counters["tcp_ooo_peak_bytes"] <= limit
    for e in flows[:50]:
        e.on_guest_gone()
    for e in flows[50:]:
        deliver(e, guest_seg(e.rcv_nxt, ISS + 1, ACK | FIN), bytearray())  # a FIN in order
        assert e.state is TcpState.CLOSE_WAIT and e.ooo is None
    assert budget.used == 0


def test_sack_permitted_only_when_offered_and_held() -> None:
    for offered, limit in ((True, 1 << 20), (False, 1 << 20), (True, 0)):
        budget = OooBudget(limit)
        syn = guest_seg(7, 0, SYN, options=tcp_options_syn(1460, 7, None, offered))
        assert syn.sack_permitted is offered
        e = TcpNatEntry(syn, template=relay_template(), mtu=MTU, iss=ISS, now=0.0,
                        ooo_budget=budget)
        e.on_connect_result(True, None, 0.0)
        (syn_ack,) = sent(e.take_actions())
        assert syn_ack.sack_permitted is (offered and limit > 0)
        e.on_guest_segment(guest_seg(8, ISS + 1, ACK), 0.0)
        (ack,) = deliver(e, guest_seg(8 + 500, ISS + 1, ACK, payload=b"w"), bytearray())
        assert (ack.sack is not None) is (offered and limit > 0)
        assert (e.ooo is not None) is (limit > 0)
    # An inbound flow offers SACK in its SYN; the guest's SYN-ACK decides.
    template = TcpFrameTemplate(dst_mac=GUEST_MAC, src_mac=RELAY_MAC, src=REMOTE_IP,
                                dst=GUEST_IP, sport=80, dport=8080, timestamps=True)
    e = TcpNatEntry.inbound(template=template, mtu=MTU, iss=ISS, now=0.0, facts=None,
                            ooo_budget=OooBudget(1 << 20))
    (our_syn,) = [a for a in e.take_actions()]
    seg = _parse(our_syn.head)
    assert seg.sack_permitted and seg.tsval is not None and seg.wscale is not None


def _parse(frame: bytes) -> TcpSegment:
    return parse_tcp(parse_ipv4(parse_ethernet(memoryview(frame)).payload))


@given(st.lists(st.tuples(st.integers(0, M32), st.integers(0, M32)), min_size=1, max_size=4),
       st.booleans())
def test_sack_option_parses_back_and_as_dpkt_reads_it(blocks: list[tuple[int, int]],
                                                      ts: bool) -> None:
    blocks = blocks[:3] if ts else blocks
    opts = tcp_options_sack(blocks, (123, 456) if ts else None)
    assert len(opts) <= 40 and len(opts) % 4 == 0
    t = relay_template()
    frame = t.build(1, 2, ACK, 100, b"", opts)
    seg = _parse(frame)
    assert seg.sack == blocks
    assert (seg.tsval, seg.tsecr) == ((123, 456) if ts else (None, None))
    tcp = dpkt.ethernet.Ethernet(frame).data.data
    (sack,) = [v for k, v in dpkt.tcp.parse_opts(tcp.opts) if k == dpkt.tcp.TCP_OPT_SACK]
    assert [(int.from_bytes(sack[i:i + 4], "big"), int.from_bytes(sack[i + 4:i + 8], "big"))
            for i in range(0, len(sack), 8)] == blocks


@settings(max_examples=200, deadline=None)
@given(st.integers(0, M32), st.lists(st.tuples(st.integers(0, 3000), st.integers(1, 600),
                                               st.booleans()), max_size=40),
       st.integers(500, 50_000))
def test_queue_alone_holds_exact_bytes_within_budget(rcv_nxt: int,
                                                     ops: list[tuple[int, int, bool]],
                                                     limit: int) -> None:
    """OooQueue without an entry: inserts anywhere in a 3000-byte window, and advances
    of rcv_nxt (across 2**32): the blocks are sorted, disjoint, never touching, hold the
    stream's bytes, and the budget is charged exactly what they hold."""
    stream = random.Random(rcv_nxt).randbytes(8000)
    budget = OooBudget(limit)
    q = OooQueue(budget, rcv_nxt)
    nxt = 0
    for off, length, advance in ops:
        if advance:
            nxt = min(nxt + length, 3600)
            q.advance((rcv_nxt + nxt) & M32)
        else:
            lo = nxt + off
            q.insert((rcv_nxt + lo) & M32, stream[lo:lo + length], False,
                     (rcv_nxt + nxt + 3000) & M32)
        blocks = q.blocks()
        cost = 0
        prev_end = nxt - 1
        for left, right, data in blocks:
            lo = seq_diff(left, rcv_nxt)
            assert lo > prev_end and lo >= nxt  # sorted, apart, above rcv_nxt
            assert data == stream[lo:lo + len(data)] and seq_diff(right, left) == len(data)
            assert lo + len(data) <= nxt + 3000
            prev_end = lo + len(data)
        for chunks in q._chunks:
            cost += sum(map(len, chunks)) + CHUNK_OVERHEAD * len(chunks)
        assert budget.used == cost <= limit
    q.clear()
    assert budget.used == 0


@pytest.mark.parametrize("descending", [False, True])
def test_one_byte_segments_beyond_a_hole_cost_the_same_at_the_end(descending: bool) -> None:
    """120,000 contiguous one-byte segments beyond a hole, in order or
    backwards. The last ones cost what the first did (before, each insert rebuilt its
    block's list of chunks: 25 s in the relay), the block holds a chunk per KiB, and
    when the hole fills the host gets every byte once, the budget all given back."""
    count = 120_000
    stream = random.Random(9).randbytes(count + 1)
    budget = OooBudget(16 << 20)
    rcv_nxt = M32 - 5000  # across the wrap
    q = OooQueue(budget, rcv_nxt)
    offsets = range(count, 0, -1) if descending else range(1, count + 1)
    edge = (rcv_nxt + count + 1) & M32

    def insert(part: range) -> float:
        start = time.perf_counter()
        for off in part:
            q.insert((rcv_nxt + off) & M32, stream[off:off + 1], False, edge)
        return time.perf_counter() - start

    early = insert(offsets[:10_000])
    insert(offsets[10_000:-10_000])
    late = insert(offsets[-10_000:])
    assert late < 3 * early + 0.05, (early, late)
    ((left, right, data),) = q.blocks()
    assert (left, right) == ((rcv_nxt + 1) & M32, edge) and data == stream[1:]
    assert len(q._chunks[0]) <= count // COALESCE_BYTES + 2
    assert budget.used == count + CHUNK_OVERHEAD * len(q._chunks[0])
    assert budget.counters["tcp_ooo_segments"] == count
    # The hole fills: what is ready is the stream, written in IOV_CHUNKS-sized parts.
    got = bytearray(stream[:1])
    nxt = (rcv_nxt + 1) & M32
    q.advance(nxt)
    while (ready := q.ready()) is not None:
        chunks, fin = ready
        assert not fin
        took = b"".join(chunks)
        got += took
        nxt = (nxt + len(took)) & M32
        q.advance(nxt)
    assert bytes(got) == stream and not q and budget.used == 0


@settings(max_examples=200, deadline=None)
@given(st.integers(0, M32), st.lists(st.tuples(st.integers(0, 2500), st.integers(1, 6)),
                                     max_size=400), st.randoms(use_true_random=False))
def test_tiny_segments_in_any_order_coalesce_and_keep_the_stream(
        rcv_nxt: int, segs: list[tuple[int, int]], rnd: random.Random) -> None:
    """Segments of a few bytes, anywhere in the window and in any order, partly taken by
    the host now and then: the queue holds exactly the stream's bytes, no two chunks
    side by side that would fit in one unless a full one is between, and the budget is
    charged exactly what the lists hold."""
    stream = random.Random(rcv_nxt).randbytes(4000)
    budget = OooBudget(1 << 20)
    q = OooQueue(budget, rcv_nxt)
    nxt = 0
    for off, length in segs:
        if rnd.random() < 0.05:
            nxt = min(nxt + rnd.randint(1, 300), 1500)
            q.advance((rcv_nxt + nxt) & M32)
        lo = nxt + off
        q.insert((rcv_nxt + lo) & M32, stream[lo:lo + length], False,
                 (rcv_nxt + nxt + 2500) & M32)
        for left, _, data in q.blocks():
            lo = seq_diff(left, rcv_nxt)
            assert lo >= nxt and data == stream[lo:lo + len(data)]
        cost = 0
        for chunks in q._chunks:
            cost += sum(map(len, chunks)) + CHUNK_OVERHEAD * len(chunks)
            # At most one chunk per COALESCE_BYTES, give or take the ends.
            assert len(chunks) <= 2 * sum(map(len, chunks)) // COALESCE_BYTES + 2
        assert budget.used == cost
    q.clear()
    assert budget.used == 0
