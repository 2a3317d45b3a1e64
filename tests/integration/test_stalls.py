"""A side that stops reading holds the other back without growing the relay.

The relay keeps no stream data of its own (bytes wait in the sockets' and the guest
kernel's queues: the host socket's receive queue, our advertised window), so when the
host peer stops reading, the guest is stopped by the window; when the guest stops
reading (its window goes to zero), the relay stops sending and probes the window
(RFC 9293 §3.8.6.1). Either way the relay's memory stays flat through the stall and
the transfer resumes intact. A real namespace guest, a real host peer, the relay
sampled from outside (faultkit.LiveRun: `relaynat run` is the relay process).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from pathlib import Path

import dpkt
import pytest
from support import GUESTS, SUPPORT
from support.faultkit import MIB, LiveRun, rss_kib, wait_until
from support.relaynat_cli import guest_python

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GUEST_TOOLS = str(SUPPORT / "guest_tools.py")
GATEWAY = "10.0.2.2"
STALL_S = 5.0
#: What RSS may move by while nothing moves (allocator noise, a timer's frames).
FLAT_KIB = 2048


def _sample_during(run: LiveRun, started: Path, seconds: float) -> list[int]:
    """The relay's RSS every 0.1 s for `seconds` once the guest wrote `started`."""
    wait_until(started.exists, 30, "the guest's transfer", run.proc)
    time.sleep(0.5)  # the windows fill, the stall sets in
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_kib(run.pid))
        time.sleep(0.1)
    return samples


def test_host_peer_that_stops_reading_stalls_the_guest_with_flat_relay_memory(
        start_peer, guest_dir: Path) -> None:
    port = start_peer("drain-then-reply", "--delay", str(STALL_S + 1))
    started = guest_dir / "started"
    size = 128 * MIB
    run = LiveRun(["sh", "-c", f"touch {started}; exec {guest_python()} {GUEST_TOOLS} "
                               f"half-close {GATEWAY} {port} --size {size}"])
    try:
        samples = _sample_during(run, started, STALL_S - 1)
        status, stats = run.finish(timeout_s=60)
    finally:
        run.kill()
    print(f"\nrelay RSS during the stall: {min(samples)}..{max(samples)} KiB")
    assert status == 0, run.stdout + run.stderr[-2000:]  # the peer's digest matched
    assert run.stdout.strip().endswith(f" {size}")
    assert max(samples) - min(samples) <= FLAT_KIB, samples
    assert stats.get("tcp_internal_errors", 0) == 0


def test_guest_that_stops_reading_is_probed_with_flat_relay_memory(
        start_peer, tmp_path: Path, guest_dir: Path) -> None:
    data = os.urandom(64 * MIB)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "f.bin").write_bytes(data)
    port = start_peer("http", "--root", str(tmp_path / "www"))
    started, pcap = guest_dir / "started", tmp_path / "guest.pcap"
    run = LiveRun([guest_python(), str(GUESTS / "stalled_http_get.py"), GATEWAY, str(port),
                   str(STALL_S), "--started", str(started)], options=("--pcap", str(pcap)))
    try:
        samples = _sample_during(run, started, STALL_S - 1.5)
        status, stats = run.finish(timeout_s=60)
    finally:
        run.kill()
    assert status == 0, run.stderr[-2000:]
    assert stats.get("tcp_internal_errors", 0) == 0
    assert run.stdout.split() == [hashlib.sha256(data).hexdigest(), str(len(data))]
    assert max(samples) - min(samples) <= FLAT_KIB, samples
    # The guest's window went to zero, and the relay probed it: empty segments one
    # below what the guest had acknowledged (RFC 9293 §3.8.6.1), several while the
    # window stayed shut, each answered with the guest's current window.
    zero_windows = probes = 0
    acked = None
    with open(pcap, "rb") as f:
        for _, raw in dpkt.pcap.Reader(f):
            tcp = getattr(getattr(dpkt.ethernet.Ethernet(raw), "data", None), "data", None)
            if not isinstance(tcp, dpkt.tcp.TCP) or port not in (tcp.sport, tcp.dport):
                continue
            if tcp.dport == port:  # from the guest
                acked = tcp.ack
                zero_windows += tcp.win == 0
            elif not tcp.data and acked is not None and tcp.seq == (acked - 1) & 0xFFFFFFFF:
                probes += 1
    print(f"\nrelay RSS during the stall: {min(samples)}..{max(samples)} KiB; "
          f"{zero_windows} zero windows from the guest, {probes} probes")
    assert zero_windows > 0 and probes >= 2, (zero_windows, probes)


def _bursty_reader(listener: socket.socket, pause_s: float, out: dict[str, object]) -> None:
    """Accept one client; read it to EOF in bursts of up to 512 KiB, pausing `pause_s`
    after each: a peer that is descheduled for a moment, over and over."""
    listener.settimeout(60)
    conn, _ = listener.accept()
    conn.settimeout(60)
    digest, n = hashlib.sha256(), 0
    while chunk := conn.recv(1 << 19):
        digest.update(chunk)
        n += len(chunk)
        time.sleep(pause_s)
    out["result"] = (digest.hexdigest(), n)
    conn.close()


def test_guest_held_by_a_pausing_host_peer_resumes_without_probing(guest_dir: Path) -> None:
    """The host peer pauses 30 ms between reads, so the relay's host socket fills and
    our window to the guest shuts, again and again. Each time the socket drains the
    relay must tell the guest: left to its own zero-window probe (RFC 9293 §3.8.6.1,
    at least Linux's 200 ms RTO) every pause became a 0.2 s stall. The guest's kernel
    counts those probes (TcpExtTCPWinProbe); none may be sent.

    Each reopened window also lets the guest queue many frames in the TAP at once, so
    the relay reads several in one wakeup and writes their payloads with one sendmsg
    (the TAP keeps its frames until the end of the batch): the bytes must arrive
    intact through that path, and it must have been taken."""
    data = os.urandom(16 * MIB)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    out: dict[str, object] = {}
    reader = threading.Thread(target=_bursty_reader, args=(listener, 0.03, out), daemon=True)
    reader.start()
    source = guest_dir / "data.bin"  # where the guest may read it
    source.write_bytes(data)
    # tcp_send_stdin.py waits until the peer read it all: `run` ends with the command.
    run = LiveRun(["sh", "-c", f"{guest_python()} {GUESTS / 'tcp_send_stdin.py'} {GATEWAY} "
                               f"{port} < {source} && nstat -asz TcpExtTCPWinProbe"])
    try:
        status, stats = run.finish(timeout_s=120)
    finally:
        run.kill()
        reader.join(30)
        listener.close()
    assert status == 0, run.stderr[-2000:]
    assert out.get("result") == (hashlib.sha256(data).hexdigest(), len(data))
    probes = int(run.stdout.split("TcpExtTCPWinProbe")[1].split()[0])
    print(f"\nguest zero-window probes: {probes}; "
          f"{stats.get('tcp_gathered_writes', 0)} gathered host writes")
    assert probes == 0
    assert stats.get("tcp_gathered_writes", 0) > 0
    assert stats.get("tcp_internal_errors", 0) == 0
