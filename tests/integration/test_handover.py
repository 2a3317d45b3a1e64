"""A running relay hands its guest over to a new relaynat process (moving/handover.py).

Everything is real: the relays are `relaynat` processes (or, where a test needs to
reach inside the old relay, a `Relay` in this process), the guest is a network
namespace behind a TAP or the test's end of a qemu-stream socket, the peers are host
sockets on this namespace's loopback, and the handovers pass real descriptors.

- A namespace guest downloads and uploads 512 MiB through `relaynat run`, which is
  handed over ten times in a row (each new relay a fresh `relaynat serve
  --receive-handover`) while both transfers run: both end with equal sha256 at both
  ends, neither end saw a reset, and neither namespace's kernel sent one.
- A relay built from an older tree (the flat module layout before the subpackages)
  hands its guest and both transfers over to this tree's relay: an upgrade in place.
- A qemu-stream guest keeps its connection across a handover, including a frame the
  old relay had read only in part.
- Refusals: a new relay with other addressing refuses at the offer, one that cannot
  hold the flows refuses the document (the old relay takes everything back and serves
  on), and a corrupt document is refused with nothing of it kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import GUESTS
from support.netshim import LossyGuest
from support.relaynat_cli import guest_python, parse_stats

from integration.test_interface import VethGuest
from relaynat.config import RelayConfig
from relaynat.control.client import call
from relaynat.control.server import ControlServer
from relaynat.moving.handover import HandoverError, Source, addressing_of
from relaynat.testing import InMemoryGuest
from relaynat.testing.guest import GuestTcp
from relaynat.transports.stream import StreamTransport

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

SIZE = 512 << 20
HANDOVERS = 10
#: Both transfers run paced at this rate until TAIL bytes are left, then wait for the
#: test's word (after the last handover) and finish at full speed: every handover
#: happens while both carry data, however slow the machine.
RATE = 96 << 20
TAIL = 32 << 20
BLOCK = 1 << 20


def _tcp_counters() -> dict[str, int]:
    """This network namespace's TCP counters (relays' host sockets and peers live here)."""
    lines = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines()
             if line.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def _relaynat(*args: str, log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "relaynat", *args], stdout=out,
                                stderr=out, env=env)


def _wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"relay exited {proc.returncode} before {path} existed"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def _receiver(tmp_path: Path, name: str, *options: str) -> tuple[subprocess.Popen[bytes], Path]:
    """A `relaynat serve --receive-handover` process, waiting."""
    path = tmp_path / f"{name}.handover"
    proc = _relaynat("serve", "--receive-handover", str(path), "--stats", "--log-level",
                     "info", *options, log=tmp_path / f"{name}.log")
    _wait_for(path, proc)
    return proc, path


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    _stop(started)


class Transfers:
    """The peer on this namespace's loopback (transfer_peer.py) and the guest program
    (transfer_guest.py), `size` bytes each
    way, paced at `rate` until `TAIL` bytes are left, then held until `go`. `where`:
    a directory the guest may write its result in."""

    def __init__(self, where: Path, size: int, rate: int) -> None:
        self.size, self.go = size, where / "go"
        self.result_file = where / "guest.json"
        self.peer = subprocess.Popen([sys.executable, str(GUESTS / "transfer_peer.py"),
                                      str(size), str(rate), str(min(TAIL, size // 4)),
                                      str(self.go)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.peer.stdout is not None
        self.down_port, self.up_port = json.loads(self.peer.stdout.readline())
        self.before = _tcp_counters()
        self.last_handover = 0.0

    def guest_argv(self, python: str = sys.executable) -> list[str]:
        """The guest program run by `python` (for `relaynat run`, one the command's
        user may execute: relaynat_cli.guest_python)."""
        return [python, str(GUESTS / "transfer_guest.py"), str(self.down_port), str(self.up_port),
                str(self.size), str(self.result_file)]

    def release(self) -> None:
        """The handovers are done: let both transfers end."""
        self.last_handover = time.monotonic()
        self.go.touch()

    def finish(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The guest's result and the peer's reports, once both transfers ended."""
        assert self.peer.stdout is not None
        reports = {r["kind"]: r for r in map(json.loads, self.peer.stdout.read().splitlines())}
        assert self.peer.wait(timeout=60) == 0
        return json.loads(self.result_file.read_text()), reports

    def check(self, guest: dict[str, Any], reports: dict[str, Any]) -> None:
        """Both transfers whole and equal at both ends, across the last handover, and
        no reset from either end or either namespace's kernel."""
        after = _tcp_counters()
        for kind in ("down", "up"):
            assert guest[kind]["error"] is None and reports[kind]["error"] is None, \
                (guest, reports)
            assert guest[kind]["length"] == reports[kind]["length"] == self.size
            assert guest[kind]["sha256"] == reports[kind]["sha256"]
            assert reports[kind]["end"] > self.last_handover  # it ran across the handovers
        assert guest["tcp"]["OutRsts"] == 0 and guest["tcp"]["EstabResets"] == 0, guest["tcp"]
        assert after["OutRsts"] == self.before["OutRsts"], "this namespace's kernel sent a RST"
        assert after["EstabResets"] == self.before["EstabResets"]

    def close(self) -> None:
        self.peer.kill()
        self.peer.wait()


