"""`serve --unixgram` and confinement: a datagram guest is answered at the socket path
it sends from, which a confined relay (an empty root, nobody) cannot reach. So the
relay says so at start and runs unconfined by default, refuses an explicit --confine,
and a confined receiver refuses a unixgram handover while the old relay serves on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.faultkit import wait_until
from support.procfs import seccomp_mode, wait_confined

from relaynat.cli.options import CONFINE_BY_DEFAULT

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")
RELAYNAT = [sys.executable, "-m", "relaynat"]


def test_confine_with_unixgram_is_refused_and_says_why(tmp_path: Path) -> None:
    done = subprocess.run([*RELAYNAT, "serve", "--confine", "--unixgram",
                           str(tmp_path / "vm.dgram")],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done
    assert "--unixgram: a confined relay cannot answer its guest" in done.stderr
    assert "--no-confine" in done.stderr
    assert not (tmp_path / "vm.dgram").exists()


@pytest.mark.skipif(not CONFINE_BY_DEFAULT, reason="confinement is not the default")
def test_unixgram_by_default_runs_unconfined_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "vm.dgram"
    proc = subprocess.Popen([*RELAYNAT, "serve", "--unixgram", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(path.exists, 30, "the unixgram socket", proc)
        time.sleep(1)  # confinement, were it to come, comes right after the bind
        assert seccomp_mode(proc.pid) == "0"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "this relay is not confined" in err and "--unixgram" in err, err


def test_a_confined_receiver_refuses_a_unixgram_guest_and_the_old_relay_serves_on(
        tmp_path: Path) -> None:
    path, control, to = tmp_path / "vm.dgram", tmp_path / "ctl.sock", tmp_path / "b.handover"
    old = subprocess.Popen([*RELAYNAT, "serve", "--no-confine", "--unixgram", str(path),
                            "--control-socket", str(control)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    new = subprocess.Popen([*RELAYNAT, "serve", "--confine", "--receive-handover", str(to)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: control.exists() and to.exists(), 30, "both relays", old)
        wait_confined(new)
        done = subprocess.run([*RELAYNAT, "ctl", "-s", str(control), "handover", "--to",
                               str(to)], capture_output=True, text=True, timeout=60)
        assert done.returncode != 0, done
        assert "a confined relay cannot answer its guest" in done.stderr, done
        # The old relay still serves its guest's socket and its control socket.
        assert old.poll() is None
        stats = subprocess.run([*RELAYNAT, "ctl", "-s", str(control), "stats"],
                               capture_output=True, text=True, timeout=30)
        assert stats.returncode == 0, stats
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as guest:
            guest.sendto(b"\0" * 60, str(path))  # a frame the relay reads (and drops)
        assert new.poll() is None  # refusing an offer does not end the receiver
    finally:
        for proc in (old, new):
            proc.terminate()
            proc.communicate(timeout=30)
