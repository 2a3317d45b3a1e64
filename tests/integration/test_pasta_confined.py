"""`relaynat-pasta` confines its relay as pasta isolates itself (passt's isolation.c):
once the TAP is open in the namespace, the splice factory started and the forwards
bound, before it reports ready. The podman argvs of test_pasta_frontend.py check the
background relay's /proc status beside its traffic; here a foreground relay with
--runas serves -t, -u, -T and -U both ways confined, keeps its -P file (pasta leaves
it: the confined relay has no path to it) and ends cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.dropin_kit import free_port, greeting_through
from support.procfs import wait_confined

pytestmark = pytest.mark.integration

PASTA = str(Path(sys.executable).parent / "relaynat-pasta")

#: In the namespace: a UDP echo on 5353, then one TCP greeting on 80.
_INSIDE = """
import socket
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 80))
t.listen(1)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", 5353))
t.settimeout(30)
u.settimeout(30)
print("ready", flush=True)
data, peer = u.recvfrom(100)
u.sendto(b"inside udp " + data, peer)
conn, _ = t.accept()
conn.sendall(b"inside tcp")
conn.close()
"""


def _udp_through(port: int, payload: bytes) -> bytes:
    """A datagram to 127.0.0.1:`port` from the host, and the answer (sent again while
    none comes: the first may meet the forward before the guest's echo is bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1)
        for _ in range(10):
            sock.sendto(payload, ("127.0.0.1", port))
            try:
                return sock.recv(100)
            except TimeoutError:
                continue
    raise AssertionError(f"no answer through UDP port {port}")


def test_confined_relay_forwards_both_ways_and_keeps_its_pid_file(tmp_path: Path) -> None:
    name = f"pastaconf-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    pid_file = tmp_path / "pasta.pid"
    tcp_listener = socket.socket()
    tcp_listener.bind(("127.0.0.1", 0))
    tcp_listener.listen(1)
    tcp_listener.settimeout(15)
    udp_host = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp_host.bind(("127.0.0.1", 0))
    udp_host.settimeout(15)
    t_port, u_port = free_port(), free_port()
    proc = subprocess.Popen(
        [PASTA, "--config-net", "-f", "-t", f"127.0.0.1/{t_port}:80", "-u",
         f"127.0.0.1/{u_port}:5353", "-T", str(tcp_listener.getsockname()[1]), "-U",
         str(udp_host.getsockname()[1]), "-P", str(pid_file), "--runas", "12345:12346",
         "--netns", name], stderr=subprocess.PIPE, text=True)
    enter = ["ip", "netns", "exec", name]
    inside: subprocess.Popen[str] | None = None
    try:
        try:
            status = wait_confined(proc, 20)
        except AssertionError:
            if proc.poll() is not None and proc.stderr is not None:
                raise AssertionError(proc.stderr.read()) from None
            raise
        assert (status["Uid"].split()[0], status["Gid"].split()[0]) == ("12345", "12346")
        assert status["CapEff"] == status["CapPrm"] == "0000000000000000", status
        assert status["NoNewPrivs"] == "1", status
        assert os.listdir(f"/proc/{proc.pid}/root") == []
        assert pid_file.read_text().strip() == str(proc.pid)
        inside = subprocess.Popen([*enter, sys.executable, "-c", _INSIDE],
                                  stdout=subprocess.PIPE, text=True)
        assert inside.stdout is not None and inside.stdout.readline() == "ready\n"
        # -u and -t: the host's loopback ports into the namespace.
        assert _udp_through(u_port, b"from host") == b"inside udp from host"
        with socket.create_connection(("127.0.0.1", t_port), timeout=10) as conn:
            assert conn.recv(100) == b"inside tcp"
        assert inside.wait(timeout=15) == 0
        # -T and -U: the namespace's loopback ports are the host's (spliced).
        assert greeting_through(enter, "127.0.0.1", tcp_listener,
                                b"host via -T") == "host via -T"
        client = subprocess.Popen(
            [*enter, sys.executable, "-c",
             "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
             "s.settimeout(10)\n"
             f"s.sendto(b'from inside',('127.0.0.1',{udp_host.getsockname()[1]}))\n"
             "print(s.recv(100).decode())\n"], stdout=subprocess.PIPE, text=True)
        data, peer = udp_host.recvfrom(100)
        udp_host.sendto(b"host via -U to " + data, peer)
        out, _ = client.communicate(timeout=15)
        assert out.strip() == "host via -U to from inside"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        # As pasta: the file stays, naming the process that served.
        assert pid_file.read_text().strip() == str(proc.pid)
    finally:
        tcp_listener.close()
        udp_host.close()
        for child in (proc, inside):
            if child is not None and child.poll() is None:
                child.kill()
                child.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        if inside is not None and inside.stdout is not None:
            inside.stdout.close()
        subprocess.run(["ip", "netns", "del", name], check=False)
