"""tcp_repair: an established connection with bytes in both queues moves from one
network namespace (host A) to another (host B) while a peer keeps talking to it, and not
a byte is lost, duplicated or reset. Real kernels only: the link to the peer moves from
A to B as a VM's network would, keeping its address and MAC."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from support import GUESTS

from relaynat.host.tcp_repair import dump, restore
from relaynat.netns.syscalls import CLONE_NEWNET, setns
from relaynat.repair_state import RepairError, RepairState

HOST_A, HOST_B, PEER = "rn-rep-a", "rn-rep-b", "rn-rep-peer"
HOST_IP, PEER_IP, PORT = "10.77.0.1", "10.77.0.2", 7000
T = TypeVar("T")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def _in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread inside network namespace `name` (namespaces are per
    thread); sockets it creates belong to that namespace wherever they are used."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with open(f"/run/netns/{name}") as ns:
                setns(ns.fileno(), CLONE_NEWNET)
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(60)
    if errors:
        raise errors[0]
    return result[0]


@pytest.fixture
def hosts() -> Iterator[subprocess.Popen[str]]:
    for ns in (HOST_A, HOST_B, PEER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
    _sh("ip", "-n", HOST_A, "link", "add", "uplink", "type", "veth", "peer", "name", "eth0",
        "netns", PEER)
    _sh("ip", "-n", HOST_A, "addr", "add", f"{HOST_IP}/24", "dev", "uplink")
    _sh("ip", "-n", HOST_A, "link", "set", "uplink", "up")
    _sh("ip", "-n", PEER, "addr", "add", f"{PEER_IP}/24", "dev", "eth0")
    _sh("ip", "-n", PEER, "link", "set", "eth0", "up")
    # The peer echoes every byte back and, at the client's EOF, sends a JSON line with
    # the sha256 and length of what it received, then closes.
    server = subprocess.Popen(["ip", "netns", "exec", PEER, sys.executable,
                               str(GUESTS / "tcp_echo_then_hash.py"), str(PORT)],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    yield server
    server.kill()
    server.wait()
    for ns in (HOST_A, HOST_B, PEER):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _fill_queues(sock: socket.socket, data: bytes) -> int:
    """Send until the kernel takes no more without reading the echo, and keeps taking
    none after a pause: the peer's echo has filled our receive queue, the peer has
    stopped reading, and our send queue is full. Returns how many bytes were taken."""
    sock.setblocking(False)
    sent = 0
    for _ in range(200):  # bounded: a few rounds settle it
        before = sent
        while sent < len(data):
            try:
                sent += sock.send(data[sent:sent + (1 << 16)])
            except BlockingIOError:
                break
        if sent == before:
            break
        time.sleep(0.1)
    sock.setblocking(True)
    return sent


@pytest.mark.integration
def test_connection_moves_between_namespaces_with_both_queues(
        hosts: subprocess.Popen[str]) -> None:
    data = os.urandom(32 << 20)
    source = _in_netns(HOST_A, lambda: socket.create_connection((PEER_IP, PORT), 10))
    sent = _fill_queues(source, data)
    assert 0 < sent < len(data)  # the premise: the queues are full, the rest waits
    # The VM stops and its network moves: A's link goes to B, keeping address and MAC.
    _sh("ip", "-n", HOST_A, "link", "set", "uplink", "down")
    state = dump(source)
    assert state.send_queue and state.recv_queue
    # Linux negotiates all three by default: their restore paths are exercised.
    assert state.timestamp is not None and state.snd_wscale is not None and state.sack
    wire = json.dumps(state.to_dict())
    # B's socket must exist before the link carries traffic: a peer segment reaching
    # B first (a zero-window probe, say) would be answered with a RST by B's kernel.
    # So the peer's end stays down (no carrier) until B has restored the socket.
    _sh("ip", "-n", PEER, "link", "set", "eth0", "down")
    _sh("ip", "-n", HOST_A, "link", "set", "uplink", "netns", HOST_B)
    _sh("ip", "-n", HOST_B, "addr", "add", f"{HOST_IP}/24", "dev", "uplink")
    _sh("ip", "-n", HOST_B, "link", "set", "uplink", "up")
    moved = _in_netns(HOST_B, lambda: restore(RepairState.from_dict(json.loads(wire))))
    _sh("ip", "-n", PEER, "link", "set", "eth0", "up")
    moved.settimeout(30)
    echoed = bytearray()

    def read_all() -> None:
        while chunk := moved.recv(1 << 20):
            echoed.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    moved.sendall(data[sent:])
    moved.shutdown(socket.SHUT_WR)
    reader.join(60)
    moved.close()
    source.close()  # in repair mode: silent, the peer sees nothing
    tail = bytes(echoed[len(data):])
    assert bytes(echoed[:len(data)]) == data
    assert json.loads(tail) == {"sha256": hashlib.sha256(data).hexdigest(),
                                "length": len(data)}
    assert hosts.wait(10) == 0


@pytest.mark.integration
def test_a_listening_socket_is_refused() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener, \
            pytest.raises(RepairError, match="not ESTABLISHED"):
        dump(listener)


