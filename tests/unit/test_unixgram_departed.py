"""A guest on a unix datagram socket that goes away takes its flows with it when the
relay learns it (the served peer's socket refuses the liveness probe, or a send), not
at their timeouts: its UDP flows' host sockets close, `TransportLost` and the flows'
`FlowClosed` ("detached") are reported, and the next guest on the path is served.

A qemu `-netdev dgram` guest, as the relay sees it: a datagram socket bound at its own
path that sends frames from there (no handshake). Everything is in this process on
real sockets: the relay, the guest's socket and a UDP echo peer on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from relaynat import Event, FlowClosed, Relay, RelayConfig, TransportLost, serve_unixgram
from relaynat.testing import frames as f

A = f.Addressing.of(RelayConfig())


async def _until(check: object, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def _guest(path: Path) -> socket.socket:
    """qemu's end: bound at its own path, not connected (it sends with sendto)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


async def test_a_departed_datagram_guest_ends_its_flows(tmp_path: Path) -> None:
    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.setblocking(False)
    events: list[Event] = []
    async with Relay(RelayConfig(ipv6=False)) as relay:
        relay.subscribe(events.append)
        server = serve_unixgram(relay, str(tmp_path / "relay.sock"))
        try:
            relay_path = str(tmp_path / "relay.sock")
            guest = _guest(tmp_path / "guest.sock")
            guest.sendto(f.udp_datagram(A, False, 40000, echo.getsockname()[1], b"ping"),
                         relay_path)
            await _until(lambda: relay.stats()["udp_flows"] == 1, 5)
            loop = asyncio.get_running_loop()
            data, peer = await asyncio.wait_for(loop.sock_recvfrom(echo, 2048), 5)
            assert data == b"ping"
            guest.close()  # qemu exits: its socket is gone
            # The probe runs once a second: the flow ends within about that, not at the
            # UDP timeout (30 s and more).
            await _until(lambda: relay.stats()["udp_flows"] == 0, 5)
            lost = [e for e in events if isinstance(e, TransportLost)]
            assert len(lost) == 1 and "gone" in lost[0].reason, events
            closed = [e for e in events if isinstance(e, FlowClosed)]
            assert [(c.protocol, c.how, c.bytes_from_guest) for c in closed] == [
                ("udp", "detached", 4)], events
            # The flow's host socket is closed: the peer's answer is refused.
            echo.sendto(b"late", peer)
            # The next guest on the path is served from its first frame.
            (tmp_path / "guest.sock").unlink()
            nxt = _guest(tmp_path / "guest.sock")
            nxt.sendto(f.udp_datagram(A, False, 40001, echo.getsockname()[1], b"again"),
                       relay_path)
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(echo, 2048), 5)
            assert data == b"again" and relay.stats()["udp_flows"] == 1
            nxt.close()
        finally:
            server.close()
            echo.close()
