"""`relaynat serve` on the qemu stream socket, driven by a raw client of the wire format
(4-byte big-endian length + Ethernet frame), as qemu and libkrun speak it. The relay is
a real process; the client speaks DHCP to it, the one service that needs no guest
kernel, and misbehaves on purpose. The qemu guest test covers a real kernel client.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest
from support.relaynat_cli import stop_and_stats

pytestmark = pytest.mark.integration

GUEST_MAC = bytes.fromhex("525400123456")


def discover(xid: int) -> bytes:
    msg = dpkt.dhcp.DHCP(op=dpkt.dhcp.DHCP_OP_REQUEST, xid=xid, chaddr=GUEST_MAC,
                         opts=[(dpkt.dhcp.DHCP_OPT_MSGTYPE, bytes([dpkt.dhcp.DHCPDISCOVER]))])
    udp = dpkt.udp.UDP(sport=68, dport=67, data=bytes(msg))
    udp.ulen = len(udp)
    ip = dpkt.ip.IP(src=bytes(4), dst=b"\xff" * 4, p=dpkt.ip.IP_PROTO_UDP, data=udp, ttl=64)
    ip.len = len(ip)
    eth = dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC,
                                 type=dpkt.ethernet.ETH_TYPE_IP, data=ip)
    return bytes(eth)


def framed(frame: bytes) -> bytes:
    return struct.pack("!I", len(frame)) + frame


def read_frame(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            raise EOFError("relay closed the connection")
        head += chunk
    (length,) = struct.unpack("!I", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            raise EOFError("relay closed mid-frame")
        body += chunk
    return body


def dhcp_offer_for(sock: socket.socket, xid: int) -> dpkt.dhcp.DHCP:
    sock.sendall(framed(discover(xid)))
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        eth = dpkt.ethernet.Ethernet(read_frame(sock))
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \
                and ip.data.sport == 67:
            reply = dpkt.dhcp.DHCP(ip.data.data)
            if reply.xid == xid:
                return reply
    raise AssertionError("no DHCP reply")


def assert_closed_by_relay(sock: socket.socket) -> None:
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        assert sock.recv(65536) == b""


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    path = str(tmp_path / "relay.sock")
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--socket", path,
                             "--stats", "--log-level", "info"],
                            stderr=subprocess.PIPE, text=True)
    # Its log line, not the socket file: the file exists from bind(), a moment before
    # listen(), and a client connecting in between is refused (seen under CI load).
    assert proc.stderr is not None
    deadline = time.monotonic() + 10
    seen = ""
    while f"listening on {path}" not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"relaynat serve did not listen on its socket: {seen}"
        if select.select([proc.stderr], [], [], left)[0]:
            line = proc.stderr.readline()
            assert line, f"relaynat serve exited: {seen}"
            seen += line
    yield path, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def test_dhcp_offer_over_stream_and_second_client_refused(serve) -> None:
    path, proc = serve
    with connect(path) as first:
        offer = dhcp_offer_for(first, 0x1234)
        assert socket.inet_ntoa(offer.yiaddr.to_bytes(4, "big")) == "10.0.2.15"
        with connect(path) as second:
            assert_closed_by_relay(second)
        # The first guest is still served.
        assert dhcp_offer_for(first, 0x1235).xid == 0x1235
    stats, _ = stop_and_stats(proc)
    assert stats["stream_clients"] == 1
    assert stats["stream_clients_refused"] == 1


@pytest.mark.parametrize("bad_length", [0, 13, 65536, 0xFFFFFFFF])
def test_bad_frame_length_closes_that_client_and_the_next_is_served(serve, bad_length) -> None:
    path, proc = serve
    with connect(path) as bad:
        assert dhcp_offer_for(bad, 1).xid == 1
        bad.sendall(struct.pack("!I", bad_length) + b"\x00" * 32)
        assert_closed_by_relay(bad)
    time.sleep(0.1)
    with connect(path) as good:
        assert dhcp_offer_for(good, 2).xid == 2
    stats, err = stop_and_stats(proc)
    assert f"frame length {bad_length} outside 14..65535" in err
    assert stats["stream_clients"] == 2
    assert stats["transport_lost"] >= 1


def test_garbage_frames_are_dropped_and_counted_and_the_client_stays(serve) -> None:
    path, proc = serve
    garbage = [
        os.urandom(14),                                            # Ethernet header only
        b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + b"\x45\x00\x00",   # truncated IPv4
        b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + b"\x4f" + os.urandom(40),  # IHL lies
        b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + b"\x00\x01",       # truncated ARP
        b"\xff" * 6 + b"\x01" + GUEST_MAC[1:] + b"\x08\x00" + os.urandom(40),  # multicast src
    ]
    with connect(path) as client:
        client.sendall(b"".join(framed(g) for g in garbage * 50))
        assert dhcp_offer_for(client, 7).xid == 7
    stats, _ = stop_and_stats(proc)
    dropped = sum(v for k, v in stats.items() if k.startswith("drop_"))
    assert dropped == len(garbage) * 50, stats
    assert stats.get("drop_internal_error", 0) == 0
    assert stats["dhcp_replies"] == 1


def test_serve_on_an_inherited_fd_exits_when_the_guest_leaves() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--fd",
                             str(theirs.fileno())], pass_fds=[theirs.fileno()],
                            stderr=subprocess.PIPE, text=True)
    theirs.close()
    try:
        assert dhcp_offer_for(ours, 99).xid == 99
        ours.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_path_in_use_and_replaces_a_stale_one(tmp_path: Path, serve) -> None:
    path, _ = serve
    second = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--socket", path],
                            capture_output=True, text=True, timeout=20)
    assert second.returncode == 1
    assert "in use" in second.stderr
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(stale)
    s.close()  # a socket file nobody listens on
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--socket", stale],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with connect(stale) as c:
                    assert dhcp_offer_for(c, 5).xid == 5
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()


def test_bad_options_are_refused_with_a_clear_message() -> None:
    for args, needle in [
        (["--mtu", "70000"], "MTU 70000 must be between"),
        (["--address", "10.0.2.300/24"], "--address"),
        (["--gateway", "192.168.1.1"], "outside the guest subnet"),
        (["--map-host-loopback", "nope"], "--map-host-loopback"),
        (["--max-flows", "0"], "must be at least 1"),
    ]:
        done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--socket", "/x",
                               *args], capture_output=True, text=True, timeout=20)
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr, (args, done.stderr)
