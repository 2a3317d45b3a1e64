#!/usr/bin/env python3
"""Single-stream TCP throughput of relaynat against slirp4netns, pasta and a plain veth pair.

Usage (as root)::

    python benches/throughput.py [--duration 5] [--repeats 3] [--mtu 65520]
                                 [--only relaynat,slirp4netns,pasta,veth] [--json out.json]

For every setup a "guest" network namespace runs the iperf3 client (``iperf3 -c ... -J``,
plus ``-R`` for host->guest) against a one-shot iperf3 server (``iperf3 -s -1``) on the
"host" side. The setups are measured in the same run, their order rotated each repeat,
and the script prints the median and min-max in Gbit/s per setup and direction with the
ratio to slirp4netns. All samples, failures and command lines go to ``--json``.

Setups (guest -> address dialled -> where the server listens on the host side):

* ``slirp4netns``: ``slirp4netns --configure --mtu=MTU --ready-fd=N PID tap0`` for a netns
  held by ``unshare --net sleep infinity``; guest 10.0.2.100 dials 10.0.2.2, which
  slirp4netns maps to the host's 127.0.0.1.
* ``pasta``: ``pasta --config-net -a 10.0.2.15 -n 24 -g 10.0.2.2 -m MTU ... -- iperf3 ...``.
  This pasta (passt 0.0~git20230309) maps the gateway address to the host's loopback by
  default (``--no-map-gw`` turns that off), so the guest dials 10.0.2.2 and the traffic
  takes pasta's tap path (not its loopback "splice" path, which only serves ports
  forwarded with ``-T``). Automatic port forwarding (``-t/-u/-T/-U``, default ``auto``)
  is turned off: nothing needs it. pasta refuses to start without a host interface
  that has a default route, so a stub veth pair with 192.0.2.1/24 (TEST-NET-1) and a
  default route via 192.0.2.254 is added inside the private namespace; nothing is
  behind it. ``--runas 0:0`` is needed when started as root: as "nobody" pasta cannot
  set up the user namespace it creates for the command. This pasta's guest->host
  stream stalls now and then for seconds (0 bytes per 1 s interval); stalled
  intervals are counted and reported.
* ``relaynat``: ``python -m relaynat run --mtu MTU -- iperf3 -c 10.0.2.2 ...`` (guest
  10.0.2.15/24, gateway 10.0.2.2 mapped to the host's 127.0.0.1).
* ``veth``: a veth pair between the host side (10.123.0.1/24) and a guest netns
  (10.123.0.2/24), both ends at the MTU, server bound to 10.123.0.1: the kernel ceiling.

Network rule: before anything else the script moves itself into a fresh, private network
namespace (:func:`relaynat.netns_util.isolate_network`), so every relay's host side and
the iperf3 servers live there and nothing can reach the machine's real network. All
namespaces it creates are held by processes it started, and they disappear once those
processes are killed (process groups, in ``finally`` blocks, also on Ctrl-C/SIGTERM).

A setup that fails (missing tool, relay crash, timeout, unparsable output) shows up as a
``failed: <reason>`` cell; the other setups are still measured.

Requirements: Linux, root, Python 3.11+, ``iproute2`` (``ip``), ``util-linux``
(``unshare``, ``nsenter``), ``iperf3`` (>= 3.1, for ``-J``), and per setup the Debian
packages ``slirp4netns`` and ``passt`` (provides ``pasta``), and relaynat itself (its
``src/`` is put on ``PYTHONPATH`` when run from a checkout). The script installs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_SRC = Path(__file__).resolve().parent.parent / "src"

DIRECTIONS: dict[str, bool] = {"guest_to_host": False, "host_to_guest": True}  # name -> -R
DIRECTION_LABELS = {"guest_to_host": "guest->host", "host_to_guest": "host->guest"}
BASELINE = "slirp4netns"

IPERF_PORT = 5201
SETUP_TIMEOUT = 15.0  # bringing a relay / namespace up
CMD_TIMEOUT = 10.0  # one-shot `ip` / `nsenter` commands
CLIENT_GRACE = 30.0  # iperf3 client timeout on top of --duration + --omit
STOP_GRACE = 2.0  # SIGTERM -> SIGKILL
STALL_GBPS = 0.1  # a 1 s iperf3 interval below this (100 Mbit/s) counts as a stall

SLIRP_GATEWAY = "10.0.2.2"
RELAY_GUEST = "10.0.2.15"
RELAY_GATEWAY = "10.0.2.2"
VETH_HOST, VETH_GUEST, VETH_PREFIX = "10.123.0.1", "10.123.0.2", 24
STUB_ADDR, STUB_GATEWAY = "192.0.2.1/24", "192.0.2.254"  # TEST-NET-1, leads nowhere


class BenchError(Exception):
    """A measurement or setup failed; the message becomes the table cell."""


class Interrupted(BaseException):
    """Raised from the SIGTERM/SIGHUP handler so that `finally` blocks clean up."""


@dataclass(frozen=True)
class Options:
    duration: float
    omit: int
    repeats: int
    mtu: int
    setups: list[str]
    json_path: Path | None
    verbose: bool


@dataclass(frozen=True)
class Guest:
    """How to run a command in a setup's guest, and where its iperf3 server lives."""

    prefix: list[str]  # argv prefix running the rest of the argv inside the guest
    target: str  # address the guest dials
    server_bind: str  # address the host-side iperf3 server listens on
    env: dict[str, str] | None = None  # environment for the guest command, if not ours
    relay_cmd: list[str] = field(default_factory=list)  # for the record (JSON)


