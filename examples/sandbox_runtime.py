#!/usr/bin/env python3
"""A sandbox runtime with relaynat in-process: several commands, each in a network
namespace of its own with its own relay and egress policy, all served by one event
loop, and every flow the relays open, deny or close written to an audit file.

    python3 examples/sandbox_runtime.py --sandboxes 3 --allow-host-port 8080 \\
        --audit audit.jsonl -- curl -sf http://10.0.2.2:8080/

Each sandbox's policy allows TCP to the host's loopback ports given with
`--allow-host-port` (through the gateway 10.0.2.2, which stands for the host's
loopback) and then applies the `--sandbox` profile: no cloud metadata, no link-local,
no private ranges, no other host loopback port. The command runs as `nobody` inside its
namespace, in /, holding no capability, so it cannot reconfigure its own network.

The audit file gets one JSON object a line for each event (`relaynat.event_dict`):
guest ready, flow opened, denied and closed, transport lost, with the sandbox's name.
At the end a summary line per sandbox goes to stderr, and the runtime exits with the
worst exit status of the commands.

Only relaynat's public API is used here (`mypy --strict` checks this file against the
installed package: tests/checks/test_examples_typed.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from collections import Counter
from typing import TextIO

from relaynat import (
    Event,
    FlowClosed,
    FlowDenied,
    FlowOpened,
    Guests,
    NamespaceGuest,
    Policy,
    RelayConfig,
    Rule,
    event_dict,
)


def sandbox_policy(config: RelayConfig, host_ports: list[int]) -> Policy:
    """The host's loopback ports the sandboxes may use, then the sandbox profile."""
    allow = [Rule("allow", "tcp", ("host",), ((port, port),), comment=f"host port {port}")
             for port in host_ports]
    profile = Policy.sandbox(config)
    return Policy([*allow, *profile.rules], profile.default, config)


class Audit:
    """Every event of every sandbox as a JSON line, and a tally per sandbox."""

    def __init__(self, out: TextIO | None) -> None:
        self.out = out
        self.tally: dict[str, Counter[str]] = {}

    def __call__(self, event: Event) -> None:
        # Runs inside the relay's data path (Guests.subscribe): a line into a buffered
        # file and a few counts, nothing that waits.
        if self.out is not None:
            self.out.write(json.dumps(event_dict(event)) + "\n")
        tally = self.tally.setdefault(event.guest or "", Counter())
        if isinstance(event, FlowOpened):
            tally["opened"] += 1
        elif isinstance(event, FlowDenied):
            tally["denied"] += 1
        elif isinstance(event, FlowClosed):
            tally["closed"] += 1
            tally["bytes_out"] += event.bytes_from_guest
            tally["bytes_in"] += event.bytes_to_guest


async def run_sandbox(guests: Guests, name: str, config: RelayConfig, policy: Policy,
                      command: list[str]) -> int:
    """One command in its own namespace, served by its own relay of `guests`."""
    guest = await NamespaceGuest.spawn(config, command, user="nobody", capabilities=[],
                                       stdin=subprocess.DEVNULL, cwd="/")
    relay = guests.add(name, config, policy)
    try:
        relay.attach(guest.transport)
        guest.go()  # the relay listens now: the command's first packet finds it
        return await guest.wait()
    finally:
        guest.close()
        guests.remove(name)  # its flows end, each one a FlowClosed in the audit


async def run(args: argparse.Namespace) -> int:
    # slirp's addressing (10.0.2.15 via 10.0.2.2, DNS 10.0.2.3), and flow maxima that let
    # many sandboxes share the process's descriptors (Guests warns when they cannot).
    config = RelayConfig(max_tcp_flows=1024, max_udp_flows=256, max_icmp_flows=16)
    policy = sandbox_policy(config, args.allow_host_port)
    out = open(args.audit, "w", encoding="utf-8") if args.audit else None  # noqa: SIM115
    audit = Audit(out)
    try:
        async with Guests() as guests:
            unsubscribe = guests.subscribe(audit)
            statuses = await asyncio.gather(*(
                run_sandbox(guests, f"sandbox-{i}", config, policy, args.command)
                for i in range(args.sandboxes)))
            unsubscribe()
    finally:
        if out is not None:
            out.close()
    for i, status in enumerate(statuses):
        tally = audit.tally.get(f"sandbox-{i}", Counter())
        print(f"sandbox-{i}: exit {status}, flows opened {tally['opened']}, "
              f"denied {tally['denied']}, closed {tally['closed']}, "
              f"bytes out {tally['bytes_out']} in {tally['bytes_in']}", file=sys.stderr)
    return max(statuses)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sandboxes", type=int, default=2, help="how many (default %(default)s)")
    p.add_argument("--allow-host-port", type=int, action="append", default=[],
                   metavar="PORT", help="a host loopback TCP port the sandboxes may use")
    p.add_argument("--audit", metavar="FILE", help="write every event here, JSON lines")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- the command each sandbox runs")
    args = p.parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command or args.sandboxes < 1:
        p.error("give at least one sandbox and a command after --")
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
