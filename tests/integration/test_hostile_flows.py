"""Single hostile flows must not hold the event loop every guest and the control socket
share: a relay in its own process (`relaynat serve`), one
raw-frame guest attacking it for a few seconds, and the relay's control-socket answers
timed from a third process. The budget is the issue's: 100 ms at the 99th percentile.

* A SYN with MSS 1 (the MSS floor) and a 1 GiB window, then a download: the relay cut
  every peek into 1-byte frames.
* ACKs that move one byte and name three new one-byte SACK blocks each: the scoreboard
  grew without bound and every ACK sorted and walked it.
* 3,000 idle flows and frames from ever new source MACs: each new MAC rebuilt every
  flow's frame template.
* Contiguous one-byte segments beyond a hole: each insert rebuilt the block's chunk
  list.

The attack is bounded in time (a frozen relay stops reading: the writes give up at
their deadline) and the probe's own timeout ends a frozen run; the pure halves of these
fixes are tested in test_window.py, test_sack_scoreboard.py, test_ooo_queue.py and
test_syn_backlog.py (the SYN backlog's memory).
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import pytest
from support.faultkit import MIB, OneShotPeer, cpu_seconds
from support.hostile_kit import ControlProbe, HostileRelay, ProbeResult, RawGuest, hostile_relay
from support.lossy_harness import wait_for

from relaynat.packet_builder import tcp_options_sack, tcp_options_syn
from relaynat.testing.guest import Reply
from relaynat.wire import ACK, FIN

pytestmark = pytest.mark.integration

M32 = 0xFFFFFFFF
#: The issue's budget for the control socket's answer while one guest attacks.
P99_BUDGET_S = 0.1
#: How long each attack goes on, and the probe around it (it starts a little before).
ATTACK_S = 4.0
PROBE_S = ATTACK_S + 1.0
#: A probe answer this late ends the run: the loop is frozen (the unfixed relay's case).
PROBE_TIMEOUT_S = 10.0
_LEN = struct.Struct("!I")
T = TypeVar("T")


def send_paced(guest: RawGuest, frames: Iterable[bytes], seconds: float,
               batch: int = 64) -> int:
    """Write `frames` spread evenly over about `seconds` (as fast as the relay reads, if
    slower), and give up when `seconds` are over even if the relay stopped reading:
    every write waits for room with a deadline. The count of frames written."""
    frames = list(frames)
    start = time.monotonic()
    deadline = start + seconds
    sock = guest.sock
    sent = 0
    for at in range(0, len(frames), batch):
        due = start + seconds * at / len(frames)
        if (pause := due - time.monotonic()) > 0:
            time.sleep(pause)
        chunk = frames[at:at + batch]
        data = memoryview(b"".join(_LEN.pack(len(f)) + f for f in chunk))
        while data:
            left = deadline - time.monotonic()
            if left <= 0:
                return sent
            _, writable, _ = select.select([], [sock], [], left)
            if not writable:
                return sent
            try:
                data = data[sock.send(data, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                continue
        sent += len(chunk)
    return sent


def attacked(control: str, attack: Callable[[], T]) -> tuple[ProbeResult, T]:
    """Run `attack()` while a probe times the control socket from before it starts
    until PROBE_S is over; the probe's answer times and what `attack` returned."""
    with ControlProbe(control, seconds=PROBE_S, timeout=PROBE_TIMEOUT_S) as probe:
        time.sleep(0.3)
        out = attack()
    return probe.result(), out


def paced_attack(relay: HostileRelay, guest: RawGuest, frames: list[bytes]
                 ) -> tuple[ProbeResult, int, float]:
    """`frames` written over ATTACK_S while the control socket is timed: the probe's
    result, the frames written, and the relay's CPU seconds meanwhile."""
    cpu0 = cpu_seconds(relay.pid)
    result, written = attacked(relay.control, lambda: send_paced(guest, frames, ATTACK_S))
    return result, written, cpu_seconds(relay.pid) - cpu0


def data_from(port: int) -> Callable[[Reply], bool]:
    return lambda r: r.tcp is not None and r.tcp.sport == port and len(r.tcp.payload) > 0


