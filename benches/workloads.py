"""Workloads of the benchmark suite: each runs against one live setup (setups.Guest) and
returns named figures. A workload that cannot produce a figure raises BenchError; run.py
turns that into a "failed: reason" cell for every figure the workload owns.

All load is bounded: iperf3 and sockperf by -t, our own tools by --duration/--seconds/
--hold, and every child gets a wall-clock timeout on top; servers listen on the setup's
host-side address (loopback of the private namespace, or the veth address).

The forwarded-port workloads (fwd, fwdcrr) turn this around: the server runs in the
guest on IPERF_PORT / CRR_PORT, the client on the host side dials the setup's forwarded
loopback port (setups.Forwards). Without -R the client sends, so host->guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    CLIENT_GRACE,
    SETUP_TIMEOUT,
    BenchError,
    parse_iperf3,
    require,
    spawned,
    stop_group,
    tcp_listening,
    wait_until,
)
from pyspy import profiled
from setups import FWD_HOST_ADDR, Forwards, Guest, rss_bytes

LOADTOOLS = str(Path(__file__).resolve().parent / "loadtools.py")
IPERF_PORT, SOCKPERF_PORT, CRR_PORT, IDLE_PORT = 5201, 11111, 5301, 5401
DIRS = {"g2h": False, "h2g": True}  # name -> iperf3 -R (client in the guest)
FWD_DIRS = {"h2g": False, "g2h": True}  # name -> iperf3 -R (client on the host side)
#: Guest ports the fwd workloads serve on, each forwarded from this offset plus the port.
FWD_GUEST_PORTS, FWD_PORT_OFFSET = (IPERF_PORT, CRR_PORT), 10000
IDLE_CONNECT_TIMEOUT = 180.0  # opening 10,000 flows through a slow relay


@dataclass(frozen=True)
class WorkloadOptions:
    duration: float
    omit: int
    udp_rate: str  # iperf3 -b for the UDP workload, e.g. "1G"
    udp_len: int  # datagram payload (iperf3 -l), below MTU 1500 so it is the same everywhere
    idle_counts: tuple[int, ...]
    verbose: bool
    profile_dir: Path | None = None  # py-spy profiles of relaynat per workload (pyspy.py)


@dataclass
class Figure:
    value: float
    #: Per-second rates when the tool reports them (stall detection: a 0 interval).
    intervals: list[float] = field(default_factory=list)


Figures = dict[str, Figure]
#: Figures measured earlier on the same live setup (the idle-flow workload's solo baseline).
Context = dict[str, float]


def _log(opts: WorkloadOptions, argv: list[str]) -> None:
    if opts.verbose:
        print(f"    $ {' '.join(argv)}", file=sys.stderr)


def _guest_run(guest: Guest, argv: list[str], timeout: float, opts: WorkloadOptions,
               ) -> tuple[bytes, int, str]:
    """Run argv in the guest; (stdout, returncode, stderr tail). Killed at timeout."""
    return _run_in(guest.prefix, argv, timeout, opts)


def _run_in(prefix: list[str], argv: list[str], timeout: float, opts: WorkloadOptions,
            ) -> tuple[bytes, int, str]:
    """Run argv after `prefix` (an nsenter, or nothing); as _guest_run."""
    full = [*prefix, *argv]
    _log(opts, full)
    with spawned(full, stdout=subprocess.PIPE) as client:
        try:
            stdout, _ = client.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{argv[0]} timed out after {timeout:.0f}s") from exc
        return stdout, client.popen.returncode, client.log_tail()


@contextlib.contextmanager
def _server(argv: list[str], port: int, opts: WorkloadOptions, prefix: Sequence[str] = (),
            ) -> Any:
    """Start argv (after `prefix`: in a guest) and wait until it listens on `port`, looked
    up in the server's own network namespace (nsenter execs, so its PID is the server's)."""
    full = [*prefix, *argv]
    _log(opts, full)
    with spawned(full) as server:
        wait_until(argv[0], lambda: tcp_listening(port, server.pid), server, SETUP_TIMEOUT)
        yield server


# --------------------------------------------------------------------------- iperf3


def _profiled(guest: Guest, opts: WorkloadOptions, tag: str, seconds: float) -> Any:
    pid = guest.relay_pid if guest.name == "relaynat" else None
    return profiled(pid, opts.profile_dir, tag, seconds)


def _iperf_client(target: str, port: int, streams: int, reverse: bool,
                  opts: WorkloadOptions, extra: tuple[str, ...] = ()) -> list[str]:
    return [*f"iperf3 -c {target} -p {port} -t {opts.duration:g}".split(),
            *f"-O {opts.omit} -J -P {streams}".split(), *(["-R"] if reverse else []), *extra]


def iperf_tcp(guest: Guest, reverse: bool, streams: int, opts: WorkloadOptions,
              extra: tuple[str, ...] = (), tag: str = "iperf3") -> Figure:
    server = f"iperf3 -s -1 -B {guest.server_bind} -p {IPERF_PORT}".split()
    client = _iperf_client(guest.target, IPERF_PORT, streams, reverse, opts, extra)
    return _iperf(guest, ([], server), (guest.prefix, client), opts, tag)


def _iperf(guest: Guest, server: tuple[list[str], list[str]],
           client: tuple[list[str], list[str]], opts: WorkloadOptions, tag: str) -> Figure:
    """One iperf3 run: server and client each as (namespace prefix, argv)."""
    require("iperf3")
    with (_server(server[1], IPERF_PORT, opts, server[0]) as srv,
          _profiled(guest, opts, tag, opts.duration + opts.omit)):
        stdout, rc, tail = _run_in(*client, opts.duration + opts.omit + CLIENT_GRACE, opts)
        try:
            sample = parse_iperf3(stdout, rc, tail)
        except BenchError as exc:
            errors = srv.log_tail(grep="error")
            raise BenchError(f"{exc} (server: {errors})" if errors else str(exc)) from exc
    return Figure(sample.gbps, sample.intervals_gbps)


def tcp_workload(streams: int, mtu: int) -> Callable[[Guest, WorkloadOptions, Context], Figures]:
    def run(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
        out: Figures = {}
        for d, rev in DIRS.items():
            key = f"tcp{streams}_{d}_{mtu}"
            try:
                out[key] = iperf_tcp(guest, rev, streams, opts, tag=key)
            except BenchError as exc:  # the other direction is still worth measuring
                out[key] = failed_figure(str(exc))
        return out

    return run


class FailedFigure(Figure):
    """A figure of a workload that partly failed: carries the reason instead of a value."""

    def __init__(self, reason: str) -> None:
        super().__init__(float("nan"))
        self.reason = reason


def failed_figure(reason: str) -> FailedFigure:
    return FailedFigure(reason)


def udp_workload(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
    """iperf3 -u at a fixed offered rate: the received rate and the loss, both ways.

    Figures are iperf3's receiver summary (end.sum_received; 3.12 has it for UDP).
    No -O warm-up: UDP has no slow start, and with -O iperf3 3.12 counts losses from
    the start but packets only after it (loss over 100%). Per-second intervals are the
    receiver's only with -R; only those count for stall detection.
    """
    require("iperf3")
    out: Figures = {}
    for d, rev in DIRS.items():
        server = f"iperf3 -s -1 -B {guest.server_bind} -p {IPERF_PORT}".split()
        client = [*f"iperf3 -c {guest.target} -p {IPERF_PORT} -u -b {opts.udp_rate}".split(),
                  *f"-l {opts.udp_len} -t {opts.duration:g} -J".split(),
                  *(["-R"] if rev else [])]
        try:
            with _server(server, IPERF_PORT, opts):
                stdout, rc, tail = _guest_run(guest, client, opts.duration + CLIENT_GRACE, opts)
            report = _iperf_json(stdout, rc, tail)
            received = report["end"]["sum_received"]
            if not received.get("packets"):
                raise BenchError("no UDP packets counted")
            intervals = ([i["sum"]["bits_per_second"] / 1e9 for i in report["intervals"]]
                         if rev else [])
            out[f"udp_{d}_gbps"] = Figure(received["bits_per_second"] / 1e9, intervals)
            out[f"udp_{d}_loss_pct"] = Figure(float(received["lost_percent"]))
        except (BenchError, KeyError, TypeError) as exc:
            reason = str(exc) if isinstance(exc, BenchError) else f"bad iperf3 JSON: {exc}"
            out[f"udp_{d}_gbps"] = out[f"udp_{d}_loss_pct"] = failed_figure(reason)
    return out


def _iperf_json(stdout: bytes, rc: int, tail: str) -> dict[str, Any]:
    text = stdout.decode(errors="replace")
    start = re.search(r"^\{", text, re.MULTILINE)
    if start is None:
        raise BenchError(f"exit status {rc}: {tail or 'no JSON'}"[:300])
    try:
        report, _ = json.JSONDecoder().raw_decode(text, start.start())
    except json.JSONDecodeError as exc:
        raise BenchError(f"exit status {rc}: unparsable JSON") from exc
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    return report


# --------------------------------------------------------------------------- latency, CRR


_PERCENTILE = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")


def latency_workload(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
    """sockperf TCP ping-pong, 64-byte messages. sockperf reports half the round trip
    as "latency"; we double it and report the round-trip time."""
    require("sockperf")
    server = f"sockperf server --tcp -i {guest.server_bind} -p {SOCKPERF_PORT}".split()
    client = (f"sockperf ping-pong --tcp -i {guest.target} -p {SOCKPERF_PORT}"
              f" -t {max(1, round(opts.duration))} -m 64").split()
    with (_server(server, SOCKPERF_PORT, opts),
          _profiled(guest, opts, "latency", opts.duration)):
        stdout, rc, tail = _guest_run(guest, client, opts.duration + CLIENT_GRACE, opts)
    pct = {float(p): float(v) for p, v in _PERCENTILE.findall(stdout.decode(errors="replace"))}
    if 50.0 not in pct or 99.0 not in pct:
        raise BenchError(f"sockperf exit status {rc}: {tail or 'no percentiles'}"[:300])
    return {"rr_p50_us": Figure(2 * pct[50.0]), "rr_p99_us": Figure(2 * pct[99.0])}


def crr_workload(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
    """Connect, 64-byte request, 64-byte response, close: one at a time, for --duration."""
    return _crr(guest, ([], guest.server_bind), (guest.prefix, guest.target, CRR_PORT),
                opts, "crr")


def _crr(guest: Guest, server: tuple[list[str], str], client: tuple[list[str], str, int],
         opts: WorkloadOptions, name: str) -> Figures:
    """crr-server (namespace prefix, bind address) on CRR_PORT, crr-client (prefix, target,
    port); figures <name>_per_s and <name>_p50_us."""
    server_argv = [sys.executable, LOADTOOLS, "crr-server", "--bind", server[1],
                   "--port", str(CRR_PORT), "--seconds", str(opts.duration + CLIENT_GRACE + 10)]
    prefix, target, port = client
    client_argv = [sys.executable, LOADTOOLS, "crr-client", "--target", target,
                   "--port", str(port), "--duration", str(opts.duration)]
    with (_server(server_argv, CRR_PORT, opts, server[0]),
          _profiled(guest, opts, name, opts.duration)):
        stdout, rc, tail = _run_in(prefix, client_argv, opts.duration + CLIENT_GRACE, opts)
    try:
        res = json.loads(stdout)
    except json.JSONDecodeError as exc:
        raise BenchError(f"crr-client exit status {rc}: {tail}"[:300]) from exc
    if not res.get("count"):
        raise BenchError(f"no connection completed: errors {res.get('errors')}")
    figures = {f"{name}_per_s": Figure(res["rate"],
                                       [float(n) for n in res["per_second"][:-1]]),
               f"{name}_p50_us": Figure(res["p50_us"])}
    if res["errors"]:
        print(f"    {name} errors: {res['errors']}", file=sys.stderr)
    return figures


# --------------------------------------------------------------------------- forwarded ports


def _forwards(guest: Guest) -> Forwards:
    if guest.forwards is None:
        raise BenchError(f"{guest.name} was started without forwarded ports")
    return guest.forwards


def fwd_workload(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
    """iperf3 one stream through the setup's forwarded port, both ways: the server in the
    guest (all addresses: each setup delivers to a different one), the client on the host
    side dialling the forwarded loopback port."""
    fw = _forwards(guest)
    server = f"iperf3 -s -1 -p {IPERF_PORT}".split()
    out: Figures = {}
    for d, rev in FWD_DIRS.items():
        key = f"fwd_{d}_gbps"
        client = _iperf_client(FWD_HOST_ADDR, fw.host_port[IPERF_PORT], 1, rev, opts)
        try:
            out[key] = _iperf(guest, (guest.prefix, server), (fw.client_prefix, client),
                              opts, key)
        except BenchError as exc:  # the other direction is still worth measuring
            out[key] = failed_figure(str(exc))
    return out


def fwdcrr_workload(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
    """The crr workload through the forwarded port: a fresh forwarded connection each."""
    fw = _forwards(guest)
    return _crr(guest, (guest.prefix, "0.0.0.0"),
                (fw.client_prefix, FWD_HOST_ADDR, fw.host_port[CRR_PORT]), opts, "fwdcrr")


# --------------------------------------------------------------------------- idle flows


def idle_workload(count: int) -> Callable[[Guest, WorkloadOptions, Context], Figures]:
    """Open `count` idle connections through the setup, read the relay's RSS, then run
    the one-stream bulk transfer both ways while they stay open and compare it to the
    solo figure measured earlier on the same live setup."""

    def run(guest: Guest, opts: WorkloadOptions, ctx: Context) -> Figures:
        out: Figures = {}
        rss0 = rss_bytes(guest.relay_pid) if guest.relay_pid else None
        hold = IDLE_CONNECT_TIMEOUT + 4 * (opts.duration + opts.omit + CLIENT_GRACE)
        server = [sys.executable, LOADTOOLS, "idle-server", "--bind", guest.server_bind,
                  "--port", str(IDLE_PORT), "--seconds", str(hold + 30)]
        client = [*guest.prefix, sys.executable, LOADTOOLS, "idle-client", "--target",
                  guest.target, "--port", str(IDLE_PORT), "--count", str(count),
                  "--hold", str(hold)]
        with _server(server, IDLE_PORT, opts):
            _log(opts, client)
            holder = subprocess.Popen(client, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
            try:
                line = _read_line(holder, IDLE_CONNECT_TIMEOUT)
                parts = line.split(maxsplit=2)
                if len(parts) < 2 or parts[0] != "READY":
                    raise BenchError(f"idle client: {line or 'no answer'}"[:200])
                opened = int(parts[1])
                if opened < count:
                    raise BenchError(f"only {opened}/{count} flows opened "
                                     f"(errors {parts[2] if len(parts) > 2 else '?'})")
                if guest.relay_pid:
                    time.sleep(0.5)  # let the relay settle (lazily allocated buffers)
                    rss = rss_bytes(guest.relay_pid)
                    out[f"rss_idle{count}_mib"] = Figure(rss / 2**20)
                    assert rss0 is not None
                    out[f"bytes_per_flow_idle{count}"] = Figure((rss - rss0) / count)
                for d, rev in DIRS.items():
                    key = f"idle{count}_{d}_gbps"
                    try:
                        fig = iperf_tcp(guest, rev, 1, opts, tag=key)
                    except BenchError as exc:
                        out[key] = out[f"idle{count}_{d}_vs_solo"] = failed_figure(str(exc))
                        continue
                    out[key] = fig
                    solo = ctx.get(f"tcp1_{d}_65520")
                    out[f"idle{count}_{d}_vs_solo"] = (
                        Figure(fig.value / solo) if solo else failed_figure("no solo figure"))
            finally:
                with contextlib.suppress(OSError):
                    holder.stdin.close()  # type: ignore[union-attr]
                with contextlib.suppress(subprocess.TimeoutExpired):
                    holder.wait(timeout=10)
                stop_group(holder)
        return out

    return run


def _read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BenchError(f"idle client: no READY after {timeout:.0f}s")
        readable, _, _ = select.select([fd], [], [], min(left, 1.0))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace").strip()