def _wait_for_transfers(control: Path) -> None:
    """Until both of the guest's flows carry data."""
    deadline = time.monotonic() + 30
    while sum(f["state"] == "established" and f["bytes_to_guest"] + f["bytes_from_guest"]
              > 0 for f in call(str(control), {"execute": "flows"})["return"]["flows"]) < 2:
        assert time.monotonic() < deadline, "the transfers did not start"
        time.sleep(0.05)


def _hand_over(control: Path, to: Path, old: subprocess.Popen[bytes],
               log: Path, exits: bool = True) -> float:
    """`relaynat ctl handover`: both flows move, the old relay exits 0 (unless not
    `exits`: a `relaynat run` of this tree, which ends with its command, checked by the
    caller); the guest's wait in ms, as the new relay counted it."""
    done = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "-s", str(control),
                           "--json", "handover", "--to", str(to)],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["return"]
    assert answer["moved_tcp"] == 2 and answer["not_moved"] == [], answer
    if exits:
        assert old.wait(timeout=20) == 0, log.read_text()
    stats = call(str(control), {"execute": "stats"})["return"]
    return float(stats["handover_pause_us"]) / 1000


def test_512_mib_both_ways_survive_ten_handovers(
        tmp_path: Path, guest_dir: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    transfers = Transfers(guest_dir, SIZE, RATE)
    try:
        # The new relays first, so that their start-up does not compete with the run.
        receivers = [_receiver(tmp_path, f"b{i}") for i in range(HANDOVERS)]
        procs.extend(proc for proc, _ in receivers)
        control = tmp_path / "control.sock"
        relay_a = _relaynat("run", "--control-socket", str(control), "--",
                            *transfers.guest_argv(guest_python()), log=tmp_path / "a.log")
        procs.append(relay_a)
        _wait_for(control, relay_a)
        _wait_for_transfers(control)
        pauses, old, log = [], relay_a, tmp_path / "a.log"
        for i, (proc, path) in enumerate(receivers):
            pauses.append(_hand_over(control, path, old, log, exits=old is not relay_a))
            old, log = proc, tmp_path / f"b{i}.log"
            time.sleep(0.2)
        transfers.release()
        assert old.wait(timeout=60) == 0  # the last relay ends with the guest's command
        # relaynat run, the command's parent, exits with its status (0).
        assert relay_a.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()
        guest, reports = transfers.finish()
    finally:
        transfers.close()
    print(f"{HANDOVERS} handovers during {SIZE >> 20} MiB down and up; the guest waited "
          f"{[round(p, 1) for p in pauses]} ms; the guest retransmitted "
          f"{guest['tcp']['RetransSegs']} segments")
    transfers.check(guest, reports)
    assert not control.exists()  # the last relay took the control socket, and removed it


#: The last commit whose package was one flat folder of modules, before they moved into
#: subpackages. Nothing in a handover names a module, so a relay built from it hands
#: over to this tree's as to its own kind: what an upgrade in place relies on.
FLAT_LAYOUT = "7d1b992"
UPGRADE_SIZE = 64 << 20
UPGRADE_RATE = 16 << 20


@pytest.fixture
def flat_layout_src() -> Iterator[Path]:
    """FLAT_LAYOUT's src/, from this repository's history, readable by the namespace
    guest's unprivileged id (its child process runs that tree's code too)."""
    root = Path(__file__).resolve().parents[2]
    archive = subprocess.run(["git", "-C", str(root), "archive", FLAT_LAYOUT, "src"],
                             capture_output=True, check=False)
    assert archive.returncode == 0, (
        f"this test needs the repository's history (git archive {FLAT_LAYOUT}): "
        f"{archive.stderr.decode()}")
    where = Path(tempfile.mkdtemp(prefix="relaynat-flat-"))
    try:
        where.chmod(0o755)
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
        yield where / "src"
    finally:
        shutil.rmtree(where)


def test_a_relay_of_the_flat_layout_hands_over_to_this_one(
        tmp_path: Path, guest_dir: Path, procs: list[subprocess.Popen[bytes]],
        flat_layout_src: Path) -> None:
    old_env = dict(os.environ, PYTHONPATH=str(flat_layout_src))
    # The old relay really runs the old tree: its modules are importable there only.
    flat_only = [sys.executable, "-c", "import relaynat.namespace, relaynat.handover"]
    assert subprocess.run(flat_only, env=old_env, check=False).returncode == 0
    assert subprocess.run(flat_only, capture_output=True, check=False).returncode != 0
    transfers = Transfers(guest_dir, UPGRADE_SIZE, UPGRADE_RATE)
    try:
        new, path = _receiver(tmp_path, "new")
        procs.append(new)
        control = tmp_path / "control.sock"
        old = _relaynat("run", "--control-socket", str(control), "--",
                        *transfers.guest_argv(guest_python()), log=tmp_path / "old.log",
                        env=old_env)
        procs.append(old)
        _wait_for(control, old)
        _wait_for_transfers(control)
        _hand_over(control, path, old, tmp_path / "old.log")
        transfers.release()
        assert new.wait(timeout=60) == 0, (tmp_path / "new.log").read_text()
        guest, reports = transfers.finish()
    finally:
        transfers.close()
    transfers.check(guest, reports)
    stats = parse_stats((tmp_path / "new.log").read_text())
    assert stats["handovers_received"] == 1 and stats["tcp_flows_imported"] == 2, stats


#: The unixgram and --interface tests: small, paced so that the handover comes while
#: both transfers carry data (they wait at their tail for it).
LINK_SIZE = 32 << 20
LINK_RATE = 16 << 20


def _serve_and_hand_over(tmp_path: Path, procs: list[subprocess.Popen[bytes]],
                         serve: list[str], receiver_options: tuple[str, ...],
                         start_guest: Callable[[list[str]], subprocess.Popen[bytes]],
                         ) -> subprocess.Popen[bytes]:
    """`relaynat serve SERVE --control-socket`, a guest running both transfers through
    it, handed over to a new relay mid-transfer; both transfers checked. Returns the
    new relay, serving on."""
    transfers = Transfers(tmp_path, LINK_SIZE, LINK_RATE)
    try:
        receiver, path = _receiver(tmp_path, "b", *receiver_options)
        procs.append(receiver)
        control = tmp_path / "control.sock"
        relay_a = _relaynat("serve", *serve, "--control-socket", str(control),
                            "--log-level", "info", log=tmp_path / "a.log")
        procs.append(relay_a)
        _wait_for(control, relay_a)
        guest = start_guest(transfers.guest_argv())
        procs.append(guest)
        _wait_for_transfers(control)
        _hand_over(control, path, relay_a, tmp_path / "a.log")
        transfers.release()
        # The guest writes its result file after its transfers end, which can be after
        # the peer's: wait for it before reading the file (CI read it half-written).
        assert guest.wait(timeout=60) == 0
        result, reports = transfers.finish()
    finally:
        transfers.close()
    transfers.check(result, reports)
    return receiver


def _stop_for_stats(relay: subprocess.Popen[bytes], log: Path) -> dict[str, int]:
    relay.send_signal(signal.SIGTERM)
    assert relay.wait(timeout=10) == 0
    return parse_stats(log.read_text())


@pytest.mark.parametrize("wire", ["vfkit", "qemu"])
def test_unixgram_guest_keeps_its_transfers(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], wire: str) -> None:
    """A real kernel behind the datagram wire of vfkit (connected to the relay, VFKT
    first) or qemu (sendto; the relay connects its socket back to it), netshim.py
    --unixgram: the bound path, the learned peer and the socket's queue move to the
    new relay."""
    path = tmp_path / "relay.dgram"
    with contextlib.ExitStack() as stack:

        def start_guest(argv: list[str]) -> subprocess.Popen[bytes]:
            guest = stack.enter_context(LossyGuest(tmp_path, str(path), 1, unixgram=wire))
            guest.dhcp()
            return subprocess.Popen(["ip", "netns", "exec", guest.name, *argv])

        # A unixgram guest is served unconfined (docs/confinement.md): a confined
        # receiver refuses it (test_confinement_unixgram.py).
        relay_b = _serve_and_hand_over(tmp_path, procs, ["--unixgram", str(path)],
                                       ("--no-confine",), start_guest)
        assert path.exists()  # A left it to B, which serves it until it ends
        stats = _stop_for_stats(relay_b, tmp_path / "b.log")
    assert stats["unixgram_frames_in"] > 0 and stats["unixgram_frames_out"] > 0, stats
    assert stats["handovers_received"] == 1
    assert not path.exists()  # B removed it at its end