# --------------------------------------------------------------------------- processes


@dataclass
class Proc:
    """A child started in its own session (so its whole process group can be killed)."""

    popen: subprocess.Popen[bytes]
    log: IO[bytes]  # stderr (and stdout unless redirected), in an unlinked temporary file

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, limit: int = 300, grep: str = "") -> str:
        """The last few non-empty lines of the log (those containing `grep`), joined."""
        self.log.flush()
        self.log.seek(0)
        lines = self.log.read().decode(errors="replace").splitlines()
        kept = [ln.strip() for ln in lines if ln.strip() and grep in ln.lower()]
        return " | ".join(kept[-3:])[-limit:]


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it after a grace period, reap the child."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM if proc.poll() is None else signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE)
    # Whatever is left in the group (grandchildren of a relay, say) is killed outright.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=STOP_GRACE)


@contextlib.contextmanager
def spawned(argv: list[str], **popen_kw: Any) -> Iterator[Proc]:
    """Start `argv` in a new session; kill its process group on the way out."""
    with tempfile.TemporaryFile() as log:
        popen_kw.setdefault("stdout", log)
        try:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True, **popen_kw
            )
        except OSError as exc:
            raise BenchError(f"cannot start {argv[0]}: {exc.strerror}") from exc
        try:
            yield Proc(popen, log)
        finally:
            stop_group(popen)


def run_cmd(argv: list[str]) -> None:
    """Run a short configuration command; raise BenchError with its stderr on failure."""
    try:
        res = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=CMD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"timed out: {' '.join(argv)}") from exc
    except OSError as exc:
        raise BenchError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    if res.returncode != 0:
        err = res.stderr.decode(errors="replace").strip()
        raise BenchError(f"{' '.join(argv)}: {err or f'exit status {res.returncode}'}")


def ip(args: str, netns_pid: int | None = None) -> None:
    """`ip <args>` here, or in the network namespace of `netns_pid`."""
    prefix = in_netns(netns_pid) if netns_pid is not None else []
    run_cmd([*prefix, "ip", *args.split()])


