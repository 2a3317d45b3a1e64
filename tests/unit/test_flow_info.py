"""`Relay.flows()`: each open flow a `FlowInfo` with typed fields (relaynat.flow_info),
here for live TCP and UDP flows through `InMemoryGuest` against loopback servers;
tests/integration/test_flow_info.py adds a ping session, which needs ping sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading

import pytest

from relaynat.events import Endpoint
from relaynat.flow_info import FlowInfo
from relaynat.testing import InMemoryGuest
from relaynat.testing import frames as f


def echo_server() -> tuple[int, threading.Thread]:
    """A one-connection TCP server on 127.0.0.1 that echoes until the client closes."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                while data := conn.recv(1000):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], thread


async def udp_answered(guest: InMemoryGuest, v6: bool, sport: int, dport: int,
                       payload: bytes) -> None:
    """Send one datagram from the guest to the gateway's `dport`; wait for the answer."""
    await guest.send(f.udp_datagram(guest.addressing, v6, sport, dport, payload))
    await guest.expect(lambda r: r.udp is not None and r.udp.dport == sport)


def check_tcp(info: FlowInfo, port: int, sent: int) -> None:
    """An outbound TCP flow from the guest's port 40000 to the gateway's `port`, open,
    `sent` bytes each way."""
    assert isinstance(info, FlowInfo)
    assert (info.protocol, info.direction, info.state) == ("tcp", "outbound", "established")
    assert info.guest_end == Endpoint("10.0.2.15", 40000)
    assert info.far == Endpoint("10.0.2.2", port) and info.far.port == port
    assert str(info.far) == f"10.0.2.2:{port}"
    assert str(info.guest_end) == "10.0.2.15:40000"
    assert info.host_peer == Endpoint("127.0.0.1", port)
    assert (info.bytes_from_guest, info.bytes_to_guest) == (sent, sent)
    assert isinstance(info.guest_window, int) and info.guest_window > 0
    assert isinstance(info.rtt_us, int) and info.rtt_us >= 0


async def test_a_tcp_and_a_udp_flow_are_described_with_typed_fields(udp6_echo: int) -> None:
    port, served = echo_server()
    async with InMemoryGuest() as guest:
        conn = await guest.tcp_connect(port)
        await conn.send(b"hello")
        assert await conn.recv_exactly(5) == b"hello"
        await udp_answered(guest, True, 5353, udp6_echo, b"ping")
        tcp, udp = sorted(guest.relay.flows(), key=lambda info: info.protocol)
        check_tcp(tcp, port, 5)
        assert isinstance(udp, FlowInfo)
        assert (udp.protocol, udp.direction, udp.state) == ("udp", "outbound", "answered")
        assert udp.guest_end == Endpoint("fd00::15", 5353)
        assert str(udp.far) == f"[fd00::2]:{udp6_echo}"
        assert udp.host_peer == Endpoint("::1", udp6_echo)
        assert (udp.bytes_from_guest, udp.bytes_to_guest) == (4, 4)
        assert udp.guest_window is None and udp.rtt_us is None
        # The JSON form: the control socket's `flows` entries, the ends as lists.
        assert json.loads(json.dumps(udp.to_dict())) == {
            "protocol": "udp", "direction": "outbound", "guest": ["fd00::15", 5353],
            "far": ["fd00::2", udp6_echo], "host_peer": ["::1", udp6_echo],
            "state": "answered", "bytes_from_guest": 4, "bytes_to_guest": 4,
            "guest_window": None, "rtt_us": None}
        await conn.close()
    await asyncio.to_thread(served.join, 5)


def test_a_flow_info_is_a_frozen_record() -> None:
    info = FlowInfo("icmp", "outbound", Endpoint("10.0.2.15", 7), Endpoint("10.0.2.2"),
                    Endpoint("127.0.0.1"), "open", 64, 64, None, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.state = "closed"  # type: ignore[misc]
    assert not hasattr(info, "__dict__")
    assert str(info.far) == "10.0.2.2" and info.far.port is None
    assert info.to_dict() == {
        "protocol": "icmp", "direction": "outbound", "guest": ["10.0.2.15", 7],
        "far": ["10.0.2.2", None], "host_peer": ["127.0.0.1", None], "state": "open",
        "bytes_from_guest": 64, "bytes_to_guest": 64, "guest_window": None, "rtt_us": None}
