"""The new-flow rate and the SYN backlog (syn_backlog.py), driven without I/O by
hypothesis. A real guest kernel's burst: tests/integration/test_syn_backlog.py.
"""

from __future__ import annotations

import tracemalloc
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from relaynat.syn_backlog import BACKLOG_CAPACITY, SynBacklog
from relaynat.wire import SYN, TcpSegment

GUEST, GW = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2])


def _syn(port: int, payload: bytearray) -> TcpSegment:
    return TcpSegment(GUEST, GW, port, 80, 1, 0, SYN, 64240, memoryview(payload))


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 50), burst=st.integers(1, 20), capacity=st.integers(0, 30),
       steps=st.lists(st.tuples(st.floats(0, 0.5), st.integers(0, 10)), max_size=40))
def test_flows_open_within_the_rate_in_arrival_order_and_the_rest_is_counted(
        rate: int, burst: int, capacity: int, steps: list[tuple[float, int]]) -> None:
    stats: Counter[str] = Counter()
    backlog = SynBacklog(stats, rate=rate, burst=burst, capacity=capacity)
    now, arrived, opened, at_once, again = 0.0, 0, [], 0, 0
    buf = bytearray(b"tfo")
    for gap, syns in steps:
        now += gap
        opened += [seg.sport for seg, _, _ in backlog.ready(now, limit=1 << 30)]
        for _ in range(syns):
            port = arrived
            arrived += 1
            if backlog.may_open(now):
                opened.append(port)
                at_once += 1
            else:
                backlog.defer(_syn(port, buf), "127.0.0.1", None)
                backlog.defer(_syn(port, buf), "127.0.0.1", None)  # sent again: one kept
                again += 1
        # Never more than the bucket allows since the start (it starts full).
        assert len(opened) <= burst + rate * now + 1e-9
        assert len(backlog) <= capacity
    buf[:] = b"new"  # the transport reuses its buffer: kept SYNs hold none of it
    while len(backlog):
        now += 1 / rate
        waiting = backlog.ready(now, limit=1 << 30)
        assert all(not seg.payload for seg, _, _ in waiting)
        opened += [seg.sport for seg, _, _ in waiting]
    # First come, first opened, once; every SYN opened, or dropped and counted.
    assert opened == sorted(set(opened))
    dropped, repeated = stats["tcp_syn_backlog_dropped"], stats["tcp_syn_backlog_repeated"]
    assert len(opened) + dropped + repeated == arrived + again
    assert stats["tcp_syn_deferred"] == len(opened) - at_once


@settings(max_examples=300, deadline=None)
@given(rate=st.integers(1, 5000), burst=st.integers(1, 20),
       steps=st.lists(st.tuples(st.floats(0, 0.01), st.integers(0, 10)), max_size=40))
def test_wait_s_is_when_the_oldest_waiting_syn_may_open(
        rate: int, burst: int, steps: list[tuple[float, int]]) -> None:
    """The relay's quiet-guest timer is set for `wait_s`: by then a SYN opens, and
    before it none could (a sequential client's SYN waited 20-40 ms for a fixed timer
    when its token was due in 0.5 ms)."""
    backlog = SynBacklog(Counter(), rate=rate, burst=burst)
    now, buf, port = 0.0, bytearray(), 0
    for gap, syns in steps:
        now += gap
        for _ in range(syns):
            port += 1
            if not backlog.may_open(now):
                backlog.defer(_syn(port, buf), "127.0.0.1", None)
        if not len(backlog):
            continue
        wait = backlog.wait_s(now)
        assert 0 <= wait <= 1 / rate
        if wait > 0:
            assert backlog.ready(now, limit=1) == []
        now += wait + 1e-9  # the float sum may round a hair below the exact token time
        assert len(backlog.ready(now, limit=1)) == 1


def test_waiting_syns_keep_their_options_and_not_their_payload() -> None:
    """A full backlog of SYNs carrying 64 KiB each holds kilobytes,
    not 64 MiB, and a waiting SYN still opens its flow with the options it offered."""
    backlog = SynBacklog(Counter(), rate=1, burst=1)
    assert backlog.may_open(0.0)
    payload = bytearray(64 << 10)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for port in range(BACKLOG_CAPACITY):
            seg = TcpSegment(GUEST, GW, 1024 + port, 80, 7, 0, SYN, 64240, memoryview(payload),
                             mss=1460, wscale=7, sack_permitted=True, tsval=5, tsecr=0)
            backlog.defer(seg, "127.0.0.1", None)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(backlog) == BACKLOG_CAPACITY
    assert held < 1 << 20, f"{held} bytes for {BACKLOG_CAPACITY} waiting SYNs"
    ((seg, host_ip, _),) = backlog.ready(1.5, limit=1)
    assert (seg.sport, seg.seq, seg.window, host_ip) == (1024, 7, 64240, "127.0.0.1")
    assert (seg.mss, seg.wscale, seg.sack_permitted, seg.tsval) == (1460, 7, True, 5)
    assert not seg.payload
