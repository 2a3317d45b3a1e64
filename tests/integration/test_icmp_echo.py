"""relaynat.host.icmp_relay with real ping sockets (the pure frame logic against dpkt:
tests/unit/test_icmp_echo_frames.py).

The tests run `IcmpEchoRelay` on the test's asyncio loop in the suite's
private network namespace (tests/conftest.py): the kernel answers pings to 127.0.0.1
itself, so the replies turned into guest frames are real ones. They widen
`net.ipv4.ping_group_range` there, which a new namespace sets to "1 0" (nobody may
open ping sockets, root included), and restore it afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from ipaddress import IPv4Address

import pytest
from support.sysctl import ALL_GROUPS, ping_group_range
from unit.test_icmp_echo_frames import (
    CONFIG,
    GATEWAY_IP,
    GUEST_IP,
    GUEST_MAC,
    check_reply,
    icmp_message,
    parse_frame,
    request_frame,
)

from relaynat.host import icmp_raw
from relaynat.host.icmp_relay import IcmpEchoRelay
from relaynat.icmp_echo import (
    ICMP_ECHO_REQUEST,
    parse_echo_reply,
)

# -- integration: real ping sockets ------------------------------------------------------

class Guest:
    """Collects the frames the relay sends toward the guest."""

    def __init__(self) -> None:
        self.frames: asyncio.Queue[bytes] = asyncio.Queue()

    def send(self, frame: bytes) -> None:
        self.frames.put_nowait(frame)

    async def next(self, timeout: float = 5.0) -> bytes:
        return await asyncio.wait_for(self.frames.get(), timeout)


def ping(relay: IcmpEchoRelay, ident: int, seq: int, payload: bytes,
         dst: bytes = GATEWAY_IP, host_ip: str = "127.0.0.1") -> None:
    frame = request_frame(icmp_message(ICMP_ECHO_REQUEST, 0, ident, seq, payload), dst=dst)
    relay.on_packet(parse_frame(frame), host_ip, GUEST_MAC)


@pytest.mark.integration
async def test_echo_through_a_real_ping_socket() -> None:
    with ping_group_range(ALL_GROUPS):
        guest, stats = Guest(), Counter[str]()
        relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), guest.send, stats)
        try:
            payload = bytes(range(256)) * 4 + b"odd"
            ping(relay, 0x4242, 7, payload)
            # The kernel itself answers on 127.0.0.1; the guest must see the gateway.
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=0x4242,
                        seq=7, payload=payload)
            for seq in (8, 0xFFFF, 0):
                ping(relay, 0x4242, seq, b"seq %d" % seq)
                check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=0x4242,
                            seq=seq, payload=b"seq %d" % seq)
            # A second identifier gets its own socket (the kernel gives it another id).
            ping(relay, 1, 1, b"")
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=1, seq=1,
                        payload=b"")
            assert relay.socket_count == 2
            assert stats["icmp_sockets_opened"] == 2
            assert stats["icmp_echo_requests"] == stats["icmp_echo_replies"] == 5
            assert not [k for k in stats if k.startswith("drop_")]
        finally:
            relay.close()
        assert relay.socket_count == 0


@pytest.mark.integration
async def test_real_kernel_reply_id_is_not_the_guests() -> None:
    """What the relay relies on: the kernel replaces the identifier by the socket's
    bound port, and delivers the reply (ICMP header + payload) with seq intact."""
    with ping_group_range(ALL_GROUPS):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        with sock:
            sock.settimeout(5)
            sock.sendto(icmp_message(ICMP_ECHO_REQUEST, 0, 0x4242, 9, b"x"), ("127.0.0.1", 0))
            data, addr = sock.recvfrom(100)
            port = sock.getsockname()[1]
        reply = parse_echo_reply(data)
        assert addr[0] == "127.0.0.1"
        assert (reply.ident, reply.seq, reply.payload) == (port, 9, b"x")


@pytest.mark.integration
async def test_not_permitted_warns_once_and_recovers(caplog: pytest.LogCaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Neither ping sockets nor raw ones (as without CAP_NET_RAW: the suite runs as root,
    so the raw socket is refused here by hand; tests/integration/test_icmp_raw.py runs a
    relay as nobody)."""

    def refused(v6: bool) -> socket.socket:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(icmp_raw, "open_raw_socket", refused)
    guest, stats = Guest(), Counter[str]()
    relay = IcmpEchoRelay(CONFIG, asyncio.get_running_loop(), guest.send, stats)
    try:
        with ping_group_range("1 0"):
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP).close()
            except PermissionError:
                pass
            else:
                pytest.skip("this kernel lets us open ping sockets outside the range")
            with caplog.at_level(logging.WARNING, logger="relaynat.icmp"):
                ping(relay, 5, 1, b"a")
                ping(relay, 5, 2, b"b")
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1
            assert 'net.ipv4.ping_group_range="0 2147483647"' in warnings[0].getMessage()
            assert stats["drop_icmp_not_permitted"] == 2 and relay.socket_count == 0
            assert relay.raw_session_count == 0
        # The sysctl is read at every socket creation: widening it fixes pings live.
        with ping_group_range(ALL_GROUPS):
            ping(relay, 5, 3, b"c")
            check_reply(await guest.next(), src=GATEWAY_IP, dst=GUEST_IP, ident=5, seq=3,
                        payload=b"c")
    finally:
        relay.close()


