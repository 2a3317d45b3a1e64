#!/usr/bin/env python3
"""The performance comparison: relaynat vs slirp4netns vs pasta (vs a newer pasta) vs a
plain veth pair, plus the qemu stream VM through relaynat vs passt, in one run.

Usage (as root, from a checkout)::

    python benches/run.py [--duration 5] [--repeats 3] [--out benches/results]
                          [--only relaynat,slirp4netns,pasta,veth,veth-dnat,loopback]
                          [--pasta-bin PATH]
                          [--workloads tcp1,tcp4,udp,latency,crr,fwd,idle,vm]

Prints a table (median, min-max over repeats, ratio to slirp4netns; for forwarded ports
also the ratio to a direct loopback connection), the targets of the performance issue
(met or missed), and writes every figure to OUT/results.json and a chart to
OUT/results.png. Each repeat brings every setup up once per MTU (order rotated each
repeat) and runs the workloads on it, in this order:

* MTU 65520 and 1500: iperf3 TCP one stream and four streams (-P 4), guest->host and
  host->guest (tcpN_<dir>_<mtu>, Gbit/s);
* MTU 65520 only: iperf3 UDP at a fixed offered rate (received Gbit/s and loss %);
  sockperf TCP ping-pong RTT p50/p99 (µs); connect-request-response rate (our client,
  benches/loadtools.py); 1,000 and 10,000 idle flows held open while the one-stream bulk
  transfer runs again both ways (ratio to the solo figure of the same live setup) and
  the relay process's RSS with them open (total MiB and bytes per flow);
* MTU 65520 only, workload fwd: a service in the guest reached from the host's loopback
  through the setup's port forwarding (relaynat -t, slirp4netns add_hostfwd, pasta -t),
  iperf3 one stream both ways and the connect rate; also measured on "loopback" (client
  and server on 127.0.0.1: the ceiling) and "veth-dnat" (a veth pair and a DNAT rule:
  the kernel's own path), two setups that run nothing else. The veth setup has no
  forwarding. With fwd selected, the MTU 65520 setups start with the forwards in place
  (a listening socket in each relay; slirp4netns also gets its API socket);
* once, outside the repeats: the TCG VM on qemu's stream socket through relaynat and
  through passt, 64 MiB each way (benches/vm.py).

A figure a setup cannot produce (a tool missing, a crash, a timeout, 10,000 flows beyond
its limits) is a "failed: reason" cell; the run goes on. A stall, a one-second interval
under --stall-gbps (or with zero connections for CRR), is counted per cell and listed.

Network rule: before anything else the script moves itself into a private network
namespace (relaynat.netns.syscalls.isolate_network); all servers listen there, guests are
namespaces it creates, and all children are killed by process group in finally blocks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import (
    REPO_SRC,
    STOP_SIGNALS,
    BenchError,
    Interrupted,
    raise_interrupted,
    tool_versions,
)
from setups import FWD_ONLY, NO_FORWARDS, SETUPS, SetupOptions
from workloads import (
    DIRS,
    FWD_DIRS,
    FWD_GUEST_PORTS,
    FWD_PORT_OFFSET,
    Context,
    FailedFigure,
    Figures,
    WorkloadOptions,
    crr_workload,
    fwd_workload,
    fwdcrr_workload,
    idle_workload,
    latency_workload,
    tcp_workload,
    udp_workload,
)

BASELINE = "slirp4netns"
CEILING = "loopback"  # forwarded-port figures are also given as a ratio to this setup
MAIN_MTU = 65520
DIR_LABEL = {"g2h": "guest->host", "h2g": "host->guest"}
ALL_WORKLOADS = ("tcp1", "tcp4", "udp", "latency", "crr", "fwd", "idle", "vm")
DEFAULT_SETUPS = "relaynat,slirp4netns,pasta,veth,veth-dnat,loopback"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool = True
    stall_unit: float = 0.0  # per-second intervals under this are stalls (0: no check)


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    intervals: list[list[float]] = field(default_factory=list)
    stalls: int = 0


@dataclass(frozen=True)
class Options:
    wopts: WorkloadOptions
    repeats: int
    setups: list[str]
    mtus: list[int]
    workloads: set[str]
    pasta_bin: str | None
    out: Path
    stall_gbps: float
    vm_mib: int
    from_json: Path | None


def metrics_for(opts: Options) -> list[Metric]:
    w, s = opts.workloads, opts.stall_gbps
    out: list[Metric] = []
    for mtu in opts.mtus:
        for streams in (1, 4):
            if f"tcp{streams}" in w:
                out += [Metric(f"tcp{streams}_{d}_{mtu}",
                               f"TCP {streams} stream{'s' if streams > 1 else ''} "
                               f"{DIR_LABEL[d]} MTU {mtu}", "Gbit/s", True, s) for d in DIRS]
    if MAIN_MTU not in opts.mtus:
        return out
    if "udp" in w:
        for d in DIRS:
            out += [Metric(f"udp_{d}_gbps", f"UDP {opts.wopts.udp_rate}bit/s offered "
                           f"{DIR_LABEL[d]} received", "Gbit/s", True, s),
                    Metric(f"udp_{d}_loss_pct", f"UDP {DIR_LABEL[d]} loss", "%", False)]
    if "latency" in w:
        out += [Metric("rr_p50_us", "TCP RR 64 B round trip p50", "µs", False),
                Metric("rr_p99_us", "TCP RR 64 B round trip p99", "µs", False)]
    if "crr" in w:
        out += [Metric("crr_per_s", "TCP connect+RR+close rate", "conn/s", True, 0.5),
                Metric("crr_p50_us", "TCP connect+RR+close p50", "µs", False)]
    if "fwd" in w:
        out += [Metric(f"fwd_{d}_gbps", f"Forwarded port TCP 1 stream {DIR_LABEL[d]}",
                       "Gbit/s", True, s) for d in FWD_DIRS]
        out += [Metric("fwdcrr_per_s", "Forwarded port connect+RR+close rate", "conn/s",
                       True, 0.5),
                Metric("fwdcrr_p50_us", "Forwarded port connect+RR+close p50", "µs", False)]
    if "idle" in w:
        for n in opts.wopts.idle_counts:
            for d in DIRS:
                out += [Metric(f"idle{n}_{d}_gbps", f"TCP 1 stream {DIR_LABEL[d]} with {n} "
                               "idle flows", "Gbit/s", True, s),
                        Metric(f"idle{n}_{d}_vs_solo", f"  ratio to solo ({n} idle flows)",
                               "x", True)]
            out += [Metric(f"rss_idle{n}_mib", f"relay RSS with {n} idle flows", "MiB", False),
                    Metric(f"bytes_per_flow_idle{n}", f"relay RSS growth per flow ({n})",
                           "B", False)]
    return out


Workload = Callable[[Any, WorkloadOptions, Context], Figures]


def workloads_for(mtu: int, opts: Options, setup: str) -> list[tuple[str, Workload]]:
    w = opts.workloads
    fwd: list[tuple[str, Workload]] = []
    if mtu == MAIN_MTU and "fwd" in w and setup not in NO_FORWARDS:
        fwd = [("fwd", fwd_workload), ("fwdcrr", fwdcrr_workload)]
    if setup in FWD_ONLY:
        return fwd
    plan: list[tuple[str, Workload]] = []
    for streams in (1, 4):
        if f"tcp{streams}" in w:
            plan.append((f"tcp{streams}", tcp_workload(streams, mtu)))
    if mtu == MAIN_MTU:
        plan += [(name, fn) for name, fn in (("udp", udp_workload),
                                             ("latency", latency_workload),
                                             ("crr", crr_workload)) if name in w]
        plan += fwd
        if "idle" in w:
            plan += [(f"idle{n}", idle_workload(n)) for n in opts.wopts.idle_counts]
    return plan


def forwards_for(mtu: int, opts: Options) -> tuple[tuple[int, int], ...]:
    """(host port, guest port) pairs a setup starts with: only where fwd will run."""
    if mtu != MAIN_MTU or "fwd" not in opts.workloads:
        return ()
    return tuple((FWD_PORT_OFFSET + port, port) for port in FWD_GUEST_PORTS)


def keys_of(workload: str, metrics: list[Metric]) -> list[str]:
    """The figures a workload owns (they all get its error if it fails as a whole)."""
    if workload.startswith("tcp"):
        prefix = workload + "_"
    elif workload == "latency":
        prefix = "rr_"
    elif workload.startswith("idle"):
        n = workload[4:]
        return [m.key for m in metrics
                if m.key.startswith(f"idle{n}_") or m.key.endswith(f"idle{n}_mib")
                or m.key.endswith(f"idle{n}")]
    else:
        prefix = workload + "_"
    return [m.key for m in metrics if m.key.startswith(prefix)]


def record(cells: dict[str, dict[str, Cell]], metric: Metric, setup: str,
           fig: Any) -> None:
    cell = cells[metric.key][setup]
    if isinstance(fig, FailedFigure):
        cell.errors.append(fig.reason)
        return
    cell.values.append(fig.value)
    if fig.intervals:
        cell.intervals.append(fig.intervals)
        if metric.stall_unit:
            cell.stalls += sum(v < metric.stall_unit for v in fig.intervals)


def run_setup(name: str, mtu: int, opts: Options, metrics: list[Metric],
              cells: dict[str, dict[str, Cell]], commands: dict[str, Any]) -> None:
    by_key = {m.key: m for m in metrics}
    plan = workloads_for(mtu, opts, name)
    done: set[str] = set()
    try:
        with SETUPS[name](SetupOptions(mtu, opts.pasta_bin, forwards_for(mtu, opts))) as guest:
            commands.setdefault(f"{name}@{mtu}", guest.relay_cmd)
            if guest.forwards is not None:
                commands.setdefault(f"{name}@{mtu} forwards", guest.forwards.how)
            ctx: Context = {}
            for wname, fn in plan:
                t0 = time.monotonic()
                try:
                    figures = fn(guest, opts.wopts, ctx)
                except BenchError as exc:
                    print(f"    {wname}: failed: {exc}", file=sys.stderr)
                    figures = {k: FailedFigure(str(exc)) for k in keys_of(wname, metrics)}
                for key, fig in figures.items():
                    if key in by_key:
                        record(cells, by_key[key], name, fig)
                    if not isinstance(fig, FailedFigure):
                        ctx[key] = fig.value
                done.add(wname)
                shown = ", ".join(
                    f"{k}={'failed' if isinstance(f, FailedFigure) else f'{f.value:.3g}'}"
                    for k, f in figures.items())
                print(f"    {wname} ({time.monotonic() - t0:.0f}s): {shown}", file=sys.stderr)
    except BenchError as exc:  # the setup itself failed (start or teardown)
        print(f"    setup failed: {exc}", file=sys.stderr)
        for wname, _ in plan:
            if wname not in done:
                for key in keys_of(wname, metrics):
                    cells[key][name].errors.append(f"setup: {exc}")


def run_all(opts: Options, metrics: list[Metric]) -> tuple[dict[str, dict[str, Cell]],
                                                         dict[str, Any]]:
    cells = {m.key: {s: Cell() for s in opts.setups} for m in metrics}
    commands: dict[str, Any] = {}
    for rep in range(opts.repeats):
        shift = rep % len(opts.setups)
        order = opts.setups[shift:] + opts.setups[:shift]
        for mtu in opts.mtus:
            for name in order:
                if not workloads_for(mtu, opts, name):
                    continue  # loopback and veth-dnat at MTU 1500, say
                print(f"[{rep + 1}/{opts.repeats}] {name} MTU {mtu}", file=sys.stderr)
                run_setup(name, mtu, opts, metrics, cells, commands)
    return cells, commands


def run_vm_part(opts: Options) -> dict[str, dict[str, Cell]]:
    import vm  # imports tests/support/vmguest.py; only needed for this part

    cells = {k: {r: Cell() for r in vm.RELAYS} for k in ("vm_g2h_gbps", "vm_h2g_gbps")}
    reason = vm.vm_unavailable()
    for rep in range(opts.repeats):
        for relay in list(vm.RELAYS)[rep % 2:] + list(vm.RELAYS)[:rep % 2]:
            print(f"[vm {rep + 1}/{opts.repeats}] {relay}", file=sys.stderr)
            try:
                if reason:
                    raise BenchError(reason)
                figures = vm.run_vm(relay, opts.vm_mib, 90.0, opts.wopts.verbose)
            except BenchError as exc:
                print(f"    failed: {exc}", file=sys.stderr)
                figures = {k: FailedFigure(str(exc)) for k in cells}
            for key, fig in figures.items():
                record(cells, Metric(key, key, "Gbit/s"), relay, fig)
                if not isinstance(fig, FailedFigure):
                    print(f"    {key}: {fig.value:.3f}", file=sys.stderr)
    return cells


# --------------------------------------------------------------------------- reporting


def summarise(cells: dict[str, dict[str, Cell]]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for key, setups in cells.items():
        out[key] = {}
        for setup, cell in setups.items():
            s: dict[str, Any] = {"samples": cell.values, "errors": cell.errors,
                                 "intervals": cell.intervals, "stalls": cell.stalls}
            if cell.values:
                s |= {"median": statistics.median(cell.values), "min": min(cell.values),
                      "max": max(cell.values)}
            out[key][setup] = s
        base = out[key].get(BASELINE, {}).get("median")
        ceiling = out[key].get(CEILING, {}).get("median")
        for s in out[key].values():
            if "median" in s and base:
                s["ratio_to_slirp4netns"] = s["median"] / base
            if "median" in s and ceiling:
                s["ratio_to_loopback"] = s["median"] / ceiling
    return out


def fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    a = abs(v)
    return f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}"


def cell_text(s: dict[str, Any], ratio: bool) -> str:
    if "median" not in s:
        if not s["errors"]:
            return "-"  # not applicable (no relay process for veth's RSS, say)
        # The short form; the full reason is in the failures list below the table.
        return f"failed: {s['errors'][-1].split(' (')[0]}"[:52]
    text = f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"
    if ratio and s.get("ratio_to_slirp4netns") is not None:
        text += f" {s['ratio_to_slirp4netns']:.2f}x"
    if ratio and s.get("ratio_to_loopback") is not None:
        text += f" lo {s['ratio_to_loopback']:.2f}"
    if s["errors"]:
        text += f" [{len(s['samples'])}/{len(s['samples']) + len(s['errors'])} ok]"
    if s["stalls"]:
        text += f" STALL{s['stalls']}"
    return text


def table(summary: dict[str, dict[str, dict[str, Any]]], metrics: list[Metric],
          setups: list[str]) -> list[str]:
    header = ["figure", "unit", *setups]
    rows = [header]
    for m in metrics:
        if m.key not in summary:
            continue
        ratio = m.unit != "x" and not m.key.startswith(("rss_", "bytes_per"))
        rows.append([m.label, m.unit,
                     *(cell_text(summary[m.key][s], ratio) for s in setups)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                     + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def med(summary: dict[str, Any], key: str, setup: str) -> float | None:
    value = summary.get(key, {}).get(setup, {}).get("median")
    return float(value) if value is not None else None


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for relaynat, evaluated on the medians (reported, not asserted)."""
    checks: list[tuple[str, float | None, str, float]] = []

    def ratio(key: str, other: str) -> float | None:
        a, b = med(summary, key, "relaynat"), med(summary, key, other)
        return a / b if a is not None and b else None

    for d in DIRS:
        checks.append((f"MTU 65520 1 stream {DIR_LABEL[d]} vs slirp4netns",
                       ratio(f"tcp1_{d}_65520", "slirp4netns"), ">=", 3.0))
        checks.append((f"MTU 65520 1 stream {DIR_LABEL[d]} vs veth",
                       ratio(f"tcp1_{d}_65520", "veth"), ">=", 0.75))
    for d in DIRS:
        checks.append((f"MTU 1500 1 stream {DIR_LABEL[d]} vs slirp4netns",
                       ratio(f"tcp1_{d}_1500", "slirp4netns"), ">=", 10.0))
    checks.append(("RR latency p50 vs pasta", ratio("rr_p50_us", "pasta"), "<=", 1.5))
    for d in FWD_DIRS:
        checks.append((f"forwarded port 1 stream {DIR_LABEL[d]} vs slirp4netns",
                       ratio(f"fwd_{d}_gbps", "slirp4netns"), ">=", 3.0))
        checks.append((f"forwarded port 1 stream {DIR_LABEL[d]} vs veth-dnat",
                       ratio(f"fwd_{d}_gbps", "veth-dnat"), ">=", 1.0))
    checks.append(("RSS with 10000 idle flows (MiB)",
                   med(summary, "rss_idle10000_mib", "relaynat"), "<", 100.0))
    for d in DIRS:
        checks.append((f"bulk {DIR_LABEL[d]} with 10000 idle flows vs solo",
                       med(summary, f"idle10000_{d}_vs_solo", "relaynat"), ">=", 0.9))
    out = []
    for what, value, op, limit in checks:
        met = None if value is None else (value >= limit if op == ">=" else
                                          value <= limit if op == "<=" else value < limit)
        out.append({"target": f"{what} {op} {limit:g}", "value": value, "met": met})
    stalls = {k: s["relaynat"]["stalls"] for k, s in summary.items()
              if s.get("relaynat", {}).get("stalls")}
    out.append({"target": "no stalled 1 s interval (relaynat)", "value": sum(stalls.values()),
                "met": not stalls, "where": stalls})
    return out


