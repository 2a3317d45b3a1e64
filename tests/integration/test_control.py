"""The control socket (control/server.py) and `relaynat ctl` (control/client.py) with a
real guest: `relaynat run --control-socket` with a namespace guest, driven by the real
`relaynat ctl` command while traffic flows; another user refused; the guest unable to
reach the socket. The protocol itself, without root: tests/unit/test_control_protocol.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.faultkit import wait_until
from support.relaynat_cli import guest_python, parse_stats
from unit.test_control_protocol import _ctl, _served

from relaynat.config import RelayConfig
from relaynat.relay import Relay

HOST_PEERS = str(SUPPORT / "host_peers.py")
IS_ROOT = os.geteuid() == 0
pytest_plugins = ["support.guest_fs"]


@pytest.mark.skipif(not IS_ROOT, reason="needs root to switch to uid 65534")
async def test_another_user_gets_eacces() -> None:
    # A directory everyone may traverse, so only the socket's own mode decides.
    where = tempfile.mkdtemp(prefix="relaynat-ctl-")
    os.chmod(where, 0o755)
    path = os.path.join(where, "ctl.sock")

    async def as_nobody() -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(GUESTS / "control_connect_as_nobody.py"), path,
            stdout=subprocess.PIPE)
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
        return out.decode().strip()

    try:
        async with _served(path):
            assert await as_nobody() == os.strerror(13)  # EACCES: Permission denied
            # The same client succeeds once the mode allows it: the mode was the reason.
            os.chmod(path, 0o666)
            assert await as_nobody() == "answered"
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.rmdir(where)


# -- integration: relaynat run --control-socket and relaynat ctl ---------------------------


def _http_get(port: int, name: str) -> tuple[socket.socket, int]:
    """A GET of /name on 127.0.0.1:port; returns the socket (headers unread) and the
    local port (how the flow listing names this client)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET /{name} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return s, s.getsockname()[1]


def _read_body(s: socket.socket, paced: threading.Event | None = None) -> bytes:
    """The response body to EOF; while `paced` is not set, slowly (256 KiB per 20 ms),
    so the transfer is still running while the test inspects it."""
    data = bytearray()
    for _ in range(100000):  # 64 MiB in chunks of at least a few bytes; ends at EOF
        chunk = s.recv(256 << 10)
        if not chunk:
            break
        data += chunk
        if paced is not None and not paced.is_set():
            time.sleep(0.02)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), head[:80]
    return body


def _flow_of(ctl_flows: str, client_port: int) -> list[str]:
    for line in ctl_flows.splitlines():
        if re.search(rf"127\.0\.0\.1:{client_port}\s", line):
            return line.split()
    raise AssertionError(f"no flow for client port {client_port} in:\n{ctl_flows}")


@pytest.mark.integration
def test_ctl_adds_and_removes_a_forward_while_a_transfer_runs(tmp_path: Path,
                                                             guest_dir: Path) -> None:
    data = os.urandom(64 << 20)
    (guest_dir / "blob").write_bytes(data)
    (guest_dir / "small").write_bytes(b"second forward works\n")
    ready, ctl_sock = guest_dir / "ready", tmp_path / "ctl.sock"
    guest = (f"exec {guest_python()} {HOST_PEERS} http --root {guest_dir} --bind 0.0.0.0 "
             f"--port 8080 --port-file {ready}")
    # Through the guest's link (--no-splice): a loopback client would be spliced, and
    # its flow then listed on the guest's loopback (test_splice_forward.py).
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", "--stats",
                             "--control-socket", str(ctl_sock), "--no-splice",
                             "-t", "127.0.0.1/0:8080", "--", "sh", "-c", guest],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        match = re.search(r"port (\d+) to guest port 8080", line)
        assert match, line
        first_port = int(match.group(1))
        wait_until(ready.exists, 30, "guest server", proc)
        wait_until(ctl_sock.exists, 30, "control socket", proc)

        paced = threading.Event()
        sock, client_port = _http_get(first_port, "blob")
        body: list[bytes] = []
        reader = threading.Thread(target=lambda: body.append(_read_body(sock, paced)))
        reader.start()

        added = _ctl(ctl_sock, "add", "tcp", "127.0.0.1/0:8080")
        assert added.returncode == 0, added.stderr
        m = re.match(r"added\s+(\d+)\s+tcp\s+127\.0\.0\.1 port (\d+) -> guest port 8080",
                     added.stdout)
        assert m, added.stdout
        second_id, second_port = m.group(1), int(m.group(2))
        assert second_id == "2"  # the -t forward is 1
        s2, _ = _http_get(second_port, "small")
        with s2:
            assert _read_body(s2) == b"second forward works\n"

        listed = _ctl(ctl_sock, "list")
        assert listed.returncode == 0, listed.stderr
        assert re.search(rf"^\s+1\s+tcp\s+127\.0\.0\.1 port {first_port} ", listed.stdout, re.M)
        assert re.search(rf"^\s+2\s+tcp\s+127\.0\.0\.1 port {second_port} ", listed.stdout,
                         re.M)

        before = _flow_of(_ctl(ctl_sock, "flows").stdout, client_port)
        time.sleep(0.5)
        after = _flow_of(_ctl(ctl_sock, "flows").stdout, client_port)
        # PROTO DIR GUEST FAR HOST-PEER STATE FROM-GUEST TO-GUEST WINDOW RTT
        assert before[:5] == ["tcp", "inbound", "10.0.2.15:8080", before[3],
                              f"127.0.0.1:{client_port}"], before
        assert before[3].startswith("10.0.2.2:")
        assert before[5] == "established"
        assert 0 < int(before[6]) < int(after[6]) < len(data) + 4096, (before, after)
        assert after[9] != "-"  # the kernel's RTT of the host socket
        as_json = json.loads(_ctl(ctl_sock, "--json", "flows").stdout)
        assert any(f["host_peer"] == ["127.0.0.1", client_port]
                   for f in as_json["return"]["flows"])

        removed = _ctl(ctl_sock, "remove", second_id)
        assert removed.returncode == 0 and removed.stdout.startswith("removed"), removed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", second_port), timeout=5)
        gone = _ctl(ctl_sock, "remove", second_id)
        assert (gone.returncode, gone.stderr) == (1, "relaynat ctl: no forward with id 2\n")

        paced.set()
        reader.join(timeout=60)
        assert not reader.is_alive()
        sock.close()
        assert hashlib.sha256(body[0]).hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert parse_stats(err)["tcp_inbound_opened"] == 2
    assert not ctl_sock.exists()  # removed on exit


