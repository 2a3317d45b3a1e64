"""The relay over a faulty wire: a real guest kernel, a lossy shim, the real relay.

    guest netns (tap0, udhcpc, curl)  <->  tests/netshim.py  <->  relaynat serve --socket
                                                                     |
                                                     host_peers.py http on 127.0.0.1

The shim drops, duplicates and reorders frames in userspace (the kernel has no netem),
seeded: every test prints its seed, and RELAYNAT_LOSSY_SEED=N replays one. What is
checked is end-to-end integrity (sha256 of what the far side received) and that no
transfer stalls: each must finish within its budget, and one that moves no byte for
STALL_S seconds fails at once with the guest's TCP state (`ss -ti`: rto, backoff,
retransmissions) in the message. Throughput is printed (`pytest -s`), not asserted.

A control test runs the same kind of faulty wire between two real kernels (no relay),
to show that the impairments are ones standard TCP gets through quickly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from netshim import GATEWAY_IP, GUEST_IP, Impairment, ImpairSpec, LossyGuest
from relaynat_cli import parse_stats

HERE = Path(__file__).resolve().parent
MIB = 1 << 20
CURL = ["curl", "-sS", "--fail", "--noproxy", "*"]
#: A transfer that moves no byte for this long has stalled (checked once a second).
STALL_S = 30.0


def _seed() -> int:
    env = os.environ.get("RELAYNAT_LOSSY_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def _wait_for(pred: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s} s")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 10) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout_s)


@dataclass(frozen=True)
class Payload:
    name: str
    path: Path
    size: int
    sha256: str


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Payload]:
    """Random payloads: down-N / up-N of N MiB (different contents each way)."""
    root = tmp_path_factory.mktemp("lossy-files")
    out: dict[str, Payload] = {}
    for direction in ("down", "up"):
        for mib in (16, 64):
            name = f"{direction}-{mib}"
            digest = hashlib.sha256()
            path = root / name
            with open(path, "wb") as f:
                for _ in range(mib):
                    chunk = os.urandom(MIB)
                    digest.update(chunk)
                    f.write(chunk)
            out[name] = Payload(name, path, mib * MIB, digest.hexdigest())
    return out


@pytest.fixture(scope="module")
def http_port(files: dict[str, Payload],
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """tests/host_peers.py http on 127.0.0.1, serving the payload files."""
    work = tmp_path_factory.mktemp("lossy-http")
    port_file = work / "port"
    root = next(iter(files.values())).path.parent
    with open(work / "http.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(HERE / "host_peers.py"), "http",
                                 "--root", str(root), "--port-file", str(port_file)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for(lambda: port_file.exists() or proc.poll() is not None, 10, "http peer")
        assert proc.poll() is None, (work / "http.log").read_text()
        yield int(port_file.read_text())
    finally:
        _stop(proc)


@dataclass
class RelayProc:
    socket: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stats(self) -> dict[str, int]:
        """Counters printed by --stats on exit (after `_stop`)."""
        try:
            return parse_stats(self.log.read_text(errors="replace"))
        except OSError:
            return {}


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProc]:
    """`relaynat serve --socket` as its own process (the real CLI)."""
    sock = str(tmp_path / "relay.sock")
    log = tmp_path / "relay.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--socket", sock,
                                 "--stats", "--log-level", "info"],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    r = RelayProc(sock, proc, log)
    try:
        _wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 10, "relay socket")
        assert proc.poll() is None, log.read_text()
        yield r
    finally:
        _stop(proc)


class TransferFailed(AssertionError):
    pass


def _watched(g: LossyGuest, argv: Sequence[str], peer: str, deadline: float) -> str:
    """Run `argv` in the guest until it exits; returns its stdout.

    Once a second the guest's TCP sockets toward `peer` are read with `ss -ti`: if
    their byte counters do not move for STALL_S seconds, or `deadline` passes, the
    command is killed and TransferFailed carries the last `ss` snapshot.
    """
    proc = subprocess.Popen(["ip", "netns", "exec", g.name, *argv], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    progress, since, snapshot = -1, time.monotonic(), ""
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            snapshot = g.run(["ss", "-tinH", "dst", peer], timeout=10, check=False).stdout
            moved = sum(map(int, re.findall(r"bytes_(?:acked|received):(\d+)", snapshot)))
            if moved != progress:
                progress, since = moved, now
            elif now - since > STALL_S:
                raise TransferFailed(f"stalled: no byte moved for {now - since:.0f} s\n"
                                     f"guest ss -ti: {snapshot.strip()}")
            if now > deadline:
                raise TransferFailed(f"over the time budget\nguest ss -ti: {snapshot.strip()}")
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
    if proc.returncode != 0:
        raise TransferFailed(f"{shlex.join(argv)} exited {proc.returncode}: {err.strip()}\n"
                             f"guest ss -ti (last): {snapshot.strip()}")
    return out


def _download(g: LossyGuest, port: int, p: Payload, deadline: float) -> tuple[str, float]:
    url = f"http://{GATEWAY_IP}:{port}/{p.name}"
    t0 = time.monotonic()
    out = _watched(g, ["bash", "-o", "pipefail", "-c",
                       f"{shlex.join(CURL)} {shlex.quote(url)} | sha256sum"],
                   GATEWAY_IP, deadline)
    return out.split()[0], time.monotonic() - t0


def _upload(g: LossyGuest, port: int, p: Payload, deadline: float) -> tuple[str, float]:
    url = f"http://{GATEWAY_IP}:{port}/upload-{p.name}"
    t0 = time.monotonic()
    out = _watched(g, [*CURL, "-T", str(p.path), url], GATEWAY_IP, deadline)
    return out.split()[0], time.monotonic() - t0


def _report(label: str, p: Payload, seconds: float) -> None:
    print(f"{label}: {p.size // MIB} MiB in {seconds:.2f} s = "
          f"{p.size / seconds / MIB:.1f} MiB/s")


def _context(g: LossyGuest, relay: RelayProc) -> str:
    return (f"seed={g.seed} (replay: RELAYNAT_LOSSY_SEED={g.seed})\n"
            f"shim: {json.dumps(g.shim_stats)}\n"
            f"relay log: {relay.log.read_text(errors='replace')[-3000:]}")


def _transfer_both_ways(relay: RelayProc, http_port: int, tmp_path: Path, down: Payload,
                        up: Payload, spec: str, dhcp: bool, budget_s: float) -> LossyGuest:
    """Guest downloads `down` then uploads `up` over a wire impaired by `spec` both ways;
    both must arrive intact within `budget_s` in total."""
    seed = _seed()
    print(f"\nlossy link seed={seed} spec=[{spec}] both directions")
    g = LossyGuest(tmp_path, relay.socket, seed, to_relay=spec, to_guest=spec)
    try:
        with g:
            if dhcp:
                lease = g.dhcp()
                assert lease.get("ip") == GUEST_IP, lease
                assert lease.get("router") == GATEWAY_IP, lease
                assert lease.get("mtu") == "65520", lease
                link = g.run(["ip", "-o", "link", "show", "tap0"], timeout=10).stdout
                assert " mtu 65520 " in link, link
                addr = g.run(["ip", "-o", "-4", "addr", "show", "tap0"], timeout=10).stdout
                assert f"inet {GUEST_IP}/24" in addr, addr
                route = g.run(["ip", "route", "show", "default"], timeout=10).stdout
                assert f"via {GATEWAY_IP}" in route, route
            else:
                g.static()
            deadline = time.monotonic() + budget_s
            got, secs = _download(g, http_port, down, deadline)
            _report("download", down, secs)
            assert got == down.sha256, f"download corrupted: {got} != {down.sha256}"
            got, secs = _upload(g, http_port, up, deadline)
            _report("upload", up, secs)
            assert got == up.sha256, f"upload corrupted: {got} != {up.sha256}"
    except BaseException as exc:
        _stop(relay.proc)
        raise AssertionError(f"{exc}\n{_context(g, relay)}") from exc
    _stop(relay.proc)
    print(f"shim counters: {json.dumps(g.shim_stats)}")
    stats = relay.stats()
    print("relay counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return g


def _direction_stats(g: LossyGuest, direction: str) -> dict[str, int]:
    st = g.shim_stats[direction]
    assert isinstance(st, dict), g.shim_stats
    return st


def _assert_impaired(g: LossyGuest, kinds: tuple[str, ...]) -> None:
    """The wire really misbehaved, in both directions, as configured."""
    for direction in ("to_relay", "to_guest"):
        st = _direction_stats(g, direction)
        for kind in kinds:
            assert st[kind] > 0, f"seed={g.seed}: no {kind} frames {direction}: {st}"


@pytest.mark.integration
def test_clean_wire_dhcp_and_64mib_both_ways(relay: RelayProc, http_port: int,
                                             files: dict[str, Payload], tmp_path: Path) -> None:
    g = _transfer_both_ways(relay, http_port, tmp_path, files["down-64"], files["up-64"],
                            "", dhcp=True, budget_s=60)
    for direction in ("to_relay", "to_guest"):
        st = _direction_stats(g, direction)
        assert st["dropped"] == st["duplicated"] == st["reordered"] == 0, st
        # MTU 65520 in effect both ways: near-64 KiB frames from the guest and the relay.
        assert st["max_frame"] > 60000, st


@pytest.mark.integration
def test_loss_reorder_duplication_64mib_both_ways(relay: RelayProc, http_port: int,
                                                  files: dict[str, Payload],
                                                  tmp_path: Path) -> None:
    g = _transfer_both_ways(relay, http_port, tmp_path, files["down-64"], files["up-64"],
                            "loss=0.01,dup=0.01,reorder=0.02,hold=3,hold_ms=5",
                            dhcp=True, budget_s=120)
    _assert_impaired(g, ("dropped", "duplicated", "reordered"))


@pytest.mark.integration
def test_five_percent_loss_16mib_both_ways(relay: RelayProc, http_port: int,
                                           files: dict[str, Payload], tmp_path: Path) -> None:
    g = _transfer_both_ways(relay, http_port, tmp_path, files["down-16"], files["up-16"],
                            "loss=0.05", dhcp=False, budget_s=120)
    _assert_impaired(g, ("dropped",))


_SINK = """\
import hashlib, socket
srv = socket.create_server((%r, 5001))
conn, _ = srv.accept()
digest, total = hashlib.sha256(), 0
while data := conn.recv(1 << 20):
    digest.update(data)
    total += len(data)