def test_interface_guest_keeps_its_transfers(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """A veth-backed guest namespace served with `serve --interface`: the packet
    socket moves, the new relay never opens the interface itself."""
    veth = VethGuest(tmp_path, 1500)
    try:

        def start_guest(argv: list[str]) -> subprocess.Popen[bytes]:
            veth.dhcp()
            return subprocess.Popen(["ip", "netns", "exec", veth.ns, *argv])

        relay_b = _serve_and_hand_over(tmp_path, procs, ["--interface", veth.near],
                                       ("-m", "1500"), start_guest)
        stats = _stop_for_stats(relay_b, tmp_path / "b.log")
    finally:
        veth.close()
    assert stats["handovers_received"] == 1
    assert stats.get("interface_send_errors", 0) == 0, stats  # --stats omits zeros
    log = (tmp_path / "b.log").read_text()
    assert f"opened interface {veth.near}" not in log  # it took A's socket
    assert f"serving interface {veth.near}" in log


@pytest.fixture
def echo_peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A host peer on 127.0.0.1 that accepts connections (the test drives them)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], accepted
    server.close()
    for conn in accepted:
        conn.close()


def _host_end(accepted: list[socket.socket], n: int) -> socket.socket:
    deadline = time.monotonic() + 5
    while len(accepted) < n:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    conn = accepted[n - 1]
    conn.settimeout(5)
    return conn