@pytest.mark.parametrize("mss", [1, 48])
def test_a_download_at_a_tiny_mss_leaves_the_loop_to_others(tmp_path: Path, mss: int) -> None:
    """An MSS of 1 is clamped to Linux's floor (tcp_min_snd_mss, 48), and even
    at 48 a flow builds a bounded number of frames per wakeup."""
    peer = OneShotPeer(send=True, limit=512 * MIB)
    with hostile_relay(tmp_path) as relay, RawGuest(relay.socket) as guest:
        cpu0 = cpu_seconds(relay.pid)

        def attack() -> Reply:
            guest.handshake(40000, peer.port, tcp_options_syn(mss, 14))
            first = guest.expect(data_from(peer.port), 10)
            guest.keep = lambda r: False
            time.sleep(ATTACK_S)
            return first

        result, first = attacked(relay.control, attack)
        cpu = cpu_seconds(relay.pid) - cpu0
        moved = guest.bytes_in
    print(f"MSS {mss}: {result.summary()}, relay CPU {cpu:.1f} s, {moved >> 20} MiB")
    assert first.tcp is not None
    assert len(first.tcp.payload) == 48, "the segment size of the MSS floor"
    assert moved > 4 * MIB, "the download goes on"
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()


def test_sack_blocks_piling_up_cost_each_ack_little(tmp_path: Path) -> None:
    """Every ACK moves the cumulative ACK by one byte and names three new
    one-byte SACK blocks; the scoreboard stays bounded and each ACK's work is that of
    its own blocks."""
    acks = 8000
    peer = OneShotPeer(send=True, limit=512 * MIB)
    with hostile_relay(tmp_path) as relay, RawGuest(relay.socket) as guest:
        sport = 40001
        una = guest.handshake(sport, peer.port, tcp_options_syn(1460, 14, None, True))
        wait_for(lambda: guest.bytes_in > 2 * MIB, 10, "a flight toward the guest")
        guest.keep = lambda r: False
        far = una + 200_000  # inside the flight: SACK blocks count only there

        def ack(i: int) -> bytes:
            blocks = [((far + 6 * i + 2 * k) & M32, (far + 6 * i + 2 * k + 1) & M32)
                      for k in range(3)]
            return guest.tcp(sport, peer.port, 1001, (una + i + 1) & M32, ACK,
                             options=tcp_options_sack(blocks))

        frames = [ack(i) for i in range(acks)]
        result, written, cpu = paced_attack(relay, guest, frames)
    print(f"SACK: {written} ACKs, {result.summary()}, relay CPU {cpu:.1f} s")
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()
    assert written == acks, "the relay kept up with the ACKs"


def test_a_flapping_source_mac_leaves_idle_flows_alone(tmp_path: Path) -> None:
    """3,000 established idle flows, then 4,000 frames each from a
    new source MAC. Learning a MAC costs the same with one flow or thousands."""
    flows, flaps = 3000, 4000
    server = socket.create_server(("127.0.0.1", 0), backlog=4096)  # never accepts
    port = server.getsockname()[1]
    with server, hostile_relay(tmp_path, ["--syn-rate", "1000000"]) as relay, \
            RawGuest(relay.socket) as guest:
        assert guest.open_idle_flows(port, flows) == flows
        frames = guest.flapping_mac_frames(flaps)
        result, written, cpu = paced_attack(relay, guest, frames)
    print(f"MAC flap: {written} frames, {result.summary()}, relay CPU {cpu:.1f} s")
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()
    assert written == flaps, "the relay kept up with the frames"


def test_one_byte_segments_beyond_a_hole_cost_little_each(tmp_path: Path) -> None:
    """Contiguous one-byte segments beyond a hole, as many as the window holds,
    held out of order; then the hole fills and the host peer gets every byte once."""
    count = 60_000
    peer = OneShotPeer(send=False)
    with hostile_relay(tmp_path) as relay, RawGuest(relay.socket) as guest:
        sport = 40002
        una = guest.handshake(sport, peer.port, tcp_options_syn(1460, 14, None, True))
        guest.keep = lambda r: False  # a duplicate ACK a segment: not kept in the test
        frames = [guest.tcp(sport, peer.port, (1002 + i) & M32, una, ACK, payload=b"x")
                  for i in range(count)]
        result, written, cpu = paced_attack(relay, guest, frames)
        guest.send(guest.tcp(sport, peer.port, 1001, una, ACK, payload=b"x"))  # the hole
        guest.send(guest.tcp(sport, peer.port, 1002 + count, una, ACK | FIN))
        outcome = peer.result(10)
    print(f"OOO: {written} segments, {result.summary()}, relay CPU {cpu:.1f} s, "
          f"peer: {outcome}")
    assert not result.timed_out and result.p99 < P99_BUDGET_S, result.summary()
    assert written == count, "the relay kept up with the segments"
    assert outcome == ("eof", count + 1), "every byte once, then the guest's FIN"