def chart(summary: dict[str, Any], vm_summary: dict[str, Any], metrics: list[Metric],
          setups: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; we only write a file
    import matplotlib.pyplot as plt

    vm_metrics = [Metric(k, k.replace("_gbps", ""), "Gbit/s") for k in vm_summary]
    groups = [
        (title, ms, summ, [n for n in names if any(
            "median" in summ.get(m.key, {}).get(n, {}) for m in ms)])
        for title, ms, summ, names in (
            ("Throughput (Gbit/s)", [m for m in metrics if m.unit == "Gbit/s"
                                     and not m.key.startswith("fwd")], summary, setups),
            ("Forwarded ports (Gbit/s)", [m for m in metrics if m.unit == "Gbit/s"
                                          and m.key.startswith("fwd")], summary, setups),
            ("Latency (µs, lower is better)", [m for m in metrics if m.unit == "µs"],
             summary, setups),
            ("Connect+request+response+close rate (conn/s)",
             [m for m in metrics if m.unit == "conn/s"], summary, setups),
            ("Relay RSS with idle flows (MiB)", [m for m in metrics if m.unit == "MiB"],
             summary, [s for s in setups if s != "veth"]),
            ("qemu stream VM under TCG (Gbit/s)", vm_metrics, vm_summary,
             ["relaynat", "passt"]),
        ) if ms
    ]
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 1, figsize=(14, 4.5 * len(groups)), squeeze=False)
    for ax, (title, ms, summ, names) in zip(axes[:, 0], groups, strict=True):
        ax.set_title(title)
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            meds, lo, hi = [], [], []
            for m in ms:
                s = summ.get(m.key, {}).get(name, {})
                v = s.get("median", 0.0)
                meds.append(v)
                lo.append(v - s.get("min", v))
                hi.append(s.get("max", v) - v)
            xs = [j + i * width for j in range(len(ms))]
            ax.bar(xs, meds, width, yerr=[lo, hi], label=name, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ms))])
        ax.set_xticklabels([m.label for m in ms], rotation=30, ha="right", fontsize=7)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured run")
    p.add_argument("--omit", type=int, default=1, help="iperf3 warm-up seconds discarded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default=DEFAULT_SETUPS,
                   help=f"comma-separated setups of {','.join(SETUPS)} (veth-dnat and "
                   "loopback only run the fwd workload)")
    p.add_argument("--pasta-bin", help="a newer pasta binary, measured as setup 'pasta-new'")
    p.add_argument("--mtus", default="65520,1500")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS))
    p.add_argument("--idle-flows", default="1000,10000")
    p.add_argument("--udp-rate", default="1G", help="iperf3 -b of the UDP workload")
    p.add_argument("--udp-len", type=int, default=1400)
    p.add_argument("--stall-gbps", type=float, default=0.01,
                   help="a 1 s interval below this counts as a stall (default 10 Mbit/s)")
    p.add_argument("--vm-mib", type=int, default=64, help="MiB each way through the VM")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="directory for results.json and results.png (git-ignored default)")
    p.add_argument("--py-spy", type=Path, metavar="DIR",
                   help="profile relaynat with py-spy during each workload into DIR")
    p.add_argument("--from-json", type=Path,
                   help="measure nothing: print and chart a results.json again into --out")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    setups = [s.strip() for s in a.only.split(",") if s.strip()]
    if a.pasta_bin and "pasta-new" not in setups:
        setups.append("pasta-new")
    workloads = {w.strip() for w in a.workloads.split(",") if w.strip()}
    bad = [s for s in setups if s not in SETUPS] + [w for w in workloads
                                                    if w not in ALL_WORKLOADS]
    if bad or not setups:
        p.error(f"unknown setup/workload {bad}")
    if a.duration <= 0 or a.repeats < 1 or a.omit < 0:
        p.error("need --duration > 0, --repeats >= 1, --omit >= 0")
    wopts = WorkloadOptions(a.duration, a.omit, a.udp_rate, a.udp_len,
                            tuple(int(n) for n in a.idle_flows.split(",") if n),
                            a.verbose, a.py_spy)
    opts = Options(wopts, a.repeats, setups, [int(m) for m in a.mtus.split(",")], workloads,
                   a.pasta_bin, a.out, a.stall_gbps, a.vm_mib, a.from_json)
    # A setup none of the chosen workloads runs on would be a column of "-" (veth-dnat
    # and loopback without fwd, veth with only fwd).
    kept = [s for s in setups if any(workloads_for(m, opts, s) for m in opts.mtus)]
    return dataclasses.replace(opts, setups=kept or setups)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.from_json is not None:  # re-render a finished run (table, targets, chart)
        report(json.loads(opts.from_json.read_text()), opts.out)
        return 0
    if os.geteuid() != 0:
        print("run.py must run as root (network namespaces, veth, TAP)", file=sys.stderr)
        return 2
    if str(REPO_SRC) not in sys.path:
        sys.path.insert(0, str(REPO_SRC))
    from relaynat.netns.syscalls import isolate_network

    isolate_network()  # before any thread or child: nothing below can reach the real network
    # Every relay and tool inherits the same descriptor limit; 10,000 flows need it.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, raise_interrupted)
    metrics = metrics_for(opts)
    started = time.time()
    try:
        cells, commands = run_all(opts, metrics)
        vm_cells = run_vm_part(opts) if "vm" in opts.workloads else {}
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"\ninterrupted ({exc or 'SIGINT'}), cleaned up", file=sys.stderr)
        return 130
    summary, vm_summary = summarise(cells), summarise(vm_cells)
    w = opts.wopts
    document = {
        "benchmark": "relaynat suite (benches/run.py)",
        "started": started,
        "finished": time.time(),
        "options": {"duration": w.duration, "omit": w.omit, "repeats": opts.repeats,
                    "setups": opts.setups, "mtus": opts.mtus,
                    "workloads": sorted(opts.workloads), "idle_flows": list(w.idle_counts),
                    "udp_rate": w.udp_rate, "udp_len": w.udp_len,
                    "stall_gbps": opts.stall_gbps, "vm_mib": opts.vm_mib,
                    "pasta_bin": opts.pasta_bin},
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "tools": tool_versions(opts.pasta_bin), "nofile": hard},
        "metrics": {m.key: {"label": m.label, "unit": m.unit,
                            "higher_is_better": m.higher_is_better} for m in metrics},
        "results": summary,
        "vm": vm_summary,
        "targets": targets(summary),
        "commands": commands,
    }
    report(document, opts.out)
    return 0