def wait_until(what: str, check: Callable[[], bool], proc: Proc, timeout: float) -> None:
    """Poll `check` until it holds; fail early if `proc` exits, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.popen.poll() is not None:
            raise BenchError(f"{what}: exited with {proc.popen.returncode}: {proc.log_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.02)


def require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found in PATH")


# --------------------------------------------------------------------------- namespaces


def in_netns(pid: int) -> list[str]:
    return ["nsenter", "-t", str(pid), "-n", "--"]


@contextlib.contextmanager
def guest_netns() -> Iterator[int]:
    """A fresh network namespace held by a sleeping process; yields that process's PID."""
    require("unshare", "nsenter", "ip")
    ours = os.readlink("/proc/self/ns/net")
    with spawned(["unshare", "--net", "--", "sleep", "infinity"]) as holder:

        def unshared() -> bool:
            try:
                return os.readlink(f"/proc/{holder.pid}/ns/net") != ours
            except OSError:
                return False

        wait_until("unshare --net", unshared, holder, SETUP_TIMEOUT)
        ip("link set lo up", holder.pid)
        yield holder.pid


def tcp_listening(port: int) -> bool:
    """Whether something in this process's network namespace listens on TCP `port`."""
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            next(f)  # header
            for line in f:
                _, local, _, state, *_ = line.split()
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                    return True
    return False


# --------------------------------------------------------------------------- setups


@contextlib.contextmanager
def setup_slirp4netns(opts: Options) -> Iterator[Guest]:
    require("slirp4netns")
    with guest_netns() as pid:
        ready_r, ready_w = os.pipe()
        try:
            argv = f"slirp4netns --configure --mtu={opts.mtu} --ready-fd={ready_w} {pid} tap0"
            argv = argv.split()
            with spawned(argv, pass_fds=(ready_w,)) as relay:
                os.close(ready_w)
                ready_w = -1
                readable, _, _ = select.select([ready_r], [], [], SETUP_TIMEOUT)
                if not readable or os.read(ready_r, 1) != b"1":
                    raise BenchError(f"slirp4netns not ready: {relay.log_tail() or 'timeout'}")
                yield Guest(in_netns(pid), SLIRP_GATEWAY, "127.0.0.1", relay_cmd=argv)
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)


@contextlib.contextmanager
def stub_uplink() -> Iterator[None]:
    """A veth pair with a default route, inside the private namespace, leading nowhere."""
    ip("link add rnbstub0 type veth peer name rnbstub1")
    try:
        ip(f"addr add {STUB_ADDR} dev rnbstub0")
        ip("link set rnbstub1 up")
        ip("link set rnbstub0 up")
        ip(f"route add default via {STUB_GATEWAY} dev rnbstub0")
        yield
    finally:
        with contextlib.suppress(BenchError):
            ip("link del rnbstub0")


@contextlib.contextmanager
def setup_pasta(opts: Options) -> Iterator[Guest]:
    require("pasta", "ip")
    prefix = (
        "pasta --config-net --foreground --quiet --runas 0:0 --ipv4-only"
        f" -a {RELAY_GUEST} -n 24 -g {RELAY_GATEWAY} -m {opts.mtu}"
        " -t none -u none -T none -U none --"
    ).split()
    with stub_uplink():
        yield Guest(prefix, RELAY_GATEWAY, "127.0.0.1", relay_cmd=prefix)


@contextlib.contextmanager
def setup_relaynat(opts: Options) -> Iterator[Guest]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_SRC), env.get("PYTHONPATH")) if p)
    prefix = [sys.executable, "-m", "relaynat", "run", "--mtu", str(opts.mtu), "--"]
    yield Guest(prefix, RELAY_GATEWAY, "127.0.0.1", env=env, relay_cmd=prefix)


