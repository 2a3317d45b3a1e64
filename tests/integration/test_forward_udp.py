"""UDP forwards (`-u`) and the source address the guest sees on forwarded flows
(`--inbound-source`), with real kernels: a namespace guest serving TCP and UDP on one
port (guest_tools.py peer-echo answers with the address it saw), host clients in the
test's namespace."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats

from relaynat.config import RelayConfig
from relaynat.netns.guest import run_command

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
#: Sizes up to what one frame carries at the default MTU 65520 (no fragmentation).
SIZES = (1, 1400, 60000)


def _wait_file(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, "guest server did not start"
        time.sleep(0.05)


def _udp_ask(local: tuple[str, int], server: tuple[str, int], data: bytes) -> bytes:
    """One datagram from `local` to `server`, the reply (3 tries, 2 s each)."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(local)
        s.settimeout(2)
        for _ in range(3):
            s.sendto(data, server)
            try:
                return s.recv(70000)
            except TimeoutError:
                continue
    return b""


async def test_udp_forward_keeps_clients_apart_in_both_families(guest_dir: Path) -> None:
    ready = guest_dir / "ready"
    ports: dict[str, int] = {}
    stats: dict[str, int] = {}

    def relay_ready(relay: object) -> None:
        ports["v4"] = relay.add_forward("udp", "127.0.0.1", 0, 5353).host_port  # type: ignore[attr-defined]
        ports["v6"] = relay.add_forward("udp", "::1", 0, 5353).host_port  # type: ignore[attr-defined]
        holder.append(relay)

    holder: list[object] = []
    guest = asyncio.ensure_future(run_command(
        RelayConfig(), [guest_python(), GUEST_TOOLS, "peer-echo", "5353", "--events",
                        str(3 * len(SIZES)), "--ready", str(ready)], relay_ready=relay_ready))
    try:
        await asyncio.to_thread(_wait_file, ready)
        # Two IPv4 clients and one IPv6 client, each keeping its socket: all three
        # send before any reads, so a reply routed to the wrong client shows.
        clients = [(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", ports["v4"]),
                    b"::ffff:10.0.2.2 "),
                   (socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", ports["v4"]),
                    b"::ffff:10.0.2.2 "),
                   (socket.socket(socket.AF_INET6, socket.SOCK_DGRAM), ("::1", ports["v6"]),
                    b"fd00::2 ")]
        for size in SIZES:
            sent = []
            for sock, server, _ in clients:
                sent.append(os.urandom(size))
                sock.sendto(sent[-1], server)
            for (sock, _, seen_as), data in zip(clients, sent, strict=True):
                sock.settimeout(5)
                reply = await asyncio.to_thread(sock.recv, 70000)
                assert reply == seen_as + data, (size, reply[:40])
        for sock, _, _ in clients:
            sock.close()
        stats = holder[0].stats()  # type: ignore[attr-defined]
        assert await asyncio.wait_for(guest, 30) == 0
    finally:
        guest.cancel()
    # One inbound flow per client, reused for all its datagrams.
    assert stats["udp_inbound_opened"] == 3
    assert stats["udp_to_guest"] == stats["udp_to_host"] == 3 * len(SIZES)


