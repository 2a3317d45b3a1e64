#!/usr/bin/env python3
"""What confinement costs: the same `relaynat run` guest with `--confine` and with
`--no-confine`, side by side in one run (docs/confinement.md).

    sudo .venv/bin/python benches/confinement.py [--duration 3] [--rounds 4] [--mtu 65520]
                                                 [--omit 0] [--syscalls] [--json FILE]

Measured through each relay, as benches/run.py measures its relaynat setup
(workloads.py): iperf3 one stream guest->host and host->guest (the server on the
benchmark's loopback, the client in the guest dialling 10.0.2.2), and the connect-
request-response rate (loadtools.py's crr client in the guest, one connection at a
time). For each, the CPU time the relay's processes spent (the relay and run's
namespace child, from /proc/PID/stat; the guest's tools are not theirs): per GiB
received for iperf3 (whose -t covers the whole transfer with the default --omit 0),
per connection for CRR. CPU time is far less at the mercy of a loaded machine than
the rates.

Each round starts a fresh pair of relays (new processes: hash seeds, heap layout) and
runs every workload on one arm then the other, the order swapped each round (A B, B A,
A B, ...), so that a drift of the machine's load falls on both arms alike. Printed per
figure: each arm's median (min-max over the rounds), the ratio of the medians, and the
median (min-max) of the per-round ratios (the two runs of a round are seconds apart),
which is what the verdict "costs under 3 %" is read from.

A confined relay confines itself once its guest is up, so an arm is only measured once
/proc/PID/status says so: Seccomp 2, NoNewPrivs 1, a uid other than root and no
capability in the confined arm, Seccomp 0 and uid 0 in the other; checked again after
every measurement (a relay killed by its filter, or one that never confined, fails the
run with exit status 1: an A/B of two identical arms would be worthless). Hence root.

`--syscalls` counts the relay's system calls during every measurement
(`perf stat -e raw_syscalls:sys_enter -p PID`) and prints them per GiB and per
connection: where confinement shows, whether it is more calls (the loop made without
io_uring batches no epoll_ctl) or dearer ones (each call runs the seccomp filter).
The counting itself costs a little on every call, in both arms alike.

Network rule: the script moves itself into a private network namespace first
(relaynat.netns.syscalls.isolate_network); servers listen on its loopback, guests are
the relays' own namespaces; every child is killed by process group on the way out.
Bounded: rounds x 2 arms x 3 workloads of --duration seconds, plus start-ups.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from common import (
    REPO_SRC,
    SETUP_TIMEOUT,
    STOP_SIGNALS,
    BenchError,
    Interrupted,
    Proc,
    in_netns,
    raise_interrupted,
    require,
    spawned,
)
from setups import RELAY_GATEWAY, Guest, _children, _wait_guest, _wait_link, tune_guest
from workloads import DIRS, WorkloadOptions, crr_workload, iperf_tcp

ARMS = ("no-confine", "confine")  # the baseline first: ratios are confine / no-confine
CONFINED_TIMEOUT = SETUP_TIMEOUT  # from the guest's link up to Seccomp 2
GIB = 2**30
TARGET_PCT = 3.0
WORKLOADS = (*(f"tcp1_{d}" for d in DIRS), "crr")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = (
    *(m for d, label in (("g2h", "guest->host"), ("h2g", "host->guest")) for m in (
        Metric(f"tcp1_{d}_gbps", f"TCP 1 stream {label}", "Gbit/s", True),
        Metric(f"tcp1_{d}_cpu_s_per_gib", "  relay CPU per GiB", "CPU s/GiB", False))),
    Metric("crr_per_s", "TCP connect+RR+close rate", "conn/s", True),
    Metric("crr_p50_us", "TCP connect+RR+close p50", "µs", False),
    Metric("crr_cpu_us_per_conn", "  relay CPU per connection", "CPU µs", False),
)
SYSCALL_METRICS = (
    *(Metric(f"tcp1_{d}_syscalls_per_gib", f"  relay syscalls per GiB {d}", "calls/GiB",
             False) for d in DIRS),
    Metric("crr_syscalls_per_conn", "  relay syscalls per connection", "calls", False),
)


# --------------------------------------------------------------------------- the relays


def status(pid: int) -> dict[str, str]:
    """The fields of /proc/PID/status that say whether a process is confined."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = ",".join(value.split())
    except OSError as exc:
        raise BenchError(f"relay {pid} is gone ({exc.strerror})") from exc
    return {k: fields.get(k, "?") for k in ("Uid", "Seccomp", "NoNewPrivs", "CapEff")}