@contextlib.contextmanager
def setup_veth(opts: Options) -> Iterator[Guest]:
    with guest_netns() as pid:
        link_cmd = (
            f"ip link add rnbveth0 mtu {opts.mtu} type veth"
            f" peer name eth0 mtu {opts.mtu} netns {pid}"
        ).split()
        run_cmd(link_cmd)
        try:
            ip(f"addr add {VETH_HOST}/{VETH_PREFIX} dev rnbveth0")
            ip("link set rnbveth0 up")
            ip(f"addr add {VETH_GUEST}/{VETH_PREFIX} dev eth0", pid)
            ip("link set eth0 up", pid)
            yield Guest(in_netns(pid), VETH_HOST, VETH_HOST, relay_cmd=link_cmd)
        finally:
            with contextlib.suppress(BenchError):
                ip("link del rnbveth0")


Setup = Callable[[Options], contextlib.AbstractContextManager[Guest]]
SETUPS: dict[str, Setup] = {
    "relaynat": setup_relaynat,
    "slirp4netns": setup_slirp4netns,
    "pasta": setup_pasta,
    "veth": setup_veth,
}


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Sample:
    gbps: float  # end.sum_received over the measured (non-omitted) time
    intervals_gbps: list[float]  # the per-second reports after the warm-up


def parse_iperf3(stdout: bytes, returncode: int, stderr_tail: str) -> Sample:
    """Read `iperf3 -J` output; BenchError with a reason if it holds no figure.

    The JSON object is looked for from the first line starting with "{" so that a relay
    printing to the same stdout does not break parsing. A run that moved 0 bytes after
    the warm-up counts as failed (a stalled connection), not as 0 Gbit/s.
    """
    text = stdout.decode(errors="replace")
    start = re.search(r"^\{", text, re.MULTILINE)
    report: Any = None
    if start is not None:
        with contextlib.suppress(json.JSONDecodeError):
            report, _ = json.JSONDecoder().raw_decode(text, start.start())
    if not isinstance(report, dict):
        reason = stderr_tail or (text.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"exit status {returncode}: {reason}"[:300])
    if report.get("error"):
        raise BenchError(f"iperf3: {report['error']}")
    try:
        received = report["end"]["sum_received"]
        intervals = [i["sum"] for i in report.get("intervals", [])]
        sample = Sample(
            float(received["bits_per_second"]) / 1e9,
            [i["bits_per_second"] / 1e9 for i in intervals if not i.get("omitted")],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"unexpected iperf3 JSON: missing {exc}") from exc
    if received.get("bytes", 0) == 0:
        warmup = sum(i.get("bytes", 0) for i in intervals if i.get("omitted"))
        raise BenchError(f"stalled: 0 bytes after the warm-up ({warmup} bytes during it)")
    return sample


def measure(guest: Guest, reverse: bool, opts: Options) -> Sample:
    """One iperf3 run: a one-shot server on the host side, the client in the guest."""
    require("iperf3")
    server_argv = f"iperf3 -s -1 -B {guest.server_bind} -p {IPERF_PORT}".split()
    client_argv = [
        *guest.prefix,
        *f"iperf3 -c {guest.target} -p {IPERF_PORT} -t {opts.duration:g} -O {opts.omit} -J".split(),
        *(["-R"] if reverse else []),
    ]
    if opts.verbose:
        print(f"    $ {' '.join(server_argv)} &\n    $ {' '.join(client_argv)}", file=sys.stderr)
    with spawned(server_argv) as server:
        wait_until("iperf3 server", lambda: tcp_listening(IPERF_PORT), server, SETUP_TIMEOUT)
        timeout = opts.duration + opts.omit + CLIENT_GRACE
        with spawned(client_argv, stdout=subprocess.PIPE, env=guest.env) as client:
            try:
                stdout, _ = client.popen.communicate(timeout=timeout)
                return parse_iperf3(stdout, client.popen.returncode, client.log_tail())
            except subprocess.TimeoutExpired as exc:
                raise BenchError(f"client timed out after {timeout:.0f}s") from exc
            except BenchError as exc:
                server_errors = server.log_tail(grep="error")
                if server_errors:
                    raise BenchError(f"{exc} (server: {server_errors})") from exc
                raise