@pytest.fixture
def outside_addresses() -> Iterator[tuple[str, str]]:
    """Two addresses on this namespace's loopback that are not loopback addresses
    (documentation prefixes, RFC 5737 and RFC 3849), standing for remote clients."""
    v4, v6 = "192.0.2.1", "2001:db8::1"
    subprocess.run(["ip", "addr", "add", f"{v4}/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "addr", "add", f"{v6}/128", "dev", "lo", "nodad"], check=True)
    yield v4, v6
    subprocess.run(["ip", "addr", "del", f"{v4}/32", "dev", "lo"], check=False)
    subprocess.run(["ip", "addr", "del", f"{v6}/128", "dev", "lo"], check=False)


def _tcp_upload(local: str, server: tuple[str, int], data: bytes) -> list[str]:
    with socket.create_connection(server, 10, source_address=(local, 0)) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    return reply.decode().split()


def test_inbound_source_client_shows_real_addresses_but_never_loopback(
        guest_dir: Path, outside_addresses: tuple[str, str]) -> None:
    v4, v6 = outside_addresses
    ready = guest_dir / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--stats", "--inbound-source", "client",
         "-t", "0:8080", "-u", "0:8080", "--", guest_python(), GUEST_TOOLS, "peer-echo",
         "8080", "--events", "4", "--ready", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    ports = {}
    for _ in range(2):
        line = proc.stderr.readline()
        match = re.search(r"forwarding (tcp|udp) \* port (\d+) to guest port 8080", line)
        assert match, line
        ports[match.group(1)] = int(match.group(2))
    try:
        _wait_file(ready)
        data = os.urandom(1 << 20)
        digest = hashlib.sha256(data).hexdigest()
        # Real addresses travel; a loopback client appears as the gateway (a loopback
        # source would be a martian on the guest's link).
        assert _tcp_upload(v4, (v4, ports["tcp"]), data) == ["::ffff:192.0.2.1", digest,
                                                             str(len(data))]
        assert _tcp_upload("127.0.0.1", ("127.0.0.1", ports["tcp"]), data) == [
            "::ffff:10.0.2.2", digest, str(len(data))]
        assert _udp_ask((v6, 0), (v6, ports["udp"]), b"hello") == b"2001:db8::1 hello"
        assert _udp_ask(("::1", 0), ("::1", ports["udp"]), b"hello") == b"fd00::2 hello"
        assert proc.wait(timeout=30) == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    stats = parse_stats(err)
    assert stats["tcp_inbound_opened"] == 2
    assert stats["udp_inbound_opened"] == 2


def test_udp_port_spec_errors_name_the_option() -> None:
    result = subprocess.run([sys.executable, "-m", "relaynat", "run", "-u", "70000", "--",
                             "true"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "port spec '70000'" in result.stderr


def test_a_wide_port_range_raises_the_descriptor_limit(guest_dir: Path) -> None:
    """10,000 forwarded ports need a descriptor each, far past a soft RLIMIT_NOFILE of
    1024; the relay raises its soft limit toward the hard one (passt does the same),
    and a port in the range reaches the guest."""
    ready = guest_dir / "ready"
    proc = subprocess.Popen(
        # --no-splice: through the guest's link, where the guest sees the gateway (a
        # spliced client comes from its loopback, test_splice_forward.py).
        ["prlimit", "--nofile=1024:20000", "--", sys.executable, "-m", "relaynat", "run",
         "--stats", "--no-splice", "-t", "1-10000", "--", guest_python(), GUEST_TOOLS,
         "peer-echo", "4242", "--events", "1", "--ready", str(ready)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_file(ready)
        data = os.urandom(1 << 16)
        reply: list[str] = []
        for _ in range(100):  # the relay may still be binding while the guest is ready
            try:
                reply = _tcp_upload("127.0.0.1", ("127.0.0.1", 4242), data)
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert reply == ["::ffff:10.0.2.2", hashlib.sha256(data).hexdigest(), str(len(data))]
        assert proc.wait(timeout=60) == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert parse_stats(err)["tcp_inbound_opened"] == 1


def test_too_many_ports_for_the_hard_limit_is_refused_clearly() -> None:
    result = subprocess.run(
        ["prlimit", "--nofile=1024:1024", "--", sys.executable, "-m", "relaynat", "run",
         "-t", "2000-4000", "--", "true"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "forwarding 2001 ports takes a descriptor each, beyond the limit of 1024" in \
        result.stderr


def test_port_range_with_exclusions_maps_as_specified(guest_dir: Path) -> None:
    """`5000-5009:6000-6009,~5003-5004`: eight host ports, each to its own guest port
    (host port + 1000), and the excluded two not listening at all."""
    ready = guest_dir / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "-t",
         "127.0.0.1/5000-5009:6000-6009,~5003-5004", "--", guest_python(),
         str(GUESTS / "tcp_range_server.py"), str(ready), "8"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_file(ready)
        answers: dict[int, str | None] = {}
        for port in range(5000, 5010):
            for _ in range(50):  # the relay may still be binding
                try:
                    with socket.create_connection(("127.0.0.1", port), 5) as s:
                        answers[port] = s.recv(16).decode()
                    break
                except ConnectionRefusedError:
                    answers[port] = None
                    if port in (5003, 5004):
                        break
                    time.sleep(0.1)
        assert answers == {port: None if port in (5003, 5004) else str(port + 1000)
                           for port in range(5000, 5010)}
        assert proc.wait(timeout=30) == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


async def test_host_udp_sockets_get_a_receive_buffer_for_bursts() -> None:
    """A UDP forward's socket and a guest flow's host socket each get UDP_RCVBUF (the
    kernel reports it doubled, socket(7)); the default 208 KiB lost 0.5-1 % of a
    1 Gbit/s host->guest stream. Read back as the kernel sees them: getsockopt on the
    forward, `ss -m` (skmem rb) for the flow's socket, which only the relay holds."""
    from relaynat.host.sockets import UDP_RCVBUF
    from relaynat.testing import frames
    from relaynat.testing.guest import InMemoryGuest

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
        peer.bind(("127.0.0.1", 0))
        port = peer.getsockname()[1]
        async with InMemoryGuest() as guest:
            forward = guest.relay.add_forward("udp", "127.0.0.1", 0, 5353)
            assert forward.sock is not None
            rcvbuf = forward.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            assert rcvbuf == 2 * UDP_RCVBUF
            await guest.send(frames.udp_datagram(guest.addressing, False, 40000, port, b"x"))
            peer.setblocking(False)
            _, relay_end = await asyncio.wait_for(
                asyncio.get_running_loop().sock_recvfrom(peer, 16), 5)
            listing = subprocess.run(["ss", "-u", "-a", "-n", "-m", "src",
                                      f"127.0.0.1:{relay_end[1]}"],
                                     capture_output=True, text=True, timeout=10).stdout
    sizes = [int(rb) for rb in re.findall(r"\brb(\d+)", listing)]
    assert sizes == [2 * UDP_RCVBUF], listing
