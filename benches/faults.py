#!/usr/bin/env python3
"""Large transfers both ways over a faulty wire, checked by sha256.

    sudo .venv/bin/python benches/faults.py [--size-mib 1024] [--spec SPEC ...]
        [--budget-s 900] [--relay-args ARGS ...] [--rounds N]

The long version of tests/integration/test_lossy_link.py, on its harness
(tests/support/lossy_harness.py): for each impairment SPEC (tests/support/netshim.py's
syntax, applied both ways), a fresh
`relaynat serve --socket` and a real guest kernel behind the shim download SIZE MiB
from a host HTTP peer and upload SIZE MiB to it; both hashes must match, and no
transfer may stall (no byte moved for 30 s) or exceed the budget. The defaults are the
issue's faults: 5% loss, reordering, duplication, corruption, and 50 ms delay with
jitter. Prints per fault the seconds and MiB/s each way; exit status 1 if any
transfer failed. Runs in a private network namespace.

Comparisons: each `--relay-args` (repeatable, e.g. "--tcp-ooo-budget 0" against "")
is a variant of the relay's options; per fault, the variants run in turn, `--rounds`
times, alternating, so drift on a shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "tests")]

from support.lossy_harness import (  # noqa: E402
    Payload,
    http_peer,
    make_payloads,
    serve_relay,
    transfer_both_ways,
)

from relaynat.netns.syscalls import isolate_network  # noqa: E402

_RECOVERY_COUNTERS = ("tcp_retransmits=", "tcp_rto_expiries=", "tcp_sack_resends=",
                      "tcp_loss_probes=", "tcp_rcvbuf_grown=", "drop_tcp_checksum=",
                      "tcp_ooo_segments=")

DEFAULT_SPECS = (
    "loss=0.05",
    "reorder=0.05,hold=3,hold_ms=5",
    "dup=0.05",
    "corrupt=0.05",
    "delay_ms=50,jitter_ms=10",
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--spec", action="append", help="impairment (repeatable); default: "
                   + " / ".join(DEFAULT_SPECS))
    p.add_argument("--budget-s", type=float, default=900.0,
                   help="time allowed per fault for both transfers")
    p.add_argument("--relay-args", action="append",
                   help="options for `relaynat serve` (repeatable: variants run in turn)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each variant per fault")
    args = p.parse_args()
    variants = args.relay_args or [""]
    if os.geteuid() != 0:
        print("needs root (network namespaces, TAP)", file=sys.stderr)
        return 2
    isolate_network()  # before any thread or child: nothing below leaves the machine
    failed = 0
    with tempfile.TemporaryDirectory(prefix="relaynat-faults-") as tmp:
        work = Path(tmp)
        (work / "files").mkdir()
        files = make_payloads(work / "files", (args.size_mib,))
        down, up = files[f"down-{args.size_mib}"], files[f"up-{args.size_mib}"]
        with http_peer(work / "files", work) as port:
            for spec in args.spec or DEFAULT_SPECS:
                for _ in range(args.rounds):
                    for variant in variants:
                        failed += not run_one(work, port, down, up, spec, variant, args)
    return 1 if failed else 0


def run_one(work: Path, port: int, down: Payload, up: Payload, spec: str, variant: str,
            args: argparse.Namespace) -> bool:
    """One fresh relay (with `variant`'s options) and guest, both transfers; printed."""
    run_dir = work / f"run-{len(os.listdir(work))}"
    run_dir.mkdir()
    log = io.StringIO()
    t0 = time.monotonic()
    ok = True
    try:
        with serve_relay(run_dir, shlex.split(variant)) as relay, redirect_stdout(log):
            transfer_both_ways(relay, port, run_dir, down, up, spec, dhcp=False,
                               budget_s=args.budget_s)
        outcome = "intact both ways"
    except AssertionError as exc:
        ok = False
        outcome = "FAILED: " + str(exc).splitlines()[0]
        print(str(exc)[-3000:], file=sys.stderr)
    lines = [line for line in log.getvalue().splitlines()
             if line.startswith(("download:", "upload:", "lossy link seed"))]
    # How the relay recovered: go-back-N rewinds against holes resent by SACK.
    lines += ["relay: " + ", ".join(part for part in line.split(": ", 1)[1].split(", ")
                                    if part.startswith(_RECOVERY_COUNTERS))
              for line in log.getvalue().splitlines() if line.startswith("relay counters:")]
    label = f" relay [{variant}]" if variant else ""
    print(f"[{spec}]{label} {args.size_mib} MiB each way: {outcome} "
          f"({time.monotonic() - t0:.1f} s)", flush=True)
    for line in lines:
        print("    " + line, flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