@dataclass
class Samples:
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        values = [smp.gbps for smp in self.samples]
        intervals = [smp.intervals_gbps for smp in self.samples]
        out: dict[str, Any] = {
            "samples_gbps": values,
            "intervals_gbps": intervals,
            "stalled_intervals": sum(g < STALL_GBPS for run in intervals for g in run),
            "errors": self.errors,
            "attempts": len(values) + len(self.errors),
        }
        if values:
            out |= {"median": statistics.median(values), "min": min(values), "max": max(values)}
        return out


def run_setup(name: str, opts: Options, results: dict[str, Samples]) -> dict[str, Any]:
    """Bring setup `name` up once and measure both directions; returns its command lines."""
    pending = list(DIRECTIONS)
    record: dict[str, Any] = {}
    try:
        with SETUPS[name](opts) as guest:
            record = {
                "relay": guest.relay_cmd,
                "guest_prefix": guest.prefix,
                "target": guest.target,
                "server_bind": guest.server_bind,
            }
            while pending:
                direction = pending.pop(0)
                try:
                    sample = measure(guest, DIRECTIONS[direction], opts)
                except BenchError as exc:
                    results[direction].errors.append(str(exc))
                    print(f"    {direction}: failed: {exc}", file=sys.stderr)
                    continue
                results[direction].samples.append(sample)
                per_s = " ".join(f"{g:.1f}" for g in sample.intervals_gbps)
                print(f"    {direction}: {sample.gbps:.2f} Gbit/s [{per_s}]", file=sys.stderr)
    except BenchError as exc:  # the setup could not be brought up (or torn down)
        print(f"    setup failed: {exc}", file=sys.stderr)
        for direction in pending:
            results[direction].errors.append(f"setup: {exc}")
    return record


def run_all(opts: Options) -> tuple[dict[str, dict[str, Samples]], dict[str, dict[str, Any]]]:
    """Every repeat measures every setup (order rotated per repeat), both directions."""
    results = {s: {d: Samples() for d in DIRECTIONS} for s in opts.setups}
    commands: dict[str, dict[str, Any]] = {}
    for rep in range(opts.repeats):
        shift = rep % len(opts.setups)
        for name in opts.setups[shift:] + opts.setups[:shift]:
            print(f"[{rep + 1}/{opts.repeats}] {name}", file=sys.stderr)
            record = run_setup(name, opts, results[name])
            if record:
                commands.setdefault(name, record)
    return results, commands


# --------------------------------------------------------------------------- reporting


def summarise(results: dict[str, dict[str, Samples]]) -> dict[str, dict[str, Any]]:
    summary = {s: {d: smp.summary() for d, smp in dirs.items()} for s, dirs in results.items()}
    for dirs in summary.values():
        for direction, stats in dirs.items():
            base = summary.get(BASELINE, {}).get(direction, {}).get("median")
            if "median" in stats and base:
                stats["ratio_to_slirp4netns"] = stats["median"] / base
    return summary


def cell(stats: dict[str, Any]) -> str:
    if "median" not in stats:
        reason = stats["errors"][-1] if stats["errors"] else "not run"
        return f"failed: {reason}"[:50]
    text = f"{stats['median']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"
    if stats["errors"]:
        text += f" [{len(stats['samples_gbps'])}/{stats['attempts']} ok]"
    return text


def ratio_cell(stats: dict[str, Any]) -> str:
    ratio = stats.get("ratio_to_slirp4netns")
    return f"{ratio:.2f}x" if ratio is not None else "-"


