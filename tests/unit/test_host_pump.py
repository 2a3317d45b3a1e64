"""host_pump: a flow's host socket receive buffer grows with the flight toward the guest,
and what one flow and one relay take from the host in one wakeup is bounded.

Real loopback TCP sockets and a real `TcpNatEntry`; the pump runs dry on an empty
socket (EAGAIN) while the entry has bytes in flight, as it does when the host peer is
held back by a full receive buffer. Without CAP_NET_ADMIN (a child process whose
capabilities `setpriv` dropped) the buffer grows within net.core.rmem_max, or not at
all where that is too small to beat the kernel's own tuning. The growth beyond
rmem_max, which needs CAP_NET_ADMIN: tests/integration/test_host_pump_rcvbuf.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from termios import FIONREAD

import pytest

from relaynat.host.flow_turns import FlowTurns
from relaynat.host.pump import (
    FLOW_SLICE_BYTES,
    FLOW_SLICE_FRAMES,
    RCVBUF_MAX,
    RCVBUF_MIN_CEILING,
    RELAY_SLICE_FRAMES,
    HostPump,
)
from relaynat.host.tcp_flow import SO_PEEK_OFF, TcpFlow, ioctl_int
from relaynat.tcp_actions import SendFrame
from unit.test_nat_entry import established


def _loopback() -> tuple[socket.socket, socket.socket]:
    """The relay's end of a loopback connection whose peer sends nothing, and the peer."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
    return sock, peer


@pytest.fixture
def connection() -> Iterator[socket.socket]:
    sock, peer = _loopback()
    try:
        yield sock
    finally:
        sock.close()
        peer.close()


def _flow(sock: socket.socket, in_flight: int, mss: int = 1460) -> TcpFlow:
    entry = established(1, 1, window=0xFFFF, mss=mss)
    entry.guest_wscale = 14  # a window of 1 GiB, so every byte below is in flight
    entry.guest_wnd_edge = (entry.snd_una + (0xFFFF << 14)) & 0xFFFFFFFF
    entry.on_host_data(memoryview(bytes(in_flight)), 0.0)
    assert entry.bytes_in_flight == in_flight
    entry.take_actions()
    flow = TcpFlow((40000, b"\x7f\0\0\1", 1, b"\x0a\0\2\x0f"), entry, sock, connecting=False,
                   host_readable=True)
    return flow