async def _round_trip(conn: GuestTcp, host: socket.socket, tag: bytes) -> None:
    """Data both ways on one connection: guest -> host, then host -> guest."""
    await conn.send(b"to host " + tag)
    got = await asyncio.to_thread(host.recv, 100)
    assert got == b"to host " + tag
    await asyncio.to_thread(host.sendall, b"to guest " + tag)
    assert await conn.recv_exactly(len(b"to guest " + tag)) == b"to guest " + tag


def test_stream_guest_keeps_its_connection(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        echo_peer: tuple[int, list[socket.socket]]) -> None:
    port, accepted = echo_peer
    receiver, path = _receiver(tmp_path, "b")
    procs.append(receiver)

    async def main() -> dict[str, object]:
        async with InMemoryGuest() as guest:
            conn = await guest.tcp_connect(port)
            host = _host_end(accepted, 1)
            await _round_trip(conn, host, b"before")
            # Half a frame: the old relay reads it, the new one must finish it.
            segment = conn.frame(0x18, b"split across relays")
            framed = len(segment).to_bytes(4, "big") + segment
            loop = asyncio.get_running_loop()
            link = guest._sock  # the guest's end of the link, for bytes that are no frame
            await loop.sock_sendall(link, framed[:30])
            transport = guest.relay._transport
            assert isinstance(transport, StreamTransport)
            while transport.handover_state()[0] != framed[:30]:
                await asyncio.sleep(0.01)
            forward = guest.relay.add_forward("tcp", "127.0.0.1", 0, 8080)
            result = await Source(guest.relay).hand_over(str(path))
            await loop.sock_sendall(link, framed[30:])
            conn.snd_nxt += len(b"split across relays")
            assert await asyncio.to_thread(host.recv, 100) == b"split across relays"
            guest.relay.close()  # the old relay's end: nothing reaches the peer
            await _round_trip(conn, host, b"after")
            # The forward moved too: its next client reaches the guest from the new relay.
            with socket.create_connection(("127.0.0.1", forward.host_port)):
                await guest.expect(lambda r: r.tcp is not None and r.tcp.dport == 8080
                                   and r.tcp.flags & 0x02 != 0)
            return result

    result = asyncio.run(main())
    assert result["moved_tcp"] == 1 and result["forwards"] == 1
    assert receiver.wait(timeout=10) == 0  # it served until the guest's link closed


#: A SYN's options offering SACK (RFC 2018 §2): MSS 1460, SACK-permitted, window scale 7.
_SYN_WITH_SACK = b"\x02\x04\x05\xb4\x04\x02\x01\x03\x03\x07"


