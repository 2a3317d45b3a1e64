"""host_pump with CAP_NET_ADMIN (root): a flow's host socket receive buffer doubles when
the flight toward the guest fills half of it (SO_RCVBUFFORCE, beyond net.core.rmem_max),
and a relay's flows together grow within one budget. Without the capability and the
pump's turns: tests/unit/test_host_pump.py.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Iterator

import pytest
from unit.test_host_pump import _flow, _grow_to_the_end, _loopback, _rcvbuf

from relaynat.host.pump import RCVBUF_BUDGET, RCVBUF_MAX, HostPump

# SO_RCVBUFFORCE needs CAP_NET_ADMIN: without it the buffer stops at rmem_max.
pytestmark = pytest.mark.integration


@pytest.fixture
def connection() -> Iterator[socket.socket]:
    sock, peer = _loopback()
    try:
        yield sock
    finally:
        sock.close()
        peer.close()


def test_a_flight_that_fills_half_the_buffer_doubles_it(connection: socket.socket) -> None:
    stats: Counter[str] = Counter()
    pump = HostPump(stats, lambda flow: None)
    size = _rcvbuf(connection)
    flow = _flow(connection, size // 2)
    assert not pump.pump(flow, 0.0)  # dry: nothing to peek
    assert _rcvbuf(connection) == 2 * size
    assert stats["tcp_rcvbuf_grown"] == 1 and flow.rcvbuf_watch == size
    # It goes on doubling with the flight, beyond rmem_max (as root: SO_RCVBUFFORCE), up
    # to RCVBUF_MAX, and then stops asking.
    grown = 2 * size
    while grown < RCVBUF_MAX:
        flow.entry.on_host_data(memoryview(bytes(grown // 2 - flow.entry.bytes_in_flight)), 0)
        flow.host_readable = True
        pump.pump(flow, 0.0)
        grown = min(2 * grown, RCVBUF_MAX)
        assert _rcvbuf(connection) == grown
    flow.entry.on_host_data(memoryview(bytes(RCVBUF_MAX // 2 - flow.entry.bytes_in_flight)), 0)
    flow.host_readable = True
    pump.pump(flow, 0.0)
    assert flow.rcvbuf_watch > 1 << 40 and _rcvbuf(connection) == RCVBUF_MAX


def test_a_relays_flows_grow_their_buffers_within_one_budget() -> None:
    """A guest that keeps a wide window and never acknowledges must not pin RCVBUF_MAX
    of host memory in every flow: growth beyond RCVBUF_BUDGET waits until a flow that
    grew leaves (closed or moved) and gives its share back."""
    stats: Counter[str] = Counter()
    pump = HostPump(stats, lambda flow: None)
    pairs = [_loopback() for _ in range(3)]
    try:
        flows = [_flow(sock, 0) for sock, _ in pairs]
        start = [_rcvbuf(sock) for sock, _ in pairs]
        for flow in flows:
            _grow_to_the_end(pump, flow)
        grown = [_rcvbuf(sock) - before for (sock, _), before in zip(pairs, start, strict=True)]
        assert sum(grown) <= RCVBUF_BUDGET < sum(grown) + RCVBUF_MAX, grown
        assert grown[0] == RCVBUF_MAX - start[0] and grown[2] < grown[0], grown
        assert stats["tcp_rcvbuf_budget_full"] >= 1
        assert [f.rcvbuf_granted for f in flows] == grown
        pump.release(flows[0])  # its flow closed
        flows[2].rcvbuf_watch = _rcvbuf(pairs[2][0]) // 2
        _grow_to_the_end(pump, flows[2])
        assert _rcvbuf(pairs[2][0]) == RCVBUF_MAX
    finally:
        for sock, peer in pairs:
            sock.close()
            peer.close()