def confinement_matches(arm: str, st: dict[str, str]) -> bool:
    uid = st["Uid"].split(",")[0]  # real, effective, saved, filesystem: "?" if none
    if arm == "confine":
        return (st["Seccomp"] == "2" and st["NoNewPrivs"] == "1" and uid not in ("0", "?")
                and st["CapEff"] == "0000000000000000")
    return st["Seccomp"] == "0" and uid == "0"


def check_arm(arm: str, relay: Proc, wait: float = 0.0) -> dict[str, str]:
    """Fail loudly unless the relay is alive and confined as its arm says (waiting up
    to `wait` seconds for a confined relay to finish confining itself)."""
    deadline = time.monotonic() + wait
    while True:
        if relay.popen.poll() is not None:
            rc = relay.popen.returncode
            why = " (SIGSYS: killed by its seccomp filter)" if rc == -signal.SIGSYS else ""
            raise BenchError(f"{arm}: relay exited with {rc}{why}: {relay.log_tail()}")
        st = status(relay.pid)
        if confinement_matches(arm, st):
            return st
        if time.monotonic() > deadline:
            raise BenchError(f"{arm}: the relay is not what its arm says: {st}")
        time.sleep(0.05)


@dataclass
class Arm:
    name: str
    guest: Guest
    relay: Proc
    status: dict[str, str]  # /proc/PID/status once confined (or not), for the record


