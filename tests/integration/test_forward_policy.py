"""Inbound forwards (`-t`) and the egress policy (`--sandbox`, `--policy`) with real
kernels: a namespace guest behind `relaynat run`, host clients and servers in the test's
private network namespace and in peer namespaces the tests create.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS, SUPPORT
from support.relaynat_cli import guest_python, parse_stats, relaynat_run

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

HOST_PEERS = str(SUPPORT / "host_peers.py")


def _start_forwarded_guest(tmp_path: Path, guest_cmd: str, *options: str
                           ) -> tuple[subprocess.Popen[str], int]:
    """`relaynat run -t 0:8080 ... -- sh -c guest_cmd`; returns the process and the host
    port the kernel chose (read from the relay's stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", "--stats",
                             "-t", "127.0.0.1/0:8080", *options, "--", "sh", "-c", guest_cmd],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    match = re.search(r"port (\d+) to guest port 8080", line)
    assert match, line + proc.stderr.read()
    return proc, int(match.group(1))


def _wait_guest_ready(ready: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert proc.poll() is None, "guest ended early"
        assert time.monotonic() < deadline, "guest server did not start"
        time.sleep(0.05)


def test_forwarded_port_carries_64mib_both_ways(tmp_path: Path, guest_dir: Path) -> None:
    data = os.urandom(64 << 20)
    (guest_dir / "blob").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    ready = guest_dir / "port"
    # The guest serves GET (the file) and PUT (answers the body's sha256) on port 8080.
    guest = (f"exec {guest_python()} {HOST_PEERS} http --root {guest_dir} --bind 0.0.0.0 "
             f"--port 8080 --port-file {ready}")
    # Through the guest's link: a loopback client would be spliced (test_splice_forward.py).
    proc, port = _start_forwarded_guest(tmp_path, guest, "--no-splice")
    try:
        _wait_guest_ready(ready, proc)
        url = f"http://127.0.0.1:{port}/blob"
        with urllib.request.urlopen(url, timeout=30) as response:
            got = response.read()
        assert hashlib.sha256(got).hexdigest() == digest
        put = urllib.request.Request(url, data=data, method="PUT")
        with urllib.request.urlopen(put, timeout=30) as response:
            assert response.read().decode().strip() == digest
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    stats = parse_stats(err)
    assert stats["tcp_inbound_opened"] == 2
    assert stats.get("tcp_internal_errors", 0) == 0


def test_guest_refusing_closes_the_host_client_within_a_second(tmp_path: Path) -> None:
    proc, port = _start_forwarded_guest(tmp_path, "sleep 30")  # nothing listens on 8080
    try:
        time.sleep(0.5)  # the guest's link is up (it has sent its first frames)
        import socket

        start = time.monotonic()
        # Closed or reset: both are fine. On a busy machine the relay's reset can even land
        # between the kernel finishing the handshake and connect() returning, which then
        # raises ECONNRESET (inet_wait_for_connect finds the socket closed): the same answer.
        with (contextlib.suppress(ConnectionResetError),
              socket.create_connection(("127.0.0.1", port), 5) as client):
            client.settimeout(5)
            assert client.recv(1) == b""
        assert time.monotonic() - start < 1.0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


# -- egress policy ----------------------------------------------------------------------

PEER_NS = "rn-policy-peer"
#: Addresses of a peer namespace standing in for the world beyond the host: a private
#: LAN host, the metadata service, and a public host (11.0.0.0/8 is publicly routed on
#: the Internet, so the policy calls it public; here it exists only in this namespace).
PRIVATE, METADATA, PUBLIC = "10.200.0.2", "169.254.169.254", "11.0.0.2"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


@pytest.fixture(scope="module")
def world() -> Iterator[int]:
    """A peer namespace behind a veth, with an HTTP server on all three addresses;
    yields its port. The relay's host side (this test's namespace) routes to it."""
    subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)
    _sh("ip", "netns", "add", PEER_NS)
    _sh("ip", "link", "add", "rnpol0", "type", "veth", "peer", "name", "eth0", "netns",
        PEER_NS)
    for addr in ("10.200.0.1/24", "169.254.169.1/24", "11.0.0.1/24"):
        _sh("ip", "addr", "add", addr, "dev", "rnpol0")
    _sh("ip", "link", "set", "rnpol0", "up")
    for addr in (f"{PRIVATE}/24", f"{METADATA}/24", f"{PUBLIC}/24"):
        _sh("ip", "netns", "exec", PEER_NS, "ip", "addr", "add", addr, "dev", "eth0")
    _sh("ip", "netns", "exec", PEER_NS, "ip", "link", "set", "eth0", "up")
    _sh("ip", "netns", "exec", PEER_NS, "ip", "link", "set", "lo", "up")
    root = Path(f"/tmp/{PEER_NS}")
    root.mkdir(exist_ok=True)
    (root / "hello").write_text("hello\n")
    port_file = root / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(["ip", "netns", "exec", PEER_NS, sys.executable, HOST_PEERS,
                               "http", "--root", str(root), "--bind", "0.0.0.0",
                               "--port-file", str(port_file)])
    deadline = time.monotonic() + 10
    while not port_file.exists():
        assert time.monotonic() < deadline and server.poll() is None
        time.sleep(0.05)
    try:
        yield int(port_file.read_text())
    finally:
        server.kill()
        server.wait()
        subprocess.run(["ip", "link", "del", "rnpol0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", PEER_NS], capture_output=True)


