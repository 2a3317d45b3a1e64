#!/usr/bin/env python3
"""Floods from a namespace guest beside a download: memory, tables, throughput kept.

    sudo .venv/bin/python benches/floods.py [--syns 100000] [--udp 10000] [--arp 20000]
        [--dhcp 20000] [--size-mib 1024]

The full-size version of tests/integration/test_floods.py, at the relay's default limits. Two
runs of `relaynat run`, each a guest downloading SIZE MiB over IPv6 from a host peer
on ::1 (sha256 checked): alone, then with tests/support/guest_flood.py's floods started just
after it (SYNs to distinct flows, a third left half-open at a host peer; UDP to
distinct destinations; ARP; DHCP). Printed: the relay's RSS at the start of the floods
and its peak (sampled every 0.1 s), its descriptors, the counters that show the
tables refusing (and, where the descriptor limit is below the sum of the flow maxima,
as on a machine whose hard `ulimit -n` is 20000, the flows refused for want of
descriptors), and the download's throughput beside the floods as a fraction of its
throughput alone (the issue asks for at least 50%). Exit status 1 if a hash differs
or the relay fails. Runs in a private network namespace; bounded by its counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests")]

from support.faultkit import MIB, HoldingPeer, LiveRun, fd_count, rss_kib  # noqa: E402
from support.guest_flood import flood_script  # noqa: E402
from support.lossy_harness import http_peer  # noqa: E402

from relaynat.netns.guest import command_ids, python_for_command  # noqa: E402
from relaynat.netns.syscalls import isolate_network  # noqa: E402

DEFAULT_MAX_TCP = 16384


def run_once(work: Path, http_port: int, open_port: int, counts: tuple[int, ...],
             digest: str, label: str) -> dict[str, object]:
    done = work / f"{label}-done"
    run = LiveRun(["sh", "-c", flood_script(http_port, open_port, done, counts, None,
                                            python_for_command())])
    samples: list[tuple[int, int]] = []
    start_rss = 0
    try:
        while run.proc.poll() is None:
            try:
                samples.append((rss_kib(run.pid), fd_count(run.pid)))
            except (OSError, RuntimeError):
                break
            if not start_rss and Path(f"{done}.start").exists():
                start_rss = samples[-1][0]
            time.sleep(0.1)
        status, stats = run.finish(timeout_s=600)
    finally:
        run.kill()
    lines = run.stdout.strip().splitlines()
    flood = next((json.loads(line) for line in lines if line.startswith("{")), None)
    speed, seconds = Path(f"{done}.speed").read_text().split()
    return {
        "status": status, "stats": stats, "flood": flood,
        "intact": bool(lines) and lines[-1].split()[0] == digest,
        "mib_per_s": float(speed) / MIB, "download_s": float(seconds),
        "rss_start_mib": start_rss / 1024, "rss_peak_mib": max(s[0] for s in samples) / 1024,
        "fds_peak": max(s[1] for s in samples),
        "tracebacks": run.stderr.count("Traceback"),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--syns", type=int, default=100_000)
    p.add_argument("--udp", type=int, default=10_000)
    p.add_argument("--arp", type=int, default=20_000)
    p.add_argument("--dhcp", type=int, default=20_000)
    p.add_argument("--size-mib", type=int, default=1024)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, TAP)", file=sys.stderr)
        return 2
    isolate_network()  # before any thread or child: nothing below leaves the machine
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the holder's connections
    counts = (args.syns, args.udp, args.arp, args.dhcp)
    with tempfile.TemporaryDirectory(prefix="relaynat-floods-") as tmp:
        work = Path(tmp)
        # The guest writes its results here as its unprivileged id outside (netns/guest.py).
        os.chown(work, *command_ids())
        (work / "www").mkdir()
        digest = hashlib.sha256()
        with open(work / "www" / "f.bin", "wb") as f:
            for _ in range(args.size_mib):
                chunk = os.urandom(MIB)
                digest.update(chunk)
                f.write(chunk)
        holder = HoldingPeer(DEFAULT_MAX_TCP + 2000)
        try:
            with http_peer(work / "www", work, bind="::1") as port:
                solo = run_once(work, port, holder.port, (0, 0, 0, 0), digest.hexdigest(),
                                "solo")
                flooded = run_once(work, port, holder.port, counts, digest.hexdigest(),
                                   "flood")
        finally:
            holder.close()
    stats = flooded["stats"]
    assert isinstance(stats, dict)
    shown = ("tcp_flows_opened", "tcp_syn_deferred", "tcp_syn_backlog_dropped",
             "tcp_syn_backlog_repeated", "tcp_refused_flow_limit", "tcp_refused_connect_limit",
             "tcp_connect_failed", "tcp_flows_closed_on_detach", "udp_flows_opened",
             "udp_drop_flow_limit", "tcp_refused_fd_limit", "udp_drop_fd_limit",
             "arp_replies", "dhcp_replies", "frames_in")
    ratio = float(flooded["mib_per_s"]) / float(solo["mib_per_s"])  # type: ignore[arg-type]
    print(f"floods: {json.dumps(flooded['flood'])}")
    print(f"download {args.size_mib} MiB alone: {solo['mib_per_s']:.0f} MiB/s, "
          f"intact={solo['intact']}, relay RSS peak {solo['rss_peak_mib']:.0f} MiB")
    print(f"download beside the floods: {flooded['mib_per_s']:.0f} MiB/s in "
          f"{flooded['download_s']:.1f} s, intact={flooded['intact']}")
    print(f"throughput ratio (floods / alone): {ratio:.2f} (issue target >= 0.50)")
    print(f"relay RSS: {flooded['rss_start_mib']:.0f} MiB as the floods began, peak "
          f"{flooded['rss_peak_mib']:.0f} MiB; descriptors peak {flooded['fds_peak']}")
    print("counters: " + ", ".join(f"{k}={stats.get(k, 0)}" for k in shown))
    ok = all(r["status"] == 0 and r["intact"] and not r["tracebacks"]
             for r in (solo, flooded))
    if not ok:
        print(f"FAILED: solo={solo} flooded={flooded}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