_GUEST_HOLDS_A_CONNECTION = """
import socket, sys, time
host, port, ready = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=20)
s.sendall(b"hello")
assert s.recv(5) == b"hello"
open(ready, "w").close()
try:
    print("open connection:", "eof" if s.recv(1) == b"" else "data")
except ConnectionResetError:
    print("open connection: reset")
try:
    socket.create_connection((host, port), timeout=5)
    print("new connection: accepted")
except ConnectionRefusedError:
    print("new connection: refused")
"""


@pytest.mark.integration
def test_policy_set_sandbox_cut_ends_a_loopback_connection(tmp_path: Path,
                                                           guest_dir: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    seen: list[str] = []

    def host_peer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            conn.sendall(conn.recv(5))
            try:
                seen.append("eof" if conn.recv(1) == b"" else "data")
            except ConnectionResetError:
                seen.append("reset")

    peer = threading.Thread(target=host_peer)
    peer.start()
    script, ready, ctl_sock = guest_dir / "guest.py", guest_dir / "ready", tmp_path / "ctl.sock"
    script.write_text(_GUEST_HOLDS_A_CONNECTION)
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", "--stats",
                             "--control-socket", str(ctl_sock), "--", guest_python(),
                             str(script), "10.0.2.2", str(port), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(ready.exists, 30, "guest connection", proc)
        flows = _ctl(ctl_sock, "flows").stdout
        assert re.search(rf"tcp\s+outbound\s+10\.0\.2\.15:\d+\s+10\.0\.2\.2:{port}\s+"
                         rf"127\.0\.0\.1:{port}\s+established", flows), flows
        cut = _ctl(ctl_sock, "policy", "set", "sandbox", "--cut")
        assert cut.returncode == 0, cut.stderr
        assert "flows cut: 1" in cut.stdout
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        listener.close()
        peer.join(timeout=30)
    assert out.splitlines() == ["open connection: reset", "new connection: refused"], err
    assert seen == ["reset"]
    stats = parse_stats(err)
    assert stats["policy_cut_tcp"] == 1
    assert stats["policy_denied"] == 1  # the new connection


@pytest.mark.integration
async def test_relay_flows_lists_a_udp_flow_and_cut_closes_it(guest_dir: Path,
                                                              udp_echo: int) -> None:
    from relaynat.netns.guest import run_command
    from relaynat.policy import Policy

    ready, cut_file = guest_dir / "ready", guest_dir / "cut"
    relays: list[Relay] = []
    out_path = guest_dir / "out"
    guest = asyncio.ensure_future(run_command(
        RelayConfig(), ["sh", "-c", f"exec {guest_python()} {GUESTS / 'udp_flow_until_cut.py'} "
                                    f"{udp_echo} {ready} {cut_file} > {out_path}"],
        relay_ready=relays.append))
    try:
        for _ in range(400):
            if ready.exists():
                break
            assert not guest.done(), guest
            await asyncio.sleep(0.05)
        relay = relays[0]
        udp = [f.to_dict() for f in relay.flows() if f.protocol == "udp"]
        assert udp == [{"protocol": "udp", "direction": "outbound",
                        "guest": ["10.0.2.15", udp[0]["guest"][1]],
                        "far": ["10.0.2.2", udp_echo], "host_peer": ["127.0.0.1", udp_echo],
                        "state": "answered", "bytes_from_guest": 1, "bytes_to_guest": 1,
                        "guest_window": None, "rtt_us": None}]
        assert relay.set_policy(Policy.sandbox(relay.config), cut=True) == 1
        assert [f for f in relay.flows() if f.protocol == "udp"] == []
        assert relay.stats()["policy_cut_udp"] == 1
        cut_file.touch()
        assert await asyncio.wait_for(guest, 30) == 0
    finally:
        guest.cancel()
    # The next datagram needed a new flow, which the sandbox refused with ICMP
    # administratively prohibited: the guest's connected socket reports it.
    assert out_path.read_text().split() == ["EHOSTUNREACH"]


def test_a_namespace_guest_cannot_reach_the_control_socket() -> None:
    """The guest shares the host's filesystem: the socket is covered by /dev/null in
    the guest's mount namespace, while the host reaches it. It lies in a directory the
    guest may search, so the cover is what refuses it, not the directory's mode."""
    where = tempfile.mkdtemp(prefix="relaynat-ctl-")
    os.chmod(where, 0o755)
    ctl_sock = os.path.join(where, "ctl.sock")
    try:
        result = subprocess.run(
            [sys.executable, "-m", "relaynat", "run", "--control-socket", ctl_sock, "--",
             guest_python(), str(GUESTS / "control_socket_probe.py"), ctl_sock],
            capture_output=True, text=True, timeout=60)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(ctl_sock)
        os.rmdir(where)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"refused: {errno.ECONNREFUSED}"