def _fetch_all(port: int, host_port: int) -> str:
    """Guest script: one curl per destination, printing 'NAME ok' or 'NAME failed'."""
    targets = {"private": PRIVATE, "metadata": METADATA, "public": PUBLIC,
               "host": "10.0.2.2"}
    return "; ".join(
        f"curl -sf -m 3 http://{addr}:{host_port if name == 'host' else port}/hello "
        f">/dev/null && echo {name} ok || echo {name} failed"
        for name, addr in targets.items())


def test_sandbox_denies_host_metadata_and_private_and_allows_public(
        world: int, start_peer, tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("hello\n")
    host_port = start_peer("http", "--root", str(tmp_path))
    open_run = relaynat_run("sh", "-c", _fetch_all(world, host_port))
    assert open_run.stdout.split("\n")[:-1] == [
        "private ok", "metadata ok", "public ok", "host ok"], open_run.stderr
    start = time.monotonic()
    sandboxed = relaynat_run("sh", "-c", _fetch_all(world, host_port), options=("--sandbox",))
    assert sandboxed.stdout.split("\n")[:-1] == [
        "private failed", "metadata failed", "public ok", "host failed"], sandboxed.stderr
    # Refused with a RST at once, not left to time out (3 s each).
    assert time.monotonic() - start < 6
    stats = parse_stats(sandboxed.stderr)
    assert stats["policy_denied"] == 3 and stats["policy_allowed"] == 1


def test_policy_file_first_match_wins(world: int, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'default = "deny"\n'
        "[[rule]]\n"
        f'action = "deny"\nto = "{PUBLIC}/32"\nports = "{world}"\n'
        "[[rule]]\n"
        'action = "allow"\nto = ["11.0.0.0/8", "private"]\nproto = "tcp"\n')
    done = relaynat_run("sh", "-c", _fetch_all(world, 1), options=("--policy", str(policy)))
    # private: rule 1 allows; metadata: default deny; public: rule 0 denies the port
    # before rule 1 could allow it; host (10.0.2.2, private too, port 1): allowed by
    # rule 1 but nothing listens there.
    assert done.stdout.split("\n")[:-1] == [
        "private ok", "metadata failed", "public failed", "host failed"], done.stderr
    stats = parse_stats(done.stderr)
    assert stats["policy_denied_rule0"] == 1 and stats["policy_denied_default"] == 1


def test_sandbox_udp_gets_admin_prohibited(world: int) -> None:
    done = relaynat_run(guest_python(), str(GUESTS / "udp_send_error.py"), PRIVATE, "9",
                        "--timeout", "3", "--show", "name-errno", options=("--sandbox",))
    # ICMP administratively prohibited (type 3 code 13) is a hard error for a connected
    # UDP socket: Linux's icmp_err_convert maps it to EHOSTUNREACH (113).
    assert done.stdout.strip() == "OSError 113", done.stdout + done.stderr
    assert parse_stats(done.stderr)["policy_denied"] == 1
