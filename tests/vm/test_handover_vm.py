"""A qemu guest on `relaynat serve --socket` (qemu `-netdev stream`) keeps a UDP
conversation and a ping across three handovers to new relay processes (`relaynat ctl
handover`, moving/handover.py), in one boot.

The guest (tests/support/vmguest.py, busybox) pings the gateway every 10 ms and, at once,
downloads a file with busybox tftp from a test server on the host's 127.0.0.1 that
answers each acknowledgement 10 ms after the last block (a request and an answer every
10 ms on one UDP flow), and streams until the handovers are done. After each handover
`ctl list` on the new relay shows the flow and the session at the same host ports, their
counts going on; at the end the file is whole (sha256 of what the server sent), the
server heard the flow from one host port throughout (its socket moved), and the ping
lost nothing but, at most, the request in flight when it was stopped. The handover
windows are printed: each relay's pause, and the server's longest wait for the guest's
next acknowledgement across each handover.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.relaynat_cli import parse_stats
from support.sysctl import ALL_GROUPS, ping_group_range
from support.vmguest import boot_vm, build_vm_images, vm_unavailable_reason

from relaynat.control.client import call

pytestmark = [pytest.mark.vm, pytest.mark.integration]

HANDOVERS = 3
BOOT_TIMEOUT = 150.0
PACE_S = 0.01
_RRQ, _DATA, _ACK, _ERROR, _OACK = 1, 3, 4, 5, 6


class PacedTftp:
    """One TFTP read (RFC 1350; RFC 2347 options acknowledged) of an endless file from
    127.0.0.1: block n+1 goes out when the guest acknowledges block n, and no sooner than
    PACE_S after block n. After `finish`, the next block is a short one, the end of the
    file. Records when each new acknowledgement came and from where."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(1.0)
        self.port: int = self.sock.getsockname()[1]
        self.acks: list[float] = []
        self.senders: set[tuple[str, int]] = set()
        self.duplicate_acks = self.resends = 0
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.done = threading.Event()
        self._finish = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def finish(self) -> None:
        self._finish.set()

    def close(self) -> None:
        self._finish.set()
        self.sock.close()
        self._thread.join(5)

    @staticmethod
    def _block(n: int) -> bytes:
        return struct.pack("!I", n) * 128

    def _serve(self) -> None:
        peer: tuple[str, int] | None = None
        last: bytes | None = None
        sent_at = 0.0
        block = 0
        end: int | None = None
        while not self.done.is_set():
            try:
                pkt, addr = self.sock.recvfrom(2048)
            except TimeoutError:
                if last is not None and peer is not None:  # the guest's answer is late
                    self.sock.sendto(last, peer)
                    self.resends += 1
                continue
            except OSError:
                return
            op = struct.unpack_from("!H", pkt)[0] if len(pkt) >= 2 else 0
            if op == _RRQ and peer is None:
                peer = addr
                self.senders.add(addr)
                parts = pkt[2:].split(b"\0")
                options = {parts[i].lower(): parts[i + 1] for i in range(2, len(parts) - 2, 2)}
                answered = b"".join(k + b"\0" + options[k] + b"\0"
                                    for k in (b"blksize",) if k in options)
                if answered and options.get(b"blksize") != b"512":
                    self.sock.sendto(struct.pack("!HH", _ERROR, 8) + b"blksize 512 only\0", addr)
                    return
                block = 0
                if answered:  # the guest acknowledges the OACK as block 0
                    last = struct.pack("!H", _OACK) + answered
                    self.sock.sendto(last, addr)
                    sent_at = time.monotonic()
                    continue
            elif op == _ACK and addr == peer:
                self.senders.add(addr)
                acked = struct.unpack_from("!H", pkt, 2)[0]
                if acked != block & 0xFFFF:
                    self.duplicate_acks += 1
                    continue
                self.acks.append(time.monotonic())
                if end is not None and block == end:
                    self.done.set()
                    return
            else:
                continue
            block += 1
            data = self._block(block)
            if self._finish.is_set():
                data, end = data[:100], block
            self.sha256.update(data)
            self.size += len(data)
            last = struct.pack("!HH", _DATA, block & 0xFFFF) + data
            time.sleep(max(0.0, sent_at + PACE_S - time.monotonic()))
            assert peer is not None
            self.sock.sendto(last, peer)
            sent_at = time.monotonic()

    def longest_wait(self, start: float, end: float) -> float:
        """The server's longest wait, in ms, for the guest's next acknowledgement while
        `start`..`end` (a handover) went by."""
        return max(((b - a) * 1000 for a, b in itertools.pairwise(self.acks)
                    if b >= start and a <= end), default=0.0)


@pytest.fixture(scope="module")
def vm_images() -> Any:
    reason = vm_unavailable_reason()
    if reason:
        pytest.fail(f"qemu guest unavailable: {reason}")
    return build_vm_images(fetch=False)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _relaynat(tmp_path: Path, name: str, *args: str) -> subprocess.Popen[bytes]:
    with open(tmp_path / f"{name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--stats",
                                 "--log-level", "info", *args], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"relay exited {proc.returncode} before {path} existed"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _conversation(control: Path, port: int) -> tuple[dict[str, Any] | None,
                                                      dict[str, Any] | None]:
    flows = call(str(control), {"execute": "flows"})["return"]["flows"]
    udp = [f for f in flows if f["protocol"] == "udp" and f["far"] == ["10.0.2.2", port]]
    icmp = [f for f in flows if f["protocol"] == "icmp" and f["far"][0] == "10.0.2.2"]
    return (udp[0] if udp else None), (icmp[0] if icmp else None)


