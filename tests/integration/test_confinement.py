"""A confined relay (relaynat.confinement, `--confine`): what /proc says of it started as
root, that a namespace guest's downloads both ways, forwards added at runtime, ctl,
policy replacement and pcap work confined, and that the seccomp filter bites: a call
outside the list ends the relay, and the guest's open flow sees a clean end. Each
check is also run with `--no-confine`, where it must come out the other way (the
protection, not the test, makes the difference).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import SUPPORT
from support.faultkit import wait_until
from support.relaynat_cli import parse_stats

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


def _guest_script(guest_dir: Path, text: str) -> Path:
    path = guest_dir / "guest.sh"
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("confine", [True, False], ids=["confined", "no-confine"])
def test_run_confined_downloads_both_ways_forwards_ctl_policy_pcap(
        tmp_path: Path, guest_dir: Path, start_peer: Callable[..., int],
        big_file: tuple[Path, str], confine: bool) -> None:
    path, digest = big_file
    http = start_peer("http", "--root", str(path.parent))
    upload = hashlib.sha256(b"\0" * (24 << 20)).hexdigest()
    ctl, pcap = tmp_path / "ctl.sock", tmp_path / "guest.pcap"
    out = guest_dir
    script = _guest_script(guest_dir, f"""#!/bin/sh
curl -sf http://10.0.2.2:{http}/{path.name} | sha256sum > {out}/down
head -c {24 << 20} /dev/zero | curl -sf -T - http://10.0.2.2:{http}/up > {out}/up
socat TCP-LISTEN:8080,reuseaddr,fork SYSTEM:'echo served-by-guest' &
SERVER=$!
touch {out}/listening
while [ ! -e {out}/done ]; do sleep 0.1; done
curl -s -m 3 http://10.0.2.2:{http}/{path.name} -o /dev/null -w '%{{http_code}}' > {out}/denied
kill $SERVER
""")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host_port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--stats", "--control-socket", str(ctl),
         "--pcap", str(pcap), "--confine" if confine else "--no-confine", "--",
         str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if confine:
            check_confined(proc, CONTROL_CAPS | CAP_KILL)
        else:
            check_unconfined(proc)
        wait_until((out / "listening").exists, 60, "the guest's transfers", proc)
        assert (out / "down").read_text().split()[0] == digest
        assert (out / "up").read_text().strip() == upload

        def ctl_run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket",
                                   str(ctl), *args], capture_output=True, text=True,
                                  timeout=30)

        added = ctl_run("add", "tcp", f"127.0.0.1/{host_port}:8080")
        assert added.returncode == 0, added.stderr
        for _ in range(50):  # the guest's socat may still be starting
            with socket.create_connection(("127.0.0.1", host_port), timeout=10) as client:
                answer = client.makefile().read()
            if answer:
                break
            time.sleep(0.1)
        assert answer == "served-by-guest\n"
        policy = tmp_path / "deny.toml"
        policy.write_text('[[rule]]\naction = "deny"\nto = ["loopback"]\n')
        replaced = ctl_run("policy", "set", str(policy))
        assert replaced.returncode == 0, replaced.stderr
        (out / "done").touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (out / "denied").read_text() == "000"  # refused by the policy set through ctl
    stats = parse_stats(err)
    assert stats["tcp_flows_opened"] >= 2 and stats["tcp_inbound_opened"] >= 1, err
    assert pcap.stat().st_size > 24 << 20  # the capture holds the upload


class _OneClient:
    """A TCP server on 127.0.0.1 that accepts one client and records how its
    connection ended ("eof" or the error's name) and when."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.ended: tuple[str, float] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn:
            try:
                while conn.recv(65536):
                    pass
                self.ended = ("eof", time.monotonic())
            except OSError as exc:
                self.ended = (type(exc).__name__, time.monotonic())


@pytest.mark.parametrize("confine", [True, False], ids=["confined", "no-confine"])
def test_a_forbidden_call_ends_the_relay_and_its_flows_cleanly(guest_dir: Path,
                                                                 confine: bool) -> None:
    peer = _OneClient()
    marker = "317.25"  # a sleep of the guest's, found by its argument
    script = _guest_script(guest_dir, f"""#!/bin/sh
sleep {marker} | socat - TCP:10.0.2.2:{peer.port}
""")
    env = {**os.environ, FORBIDDEN: "2"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--confine" if confine else "--no-confine",
         "--", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        assert peer.accepted.wait(30), "the guest's flow did not open"
        if confine:
            assert proc.wait(timeout=20) == -signal.SIGSYS
            died = time.monotonic()
            # The host side of the open flow sees its end at once, not a hang...
            wait_until(lambda: peer.ended is not None, 10, "the host side's end")
            assert peer.ended is not None and peer.ended[1] - died < 5
            # ...and the guest is ended with its relay (nothing of it is left).
            wait_until(lambda: not _running(marker), 10, "the guest's end")
        else:
            time.sleep(4)  # two seconds past the forbidden call
            assert proc.poll() is None, "an unconfined relay makes the call and goes on"
            assert peer.ended is None
    finally:
        if proc.poll() is None:
            proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "making a call the seccomp filter forbids" in err


def _running(needle: str) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if needle.encode() in f.read():
                        return True
            except OSError:
                continue
    return False


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
