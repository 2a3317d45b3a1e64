"""Spliced forwards: `relaynat run -t` clients on the host's loopback joined to the guest's
loopback service by splice(2), and the -T / -U loopback forwards the other way.

The relay is the real command; the guest's services are tests/guests/splice_service.py
and loopback_client.py run as its command; the clients and host peers are this
process's sockets (threads). The pytest process is in a private network namespace
(conftest.py): every address here is its loopback or the guest's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python, parse_stats

pytestmark = pytest.mark.integration

SERVICE = str(GUESTS / "splice_service.py")
CLIENT = str(GUESTS / "loopback_client.py")
GUEST_PORT = 8080
MIB = 1 << 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pattern(seed: int, size: int) -> Iterator[bytes]:
    """The guest programs' data: 1 MiB blocks of random.Random(seed).randbytes."""
    rng, left = random.Random(seed), size
    while left:
        block = rng.randbytes(min(MIB, left))
        left -= len(block)
        yield block


def _digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for block in _pattern(seed, size):
        h.update(block)
    return f"{h.hexdigest()} {size}"


class Relay:
    """`relaynat run --stats OPTIONS -- COMMAND` running; `lines` what the command
    printed after "ready", `stats` the counters, once `finish` returned."""

    def __init__(self, proc: subprocess.Popen[str], err: Path) -> None:
        self.proc = proc
        self._err = err
        self.lines: list[str] = []
        self.stats: dict[str, int] = {}

    def finish(self, timeout: float = 60) -> None:
        assert self.proc.stdout is not None
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines = [line for line in out.splitlines() if line]
        self.stats = parse_stats(self._err.read_text())

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def relay(tmp_path: Path, options: list[str], *command: str,
          wait_ready: bool = True) -> Iterator[Relay]:
    err = tmp_path / f"relay-{time.monotonic_ns()}.err"
    with open(err, "w") as errf:
        proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", "--stats", *options,
                                 "--", *command], stdout=subprocess.PIPE, stderr=errf,
                                text=True)
    r = Relay(proc, err)
    try:
        if wait_ready:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, f"the guest never said ready: {err.read_text()}"
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, err.read_text())
        yield r
    finally:
        if proc.poll() is None and not r.stats:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.communicate(timeout=20)
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def _service(mode: str, count: int = 1, size: int = 0) -> list[str]:
    return [guest_python(), SERVICE, mode, str(GUEST_PORT), str(count), str(size)]


def _connect(port: int, family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    return socket.create_connection((host, port), timeout=60)


def _drain(s: socket.socket) -> str:
    h, n = hashlib.sha256(), 0
    while data := s.recv(MIB):
        h.update(data)
        n += len(data)
    return f"{h.hexdigest()} {n}"


def test_256_mib_each_way_arrive_intact_through_the_splice(tmp_path: Path) -> None:
    size = 256 * MIB
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("both", 1, size)) as r:
        s = _connect(port)

        def send() -> None:
            for block in _pattern(3, size):
                s.sendall(block)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = _drain(s)
        sender.join(timeout=120)
        s.close()
        r.finish()
    assert got == _digest(1, size)
    assert r.lines == [_digest(3, size)]
    assert r.stats.get("splice_opened", 0) == 1
    assert r.stats.get("tcp_inbound_opened", 0) == 0
    assert r.stats.get("splice_bytes_to_guest", 0) == size
    assert r.stats.get("splice_bytes_from_guest", 0) == size
    assert r.stats.get("splice_closed", 0) == 1


def test_a_confined_relay_splices(tmp_path: Path) -> None:
    """Under --confine (seccomp allowlist, empty root, nobody) the spliced path still
    runs: splice(2) is on the list, and the sockets come from the factory made before."""
    size = 4 * MIB
    port = _free_port()
    with relay(tmp_path, ["--confine", "-t", f"{port}:{GUEST_PORT}"],
               *_service("both", 1, size)) as r:
        s = _connect(port)
        for block in _pattern(3, size):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        got = _drain(s)
        s.close()
        r.finish()
    assert r.proc.returncode == 0
    assert got == _digest(1, size)
    assert r.lines == [_digest(3, size)]
    assert r.stats.get("splice_opened", 0) == 1