def _rcvbuf(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_a_flight_below_half_the_buffer_leaves_it(connection: socket.socket) -> None:
    """The peer is slow, not held back: the buffer stays, and the next look waits for
    a flight of half of it."""
    stats: Counter[str] = Counter()
    pump = HostPump(stats, lambda flow: None)
    size = _rcvbuf(connection)
    flow = _flow(connection, size // 2 - 1000)
    pump.pump(flow, 0.0)
    assert _rcvbuf(connection) == size and stats["tcp_rcvbuf_grown"] == 0
    assert flow.rcvbuf_watch == size // 2


def _grow_to_the_end(pump: HostPump, flow: TcpFlow) -> None:
    """Keep the flight at what the pump watches for, until it stops asking."""
    for _ in range(20):
        need = flow.rcvbuf_watch - flow.entry.bytes_in_flight
        if need > RCVBUF_MAX:
            return
        if need > 0:
            flow.entry.on_host_data(memoryview(bytes(need)), 0.0)
        flow.host_readable = True
        pump.pump(flow, 0.0)


def _sending(nbytes: int) -> tuple[socket.socket, socket.socket]:
    """A loopback connection whose peer has sent `nbytes` (all in the relay end's queue)."""
    sock, peer = _loopback()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    peer.sendall(bytes(nbytes))
    deadline = time.monotonic() + 5
    while ioctl_int(sock, FIONREAD) < nbytes:
        assert time.monotonic() < deadline, "the peer's bytes did not arrive"
        time.sleep(0.01)
    return sock, peer


def test_a_wakeup_takes_a_flows_share_and_the_relays_from_the_host() -> None:
    """At a 48-byte MSS a peek of 1 MiB was 21,845 frames built in one
    call, and sixteen of them in one wakeup. One pump now builds at most
    FLOW_SLICE_FRAMES frames and peeks at most FLOW_SLICE_BYTES (True: call again), and
    the flows of one relay together at most its share, until `new_wakeup`."""
    frames: list[int] = []

    def count(flow: TcpFlow) -> None:
        frames.append(sum(isinstance(a, SendFrame) for a in flow.entry.take_actions()))

    pump = HostPump(Counter(), count)
    pairs = [_sending(1 << 20) for _ in range(RELAY_SLICE_FRAMES // FLOW_SLICE_FRAMES + 1)]
    try:
        flows = [_flow(sock, 0, mss=48) for sock, _ in pairs]
        for flow in flows[:-1]:
            frames.clear()
            assert pump.pump(flow, 0.0)
            assert sum(frames) == FLOW_SLICE_FRAMES, frames
            assert flow.entry.bytes_in_flight == 48 * FLOW_SLICE_FRAMES
        # The relay's share is spent: the last flow waits for the next wakeup.
        assert not pump.share_left
        assert pump.pump(flows[-1], 0.0) and flows[-1].entry.bytes_in_flight == 0
        pump.new_wakeup()
        frames.clear()
        assert pump.pump(flows[-1], 0.0) and sum(frames) == FLOW_SLICE_FRAMES
        # Full-sized segments: the bytes bound first.
        pairs.append(_sending(FLOW_SLICE_BYTES + (1 << 20)))
        wide = _flow(pairs[-1][0], 0, mss=65000)
        wide.entry.frame_payload_max = 65483  # a GSO super-frame (offload)
        pump.new_wakeup()
        frames.clear()
        assert pump.pump(wide, 0.0)
        assert wide.entry.bytes_in_flight == FLOW_SLICE_BYTES
        assert sum(frames) == -(-FLOW_SLICE_BYTES // 65483)
    finally:
        for sock, peer in pairs:
            sock.close()
            peer.close()


class _Loop:
    """What FlowTurns asks of the event loop: call_soon, run by hand."""

    def __init__(self) -> None:
        self.soon: list[object] = []

    def call_soon(self, callback: object) -> None:
        self.soon.append(callback)


def test_flows_left_without_a_turn_go_first_and_greedy_ones_last() -> None:
    loop = _Loop()
    served: list[list[int]] = []
    turns = FlowTurns(loop, lambda: None)  # type: ignore[arg-type]
    flows = [TcpFlow((i, b"", 0, b""), None, None) for i in range(5)]  # type: ignore[arg-type]
    for flow in flows:
        turns.mark(flow)
    turns.mark(flows[0])  # marked twice, served once
    batch = turns.take()
    served.append([f.key[0] for f in batch])
    for flow in batch:
        flow.dirty = False
    turns.mark(flows[4])  # marked during the flush, after it was served
    # 0 and 1 used their share, 2 and 3 got no turn, 4 was done.
    turns.again(waiting=[flows[2], flows[3]], used=[flows[0], flows[1]])
    assert [f.key[0] for f in turns.take()] == [2, 3, 4, 0, 1]
    assert all(f.dirty for f in flows)
    assert len(loop.soon) == 1  # one flush soon, however often asked
    assert served == [[0, 1, 2, 3, 4]]


_UNPRIVILEGED = """
import json, socket, sys
from collections import Counter
sys.path.insert(0, sys.argv[1])
from unit.test_host_pump import _flow, _grow_to_the_end, _rcvbuf
from relaynat.host.pump import HostPump
from relaynat.host.tcp_flow import SO_PEEK_OFF
server = socket.create_server(("127.0.0.1", 0))
sock = socket.create_connection(server.getsockname())
sock.setblocking(False)
sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
stats = Counter()
pump = HostPump(stats, lambda flow: None)
before = _rcvbuf(sock)
flow = _flow(sock, before)
pump.pump(flow, 0.0)
after = _rcvbuf(sock)
_grow_to_the_end(pump, flow)  # on with the flight until it stops growing
print(json.dumps({"before": before, "after": after, "last": _rcvbuf(sock),
                  "grown": stats["tcp_rcvbuf_grown"]}))
"""


def test_without_cap_net_admin_it_grows_within_rmem_max_or_not_at_all() -> None:
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing")
    tests = Path(__file__).resolve().parents[1]
    out = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all",
                          sys.executable, "-c", _UNPRIVILEGED, str(tests)],
                         capture_output=True, text=True, check=True, timeout=60)
    figures = json.loads(out.stdout)
    ceiling = min(2 * int(Path("/proc/sys/net/core/rmem_max").read_text()), RCVBUF_MAX)
    if ceiling >= RCVBUF_MIN_CEILING:
        assert figures["after"] == min(2 * figures["before"], ceiling), figures
        assert figures["last"] == ceiling and figures["grown"] >= 1, figures
    else:  # Debian's default rmem_max: SO_RCVBUF would cap it below the kernel's tuning
        assert figures["after"] == figures["last"] == figures["before"], figures
        assert figures["grown"] == 0, figures