def guest_script(port: int) -> str:
    return f"""\
ping -q -i 0.01 10.0.2.2 > /tmp/ping.txt 2>&1 &
pinger=$!
tftp -g -r stream.bin -l /tmp/stream.bin 10.0.2.2 {port}
echo "RN-TFTP $?"
kill -INT $pinger; wait $pinger
cat /tmp/ping.txt
sha256sum /tmp/stream.bin
"""


def test_a_qemu_guest_talks_and_pings_across_three_handovers(
        vm_images: Any, tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    with ping_group_range(ALL_GROUPS), contextlib.ExitStack() as stack:
        tftp = PacedTftp()
        stack.callback(tftp.close)
        receivers = []
        for i in range(HANDOVERS):
            path = tmp_path / f"b{i}.handover"
            proc = _relaynat(tmp_path, f"b{i}", "--receive-handover", str(path))
            procs.append(proc)
            receivers.append((proc, path))
        for proc, path in receivers:
            _wait_for(path, proc)
        sock, control = tmp_path / "q.sock", tmp_path / "control.sock"
        relay_a = _relaynat(tmp_path, "a", "--dns-upstream", "127.0.0.1", "--control-socket",
                            str(control), "--socket", str(sock))
        procs.append(relay_a)
        _wait_for(sock, relay_a)
        _wait_for(control, relay_a)
        booted: dict[str, Any] = {}
        vm = threading.Thread(target=lambda: booted.update(result=boot_vm(
            str(sock), guest_script(tftp.port), timeout=BOOT_TIMEOUT, images=vm_images)))
        vm.start()
        stack.callback(vm.join, BOOT_TIMEOUT + 10)
        deadline = time.monotonic() + BOOT_TIMEOUT
        while len(tftp.acks) < 20 or None in _conversation(control, tftp.port):
            assert vm.is_alive(), booted
            assert time.monotonic() < deadline, "the guest's conversation did not start"
            time.sleep(0.1)
        pauses: list[float] = []
        handovers: list[tuple[float, float]] = []
        old = relay_a
        for i, (proc, path) in enumerate(receivers):
            udp, icmp = _conversation(control, tftp.port)
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                                   "--json", "handover", "--to", str(path)],
                                  capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            handovers.append((started, time.monotonic()))
            answer = json.loads(done.stdout)["return"]
            assert answer["not_moved"] == [], answer
            assert (answer["moved_udp"], answer["moved_icmp"]) == (1, 1), answer
            assert old.wait(timeout=20) == 0  # a relay that handed over ends
            pauses.append(call(str(control), {"execute": "stats"})["return"][
                "handover_pause_us"] / 1000)
            udp_now, icmp_now = _conversation(control, tftp.port)
            assert udp is not None and icmp is not None
            assert udp_now is not None and icmp_now is not None, f"not listed after {i + 1}"
            for was, now in ((udp, udp_now), (icmp, icmp_now)):
                assert (now["guest"], now["far"], now["host_peer"]) == (
                    was["guest"], was["far"], was["host_peer"]), (was, now)
                assert now["bytes_from_guest"] >= was["bytes_from_guest"] > 0
                assert now["bytes_to_guest"] >= was["bytes_to_guest"] > 0
            old = proc
            time.sleep(1.0)
        acks_before_end = len(tftp.acks)
        tftp.finish()
        vm.join(BOOT_TIMEOUT)
        assert not vm.is_alive(), "the guest did not finish"
        old.terminate()  # the last relay serves the socket on, for the next guest
        assert old.wait(timeout=20) == 0
        stats = parse_stats((tmp_path / f"b{HANDOVERS - 1}.log").read_text())
    result = booted["result"]
    gaps = [round(tftp.longest_wait(*during), 1) for during in handovers]
    print(f"{HANDOVERS} handovers under a qemu guest's tftp (a block every 10 ms) and ping "
          f"-i 0.01: the relays counted pauses of {[round(p, 1) for p in pauses]} ms; the "
          f"server waited at most {gaps} ms for the guest's next acknowledgement "
          f"during each; "
          f"{acks_before_end} blocks by then, {tftp.duplicate_acks} duplicate "
          f"acknowledgements, {tftp.resends} resends")
    print(result.console[-3000:])
    assert not result.timed_out and result.exit_status == 0, result.console
    assert "RN-TFTP 0" in result.output, result.output
    assert f"{tftp.sha256.hexdigest()}  /tmp/stream.bin" in result.output, result.output
    assert tftp.done.is_set() and acks_before_end > 100
    assert len(tftp.senders) == 1, f"the server heard {tftp.senders}: a socket opened anew"
    ping = re.search(r"(\d+) packets transmitted, (\d+) packets received", result.output)
    assert ping is not None, result.output
    sent, answered = int(ping.group(1)), int(ping.group(2))
    assert sent > 100 and sent - answered <= 1, result.output  # one in flight at SIGINT
    assert stats.get("handovers_received") == HANDOVERS, stats  # counters go on
    assert stats.get("udp_flows_opened") == 1 and stats.get("icmp_sockets_opened") == 1, stats
    assert max(gaps) < 2000, gaps