def test_the_spliced_path_is_taken_unless_no_splice(tmp_path: Path) -> None:
    """The counters tell the paths apart: the same exchange, spliced and through the
    guest's TAP (--no-splice)."""
    for options, spliced in (([], 1), (["--no-splice"], 0)):
        port = _free_port()
        with relay(tmp_path, [*options, "-t", f"{port}:{GUEST_PORT}"],
                   *_service("sink")) as r:
            s = _connect(port)
            s.sendall(b"x" * 1000)
            s.shutdown(socket.SHUT_WR)
            assert s.makefile().readline().split()[1] == "1000"
            s.close()
            r.finish()
        assert r.stats.get("splice_opened", 0) == spliced, options
        assert r.stats.get("tcp_inbound_opened", 0) == 1 - spliced, options


def test_half_close_client_first_then_the_guest_answers(tmp_path: Path) -> None:
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("sink")) as r:
        s = _connect(port, socket.AF_INET6)
        for block in _pattern(3, 8 * MIB):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile().readline().strip()
        assert s.recv(1) == b""  # the guest's close crossed over as our EOF
        s.close()
        r.finish()
    assert answer == _digest(3, 8 * MIB)
    assert r.stats.get("splice_opened", 0) == 1


def test_half_close_guest_first_then_the_client_sends(tmp_path: Path) -> None:
    port = _free_port()
    ctl = str(tmp_path / "ctl.sock")
    with relay(tmp_path, ["--control-socket", ctl, "-t", f"{port}:{GUEST_PORT}"],
               *_service("first", 1, 8 * MIB)) as r:
        s = _connect(port)
        s_port = s.getsockname()[1]
        got = _drain(s)  # to the guest's FIN, while our side stays open
        # Open, half-closed: the control socket lists it as the relay's flows.
        flows = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket", ctl,
                                "--json", "flows"], capture_output=True, text=True,
                               timeout=30)
        for block in _pattern(3, 8 * MIB):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        s.close()
        r.finish()
    assert got == _digest(2, 8 * MIB)
    assert r.lines == [_digest(3, 8 * MIB)]
    assert flows.returncode == 0, flows.stderr
    listed = json.loads(flows.stdout)["return"]["flows"]
    spliced = [f for f in listed if f["state"] == "spliced"]
    assert len(spliced) == 1, listed
    assert spliced[0]["guest"] == ["127.0.0.1", GUEST_PORT]
    assert spliced[0]["host_peer"] == ["127.0.0.1", s_port]
    assert spliced[0]["bytes_to_guest"] == 0
    assert spliced[0]["direction"] == "inbound"


def test_a_client_reset_reaches_the_guest(tmp_path: Path) -> None:
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("expect_reset")) as r:
        s = _connect(port)
        s.sendall(b"some bytes")
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        r.finish(timeout=20)
    assert r.lines == ["reset"]
    assert r.stats.get("splice_resets", 0) == 1


def test_a_guest_reset_reaches_the_client(tmp_path: Path) -> None:
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("reset")) as r:
        s = _connect(port)
        s.settimeout(10)
        s.sendall(b"hello")
        with pytest.raises(ConnectionResetError):
            while s.recv(65536):
                pass
        s.close()
        r.finish(timeout=20)
    assert r.stats.get("splice_resets", 0) == 1


