"""A real Linux guest under qemu (TCG) on `relaynat serve`'s sockets: the qemu-stream
socket (`--socket`, qemu `-netdev stream`) and the unix datagram socket (`--unixgram`,
qemu `-netdev dgram`, the wire format vfkit and libkrun also speak).

The guest (tests/vmguest.py) gets its address by DHCP from the relay and downloads a
random file from an HTTP server on the host's 127.0.0.1 via the gateway 10.0.2.2, which
the relay maps to host loopback. All of it runs in the test session's private network
namespace (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import http.server
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from relaynat_cli import parse_stats
from vmguest import boot_vm, build_vm_images, vm_unavailable_reason

pytestmark = [pytest.mark.vm, pytest.mark.integration]

FILE_SIZE = 8 * 1024 * 1024
BOOT_TIMEOUT = 50.0


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def http_file(tmp_path: Path) -> Iterator[tuple[int, str, str]]:
    """(port, name, sha256) of a random 8 MiB file served on 127.0.0.1."""
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(FILE_SIZE)
    (root / "blob.bin").write_bytes(data)
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], "blob.bin", hashlib.sha256(data).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# variant -> (qemu -netdev kind, relaynat serve options before the socket path)
VARIANTS = {
    "stream": ("stream", ["--socket"]),
    "dgram": ("dgram", ["--unixgram"]),
    # 1500-byte frames: ~6000 datagrams toward qemu, whose socket queues only 10.
    "dgram-mtu1500": ("dgram", ["--mtu", "1500", "--unixgram"]),
}


@dataclasses.dataclass
class RelayServe:
    netdev: str
    path: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> dict[str, int]:
        """SIGTERM the relay; its --stats counters."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return parse_stats(self.log.read_text(errors="replace"))


@pytest.fixture(params=list(VARIANTS))
def relay_socket(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayServe]:
    """`relaynat serve --socket|--unixgram <tmp>/q.sock` running."""
    netdev, options = VARIANTS[request.param]
    sock = tmp_path / "q.sock"
    log = tmp_path / "relay.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "relaynat", "serve", "--stats", "--log-level", "info",
             *options, str(sock)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if proc.poll() is not None:
                pytest.fail(f"relaynat serve exited with {proc.returncode}:\n{log.read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"relaynat serve did not create {sock}:\n{log.read_text()}")
            time.sleep(0.05)
        yield RelayServe(netdev, str(sock), proc, log)
    finally:
        RelayServe(netdev, str(sock), proc, log).stop()
        print(f"--- relay log ---\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="module")
def vm_images():
    reason = vm_unavailable_reason()
    if reason:
        # install.sh builds the images; a missing one is a broken install, not a skip.
        pytest.fail(f"qemu guest unavailable: {reason}")
    return build_vm_images(fetch=False)


def test_guest_dhcp_and_download_through_relay(vm_images, http_file, relay_socket) -> None:
    relay = relay_socket
    port, name, digest = http_file
    command = (
        "ip -4 addr show dev eth0\n"
        f"wget -q -O /tmp/{name} http://10.0.2.2:{port}/{name} || exit 10\n"
        f"sha256sum /tmp/{name}\n"
    )
    result = boot_vm(relay.path, command, timeout=BOOT_TIMEOUT, images=vm_images,
                     netdev=relay.netdev)
    print(f"--- guest console ({result.duration:.1f}s, times {result.times}) ---")
    print(result.console)

    assert not result.timed_out, f"guest timed out after {BOOT_TIMEOUT}s:\n{result.console}"
    assert result.dhcp_ok, f"no DHCP lease:\n{result.console}"
    assert result.lease.get("ip") == "10.0.2.15", result.lease
    assert result.lease.get("router") == "10.0.2.2", result.lease
    addrs = re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/(\d+)", result.output)
    assert addrs == [("10.0.2.15", "24")], result.output
    assert result.exit_status == 0, result.console
    assert f"{digest}  /tmp/{name}" in result.output, result.output
    stats = relay.stop()
    if relay.netdev == "dgram":
        assert stats.get("unixgram_peers") == 1, stats
        assert stats.get("unixgram_drop_send_full", 0) == 0, stats
