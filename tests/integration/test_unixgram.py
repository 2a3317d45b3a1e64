"""`relaynat serve --unixgram PATH` and `--fd N` (datagram) driven by raw clients of the
wire format: one Ethernet frame per AF_UNIX datagram. The vfkit-style client binds its
own path, connects to the relay's and sends the `VFKT` handshake first, as vfkit and
libkrun/krunkit do; the qemu-style client binds its own path and just sends frames
(qemu's `-netdev dgram`). The relay is a real process; the clients speak DHCP to it,
and misbehave on purpose. The qemu guest test covers a real kernel behind `-netdev dgram`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dpkt
import pytest
from support.relaynat_cli import stop_and_stats

from integration.test_stream_transport import GUEST_MAC, discover

pytestmark = pytest.mark.integration


def unixgram_client(path: Path, relay: str, *, vfkit: bool = True) -> socket.socket:
    """A client bound at `path`; vfkit-style: connected to the relay, VFKT sent."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.bind(str(path))
    if vfkit:
        s.connect(relay)
        s.send(b"VFKT")
    return s


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


def dhcp_reply(sock: socket.socket, xid: int, timeout: float = 5.0) -> dpkt.dhcp.DHCP | None:
    """The DHCP reply with `xid` among the datagrams received within `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(70000)
        except TimeoutError:
            return None
        eth = dpkt.ethernet.Ethernet(data)
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP) \
                and ip.data.sport == 67:
            reply = dpkt.dhcp.DHCP(ip.data.data)
            if reply.xid == xid:
                return reply
    return None


def offer_for(sock: socket.socket, relay: str, xid: int) -> dpkt.dhcp.DHCP:
    if _connected(sock):
        sock.send(discover(xid))
    else:
        sock.sendto(discover(xid), relay)
    reply = dhcp_reply(sock, xid)
    assert reply is not None, "no DHCP reply"
    return reply


def start_relay(args: list[str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--stats",
                             "--log-level", "info", *args],
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    path = str(tmp_path / "relay.sock")
    proc = start_relay(["--unixgram", path])
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "relaynat serve did not create its socket"
        time.sleep(0.02)
    yield path, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_vfkit_client_gets_an_offer_and_a_second_peer_is_ignored(tmp_path, serve) -> None:
    relay, proc = serve
    with unixgram_client(tmp_path / "vfkit.sock", relay) as first:
        offer = offer_for(first, relay, 0x1234)
        assert socket.inet_ntoa(offer.yiaddr.to_bytes(4, "big")) == "10.0.2.15"
        with unixgram_client(tmp_path / "other.sock", relay) as second:
            second.send(discover(0x4321))
            assert dhcp_reply(second, 0x4321, timeout=0.5) is None
        # Nor did the first guest get the second one's reply; it is still served.
        assert offer_for(first, relay, 0x1235).xid == 0x1235
    stats, _ = stop_and_stats(proc)
    assert not os.path.exists(relay), "the relay removes its socket on exit"
    assert stats["unixgram_handshakes"] == 1  # the second peer's is dropped as foreign
    assert stats["unixgram_peers"] == 1
    assert stats["unixgram_drop_foreign_peer"] == 2  # VFKT and DISCOVER of the second
    assert stats["dhcp_replies"] == 2
    assert stats.get("unixgram_drop_short_frame", 0) == 0


def test_qemu_style_client_without_handshake(tmp_path, serve) -> None:
    relay, proc = serve
    with unixgram_client(tmp_path / "qemu.sock", relay, vfkit=False) as client:
        assert offer_for(client, relay, 3).xid == 3
    stats, _ = stop_and_stats(proc)
    assert stats.get("unixgram_handshakes", 0) == 0
    assert stats["unixgram_peers"] == 1


def test_garbage_datagrams_are_counted_and_the_client_stays(tmp_path, serve) -> None:
    relay, proc = serve
    garbage = [
        os.urandom(14),                                            # Ethernet header only
        b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + b"\x45\x00\x00",   # truncated IPv4
        b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + b"\x00\x01",       # truncated ARP
        b"\xff" * 6 + b"\x01" + GUEST_MAC[1:] + b"\x08\x00" + os.urandom(40),  # multicast src
    ]
    short = [b"", b"\x00", b"VFK", b"VFKTX", os.urandom(13)]
    with unixgram_client(tmp_path / "vfkit.sock", relay) as client:
        assert offer_for(client, relay, 1).xid == 1
        for _ in range(20):
            for g in garbage + short:
                client.send(g)
            time.sleep(0.01)  # the relay's receive queue holds 10 datagrams
        client.send(os.urandom(65536))  # one byte over the largest frame
        client.send(b"VFKT")  # a repeated handshake is not a frame either
        assert offer_for(client, relay, 7).xid == 7
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unnamed:
        unnamed.sendto(discover(8), relay)  # no address to answer to
    time.sleep(0.2)
    stats, _ = stop_and_stats(proc)
    relay_drops = sum(v for k, v in stats.items() if k.startswith("drop_"))
    assert relay_drops == len(garbage) * 20, stats
    assert stats["unixgram_drop_short_frame"] == len(short) * 20, stats
    assert stats["unixgram_drop_long_frame"] == 1, stats
    assert stats["unixgram_handshakes"] == 2, stats
    assert stats["unixgram_drop_unnamed_peer"] == 1, stats
    assert stats.get("drop_internal_error", 0) == 0
    assert stats["dhcp_replies"] == 2


def test_a_gone_peer_is_replaced_by_the_next(tmp_path, serve) -> None:
    relay, proc = serve
    with unixgram_client(tmp_path / "a.sock", relay) as first:
        assert offer_for(first, relay, 10).xid == 10
    os.unlink(tmp_path / "a.sock")  # vfkit exited; a restarted one binds a new path
    with unixgram_client(tmp_path / "b.sock", relay) as second:
        assert offer_for(second, relay, 11).xid == 11
    stats, _ = stop_and_stats(proc)
    assert stats["unixgram_peers_replaced"] == 1, stats
    assert stats["unixgram_peers"] == 2, stats


def test_qemu_style_peer_is_not_flooded_into_drops(tmp_path, serve) -> None:
    """qemu's socket is not connected to ours, so Linux queues at most
    net.unix.max_dgram_qlen (10) datagrams toward it; the relay connects to it and waits
    for writability instead of dropping. 60 replies, nothing read until all are sent."""
    relay, proc = serve
    with unixgram_client(tmp_path / "qemu.sock", relay, vfkit=False) as client:
        assert offer_for(client, relay, 1).xid == 1
        for xid in range(100, 160):
            client.sendto(discover(xid), relay)
        time.sleep(0.5)
        got = set()
        client.settimeout(5)
        while len(got) < 60:
            eth = dpkt.ethernet.Ethernet(client.recv(70000))
            got.add(dpkt.dhcp.DHCP(eth.data.data.data).xid)
        assert got == set(range(100, 160))
    stats, _ = stop_and_stats(proc)
    assert stats.get("unixgram_drop_send_full", 0) == 0, stats
    assert stats["unixgram_frames_out"] == 61, stats


def test_qemu_style_peers_one_at_a_time(tmp_path, serve) -> None:
    """While a qemu-style guest is served the relay's socket is connected to it: the
    kernel refuses other senders (EPERM). Once the guest's socket is gone the relay
    notices within a second and serves the next one."""
    relay, proc = serve
    with unixgram_client(tmp_path / "a.sock", relay, vfkit=False) as first:
        assert offer_for(first, relay, 20).xid == 20
        with (unixgram_client(tmp_path / "b.sock", relay, vfkit=False) as second,
              pytest.raises(PermissionError)):
            second.sendto(discover(21), relay)
    os.unlink(tmp_path / "a.sock")
    with unixgram_client(tmp_path / "c.sock", relay, vfkit=False) as third:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(PermissionError):
                assert offer_for(third, relay, 22).xid == 22
                break
            assert time.monotonic() < deadline, "the relay never let the next guest in"
            time.sleep(0.1)
    stats, _ = stop_and_stats(proc)
    # The relay found the first guest gone by itself (its flows ended then), so the
    # third was learned afresh rather than replacing a gone one on arrival.
    assert stats["unixgram_peers_gone"] == 1, stats
    assert stats["unixgram_peers"] == 2, stats


def test_serve_on_an_inherited_datagram_fd() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc = start_relay(["--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.send(b"VFKT")
        ours.send(b"short")
        assert offer_for(ours, "", 99).xid == 99
        stats, err = stop_and_stats(proc)
        assert stats["unixgram_handshakes"] == 1, err
        assert stats["unixgram_drop_short_frame"] == 1, err
        assert stats["dhcp_replies"] == 1, err
    finally:
        ours.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tcp_segment(sport: int, dport: int, seq: int, ack: int, flags: int) -> bytes:
    tcp = dpkt.tcp.TCP(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, win=65535)
    ip = dpkt.ip.IP(src=socket.inet_aton("10.0.2.15"), dst=socket.inet_aton("10.0.2.2"),
                    p=dpkt.ip.IP_PROTO_TCP, data=tcp, ttl=64)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(dst=b"\xff" * 6, src=GUEST_MAC,
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def test_inherited_datagram_fd_exits_when_the_guest_is_gone() -> None:
    """Linux does not tell a datagram socket that its peer closed; the relay finds out
    at its next send (ECONNREFUSED) and exits, as it does on a stream fd's EOF. The
    next send here: data from a host server on a TCP flow the guest opened."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    proc = start_relay(["--fd", str(theirs.fileno())], pass_fds=[theirs.fileno()])
    theirs.close()
    try:
        ours.send(tcp_segment(40000, port, 1000, 0, dpkt.tcp.TH_SYN))
        ours.settimeout(5)
        while True:
            eth = dpkt.ethernet.Ethernet(ours.recv(70000))
            seg = eth.data.data if isinstance(eth.data, dpkt.ip.IP) else None
            if isinstance(seg, dpkt.tcp.TCP) and seg.flags & dpkt.tcp.TH_SYN:
                break
        assert seg.flags & dpkt.tcp.TH_ACK, "expected SYN-ACK"
        ours.send(tcp_segment(40000, port, 1001, seg.seq + 1, dpkt.tcp.TH_ACK))
        listener.settimeout(5)
        host_side, _ = listener.accept()
        ours.close()  # the guest goes away without a word
        host_side.sendall(b"hello")  # the relay forwards it and finds nobody there
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "peer gone" in err, err
        host_side.close()
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_unixgram_refuses_a_path_in_use(serve) -> None:
    path, _ = serve
    second = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--unixgram", path],
                            capture_output=True, text=True, timeout=20)
    assert second.returncode == 1
    assert "in use" in second.stderr


def test_unixgram_replaces_a_leftover_socket_and_refuses_other_files(tmp_path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(stale))
    proc = start_relay(["--unixgram", str(stale)])
    try:
        with unixgram_client(tmp_path / "c.sock", str(stale), vfkit=False) as c:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(ConnectionRefusedError, FileNotFoundError):
                    c.sendto(discover(5), str(stale))  # refused until the relay rebinds
                    if dhcp_reply(c, 5, timeout=0.3) is not None:
                        break
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    regular = tmp_path / "file"
    regular.write_text("not a socket")
    done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--unixgram",
                           str(regular)], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert "not a socket" in done.stderr
    assert regular.read_text() == "not a socket"


def test_fd_that_is_not_a_socket_is_refused(tmp_path) -> None:
    with open(tmp_path / "f", "w") as f:
        done = subprocess.run([sys.executable, "-m", "relaynat", "serve", "--fd",
                               str(f.fileno())], pass_fds=[f.fileno()],
                              capture_output=True, text=True, timeout=20)
    assert done.returncode == 1, done.stderr
    assert "relaynat serve:" in done.stderr