def print_table(summary: dict[str, dict[str, Any]], opts: Options) -> None:
    header = ["setup"]
    for direction in DIRECTIONS:
        header += [f"{DIRECTION_LABELS[direction]} Gbit/s median (min-max)", "vs slirp"]
    rows = [header]
    for name, dirs in summary.items():
        row = [name]
        for direction in DIRECTIONS:
            row += [cell(dirs[direction]), ratio_cell(dirs[direction])]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print(
        f"\niperf3 single TCP stream, {opts.duration:g}s (+{opts.omit}s omitted) x "
        f"{opts.repeats} repeats, MTU {opts.mtu}, {os.cpu_count()} CPUs"
    )
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    failures = [
        (n, d, e) for n, dirs in summary.items() for d, s in dirs.items() for e in s["errors"]
    ]
    if failures:
        print("\nfailures:")
        for name, direction, err in failures:
            print(f"  {name} {DIRECTION_LABELS[direction]}: {err}")
    stalls = [
        f"{name} {DIRECTION_LABELS[d]} {st['stalled_intervals']}/{n_intervals}"
        for name, dirs in summary.items()
        for d, st in dirs.items()
        if st["stalled_intervals"] and (n_intervals := sum(map(len, st["intervals_gbps"])))
    ]
    if stalls:
        print(f"\nstalls (1 s intervals under {STALL_GBPS * 1000:g} Mbit/s): {', '.join(stalls)}")


def tool_versions() -> dict[str, str]:
    probes = {
        "iperf3": ["iperf3", "--version"],
        "slirp4netns": ["slirp4netns", "--version"],
        "passt": ["dpkg-query", "-W", "-f", "${Version}", "passt"],
    }
    versions = {}
    for name, argv in probes.items():
        try:
            res = subprocess.run(argv, capture_output=True, timeout=CMD_TIMEOUT, check=False)
            versions[name] = (res.stdout.decode(errors="replace").splitlines() or ["?"])[0]
        except (OSError, subprocess.TimeoutExpired):
            versions[name] = "unavailable"
    return versions


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per iperf3 run")
    p.add_argument("--omit", type=int, default=1, help="warm-up seconds iperf3 discards")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mtu", type=int, default=65520)
    p.add_argument("--only", default=",".join(SETUPS), help="comma-separated setups")
    p.add_argument("--json", type=Path, help="write all figures to this file")
    p.add_argument("-v", "--verbose", action="store_true", help="print every command")
    a = p.parse_args(argv)
    setups = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in setups if s not in SETUPS]
    if unknown or not setups:
        p.error(f"unknown setup(s) {unknown}; choose from {','.join(SETUPS)}")
    if a.duration <= 0 or a.repeats < 1 or a.omit < 0 or not 576 <= a.mtu <= 65535:
        p.error("need --duration > 0, --repeats >= 1, --omit >= 0, 576 <= --mtu <= 65535")
    return Options(a.duration, a.omit, a.repeats, a.mtu, setups, a.json, a.verbose)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupted(signum: int, _frame: object) -> None:
    for sig in STOP_SIGNALS:  # a second Ctrl-C must not cut the clean-up short
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if os.geteuid() != 0:
        print("throughput.py must run as root (network namespaces, veth)", file=sys.stderr)
        return 2
    if str(REPO_SRC) not in sys.path:
        sys.path.insert(0, str(REPO_SRC))
    from relaynat.netns_util import isolate_network

    isolate_network()  # before any thread or child: nothing below can reach the real network
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # e.g. SIGINT in a background job
            signal.signal(sig, _raise_interrupted)
    started = time.time()
    try:
        results, commands = run_all(opts)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}), cleaned up", file=sys.stderr)
        return 130
    summary = summarise(results)
    print_table(summary, opts)
    if opts.json_path is not None:
        document = {
            "benchmark": "iperf3 single-stream TCP throughput",
            "started": started,
            "options": {
                "duration": opts.duration,
                "omit": opts.omit,
                "repeats": opts.repeats,
                "mtu": opts.mtu,
                "setups": opts.setups,
            },
            "host": {
                "kernel": platform.release(),
                "cpus": os.cpu_count(),
                "tools": tool_versions(),
            },
            "units": "Gbit/s (iperf3 end.sum_received.bits_per_second / 1e9)",
            "results": summary,
            "commands": commands,
        }
        opts.json_path.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nwrote {opts.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