def test_a_moved_flow_keeps_sack(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        echo_peer: tuple[int, list[socket.socket]]) -> None:
    """A flow whose guest offered SACK goes on with SACK at the new relay process (the
    live flows document carries `sack_ok`): data beyond a hole is held there and
    reported in a SACK block, and written in order once the hole fills."""
    port, accepted = echo_peer
    receiver, path = _receiver(tmp_path, "b")
    procs.append(receiver)

    async def main() -> tuple[list[tuple[int, int]] | None, int, int]:
        async with InMemoryGuest() as guest:
            conn = GuestTcp(guest, False, 40100, port, 5000)
            await guest.send(conn.frame(0x02, seq=5000, ack=0, options=_SYN_WITH_SACK))
            synack = await guest.expect(conn.matches)
            assert synack.tcp is not None and synack.tcp.sack_permitted
            conn.rcv_nxt = (synack.tcp.seq + 1) & 0xFFFFFFFF
            await guest.send(conn.frame(0x10))
            host = _host_end(accepted, 1)
            await _round_trip(conn, host, b"before")
            result = await Source(guest.relay).hand_over(str(path))
            guest.relay.close()
            hole = conn.snd_nxt
            await guest.send(conn.frame(0x18, b"b" * 100, seq=(hole + 100) & 0xFFFFFFFF))
            dup = await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                                     and r.tcp.sack is not None)
            assert dup.tcp is not None and dup.tcp.ack == hole
            await guest.send(conn.frame(0x18, b"a" * 100, seq=hole))
            conn.snd_nxt = (hole + 200) & 0xFFFFFFFF
            await guest.expect(lambda r: conn.matches(r) and r.tcp is not None
                               and r.tcp.ack == conn.snd_nxt)
            got = b""
            while len(got) < 200:
                got += await asyncio.to_thread(host.recv, 200 - len(got))
            assert got == b"a" * 100 + b"b" * 100
            return dup.tcp.sack, hole, result["moved_tcp"]

    blocks, hole, moved = asyncio.run(main())
    assert moved == 1
    assert blocks == [((hole + 100) & 0xFFFFFFFF, (hole + 200) & 0xFFFFFFFF)]


def test_other_addressing_is_refused_and_the_relay_serves_on(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        echo_peer: tuple[int, list[socket.socket]]) -> None:
    port, accepted = echo_peer
    receiver, path = _receiver(tmp_path, "b", "-a", "10.0.2.16/24")
    procs.append(receiver)
    control = tmp_path / "control.sock"

    async def main() -> subprocess.CompletedProcess[str]:
        async with InMemoryGuest() as guest:
            conn = await guest.tcp_connect(port)
            host = _host_end(accepted, 1)
            server = ControlServer(str(control))
            await server.start(guest.relay)
            server.on_handover = Source(guest.relay, server).hand_over
            ctl = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relaynat", "ctl", "-s", str(control), "handover",
                "--to", str(path), stderr=asyncio.subprocess.PIPE)
            _, err = await ctl.communicate()
            await _round_trip(conn, host, b"still here")
            server.close()
            return subprocess.CompletedProcess([], ctl.returncode or 0, "", err.decode())

    done = asyncio.run(main())
    assert done.returncode == 1
    assert "address is '10.0.2.15' there, '10.0.2.16' here" in done.stderr, done.stderr
    assert "internal error" not in done.stderr, done.stderr  # a reason, not a crash
    assert receiver.poll() is None  # it waits for another offer


def test_a_refused_document_gives_everything_back(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        echo_peer: tuple[int, list[socket.socket]]) -> None:
    """The new relay cannot hold two flows: it refuses once the old one has stopped;
    the old one takes its flows, transport and forwards back and serves on."""
    port, accepted = echo_peer
    receiver, path = _receiver(tmp_path, "b", "--max-tcp-flows", "1")
    procs.append(receiver)

    async def main() -> None:
        async with InMemoryGuest() as guest:
            first = await guest.tcp_connect(port, sport=40001)
            second = await guest.tcp_connect(port, sport=40002)
            hosts = [_host_end(accepted, 1), _host_end(accepted, 2)]
            await _round_trip(first, hosts[0], b"established")
            await _round_trip(second, hosts[1], b"established")
            forward = guest.relay.add_forward("tcp", "127.0.0.1", 0, 8080)
            with pytest.raises(HandoverError, match="2 TCP flows do not fit max_tcp_flows 1"):
                await Source(guest.relay).hand_over(str(path))
            assert guest.stats()["handovers_failed"] == 1
            await _round_trip(first, hosts[0], b"one")
            await _round_trip(second, hosts[1], b"two")
            # The forward listens again: a client's connection reaches the guest (SYN).
            client = socket.create_connection(("127.0.0.1", forward.host_port))
            syn = await guest.expect(lambda r: r.tcp is not None and r.tcp.dport == 8080)
            assert syn.tcp is not None
            client.close()

    asyncio.run(main())
    assert receiver.poll() is None


