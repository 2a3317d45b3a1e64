"""Test-session setup: everything runs inside a private network namespace.

When the suite runs as root, the pytest process unshares its network namespace at
import time, before any thread exists, and brings up `lo`. Every relay, server, guest
namespace and benchmark a test starts is then a descendant of that namespace, so even
a buggy relay that connects somewhere unexpected reaches nothing outside this machine.
Integration tests need root; without it they are skipped with that reason, visibly.

The lane is the directory: every test under tests/integration/ is marked `integration`,
every test under tests/vm/ `vm` and `integration`, whatever its module says, so
`-m "not integration"` and the root check cannot miss one. tests/unit/ and tests/checks/
are marked nothing and run without root (tests/checks/test_lanes.py keeps it so).
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import SUPPORT
from support.root_netns import RootNetnsWatch

from relaynat.netns.syscalls import isolate_network

TESTS = Path(__file__).resolve().parent
#: Size of the `big_file` fixture: large enough that a transfer spans many windows.
BIG = 256 << 20
IS_ROOT = os.geteuid() == 0
#: The namespace the suite started in, watched so a test that changes it fails.
ROOT_NETNS: RootNetnsWatch | None = None
if IS_ROOT and os.environ.get("RELAYNAT_TEST_NETNS_DONE") != "1":
    ROOT_NETNS = RootNetnsWatch.start()
    isolate_network()
    # Children (pytest-xdist workers, re-invocations) inherit this namespace already.
    os.environ["RELAYNAT_TEST_NETNS_DONE"] = "1"
    os.environ["RELAYNAT_TEST_ROOT_NETNS_PID"] = str(ROOT_NETNS.pid)
elif IS_ROOT and os.environ.get("RELAYNAT_TEST_ROOT_NETNS_PID"):
    ROOT_NETNS = RootNetnsWatch(int(os.environ["RELAYNAT_TEST_ROOT_NETNS_PID"]))


#: Markers every test of a lane directory gets.
LANE_MARKERS = {"integration": ("integration",), "vm": ("vm", "integration")}


def lane_of(path: Path) -> str | None:
    """The lane directory (unit, integration, vm, checks) a test file is in."""
    try:
        return path.resolve().relative_to(TESTS).parts[0]
    except ValueError:  # a file outside tests/ (benches/test_micro.py, given by hand)
        return None


# tryfirst: the markers must be there before `-m` deselects by them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in LANE_MARKERS.get(lane_of(item.path) or "", ()):
            if item.get_closest_marker(name) is None:
                item.add_marker(name)
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root for network namespaces and TAP devices")
    for item in items:
        # By marker, not keyword: a directory's name is a keyword of every test in it.
        if item.get_closest_marker("integration") or item.get_closest_marker("vm"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def root_netns_untouched(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail an integration test that changed the links or routes of the namespace the
    suite started in (the machine's own network, usually)."""
    yield
    if ROOT_NETNS is None or request.node.get_closest_marker("integration") is None:
        return
    changes = ROOT_NETNS.changes()
    if changes:
        ROOT_NETNS.accept()  # blame this test only, not every test after it
        pytest.fail("the test changed the network namespace the suite started in "
                    "(undo by hand): " + "; ".join(changes), pytrace=False)


def pytest_unconfigure(config: pytest.Config) -> None:
    if ROOT_NETNS is not None:
        ROOT_NETNS.stop()


@pytest.fixture
def start_peer(tmp_path: Path) -> Iterator[Callable[..., int]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> int:
        port_file = tmp_path / f"port-{len(procs)}"
        procs.append(subprocess.Popen(
            [sys.executable, str(SUPPORT / "host_peers.py"), *args, "--port-file", str(port_file)]))
        deadline = time.monotonic() + 10
        while not port_file.exists():
            if time.monotonic() > deadline or procs[-1].poll() is not None:
                raise RuntimeError(f"host peer {args} did not start")
            time.sleep(0.02)
        return int(port_file.read_text())

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def big_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("data") / "big.bin"
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG >> 20):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return path, digest.hexdigest()


def _udp_echo_server(family: socket.AddressFamily, addr: str) -> Iterator[int]:
    """Echoes each datagram; b"big N" is answered with N bytes instead."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((addr, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)

    def loop() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65536)
            except OSError:
                return
            if data.startswith(b"big "):
                data = b"B" * int(data[4:])
            try:
                sock.sendto(data, peer)
            except OSError:  # closed by the fixture's teardown between the two calls
                return

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    sock.close()
    thread.join(timeout=2)


@pytest.fixture
def udp_echo() -> Iterator[int]:
    """A UDP echo server on 127.0.0.1 (a thread of this process); yields its port."""
    yield from _udp_echo_server(socket.AF_INET, "127.0.0.1")


@pytest.fixture
def udp6_echo() -> Iterator[int]:
    """The same on ::1."""
    yield from _udp_echo_server(socket.AF_INET6, "::1")


@pytest.fixture
def data_file(tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Path, str]:
    """Random bytes, the size of the test module's SIZE, in a file; (path, sha256)."""
    data = os.urandom(request.module.SIZE)
    path = tmp_path / "data"
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()