def test_a_reset_after_half_close_reaches_an_idle_guest(tmp_path: Path) -> None:
    """The client half-closed (that direction is done), the guest is idle, then the
    client resets: nothing is moving, so only the error on the client's socket
    (EPOLLERR) tells the relay, which must pass it on."""
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("idle_reset")) as r:
        s = _connect(port)
        s.sendall(b"some bytes")
        s.shutdown(socket.SHUT_WR)
        time.sleep(0.5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        r.finish(timeout=20)
    assert r.lines == ["reset"]
    assert r.stats.get("splice_resets", 0) == 1


def test_a_slow_reader_holds_the_client_back_and_the_relay_buffers_nothing(
        tmp_path: Path) -> None:
    size = 48 * MIB
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("slow", 1, 0)) as r:
        base = r.rss_kib()
        s = _connect(port)
        peak = base
        done = threading.Event()

        def watch() -> None:
            nonlocal peak
            while not done.wait(0.1):
                with contextlib.suppress(OSError, AssertionError):
                    peak = max(peak, r.rss_kib())

        watcher = threading.Thread(target=watch)
        watcher.start()
        start = time.monotonic()
        for block in _pattern(3, size):
            s.sendall(block)
        sent_in = time.monotonic() - start
        s.shutdown(socket.SHUT_WR)
        done.set()
        watcher.join()
        s.close()
        r.finish(timeout=120)
    assert r.lines == [_digest(3, size)]
    # 64 KiB per 20 ms is at most 3.2 MB/s: unless the data waited in the sender (its
    # window closed by full buffers and pipes), 48 MiB could not have been sent before
    # ~30 MiB of it was read, 9 s in; the kernel's buffers along the way hold less.
    assert sent_in > 4, f"48 MiB sent in {sent_in:.1f} s: nothing held the sender back"
    assert peak - base < 16 * 1024, f"relay RSS grew by {(peak - base) // 1024} MiB"


