"""Inbound TCP (a host client on a forwarded port), the whole path with real kernels: a
namespace guest and host clients. The handshake itself, driven without I/O:
tests/unit/test_inbound_handshake.py."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python

from relaynat.config import RelayConfig
from relaynat.netns.guest import run_command

pytest_plugins = ["support.guest_fs"]


# -- real kernels -------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_client_connecting_before_the_guest_spoke_reaches_it(guest_dir: Path) -> None:
    """An IPv4-only guest with a static address sends nothing at link-up, so when a
    forward's client connects the relay does not know the guest's MAC. It asks (an ARP
    request) and SYNs the guest once the answer teaches it the MAC. It used to SYN the
    broadcast address, every retry too, which the guest's TCP discards: the client
    hung (test_forwarded_uploads' flaky stall, when its client won the race against
    the guest's first frame)."""
    listening = guest_dir / "listening"
    relays = []

    def ready(relay: object) -> None:
        relays.append(relay)

    guest = asyncio.ensure_future(run_command(
        RelayConfig(ipv6=False), [guest_python(), str(GUESTS / "tcp_upper_once.py"),
                                 str(listening)],
        relay_ready=ready))
    try:
        for _ in range(200):
            if listening.exists():
                break
            await asyncio.sleep(0.05)
        relay = relays[0]
        assert relay.stats().get("frames_in", 0) == 0  # the premise: the guest never spoke
        port = relay.add_forward("tcp", "127.0.0.1", 0, 8080).host_port

        def talk() -> bytes:
            with socket.create_connection(("127.0.0.1", port), 5) as s:
                s.sendall(b"hello")
                return s.recv(100)

        assert await asyncio.to_thread(talk) == b"HELLO"
        assert await asyncio.wait_for(guest, 10) == 0
    finally:
        guest.cancel()
    stats = relay.stats()
    assert stats["guest_solicits"] == 1 and stats["frames_in"] > 0


def _upload(addr: str, port: int, data: bytes) -> str:
    """Send `data`, half-close, return the reply; "" when the guest refused (reset)."""
    try:
        with socket.create_connection((addr, port), 10) as s:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
    except ConnectionResetError:
        return ""
    return reply.decode()


@pytest.mark.integration
async def test_forwarded_uploads_over_ipv4_and_ipv6_arrive_intact() -> None:
    data = os.urandom(64 << 20)
    digest = hashlib.sha256(data).hexdigest()
    ports: dict[str, int] = {}

    def ready(relay: object) -> None:
        ports["v4"] = relay.add_forward("tcp", "127.0.0.1", 0, 8080).host_port  # type: ignore[attr-defined]
        ports["v6"] = relay.add_forward("tcp", "::1", 0, 8080).host_port  # type: ignore[attr-defined]

    guest = asyncio.ensure_future(run_command(
        RelayConfig(), [guest_python(), str(GUESTS / "tcp_upload_hash_server.py"), "2"],
        relay_ready=ready))
    try:
        replies = []
        for addr, key in (("127.0.0.1", "v4"), ("::1", "v6")):
            for _ in range(50):  # the guest's server may not listen yet: retry refusals
                while key not in ports:
                    await asyncio.sleep(0.05)
                reply = await asyncio.to_thread(_upload, addr, ports[key], data)
                if reply:
                    break
                await asyncio.sleep(0.1)
            replies.append(reply.split())
        assert await asyncio.wait_for(guest, 30) == 0
    finally:
        guest.cancel()
    # The guest saw each connection come from the gateway, in the client's family.
    assert replies == [[digest, str(len(data)), "::ffff:10.0.2.2"],
                       [digest, str(len(data)), "fd00::2"]]


