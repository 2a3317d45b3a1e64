#!/usr/bin/env python3
"""rootlesskit's own benchmark shape through `relaynat-slirp4netns` and the real
slirp4netns, in one run.

Usage (as root, from a checkout)::

    python benches/rootlesskit_bench.py [--duration 3] [--repeats 1]
                                        [--only relaynat,slirp4netns] [--json FILE]

The cases are rootlesskit's hack/benchmark-iperf3-net.sh and benchmark-iperf3-port.sh:

* net, MTU 65520 and 1500: `rootlesskit --net=slirp4netns --mtu=MTU
  --slirp4netns-binary=BINARY -- iperf3 -t N -c 10.0.2.2`, the child sending to an
  `iperf3 -s` on the parent's loopback (Gbit/s received);
* port: `rootlesskit --net=slirp4netns --mtu=65520 --port-driver=slirp4netns iperf3 -s`,
  `rootlessctl add-ports 127.0.0.1:PORT:5201/tcp`, then `iperf3 -t N -c 127.0.0.1 -p
  PORT` from the parent: the parent sends into the child through the binary's API-socket
  forward.

rootlesskit runs as `nobody` with a subordinate id range, as an unprivileged user runs
it. Every case runs in a network and mount namespace of its own (`unshare -n -m`):
/etc/subuid, /etc/subgid and a 0666 /dev/net/tun are bind mounts there, so nothing of
the machine changes and all traffic stays on that namespace's loopback. Each case is
bounded: iperf3 runs --duration seconds, and the whole case is killed after a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

from support.dropin_kit import (  # noqa: E402
    SCRATCH,
    SLIRP4NETNS_BINARY,
    SUBIDS_NOBODY,
    TUN_0666,
    relaynat_path,
)
from support.relaynat_cli import guest_python  # noqa: E402
from support.scenario import run_scenario  # noqa: E402

BINARIES = {"relaynat": "relaynat", "slirp4netns": "/usr/bin/slirp4netns"}
CASES = (("net", 65520), ("net", 1500), ("port", 65520))

_CASE = SCRATCH + TUN_0666 + SUBIDS_NOBODY + r"""
mkdir -m 777 "$dev/state" "$dev/sync"
ip link set lo up
""" + SLIRP4NETNS_BINARY + r"""
pids=
trap 'kill $pids 2>/dev/null || true; cleanup' EXIT
rk="setpriv --reuid=65534 --regid=65534 --clear-groups env HOME=/nonexistent rootlesskit
    --state-dir $dev/state/rk --net=slirp4netns --slirp4netns-binary=$s4n --mtu=$MTU"
cd /
if [ "$KIND" = net ]; then
    iperf3 -s -1 -B 127.0.0.1 >/dev/null &
    pids=$!
    sleep 0.3
    $rk -- iperf3 -J -t "$DURATION" -c 10.0.2.2
else
    $rk --port-driver=slirp4netns iperf3 -s >/dev/null &
    pids=$!
    for _ in $(seq 100); do [ -S "$dev/state/rk/api.sock" ] && break; sleep 0.1; done
    sleep 1
    ctl="setpriv --reuid=65534 --regid=65534 --clear-groups rootlessctl
        --socket=$dev/state/rk/api.sock"
    $ctl add-ports "127.0.0.1:$PORT:5201/tcp" >/dev/null
    iperf3 -J -t "$DURATION" -c 127.0.0.1 -p "$PORT"
fi
"""


def run_case(binary: str, kind: str, mtu: int, duration: int, port: int) -> float:
    """Gbit/s received in one case; raises RuntimeError with the reason."""
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "BINARY": BINARIES[binary],
           "RELAYNAT_PATH": relaynat_path(), "GUEST_PYTHON": guest_python(),
           "KIND": kind, "MTU": str(mtu), "DURATION": str(duration), "PORT": str(port)}
    done = run_scenario(_CASE, env=env, timeout=duration + 60)
    try:
        report = json.loads(done.stdout)
        bits = report["end"]["sum_received"]["bits_per_second"]
    except (ValueError, KeyError) as exc:
        raise RuntimeError(f"no iperf3 result ({exc}): {done.stderr.strip()[-300:]}") from None
    return float(bits) / 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--duration", type=int, default=3, help="iperf3 seconds per case")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--only", default=",".join(BINARIES))
    p.add_argument("--json", metavar="FILE", help="write the figures here too")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network and mount namespaces, subordinate ids)", file=sys.stderr)
        return 2
    chosen = [b for b in args.only.split(",") if b]
    unknown = [b for b in chosen if b not in BINARIES]
    if unknown:
        p.error(f"--only: unknown {', '.join(unknown)} (choose from {', '.join(BINARIES)})")
    figures: dict[str, dict[str, list[float]]] = {}
    failures: dict[str, dict[str, str]] = {}
    for repeat in range(args.repeats):
        for kind, mtu in CASES:
            case = f"{kind} mtu {mtu}"
            # Alternate which binary goes first, so neither always runs on a warmer machine.
            order = chosen if repeat % 2 == 0 else chosen[::-1]
            for binary in order:
                try:
                    gbps = run_case(binary, kind, mtu, args.duration, 15201)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    failures.setdefault(case, {})[binary] = str(exc)
                    continue
                figures.setdefault(case, {}).setdefault(binary, []).append(gbps)
    width = max(len(b) for b in chosen) + 2
    print(f"{'case (Gbit/s, median)':24}" + "".join(f"{b:>{width + 8}}" for b in chosen))
    for kind, mtu in CASES:
        case = f"{kind} mtu {mtu}"
        cells = []
        for binary in chosen:
            values = figures.get(case, {}).get(binary)
            cells.append(f"{statistics.median(values):{width + 8}.2f}" if values
                         else f"{'failed':>{width + 8}}")
        print(f"{case:24}" + "".join(cells))
    for case, reasons in failures.items():
        for binary, reason in reasons.items():
            print(f"failed: {case} {binary}: {reason}", file=sys.stderr)
    if args.json:
        document: dict[str, Any] = {"duration_s": args.duration, "repeats": args.repeats,
                                    "gbps": figures, "failed": failures,
                                    "load": os.getloadavg()}
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