def test_a_corrupt_document_is_refused_with_nothing_kept(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]],
        echo_peer: tuple[int, list[socket.socket]]) -> None:
    """A document whose flow has a corrupt field, with a live socket beside it: the
    new relay refuses naming the field, keeps nothing (the socket is untouched, the
    peer sees nothing), and then takes a good handover."""
    port, accepted = echo_peer
    receiver, path = _receiver(tmp_path, "b")
    procs.append(receiver)
    fd_dir = Path(f"/proc/{receiver.pid}/fd")

    def held_by_receiver(fds: list[int]) -> set[str]:
        """Which of `fds` (this process's) the receiver holds a copy of."""
        names = {f"socket:[{os.fstat(fd).st_ino}]" for fd in fds}
        held = set()
        for entry in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                held.add(os.readlink(fd_dir / entry))
        return names & held

    async def main() -> None:
        async with InMemoryGuest() as guest:
            conn = await guest.tcp_connect(port)
            host = _host_end(accepted, 1)
            await _round_trip(conn, host, b"established")
            source = Source(guest.relay)
            held = source._take_out()  # what a real handover sends, and then serve on
            source._give_back(held)
            assert len(held.fds) == 2  # the flow's socket and the guest's link
            for field, value, error in (
                    ("snd_una", "corrupt", "tcp: flows[0]: field snd_una: 'corrupt' is not "
                                           "a 32-bit unsigned number"),
                    ("socket", {"fd": 0, "peer": ["127.0.0.1", 1]},
                     "tcp flows[0]: its socket is connected to")):
                doc = json.loads(json.dumps(held.doc))
                doc["tcp"]["flows"][0][field] = value
                refusal = await asyncio.to_thread(_send_by_hand, path, doc, held.fds)
                assert refusal.startswith(error), refusal
                await _round_trip(conn, host, field.encode())
            deadline = time.monotonic() + 5
            while held_by_receiver(held.fds):  # the refused copies are closed
                assert time.monotonic() < deadline, held_by_receiver(held.fds)
                await asyncio.sleep(0.01)
            await Source(guest.relay).hand_over(str(path))
            guest.relay.close()
            await _round_trip(conn, host, b"taken")

    asyncio.run(main())


def test_a_link_the_new_relay_cannot_serve_is_refused_at_the_offer(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    """An offer naming a guest-link kind this relaynat does not know (a later
    version's) is refused before the old relay stops anything, naming the kind; the
    new relay waits for the next offer. (A relay that predates the "transport" field
    refuses at the document instead: "transport kind 'unixgram' is not tap or
    stream".)"""
    receiver, path = _receiver(tmp_path, "b")
    procs.append(receiver)
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        addressing = addressing_of(RelayConfig())  # the receiver runs with the defaults
        sock.sendall(json.dumps({"offer": {"format": "relaynat-handover", "version": 1,
                                           "relaynat": "test", "addressing": addressing,
                                           "transport": "vsock"}}).encode())
        answer = json.loads(sock.recv(1 << 16))
    assert "'vsock' guest link cannot be taken over" in answer.get("error", ""), answer
    assert receiver.poll() is None


def _send_by_hand(path: Path, doc: dict[str, object], fds: list[int]) -> str:
    """The handover protocol (moving/handover.py) spoken by the test; the receiver's error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"offer": {"format": "relaynat-handover", "version": 1,
                                           "relaynat": "test",
                                           "addressing": doc["addressing"]}}).encode())
        assert "ready" in json.loads(sock.recv(1 << 16))
        data = json.dumps(doc).encode()
        sock.sendall(json.dumps({"document": len(data), "fds": len(fds)}).encode())
        socket.send_fds(sock, [b"fds"], fds)
        for i in range(0, len(data), 32 << 10):
            sock.sendall(data[i:i + (32 << 10)])
        answer = json.loads(sock.recv(1 << 16))
        return str(answer["error"])
