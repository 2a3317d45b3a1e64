"""qemu `-netdev stream` guest (the TCG VM of tests/support/vmguest.py) through relaynat
(`relaynat serve --socket`) and through passt (Debian's 2023-03 passt in its qemu mode,
`passt --socket PATH`, the same 4-byte-length stream framing): guest->host and
host->guest TCP throughput on the same VM image.

The guest is busybox only, so the load is `dd | nc` toward a host sink and `nc > /dev/null`
from a host source. Both host peers are threads of this process listening on the private
namespace's loopback; the guest dials the gateway 10.0.2.2, which both relays map to the
host's loopback. Timing is taken on the host: the sink from its first byte to the last
expected byte; the source from accept to the guest closing after reading everything.
Under TCG with one vCPU the guest's own stack is the bottleneck, so these figures
compare the relays' efficiency under a slow guest, not their ceilings.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from common import REPO_SRC, SETUP_TIMEOUT, BenchError, require, spawned, stub_uplink
from setups import RELAY_GATEWAY, RELAY_GUEST
from workloads import Figure, Figures, failed_figure

sys.path.insert(0, str(REPO_SRC.parent / "tests"))
from support import vmguest  # the VM builder of the tests

SINK_PORT, SOURCE_PORT = 5501, 5502
CHUNK = 1 << 16


class _Peer(threading.Thread):
    """One-connection sink (guest->host) or source (host->guest) timing the transfer."""

    def __init__(self, port: int, nbytes: int, send: bool, timeout: float) -> None:
        super().__init__(daemon=True)
        self.nbytes, self.send, self.timeout = nbytes, send, timeout
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(1)
        self.srv.settimeout(timeout)
        self.timeout = timeout
        self.gbps: float | None = None
        self.done = 0  # bytes moved so far (for the error message)
        self.error = "no connection"

    def run(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError as exc:
            self.error = f"no connection: {exc}"
            return
        with conn:
            conn.settimeout(self.timeout)
            try:
                self._transfer(conn)
            except OSError as exc:
                self.error = (f"{type(exc).__name__} after {self.done} of {self.nbytes} bytes"
                              f"{' sent' if self.send else ' received'}")

    def _transfer(self, conn: socket.socket) -> None:
        if self.send:
            block = b"\0" * CHUNK
            t0 = time.monotonic()
            while self.done < self.nbytes:
                self.done += conn.send(block[:min(CHUNK, self.nbytes - self.done)])
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(CHUNK):  # the guest's nc closes once it read everything
                pass
        else:
            buf = bytearray(CHUNK)
            t0 = 0.0
            while self.done < self.nbytes:
                n = conn.recv_into(buf)
                if not n:
                    self.error = f"EOF after {self.done} of {self.nbytes} bytes"
                    return
                if not self.done:
                    t0 = time.monotonic()
                self.done += n
        self.gbps = self.nbytes * 8 / (time.monotonic() - t0) / 1e9

    def close(self) -> None:
        self.srv.close()


@contextlib.contextmanager
def _relaynat(sock: Path) -> Iterator[list[str]]:
    argv = [sys.executable, "-m", "relaynat", "serve", "--socket", str(sock)]
    with spawned(argv):
        _wait_socket(sock)
        yield argv


@contextlib.contextmanager
def _passt(sock: Path) -> Iterator[list[str]]:
    require("passt")
    # Same addressing as relaynat's, so the guest command is the same. The gateway maps
    # to the host's loopback by default; --runas 0:0 and the stub uplink as for pasta
    # (see setups.py).
    argv = ["passt", *(f"--foreground --quiet --runas 0:0 --ipv4-only --socket {sock}"
                       f" -a {RELAY_GUEST} -n 24 -g {RELAY_GATEWAY} -t none -u none").split()]
    with stub_uplink(), spawned(argv):
        _wait_socket(sock)
        yield argv


def _wait_socket(path: Path) -> None:
    deadline = time.monotonic() + SETUP_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{path.name} did not appear")
        time.sleep(0.05)


RELAYS = {"relaynat": _relaynat, "passt": _passt}


def vm_unavailable() -> str | None:
    return vmguest.vm_unavailable_reason()


def run_vm(relay: str, mib: int, timeout: float, verbose: bool) -> Figures:
    """Boot the VM on `relay` once, transfer `mib` MiB each way; figures in Gbit/s."""
    nbytes = mib << 20
    command = (f"dd if=/dev/zero bs=65536 count={nbytes // CHUNK} 2>/dev/null"
               f" | nc {RELAY_GATEWAY} {SINK_PORT}; echo g2h=$?;"
               f" nc {RELAY_GATEWAY} {SOURCE_PORT} > /dev/null; echo h2g=$?")
    sink = _Peer(SINK_PORT, nbytes, send=False, timeout=timeout)
    source = _Peer(SOURCE_PORT, nbytes, send=True, timeout=timeout)
    try:
        sink.start()
        source.start()
        with tempfile.TemporaryDirectory(prefix="rn-bench-vm-") as tmp:
            sock = Path(tmp) / "relay.sock"
            with RELAYS[relay](sock):
                result = vmguest.boot_vm(sock, command, timeout=timeout)
        if verbose:
            print(result.output, file=sys.stderr)
        if result.dhcp_ok is not True:
            raise BenchError(f"VM without network: {result.console[-200:]!r}")
        sink.join(5)
        source.join(5)
        if result.timed_out:  # a direction that finished still counts; the other says why
            for peer in (sink, source):
                peer.error = (f"VM timed out after {timeout:.0f}s with {peer.done} of"
                              f" {nbytes} bytes moved")
    finally:
        sink.close()
        source.close()
    out: Figures = {}
    for key, peer in (("vm_g2h_gbps", sink), ("vm_h2g_gbps", source)):
        out[key] = Figure(peer.gbps) if peer.gbps is not None else failed_figure(peer.error)
    return out