@contextlib.contextmanager
def relay(arm: str, mtu: int, verbose: bool) -> Iterator[Arm]:
    """`relaynat run --<arm> --mtu MTU -- sleep infinity`, its guest tuned as run.py's."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_SRC), env.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", "relaynat", "run", f"--{arm}", "--mtu", str(mtu),
            "--", "sleep", "infinity"]
    if verbose:
        print(f"    $ {' '.join(argv)}", file=sys.stderr)
    with spawned(argv, env=env) as proc:
        pid = _wait_guest(f"relaynat run --{arm}", proc)
        _wait_link(pid, f"relaynat run --{arm}")
        tune_guest(pid)
        st = check_arm(arm, proc, CONFINED_TIMEOUT)
        yield Arm(arm, Guest(f"relaynat --{arm}", in_netns(pid),
                             RELAY_GATEWAY, "127.0.0.1", proc.pid, argv), proc, st)


def tree_cpu_s(root: int) -> float:
    """User and system CPU seconds of `root` and its descendants (all their threads)."""
    tree = _children()
    todo, total = [root], 0
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14, 15)
    return total / CLK_TCK


@contextlib.contextmanager
def syscalls_counted(pid: int, enabled: bool) -> Iterator[list[int]]:
    """Count `pid`'s system calls while the body runs (perf stat on the
    raw_syscalls:sys_enter tracepoint); the count is appended to the yielded list."""
    counted: list[int] = []
    if not enabled:
        yield counted
        return
    with tempfile.NamedTemporaryFile(prefix="rnb-perf-", suffix=".csv") as out:
        argv = ["perf", "stat", "-x,", "-o", out.name, "-e", "raw_syscalls:sys_enter",
                "-p", str(pid)]
        with spawned(argv) as perf:
            time.sleep(0.3)  # perf attaches its counters
            yield counted
            os.kill(perf.pid, signal.SIGINT)  # perf stat writes its counts on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                perf.popen.wait(timeout=10)
        for line in Path(out.name).read_text().splitlines():
            parts = line.split(",")
            if len(parts) > 2 and parts[2].startswith("raw_syscalls:sys_enter"):
                counted.append(int(parts[0]))
    if not counted:
        raise BenchError(f"perf stat counted nothing for {pid}")


# --------------------------------------------------------------------------- measuring

Figures = dict[str, float]


def measure_tcp(arm: Arm, d: str, opts: WorkloadOptions, syscalls: bool) -> Figures:
    cpu0 = tree_cpu_s(arm.relay.pid)
    with syscalls_counted(arm.relay.pid, syscalls) as calls:
        fig = iperf_tcp(arm.guest, DIRS[d], 1, opts, tag=f"tcp1_{d}")
    cpu = tree_cpu_s(arm.relay.pid) - cpu0
    gib = fig.value * 1e9 / 8 * opts.duration / GIB
    out = {f"tcp1_{d}_gbps": fig.value, f"tcp1_{d}_cpu_s_per_gib": cpu / gib}
    if calls:
        out[f"tcp1_{d}_syscalls_per_gib"] = calls[0] / gib
    return out


def measure_crr(arm: Arm, opts: WorkloadOptions, syscalls: bool) -> Figures:
    cpu0 = tree_cpu_s(arm.relay.pid)
    with syscalls_counted(arm.relay.pid, syscalls) as calls:
        figs = crr_workload(arm.guest, opts, {})
    cpu = tree_cpu_s(arm.relay.pid) - cpu0
    conns = figs["crr_per_s"].value * opts.duration
    out = {"crr_per_s": figs["crr_per_s"].value, "crr_p50_us": figs["crr_p50_us"].value,
           "crr_cpu_us_per_conn": cpu / conns * 1e6}
    if calls:
        out["crr_syscalls_per_conn"] = calls[0] / conns
    return out


def workloads(opts: WorkloadOptions, syscalls: bool, only: set[str],
              ) -> list[tuple[str, Callable[[Arm], Figures]]]:
    plan: list[tuple[str, Callable[[Arm], Figures]]] = [
        *((f"tcp1_{d}", lambda arm, d=d: measure_tcp(arm, d, opts, syscalls)) for d in DIRS),
        ("crr", lambda arm: measure_crr(arm, opts, syscalls))]
    return [(name, fn) for name, fn in plan if name in only]


#: rounds[i][arm][key]: the figures of round i; a measurement that failed has none.
Rounds = list[dict[str, Figures]]


def run_rounds(a: argparse.Namespace, opts: WorkloadOptions, rounds: Rounds,
               failures: list[str], seen: dict[str, dict[str, str]]) -> None:
    """Fill `rounds`, `failures` (a measurement that failed: the run goes on) and `seen`
    (each arm's /proc status once confined). A relay that is not what its arm says, or
    that died, ends the run (BenchError)."""
    for rnd in range(a.rounds):
        order = ARMS if rnd % 2 == 0 else ARMS[::-1]
        print(f"[round {rnd + 1}/{a.rounds}] {' then '.join(order)}", file=sys.stderr)
        rounds.append({arm: {} for arm in ARMS})
        with relay(order[0], a.mtu, a.verbose) as first, \
                relay(order[1], a.mtu, a.verbose) as second:
            for arm in (first, second):
                seen.setdefault(arm.name, arm.status)
            for wname, measure in workloads(opts, a.syscalls, a.workloads):
                for arm in (first, second):
                    t0 = time.monotonic()
                    try:
                        got = measure(arm)
                    except BenchError as exc:
                        failures.append(f"round {rnd + 1} {arm.name} {wname}: {exc}")
                        print(f"    {arm.name:10} {wname}: failed: {exc}", file=sys.stderr)
                        got = {}
                    check_arm(arm.name, arm.relay)  # still alive, still as it was
                    rounds[-1][arm.name] |= got
                    if got:
                        shown = ", ".join(f"{k}={v:.4g}" for k, v in got.items())
                        print(f"    {arm.name:10} {wname} ({time.monotonic() - t0:.0f}s): "
                              f"{shown}", file=sys.stderr)


# --------------------------------------------------------------------------- reporting


def cost_pct(metric: Metric, ratio: float) -> float:
    """What confinement costs, in %, from a confine/no-confine ratio (positive: worse)."""
    return (1 - ratio) * 100 if metric.higher_is_better else (ratio - 1) * 100


def summarise(rounds: Rounds, metrics: tuple[Metric, ...]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for m in metrics:
        b = [r[ARMS[0]][m.key] for r in rounds if m.key in r[ARMS[0]]]
        c = [r[ARMS[1]][m.key] for r in rounds if m.key in r[ARMS[1]]]
        if not b or not c:
            continue
        # The two arms of one round ran seconds apart: their ratio is the paired sample.
        paired = [r[ARMS[1]][m.key] / r[ARMS[0]][m.key] for r in rounds
                  if r[ARMS[0]].get(m.key) and m.key in r[ARMS[1]]]
        row: dict[str, object] = {
            "label": m.label, "unit": m.unit, "higher_is_better": m.higher_is_better,
            ARMS[0]: b, ARMS[1]: c,
            "ratio_of_medians": statistics.median(c) / statistics.median(b),
            "paired_ratios": paired,
        }
        if paired:
            med = statistics.median(paired)
            costs = sorted(cost_pct(m, r) for r in paired)
            row |= {"paired_median": med, "cost_pct": cost_pct(m, med),
                    "cost_pct_range": [costs[0], costs[-1]],
                    "under_target": cost_pct(m, med) < TARGET_PCT}
        out[m.key] = row
    return out


def fmt(v: float) -> str:
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3g}"


def table(summary: dict[str, dict[str, object]]) -> list[str]:
    rows = [["figure", "unit", *(f"--{arm}" for arm in ARMS), "ratio of medians",
             "per-round ratio", "cost", f"< {TARGET_PCT:g} %"]]
    for row in summary.values():
        cells: list[str] = [str(row["label"]), str(row["unit"])]
        for arm in ARMS:
            v: list[float] = row[arm]  # type: ignore[assignment]
            cells.append(f"{fmt(statistics.median(v))} ({fmt(min(v))}-{fmt(max(v))})")
        cells.append(f"{row['ratio_of_medians']:.3f}")
        paired: list[float] = row["paired_ratios"]  # type: ignore[assignment]
        if paired:
            lo, hi = row["cost_pct_range"]  # type: ignore[misc]
            cells += [f"{row['paired_median']:.3f} ({min(paired):.3f}-{max(paired):.3f})",
                      f"{row['cost_pct']:+.1f} % ({lo:+.1f}..{hi:+.1f})",
                      "yes" if row["under_target"] else "NO"]
        else:
            cells += ["-", "-", "-"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def git_head() -> str:
    res = subprocess.run(["git", "-C", str(REPO_SRC.parent), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, check=False)
    return res.stdout.strip() or "?"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Whole seconds: iperf3 reads -t as an integer (0.5 would be 0, its "forever").
    p.add_argument("--duration", type=int, default=3, help="seconds per measurement")
    p.add_argument("--rounds", type=int, default=4,
                   help="rounds, each measuring both arms (order swapped each round)")
    p.add_argument("--omit", type=int, default=0,
                   help="iperf3 warm-up seconds (not counted in the rate; the relay's CPU "
                   "per GiB then also holds the warm-up's)")
    p.add_argument("--mtu", type=int, default=65520)
    p.add_argument("--syscalls", action="store_true",
                   help="count the relay's system calls (perf stat) per GiB and connection")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of {','.join(WORKLOADS)}")
    p.add_argument("--json", type=Path, help="write every figure to this file")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    if a.duration < 1 or a.rounds < 1 or a.omit < 0:
        p.error("need --duration >= 1, --rounds >= 1, --omit >= 0")
    a.workloads = {w.strip() for w in a.workloads.split(",") if w.strip()}
    if not a.workloads or a.workloads - set(WORKLOADS):
        p.error(f"unknown workloads {sorted(a.workloads - set(WORKLOADS))}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("confinement.py must run as root: only a relay started as root drops to "
              "nobody (and namespaces need it)", file=sys.stderr)
        return 2
    require("iperf3", "nsenter", "ip", *(["perf"] if a.syscalls else []))
    if str(REPO_SRC) not in sys.path:
        sys.path.insert(0, str(REPO_SRC))
    from relaynat.netns.syscalls import isolate_network

    isolate_network()  # before any child: nothing below can reach the real network
    # The relay's host sockets leave TIME_WAIT entries toward the one CRR server; the
    # namespace is this run's own (tcp(7) tcp_tw_reuse, as tune_guest does in guests).
    tune_guest(os.getpid())
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, raise_interrupted)
    opts = WorkloadOptions(a.duration, a.omit, "0", 0, (), a.verbose)
    started, load0 = time.time(), os.getloadavg()
    rounds: Rounds = []
    failures: list[str] = []
    seen: dict[str, dict[str, str]] = {}
    try:
        run_rounds(a, opts, rounds, failures, seen)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}), cleaned up", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"\nconfinement bench FAILED: {exc}", file=sys.stderr)
        return 1
    load1 = os.getloadavg()
    summary = summarise(rounds, METRICS + (SYSCALL_METRICS if a.syscalls else ()))
    head = (f"relaynat --confine vs --no-confine: {a.rounds} rounds of {a.duration:g} s "
            f"per figure, MTU {a.mtu}, {os.cpu_count()} CPUs, kernel {platform.release()}, "
            f"src {git_head()}, load average {load0[0]:.2f} at the start and "
            f"{load1[0]:.2f} at the end; cost = what --confine loses (positive) or gains "
            f"(negative), from the median of the per-round ratios (its min..max)")
    lines = [head, "", *(f"--{arm}: relay {' '.join(f'{k} {v}' for k, v in st.items())}"
                         for arm, st in seen.items()), "", *table(summary)]
    if failures:
        lines += ["", "failed measurements (left out of the figures):",
                  *(f"  {f}" for f in failures)]
    print("\n".join(lines))
    if a.json is not None:
        a.json.write_text(json.dumps({
            "benchmark": "benches/confinement.py", "argv": sys.argv, "started": started,
            "finished": time.time(), "loadavg_start": load0, "loadavg_end": load1,
            "src": git_head(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "options": vars(a) | {"json": str(a.json), "workloads": sorted(a.workloads)},
            "relay_status": seen, "rounds": rounds, "failures": failures,
            "summary": summary, "table": lines}, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