def test_two_hundred_concurrent_forwarded_connections(tmp_path: Path) -> None:
    count = 200
    port = _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT}"], *_service("echo", count)) as r:
        results: list[bool] = []
        sockets = [_connect(port) for _ in range(count)]

        def talk(s: socket.socket, n: int) -> None:
            data = os.urandom(64 * 1024 + n)
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            got = bytearray()
            while chunk := s.recv(65536):
                got += chunk
            results.append(bytes(got) == data)
            s.close()

        threads = [threading.Thread(target=talk, args=(s, n)) for n, s in enumerate(sockets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        r.finish()
    assert results == [True] * count
    assert r.stats.get("splice_opened", 0) == count
    assert r.stats.get("splice_closed", 0) == count


def test_a_forward_with_no_guest_service_refuses_the_client_at_once(tmp_path: Path) -> None:
    port, other = _free_port(), _free_port()
    with relay(tmp_path, ["-t", f"{port}:{GUEST_PORT + 1}", "-t", f"{other}:{GUEST_PORT}"],
               *_service("sink")) as r:
        start = time.monotonic()
        # The RST may come before connect() has returned (it then fails with it).
        opened: list[socket.socket] = []
        with pytest.raises((ConnectionResetError, ConnectionRefusedError)):
            opened.append(_connect(port))
            opened[0].settimeout(5)
            opened[0].recv(1)
        assert time.monotonic() - start < 2
        for s in opened:
            s.close()
        # End the guest through the port that has a service.
        s = _connect(other)
        s.shutdown(socket.SHUT_WR)
        s.makefile().readline()
        s.close()
        r.finish()
    assert r.stats.get("splice_refused", 0) == 1


def test_tcp_loopback_forward_from_the_guest_to_the_host(tmp_path: Path) -> None:
    size = 16 * MIB
    host_port = _free_port()
    srv = socket.create_server(("127.0.0.1", host_port))
    answers: list[str] = []

    def sink() -> None:
        c, _ = srv.accept()
        answers.append(_drain(c))
        c.sendall((answers[0] + "\n").encode())
        c.close()

    thread = threading.Thread(target=sink)
    thread.start()
    with relay(tmp_path, ["-T", f"127.0.0.1/5001:{host_port}"],
               guest_python(), CLIENT, "tcp", "127.0.0.1", "5001", str(size),
               wait_ready=False) as r:
        r.finish()
    thread.join(timeout=10)
    srv.close()
    assert answers == [_digest(3, size)]
    assert r.lines == [_digest(3, size)]
    assert r.stats.get("splice_reverse_opened", 0) == 1
    assert r.stats.get("tcp_flows_opened", 0) == 0  # not through the guest's link


def test_udp_loopback_forward_from_the_guest_to_the_host(tmp_path: Path,
                                                         udp_echo: int) -> None:
    with relay(tmp_path, ["-U", f"5353:{udp_echo}"],
               guest_python(), CLIENT, "udp", "127.0.0.1", "5353", "3",
               wait_ready=False) as r:
        r.finish()
    assert r.lines == ["hello 0", "hello 1", "hello 2"]
    assert r.stats.get("loopback_udp_from_guest", 0) == 3
    assert r.stats.get("loopback_udp_to_guest", 0) == 3


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"rn-splice-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_a_joined_namespace_is_spliced_too(tmp_path: Path, netns: str) -> None:
    port = _free_port()
    with relay(tmp_path, ["--netns", netns, "-t", f"{port}:{GUEST_PORT}"],
               *_service("sink")) as r:
        s = _connect(port)
        s.sendall(b"y" * 4096)
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile().readline().strip()
        s.close()
        r.finish()
    assert answer.split()[1] == "4096"
    assert r.stats.get("splice_opened", 0) == 1


_UNPRIVILEGED = r"""
set -e
# /dev/net/tun open to all, as Debian ships it, in this mount namespace only.
dev=$(mktemp -d)
mount -t tmpfs -o mode=755 tmpfs "$dev"
mknod -m 666 "$dev/tun" c 10 200
mount --bind "$dev/tun" /dev/net/tun
cd /
set +e
setpriv --reuid=65534 --regid=65534 --clear-groups env PYTHONPATH="$RELAYNAT_PATH" \
    timeout 60 "$GUEST_PYTHON" -m relaynat run --stats -t "$PORT:8080" \
    -T "127.0.0.1/5001:$HOST_PORT" \
    -- sh -c "$GUEST_PYTHON $CLIENT tcp 127.0.0.1 5001 1000 && \
              $GUEST_PYTHON $SERVICE sink 8080 1" &
relay=$!
# The factory (the relay's child; setpriv and env executed the relay, timeout forked
# it): its credentials once it has set up (no_new_privs is its last step).
factory=
for _ in $(seq 200); do
    python=$(pgrep -P $relay)
    [ -n "$python" ] && factory=$(pgrep -f relaynat.netns.ns_sockets -P "$python")
    [ -n "$factory" ] && grep -q 'NoNewPrivs:.1' "/proc/$factory/status" && break
    sleep 0.05
done
grep -E '^(Uid|CapEff|NoNewPrivs):' "/proc/$factory/status"
# Until the guest's service answers (before it listens, the relay resets the client).
for _ in $(seq 200); do
    answer=$(printf hello | socat -t 5 - TCP:127.0.0.1:$PORT 2>/dev/null)
    [ -n "$answer" ] && echo "$answer" && break
    sleep 0.1
done
wait $relay
"""


def test_an_unprivileged_relay_splices_and_its_factory_keeps_no_privilege(
        tmp_path: Path) -> None:
    """As nobody: the factory enters the guest's user namespace, then its network
    namespace, and drops every capability there; -t and -T are spliced."""
    import site

    src = str(Path(__file__).resolve().parents[2] / "src")
    path = os.pathsep.join([src, *site.getsitepackages()])
    probe = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            "env", f"PYTHONPATH={path}", guest_python(), "-c",
                            "import relaynat.relay"], capture_output=True, cwd="/")
    if probe.returncode:
        pytest.skip("nobody cannot import relaynat and its dependencies here: "
                    + probe.stderr.decode()[-300:])
    host_port = _free_port()
    srv = socket.create_server(("127.0.0.1", host_port))
    answers: list[str] = []

    def sink() -> None:
        c, _ = srv.accept()
        answers.append(_drain(c))
        c.sendall((answers[0] + "\n").encode())
        c.close()

    thread = threading.Thread(target=sink)
    thread.start()
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           _UNPRIVILEGED], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RELAYNAT_PATH": path,
                               "GUEST_PYTHON": guest_python(), "PORT": str(_free_port()),
                               "HOST_PORT": str(host_port), "CLIENT": CLIENT,
                               "SERVICE": SERVICE})
    thread.join(timeout=10)
    srv.close()
    assert done.returncode == 0, done.stderr
    stats = parse_stats(done.stderr)
    assert "Uid:\t65534\t65534\t65534\t65534" in done.stdout
    assert "CapEff:\t0000000000000000" in done.stdout
    assert "NoNewPrivs:\t1" in done.stdout
    assert _digest(3, 1000) in done.stdout  # the guest's -T upload, answered
    assert hashlib.sha256(b"hello").hexdigest() in done.stdout  # the -t client's
    assert answers == [_digest(3, 1000)]
    assert stats.get("splice_opened", 0) == 1
    assert stats.get("splice_reverse_opened", 0) == 1
