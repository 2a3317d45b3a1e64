"""The lossy-wire harness: `relaynat serve --socket`, an HTTP peer, a real guest kernel
behind tests/support/netshim.py, and transfers watched for stalls and checked by sha256.

Shared by tests/integration/test_lossy_link.py (short, CI) and benches/faults.py (1 GiB runs). A
transfer that moves no byte for STALL_S seconds fails at once with the guest's TCP
state (`ss -ti`: rto, backoff, retransmissions) in the message.
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

from support import SUPPORT
from support.netshim import GATEWAY_IP, GUEST_IP, LossyGuest
from support.procfs import wait_confined
from support.relaynat_cli import parse_stats

MIB = 1 << 20
CURL = ["curl", "-sS", "--fail", "--noproxy", "*"]
#: A transfer that moves no byte for this long has stalled (checked once a second).
STALL_S = 30.0


def seed_from_env() -> int:
    env = os.environ.get("RELAYNAT_LOSSY_SEED")
    return int(env) if env else random.SystemRandom().randrange(1 << 32)


def wait_for(pred: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s} s")
        time.sleep(0.02)


def stop_proc(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout_s: float = 10) -> None:
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


def make_payloads(root: Path, sizes_mib: Sequence[int]) -> dict[str, Payload]:
    """Random payloads in `root`: down-N / up-N of N MiB (different contents each way)."""
    out: dict[str, Payload] = {}
    for direction in ("down", "up"):
        for mib in sizes_mib:
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


@contextlib.contextmanager
def host_peer(kind: str, work: Path, *args: str) -> Iterator[int]:
    """tests/support/host_peers.py KIND (its own process, logging to WORK/KIND.log); its port."""
    port_file = work / f"{kind}.port"
    with open(work / f"{kind}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, str(SUPPORT / "host_peers.py"), kind, *args,
                                 "--port-file", str(port_file)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, 10, f"{kind} peer")
        assert proc.poll() is None, (work / f"{kind}.log").read_text()
        yield int(port_file.read_text())
    finally:
        stop_proc(proc)


def http_peer(root: Path, work: Path, bind: str = "127.0.0.1",
              ) -> contextlib.AbstractContextManager[int]:
    """tests/support/host_peers.py http on `bind`, serving the files in `root`; its port."""
    return host_peer("http", work, "--root", str(root), "--bind", bind)


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


@contextlib.contextmanager
def serve_relay(work: Path, options: Sequence[str] = ()) -> Iterator[RelayProc]:
    """`relaynat serve --socket` as its own process (the real CLI), stopped on exit."""
    sock = str(work / "relay.sock")
    log = work / "relay.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--socket", sock,
                                 "--stats", "--log-level", "info", *options],
                                stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    r = RelayProc(sock, proc, log)
    try:
        wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, 10, "relay socket")
        assert proc.poll() is None, log.read_text()
        if "--no-confine" not in options:
            # The socket is bound before the relay confines itself: what a test
            # measures of it (its descriptors, for one) is the serving relay's only after.
            wait_confined(proc)
        yield r
    finally:
        stop_proc(proc)


class TransferFailed(AssertionError):
    pass


def watched(g: LossyGuest, argv: Sequence[str], peer: str, deadline: float) -> str:
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


def download(g: LossyGuest, port: int, p: Payload, deadline: float) -> tuple[str, float]:
    url = f"http://{GATEWAY_IP}:{port}/{p.name}"
    t0 = time.monotonic()
    out = watched(g, ["bash", "-o", "pipefail", "-c",
                       f"{shlex.join(CURL)} {shlex.quote(url)} | sha256sum"],
                   GATEWAY_IP, deadline)
    return out.split()[0], time.monotonic() - t0


def upload(g: LossyGuest, port: int, p: Payload, deadline: float) -> tuple[str, float]:
    url = f"http://{GATEWAY_IP}:{port}/upload-{p.name}"
    t0 = time.monotonic()
    out = watched(g, [*CURL, "-T", str(p.path), url], GATEWAY_IP, deadline)
    return out.split()[0], time.monotonic() - t0


def report(label: str, p: Payload, seconds: float) -> None:
    print(f"{label}: {p.size // MIB} MiB in {seconds:.2f} s = "
          f"{p.size / seconds / MIB:.1f} MiB/s")


def failure_context(g: LossyGuest, relay: RelayProc) -> str:
    return (f"seed={g.seed} (replay: RELAYNAT_LOSSY_SEED={g.seed})\n"
            f"shim: {json.dumps(g.shim_stats)}\n"
            f"relay log: {relay.log.read_text(errors='replace')[-3000:]}")


def transfer_both_ways(relay: RelayProc, http_port: int, tmp_path: Path, down: Payload,
                        up: Payload, spec: str, dhcp: bool, budget_s: float) -> LossyGuest:
    """Guest downloads `down` then uploads `up` over a wire impaired by `spec` both ways;
    both must arrive intact within `budget_s` in total."""
    seed = seed_from_env()
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
            got, secs = download(g, http_port, down, deadline)
            report("download", down, secs)
            assert got == down.sha256, f"download corrupted: {got} != {down.sha256}"
            got, secs = upload(g, http_port, up, deadline)
            report("upload", up, secs)
            assert got == up.sha256, f"upload corrupted: {got} != {up.sha256}"
            g.read_nstat()
    except BaseException as exc:
        stop_proc(relay.proc)
        raise AssertionError(f"{exc}\n{failure_context(g, relay)}") from exc
    stop_proc(relay.proc)
    print(f"shim counters: {json.dumps(g.shim_stats)}")
    stats = relay.stats()
    print("relay counters: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    return g


