#!/usr/bin/env python3
"""Single-stream iperf3 throughput of `relaynat serve --interface` over a veth pair.

Usage (as root)::

    python benches/interface_throughput.py [--duration 3] [--repeats 2]
        [--mtus 1500,65520] [--variants vnet,plain]

A guest namespace holds the far end of a veth pair (static 10.0.2.15/24, default route
via 10.0.2.2, both ends at the MTU); the relay serves the near end with the options of
each variant (`vnet`: PACKET_VNET_HDR, the default; `plain`: `--no-vnet-hdr`); the
iperf3 client in the guest dials 10.0.2.2, which the relay maps to the iperf3 server
on host 127.0.0.1. Variants alternate within each
repeat; the script prints the median (min-max) in Gbit/s per variant and direction, and
the slowest 0.1 s interval of any of its runs (bursts and stalls).

Network rule: the script first moves into a private network namespace
(`relaynat.netns.syscalls.isolate_network`), so nothing reaches beyond this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from relaynat.netns.syscalls import isolate_network

NS, NEAR, PORT = "rnbench", "rnbench0", 5301
VARIANTS = {"vnet": [], "plain": ["--no-vnet-hdr"]}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=20)


def setup(mtu: int) -> None:
    sh("ip", "netns", "add", NS)
    sh("ip", "link", "add", NEAR, "mtu", str(mtu), "type", "veth", "peer", "name", "eth0",
       "mtu", str(mtu), "netns", NS)
    sh("ip", "link", "set", NEAR, "addrgenmode", "none")
    sh("ip", "link", "set", NEAR, "up")
    for cmd in (["link", "set", "lo", "up"], ["link", "set", "eth0", "up"],
                ["addr", "add", "10.0.2.15/24", "dev", "eth0"],
                ["route", "add", "default", "via", "10.0.2.2"]):
        sh("ip", "-n", NS, *cmd)


def teardown() -> None:
    subprocess.run(["ip", "link", "del", NEAR], capture_output=True, timeout=10)
    subprocess.run(["ip", "netns", "del", NS], capture_output=True, timeout=10)


def one_run(extra: list[str], reverse: bool, duration: float) -> tuple[float, float]:
    """(Gbit/s over the run, Gbit/s of its slowest 0.1 s interval): the second shows
    bursts and stalls that the average hides."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    relay = subprocess.Popen([sys.executable, "-m", "relaynat", "serve", "--interface", NEAR,
                              *extra], env=env)
    server = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(PORT)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        args = ["ip", "netns", "exec", NS, "iperf3", "-c", "10.0.2.2", "-p", str(PORT),
                "-t", str(duration), "-i", "0.1", "-J"] + (["-R"] if reverse else [])
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 30)
        if done.returncode != 0:
            return float("nan"), float("nan")
        result = json.loads(done.stdout)
        # The first interval holds the connection's slow start: not a burst.
        slowest = min(i["sum"]["bits_per_second"] for i in result["intervals"][1:])
        return result["end"]["sum_received"]["bits_per_second"] / 1e9, slowest / 1e9
    finally:
        for proc in (server, relay):
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mtus", default="1500,65520")
    parser.add_argument("--variants", default="vnet,plain")
    opts = parser.parse_args()
    isolate_network()
    variants = opts.variants.split(",")
    for mtu in (int(m) for m in opts.mtus.split(",")):
        samples: dict[tuple[str, bool], list[tuple[float, float]]] = {}
        setup(mtu)
        try:
            for rep in range(opts.repeats):
                order = variants[rep % len(variants):] + variants[:rep % len(variants)]
                for name in order:
                    for reverse in (False, True):
                        samples.setdefault((name, reverse), []).append(
                            one_run(VARIANTS[name], reverse, opts.duration))
        finally:
            teardown()
        print(f"MTU {mtu}: Gbit/s, median (min-max) of {opts.repeats} x {opts.duration} s; "
              "[the slowest 0.1 s interval of any run]")
        for name in variants:
            cells = []
            for reverse in (False, True):
                xs = [gbits for gbits, _ in samples[(name, reverse)]]
                slowest = min(low for _, low in samples[(name, reverse)])
                cells.append(f"{'host->guest' if reverse else 'guest->host'} "
                             f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f}) "
                             f"[{slowest:.2f}]")
            print(f"  {name:13} " + "   ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
