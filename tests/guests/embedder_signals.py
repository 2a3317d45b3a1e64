"""An embedding program's signal handlers around `run_command`.

    python3 embedder_signals.py MODE [DIR]

Run as root in the test's network namespace (not as a guest): it creates namespace
guests itself. Modes:

- `keep`: installs loop handlers for SIGTERM and SIGHUP, awaits one
  `run_command(["true"])`, then signals itself with both: each handler must run.
- `concurrent`: the same around two `run_command`s at once.
- `forward`: no handlers of its own and SIGHUP ignored; `run_command(...,
  forward_signals=True)` of a command that exits 42 on SIGTERM, which this program
  sends itself once DIR/ready exists; then SIGTERM must be back to its default action
  and SIGHUP still ignored.
- `refuse`: a loop handler for SIGTERM, then `forward_signals=True` must be refused
  before any guest starts, and the handler must still run.

Prints one line per check passed and exits 0; a signal that kills it instead shows
as its exit status (-15 for SIGTERM).
"""

import asyncio
import os
import signal
import sys
from pathlib import Path

from relaynat import RelayConfig, run_command
from relaynat.netns.guest import NamespaceSetupError

SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def _handled_after(runs: int) -> None:
    loop = asyncio.get_running_loop()
    got = {signum: asyncio.Event() for signum in SIGNALS}
    for signum, event in got.items():
        loop.add_signal_handler(signum, event.set)
    codes = await asyncio.gather(*(run_command(RelayConfig(), ["true"])
                                   for _ in range(runs)))
    print("exit", *codes)
    for signum, event in got.items():
        os.kill(os.getpid(), signum)
        await asyncio.wait_for(event.wait(), 10)
        print("handled", signal.Signals(signum).name)


async def _forward(directory: Path) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ready = directory / "ready"
    command = ["sh", "-c", f"trap 'exit 42' TERM; touch {ready}; while :; do sleep 0.1; done"]
    run = asyncio.ensure_future(run_command(RelayConfig(), command, forward_signals=True))
    while not ready.exists():
        assert not run.done(), run.result()
        await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    print("exit", await asyncio.wait_for(run, 30))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, signal.getsignal(signal.SIGHUP)
    print("restored")


async def _refuse() -> None:
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, got.set)
    try:
        await run_command(RelayConfig(), ["true"], forward_signals=True)
    except NamespaceSetupError as exc:
        print("refused:", exc)
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(got.wait(), 10)
    print("handled SIGTERM")


def main() -> None:
    mode = sys.argv[1]
    if mode == "keep":
        asyncio.run(_handled_after(1))
    elif mode == "concurrent":
        asyncio.run(_handled_after(2))
    elif mode == "forward":
        asyncio.run(_forward(Path(sys.argv[2])))
    elif mode == "refuse":
        asyncio.run(_refuse())
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
