"""A `relaynat run` command ends with its relay however the relay dies: SIGKILL here
(test_confinement.py has its seccomp filter's SIGSYS). Neither `run -- CMD` (a namespace
of the command's own, whose outer process has END_SIGNAL as its parent-death signal)
nor `run --netns TARGET -- CMD` (the command is the relay's child itself) leaves the
command running with a link nobody serves, nor the relay's output pipes held open.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from support.dropin_kit import netns_sleeper
from support.faultkit import wait_until

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _sleeps(pid: int) -> list[int]:
    """The `sleep` processes below `pid`."""
    found = []
    for kid in _descendants(pid):
        try:
            with open(f"/proc/{kid}/comm") as f:
                if f.read().strip() == "sleep":
                    found.append(kid)
        except OSError:
            continue
    return found


@pytest.fixture
def target() -> Iterator[subprocess.Popen[bytes]]:
    with netns_sleeper() as proc:
        yield proc


@pytest.mark.parametrize("joined", [False, True], ids=["own-namespace", "netns"])
def test_the_command_ends_with_a_killed_relay(joined: bool,
                                              target: subprocess.Popen[bytes]) -> None:
    where = ["--netns", str(target.pid)] if joined else []
    proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", *where, "--",
                             "sleep", "300"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    guest: list[int] = []
    try:
        wait_until(lambda: bool(_sleeps(proc.pid)), 30, "the command's sleep", proc)
        guest += _descendants(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        killed = time.monotonic()
        wait_until(lambda: not any(_running(pid) for pid in guest), 5,
                   "the end of the command's processes")
        proc.communicate(timeout=5)  # nothing of the guest holds its pipes
        assert time.monotonic() - killed < 10
    finally:
        for pid in guest:  # whatever outlived the relay (it must not)
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)