conn.sendall(f"{digest.hexdigest()} {total}\\n".encode())
conn.close()
"""

_SEND = """\
import socket, sys
s = socket.create_connection((%r, 5001), timeout=60)
with open(sys.argv[1], "rb") as f:
    s.sendfile(f)
s.shutdown(socket.SHUT_WR)
print(s.makefile().readline().strip())
"""


@pytest.mark.integration
def test_control_two_kernels_same_faults(files: dict[str, Payload], tmp_path: Path) -> None:
    """The shim between two real kernels (no relay): 64 MiB at 5% loss, and with loss,
    duplication and reordering, arrive intact in seconds. So the faults of the tests
    above are ones standard TCP (SACK, timestamps) handles: a relay that stalls on
    them is at fault, not the wire."""
    up = files["up-64"]
    for spec in ("loss=0.05", "loss=0.01,dup=0.01,reorder=0.02,hold=3,hold_ms=5"):
        seed = _seed()
        print(f"\ncontrol seed={seed} spec=[{spec}]")
        wire = str(tmp_path / "wire.sock")
        with LossyGuest(tmp_path, wire, seed, listen=True) as host, \
                LossyGuest(tmp_path, wire, seed, to_relay=spec, to_guest=spec) as g:
            host.static(f"{GATEWAY_IP}/24", gateway=None)
            g.static()
            sink = subprocess.Popen(["ip", "netns", "exec", host.name, sys.executable, "-c",
                                     _SINK % GATEWAY_IP], stdout=subprocess.PIPE, text=True,
                                    start_new_session=True)
            try:
                _wait_for(lambda: ":5001 " in host.run(["ss", "-Htln"], timeout=10).stdout,
                          10, "control sink")
                t0 = time.monotonic()
                out = _watched(g, [sys.executable, "-c", _SEND % GATEWAY_IP, str(up.path)],
                               GATEWAY_IP, time.monotonic() + 60)
                secs = time.monotonic() - t0
                _report("control upload", up, secs)
            finally:
                _stop(sink)
                sink.communicate(timeout=10)
        assert out.split() == [up.sha256, str(up.size)], f"seed={seed}: {out!r}"
        assert secs < 30, f"seed={seed}: control transfer took {secs:.1f} s"
        print(f"control shim counters: {json.dumps(g.shim_stats)}")
        assert _direction_stats(g, "to_relay")["dropped"] > 0, g.shim_stats


# -- the shim's impairment model on its own (no root needed) ------------------------------


def test_impairment_spec_parsing() -> None:
    spec = ImpairSpec.parse("loss=0.05, dup=0.01,reorder=0.2,hold=4,hold_ms=2.5")
    assert (spec.loss, spec.dup, spec.reorder, spec.hold, spec.hold_ms) == (
        0.05, 0.01, 0.2, 4, 2.5)
    assert ImpairSpec.parse("") == ImpairSpec()
    for bad in ("loss=2", "drop=0.1", "loss", "hold=0", "hold_ms=0"):
        with pytest.raises(ValueError):
            ImpairSpec.parse(bad)


def test_impairment_is_seeded_and_conserves_frames() -> None:
    spec = ImpairSpec(loss=0.1, dup=0.1, reorder=0.2, hold=3, hold_ms=5)
    frames = [i.to_bytes(4, "big") for i in range(5000)]

    def run(seed: int) -> tuple[list[bytes], Impairment]:
        imp = Impairment(spec, random.Random(seed))
        out = [f for i, fr in enumerate(frames) for f in imp.push(fr, i * 1e-4)]
        out += imp.expire(1e9)
        return out, imp

    out, imp = run(7)
    assert out == run(7)[0]
    assert out != run(8)[0]
    st = imp.stats
    assert st.dropped and st.duplicated and st.reordered
    # Every frame arrives once, twice (duplicated) or not at all (dropped); none invented.
    assert len(out) == len(frames) - st.dropped + st.duplicated
    assert set(out) <= set(frames)
    assert out != sorted(out)  # reordered
    assert not imp.held


def test_impairment_held_frame_released_after_k_frames_or_timeout() -> None:
    imp = Impairment(ImpairSpec(reorder=1.0, hold=2, hold_ms=5), random.Random(1))
    assert imp.push(b"a", 0.0) == []  # held
    assert imp.next_deadline() == pytest.approx(0.005)
    imp.spec.reorder = 0.0
    assert imp.push(b"b", 0.001) == [b"b"]
    assert imp.push(b"c", 0.002) == [b"c", b"a"]  # after two later frames
    imp.spec.reorder = 1.0
    assert imp.push(b"d", 0.003) == []
    assert imp.expire(0.0079) == []
    assert imp.expire(0.0081) == [b"d"]  # quiet wire: released by the timer
