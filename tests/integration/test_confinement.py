"""A confined relay (relaynat.confinement, `--confine`): what /proc says of `serve`
started as root (ids, no_new_privs, seccomp, capabilities by feature, an empty root),
that ctl and a guest connection still work confined, and `--runas`. Each check is also
run with `--no-confine`, where it must come out the other way (the protection, not
the test, makes the difference).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import SUPPORT
from support.faultkit import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")
pytest_plugins = ["support.guest_fs"]

HOST_PEERS = str(SUPPORT / "host_peers.py")
NOBODY = 65534
#: CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12): what a control socket keeps.
CONTROL_CAPS = (1 << 10) | (1 << 12)
CAP_KILL = 1 << 5
FORBIDDEN = "RELAYNAT_TEST_FORBIDDEN_CALL_S"


def status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict."""
    with open(f"/proc/{pid}/status") as f:
        return {key: value.strip() for key, _, value in
                (line.partition(":") for line in f)}


def wait_confined(proc: subprocess.Popen[str], timeout_s: float = 30) -> dict[str, str]:
    """The relay's status once its seccomp filter is on."""
    wait_until(lambda: status(proc.pid).get("Seccomp") == "2", timeout_s,
               "the relay's seccomp filter", proc)
    return status(proc.pid)


def check_confined(proc: subprocess.Popen[str], caps: int) -> None:
    st = wait_confined(proc)
    assert st["Uid"].split() == [str(NOBODY)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(NOBODY)] * 4, st["Gid"]
    assert st["Groups"] == ""
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert int(st["CapEff"], 16) == caps, st["CapEff"]
    assert int(st["CapPrm"], 16) == caps, st["CapPrm"]
    assert int(st["CapBnd"], 16) == caps, st["CapBnd"]
    assert st["Threads"] == "1"
    assert os.listdir(f"/proc/{proc.pid}/root") == []


def check_unconfined(proc: subprocess.Popen[str]) -> None:
    """What the same relay shows with --no-confine: the checks above would fail."""
    time.sleep(1.5)
    st = status(proc.pid)
    assert st["Uid"].split()[0] == "0" and st["Seccomp"] == "0" and st["NoNewPrivs"] == "0"
    assert int(st["CapEff"], 16) > CONTROL_CAPS | CAP_KILL
    assert "etc" in os.listdir(f"/proc/{proc.pid}/root")


@pytest.mark.parametrize("confine", [True, False], ids=["confined", "no-confine"])
def test_serve_as_root_is_confined(tmp_path: Path, confine: bool) -> None:
    sock, ctl = tmp_path / "vm.sock", tmp_path / "ctl.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "serve", "--socket", str(sock),
         "--control-socket", str(ctl), "--confine" if confine else "--no-confine"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if confine:
            check_confined(proc, CONTROL_CAPS)
        else:
            check_unconfined(proc)
        # ctl still answers, and a guest can still connect to the stream socket.
        out = subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket", str(ctl),
                              "stats"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "tcp_flows_opened" in out.stdout, out
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as guest:
            guest.connect(str(sock))
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_serve_without_control_socket_keeps_no_capability(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "serve", "--confine", "--unixgram",
         str(tmp_path / "vm.dgram"), "--stats"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        check_confined(proc, 0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "unixgram" in err or "tcp_flows_opened" not in err  # stats printed on exit
    assert re.search(r"^\S+ +\d+$", err, re.M), err


def test_runas_names_the_user(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "serve", "--confine", "--runas", "daemon",
         "--socket", str(tmp_path / "vm.sock")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st = wait_confined(proc)
        assert st["Uid"].split()[0] == "1" and st["Gid"].split()[0] == "1", st
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def test_runas_root_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relaynat", "serve", "--confine", "--runas", "0:0",
         "--socket", str(tmp_path / "vm.sock")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--runas" in done.stderr, done
