"""The suite's watch on the namespace it started in sees links and routes change.

tests/conftest.py fails any integration test after which `RootNetnsWatch.changes()` is
not empty; here the watch is pointed at a namespace this test makes, so the changes it
must see are made where they harm nothing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from support.root_netns import RootNetnsWatch


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a fresh network namespace, standing in for the machine's own."""
    proc = subprocess.Popen(["unshare", "-n", "sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _in(proc: subprocess.Popen[bytes], *cmd: str) -> None:
    subprocess.run(["nsenter", "-t", str(proc.pid), "-n", *cmd], check=True)


def test_watch_sees_a_new_link_and_a_default_route(
        stand_in: subprocess.Popen[bytes]) -> None:
    # unshare has to have entered the namespace before the baseline is taken.
    for _ in range(100):
        if subprocess.run(["nsenter", "-t", str(stand_in.pid), "-n", "true"]).returncode == 0:
            break
    watch = RootNetnsWatch(stand_in.pid)
    assert watch.changes() == []
    _in(stand_in, "ip", "tuntap", "add", "dev", "tap9", "mode", "tap")
    _in(stand_in, "ip", "addr", "add", "10.0.2.100/24", "dev", "tap9")
    _in(stand_in, "ip", "link", "set", "tap9", "up")
    _in(stand_in, "ip", "route", "add", "default", "via", "10.0.2.2", "dev", "tap9",
        "onlink")
    changes = watch.changes()
    assert "+ link tap9" in changes
    assert any(c.startswith("+ route tap9 00000000 0202000A") for c in changes), changes
    watch.accept()
    assert watch.changes() == []
    _in(stand_in, "ip", "link", "del", "tap9")
    assert "- link tap9" in watch.changes()
