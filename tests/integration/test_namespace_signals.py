"""Signals around namespace guests: `run_command` leaves the embedding program's
handlers alone unless asked to forward, and `relaynat run` forwards SIGTERM and
SIGHUP to its command.

The embedding program is a real process (tests/guests/embedder_signals.py) with its
own event loop, since signal handlers are process-wide: one run inside pytest's
process could not show what a SIGTERM does to it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import GUESTS
from support.faultkit import wait_until

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

EMBEDDER = str(GUESTS / "embedder_signals.py")


def _embedder(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, EMBEDDER, *args], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("mode", "runs"), [("keep", 1), ("concurrent", 2)])
def test_run_command_leaves_the_programs_signal_handlers(mode: str, runs: int) -> None:
    done = _embedder(mode)
    # Killed by its own SIGTERM (-15) when run_command had removed the handler.
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.splitlines() == [
        "exit" + " 0" * runs, "handled SIGTERM", "handled SIGHUP"], done.stderr


def test_forward_signals_passes_sigterm_on_and_restores_the_dispositions(
        guest_dir: Path) -> None:
    done = _embedder("forward", str(guest_dir))
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    assert done.stdout.splitlines() == ["exit 42", "restored"], done.stderr


def test_forward_signals_is_refused_where_the_program_handles_them() -> None:
    done = _embedder("refuse")
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
    refused, handled = done.stdout.splitlines()
    assert refused.startswith("refused: forward_signals: SIGTERM already has a handler"), refused
    assert handled == "handled SIGTERM"


def test_sighup_to_relaynat_run_reaches_the_command(guest_dir: Path) -> None:
    ready = guest_dir / "ready"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--", "sh", "-c",
         f"trap 'exit 43' HUP; touch {ready}; while :; do sleep 0.1; done"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(ready.exists, 30, "the command", proc)
        proc.send_signal(signal.SIGHUP)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 43, err