def report(document: dict[str, Any], out: Path) -> None:
    """Print the table and targets, write OUT/results.json and OUT/results.png."""
    o, summary, vm_summary = document["options"], document["results"], document["vm"]
    metrics = [Metric(k, m["label"], m["unit"], m["higher_is_better"])
               for k, m in document["metrics"].items()]
    lines = [f"relaynat benchmark suite: {o['duration']:g}s runs (+{o['omit']}s iperf3 "
             f"warm-up), {o['repeats']} repeats, {document['host']['cpus']} CPUs, kernel "
             f"{document['host']['kernel']}; median (min-max) and ratio to slirp4netns", "",
             *table(summary, metrics, o["setups"])]
    if vm_summary:
        vm_metrics = [Metric("vm_g2h_gbps", f"VM (TCG) guest->host {o['vm_mib']} MiB", "Gbit/s"),
                      Metric("vm_h2g_gbps", f"VM (TCG) host->guest {o['vm_mib']} MiB", "Gbit/s")]
        lines += ["", *table(vm_summary, vm_metrics, ["relaynat", "passt"])]
    lines += ["", "targets (relaynat, medians):"]
    for g in document["targets"]:
        state = {True: "met", False: "MISSED", None: "n/a"}[g["met"]]
        value = "-" if g["value"] is None else f"{g['value']:.3g}"
        lines.append(f"  [{state:6}] {g['target']}: {value}" +
                     (f" {g['where']}" if g.get("where") else ""))
    # One line per setup and reason, naming the figures it cost (a failed workload
    # fails all its figures, and each repeat may fail alike).
    reasons: dict[tuple[str, str], list[str]] = {}
    for k, ss in {**summary, **vm_summary}.items():
        for s, c in ss.items():
            for e in dict.fromkeys(c["errors"]):
                reasons.setdefault((s, e), []).append(k)
    failures = [f"  {s}: {e} ({', '.join(keys)})" for (s, e), keys in reasons.items()]
    if failures:
        lines += ["", "failures:", *failures]
    print("\n".join(lines))
    document["table"] = lines
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2) + "\n")
    try:
        chart(summary, vm_summary, metrics, o["setups"], out / "results.png")
    except ImportError as exc:  # matplotlib is the bench extra; the figures still count
        print(f"no chart: {exc}", file=sys.stderr)
    print(f"\nwrote {out / 'results.json'} and {out / 'results.png'}")


if __name__ == "__main__":
    sys.exit(main())