@pytest.mark.integration
async def test_idle_timeout_bound_unreachable_and_close() -> None:
    with ping_group_range(ALL_GROUPS):
        guest, stats = Guest(), Counter[str]()
        loop = asyncio.get_running_loop()
        relay = IcmpEchoRelay(CONFIG, loop, guest.send, stats, idle_timeout_s=0.3,
                              max_sockets=2)
        try:
            ping(relay, 1, 1, b"a")
            await guest.next()
            ping(relay, 2, 1, b"b")
            await guest.next()
            ping(relay, 3, 1, b"c")  # a third (id, destination): over the bound
            assert stats["drop_icmp_table_full"] == 1 and relay.socket_count == 2
            # Keep session 1 busy past the timeout; session 2 idles out.
            for seq in range(2, 6):
                await asyncio.sleep(0.1)
                ping(relay, 1, seq, b"a")
                await guest.next()
            assert relay.socket_count == 1 and stats["icmp_sockets_expired"] == 1
            await asyncio.sleep(0.6)
            assert relay.socket_count == 0 and stats["icmp_sockets_expired"] == 2
            # Only lo exists in this namespace: the send fails, the guest sees nothing.
            unreachable = IPv4Address("192.0.2.1")
            ping(relay, 4, 1, b"d", dst=unreachable.packed, host_ip=str(unreachable))
            assert stats["drop_icmp_send_error"] == 1
            ping(relay, 1, 9, b"e")
            fds = [s.sock.fileno() for _k, s in relay.sessions.items()]
            assert fds and all(fd >= 0 for fd in fds)
        finally:
            relay.close()
        assert relay.socket_count == 0
        ping(relay, 1, 10, b"f")  # after close: counted, nothing opened
        assert stats["drop_icmp_closed"] == 1 and relay.socket_count == 0
        await asyncio.sleep(0.05)
        assert guest.frames.qsize() <= 1  # at most the reply to seq 9, read before close


@pytest.mark.integration
def test_namespace_guest_pings_the_gateway_mapped_to_host_loopback() -> None:
    """iputils ping in a real guest kernel, through `relaynat run`, to 10.0.2.2: the
    relay sends the echoes from a ping socket to the host's 127.0.0.1 and the replies
    come back with the guest's identifier, sequence numbers and payload."""
    import subprocess
    import sys

    from support.relaynat_cli import parse_stats

    with ping_group_range(ALL_GROUPS):
        done = subprocess.run(
            [sys.executable, "-m", "relaynat", "run", "--stats", "--",
             "ping", "-c", "3", "-i", "0.2", "-s", "1000", "-W", "2", "10.0.2.2"],
            capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 packets transmitted, 3 received" in done.stdout
    assert "1008 bytes from 10.0.2.2: icmp_seq=3" in done.stdout
    stats = parse_stats(done.stderr)
    assert stats["icmp_echo_requests"] == 3
    assert stats["icmp_echo_replies"] == 3
