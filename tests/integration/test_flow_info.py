"""`Relay.flows()` with a live TCP flow, UDP flow and ping session at once, each a
`FlowInfo` with typed fields. Ping sockets need `net.ipv4.ping_group_range`, which the
suite's namespace allows nobody until the test widens it (support/sysctl.py); the TCP
and UDP parts alone are tests/unit/test_flow_info.py."""

from __future__ import annotations

import asyncio

from support.sysctl import ALL_GROUPS, ping_group_range
from unit.test_flow_info import check_tcp, echo_server, udp_answered

from relaynat.events import Endpoint
from relaynat.flow_info import FlowInfo
from relaynat.testing import InMemoryGuest
from relaynat.testing import frames as f
from relaynat.wire import IPPROTO_ICMP


async def test_a_tcp_flow_a_udp_flow_and_a_ping_session_are_typed(udp_echo: int) -> None:
    port, served = echo_server()
    with ping_group_range(ALL_GROUPS):
        async with InMemoryGuest() as guest:
            conn = await guest.tcp_connect(port)
            await conn.send(b"hello")
            assert await conn.recv_exactly(5) == b"hello"
            await udp_answered(guest, False, 5353, udp_echo, b"ping")
            await guest.send(f.echo_request(guest.addressing, False, 0x4242, 1, b"x" * 56))
            await guest.expect(lambda r: r.ip is not None and r.ip.proto == IPPROTO_ICMP)
            flows = {info.protocol: info for info in guest.relay.flows()}
            await conn.close()
    await asyncio.to_thread(served.join, 5)
    assert sorted(flows) == ["icmp", "tcp", "udp"]
    assert all(isinstance(info, FlowInfo) for info in flows.values())
    check_tcp(flows["tcp"], port, 5)
    udp = flows["udp"]
    assert (udp.direction, udp.state) == ("outbound", "answered")
    assert udp.guest_end == Endpoint("10.0.2.15", 5353)
    assert str(udp.far) == f"10.0.2.2:{udp_echo}"
    assert udp.host_peer == Endpoint("127.0.0.1", udp_echo)
    assert (udp.bytes_from_guest, udp.bytes_to_guest) == (4, 4)
    icmp = flows["icmp"]
    assert (icmp.direction, icmp.state) == ("outbound", "open")
    assert icmp.guest_end == Endpoint("10.0.2.15", 0x4242)  # the port: the echo identifier
    assert icmp.far == Endpoint("10.0.2.2", None) and str(icmp.far) == "10.0.2.2"
    assert icmp.host_peer == Endpoint("127.0.0.1", None)
    assert (icmp.bytes_from_guest, icmp.bytes_to_guest) == (64, 64)  # header and payload
    assert (icmp.guest_window, icmp.rtt_us, udp.guest_window, udp.rtt_us) == (
        None, None, None, None)
