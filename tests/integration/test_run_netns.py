"""`relaynat run --netns TARGET [-- CMD]`: serving a network namespace that exists already
(an `ip netns add` one, a process's), as `pasta PID` / `pasta --netns PATH` do.

The pytest process runs in a private network namespace (conftest.py); host servers
listen on its 127.0.0.1 and the guest reaches them through 10.0.2.2. The targets are
made here (`ip netns add` with a unique name, `unshare -n sleep`) and removed after.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import GUESTS
from support.dropin_kit import (
    NOBODY_NETNS,
    SCRATCH,
    TUN_0666,
    free_port,
    netns_sleeper,
    nobody_env,
)
from support.relaynat_cli import parse_stats

pytestmark = pytest.mark.integration

RELAYNAT = [sys.executable, "-m", "relaynat"]


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAYNAT, "run", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"rn-test-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process in a network namespace of its own (`unshare -n` executes `sleep`, so
    the PID is the sleep's)."""
    with netns_sleeper() as proc:
        yield proc


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _has_tap(nsenter: list[str], name: str = "tap0") -> bool:
    return subprocess.run([*nsenter, "ip", "link", "show", name],
                          capture_output=True).returncode == 0


def test_named_namespace_command_reaches_host_loopback_and_resolves(
        netns: str, start_peer, tmp_path: Path) -> None:
    (tmp_path / "page.txt").write_text("served from host loopback\n")
    port = start_peer("http", "--root", str(tmp_path))
    done = _run("--netns", netns, "--stats", "--dns-record", "web.test=10.0.2.2", "--",
                "sh", "-c", f"curl -sS --fail http://web.test:{port}/page.txt && "
                            "ip -br addr show tap0 && ip route && exit 7")
    assert done.returncode == 7, done.stderr  # the command's status is relaynat's
    assert "served from host loopback" in done.stdout
    assert "10.0.2.15/24" in done.stdout
    assert "default via 10.0.2.2 dev tap0" in done.stdout
    stats = parse_stats(done.stderr)
    assert stats["tcp_flows_opened"] >= 1
    assert stats["dns_static_answers"] >= 1  # web.test, through /etc/resolv.conf
    # Made by relaynat, gone with it; the namespace itself stays.
    assert not _has_tap(["ip", "netns", "exec", netns])
    assert os.path.exists(f"/run/netns/{netns}")


def test_command_status_and_signal_status(netns: str) -> None:
    assert _run("--netns", netns, "--", "sh", "-c", "exit 3").returncode == 3
    assert _run("--netns", netns, "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_proc_path_target_runs_the_command_in_that_namespace(
        sleeper: subprocess.Popen[bytes]) -> None:
    inode = os.stat(f"/proc/{sleeper.pid}/ns/net").st_ino
    done = _run("--netns", f"/proc/{sleeper.pid}/ns/net", "--", "sh", "-c",
                "stat -L -c %i /proc/self/ns/net")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == inode


def test_no_configure_leaves_the_tap_bare(netns: str) -> None:
    done = _run("--netns", netns, "--no-configure", "--", "ip", "-o", "-4", "addr", "show",
                "dev", "tap0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_pid_target_serves_forwards_and_control_then_ends_with_the_process(
        sleeper: subprocess.Popen[bytes], start_peer, tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("from the host\n")
    http_port = start_peer("http", "--root", str(tmp_path))
    host_port = free_port()
    ctl = os.path.join(tempfile.mkdtemp(prefix="relaynat-netns-"), "ctl.sock")
    nsenter = ["nsenter", "-t", str(sleeper.pid), "-n"]
    relay = subprocess.Popen(
        [*RELAYNAT, "run", "--netns", str(sleeper.pid), "--stats", "--control-socket", ctl,
         "-t", f"127.0.0.1/{host_port}:8080"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: os.path.exists(ctl) and _has_tap(nsenter), "the relay")
        # Outbound: the joined namespace reaches the host's loopback through 10.0.2.2.
        got = subprocess.run([*nsenter, "curl", "-sS", "--fail", "--max-time", "10",
                              f"http://10.0.2.2:{http_port}/f.txt"],
                             capture_output=True, text=True, timeout=30)
        assert got.stdout == "from the host\n", got.stderr
        # Inbound: -t forwards the host port to a server in the joined namespace.
        listening = tmp_path / "listening"
        server = subprocess.Popen([*nsenter, sys.executable, str(GUESTS / "tcp_upper_once.py"),
                                   str(listening)])
        _wait_for(listening.exists, "the server in the namespace")
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as c:
            c.sendall(b"forwarded")
            assert c.recv(100) == b"FORWARDED"
        server.wait(timeout=10)
        listed = subprocess.run([*RELAYNAT, "ctl", "--socket", ctl, "list"],
                                capture_output=True, text=True, timeout=30)
        assert f"127.0.0.1 port {host_port} -> guest port 8080" in listed.stdout, listed
        # The target's exit ends the relay (its pidfd becomes readable).
        sleeper.kill()
        killed = time.monotonic()
        _, err = relay.communicate(timeout=30)
        elapsed = time.monotonic() - killed
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    print(f"relaynat ended {elapsed * 1000:.0f} ms after the target process")
    assert relay.returncode == 0, err
    assert elapsed < 3, elapsed
    assert parse_stats(err)["tcp_flows_opened"] >= 1
    assert not os.path.exists(ctl)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_ends_a_commandless_relay_and_removes_its_tap(netns: str, signum: int) -> None:
    nsenter = ["ip", "netns", "exec", netns]
    relay = subprocess.Popen([*RELAYNAT, "run", "--netns", netns],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _has_tap(nsenter), "the TAP")
        relay.send_signal(signum)
        _, err = relay.communicate(timeout=15)
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert relay.returncode == 0, err
    assert not _has_tap(nsenter)


def test_existing_persistent_tap_is_used_and_kept(netns: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "ip", "tuntap", "add", "dev", "tapx",
                    "mode", "tap"], check=True)
    done = _run("--netns", netns, "--tap-name", "tapx", "--", "ip", "-br", "-4", "addr",
                "show", "dev", "tapx")
    assert done.returncode == 0, done.stderr
    assert "10.0.2.15/24" in done.stdout
    assert _has_tap(["ip", "netns", "exec", netns], "tapx")


def test_sandbox_denies_host_loopback_in_a_joined_namespace(netns: str, start_peer,
                                                            tmp_path: Path) -> None:
    (tmp_path / "f.txt").write_text("secret\n")
    port = start_peer("http", "--root", str(tmp_path))
    done = _run("--netns", netns, "--sandbox", "--stats", "--", "curl", "-sS",
                "--max-time", "5", f"http://10.0.2.2:{port}/f.txt")
    assert done.returncode != 0
    assert "secret" not in done.stdout
    assert parse_stats(done.stderr)["policy_denied"] >= 1


@pytest.mark.parametrize("target, message", [
    ("rn-no-such-namespace", "no network namespace named"),
    ("999999999", "no process 999999999"),
    ("/etc/hostname", "is not a namespace file"),
    ("/proc/self/ns/mnt", "is a mount namespace, not a network namespace"),
    ("/nonexistent/ns", "does not exist"),
    # The relay's own namespace (its host sockets' one): a TAP addressed there with a
    # default route via the gateway would take over the host's routes.
    ("/proc/self/ns/net", "relaynat's own network namespace"),
    (str(os.getpid()), "relaynat's own network namespace"),
])
def test_bad_targets_are_refused_at_start(target: str, message: str) -> None:
    before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    done = _run("--netns", target, "--", "true", timeout=30)
    assert done.returncode == 2
    assert message in done.stderr, done.stderr
    assert subprocess.run(["ip", "-o", "link"], capture_output=True,
                          text=True).stdout == before  # no TAP made here


def test_options_that_do_not_fit_are_refused(netns: str) -> None:
    done = _run("--no-configure", "--", "true", timeout=30)
    assert done.returncode == 2 and "--no-configure needs --netns" in done.stderr
    done = _run("--netns", netns, "--runas", "1:1", "--", "true", timeout=30)
    assert done.returncode == 2 and "--runas" in done.stderr


_UNPRIVILEGED = SCRATCH + TUN_0666 + NOBODY_NETNS + r"""
cd /
set +e
$as_nobody env PYTHONPATH="$RELAYNAT_PATH" "$GUEST_PYTHON" -m relaynat run --netns $target \
    --dns-record web.test=10.0.2.2 -- sh -c "id -u; curl -sS --fail http://web.test:$PORT/f.txt"
echo "command-status $?"
$as_nobody env PYTHONPATH="$RELAYNAT_PATH" "$GUEST_PYTHON" -m relaynat run --netns $target &
relay=$!
# Until the relay has configured the link (its default route), not merely made tap0:
# a connect before that meets a namespace with no route.
for _ in $(seq 100); do
    [ -n "$(nsenter -t $target -n ip -4 route show default dev tap0 2>/dev/null)" ] && break
    sleep 0.1
done
nsenter -t $target -U -n --preserve-credentials curl -sS --fail http://10.0.2.2:$PORT/f.txt
kill $target
wait $relay
echo "relay-status $?"
"""


def test_unprivileged_caller_joins_the_user_namespace_that_owns_the_target(
        start_peer, tmp_path: Path) -> None:
    """As `nobody`, against a network namespace a user namespace of nobody's owns (as
    rootlesskit's): the TAP is opened in a child that entered both, and the command runs
    as root of that user namespace."""
    tmp_path.chmod(0o755)
    (tmp_path / "f.txt").write_text("reached unprivileged\n")
    (tmp_path / "f.txt").chmod(0o644)
    port = start_peer("http", "--root", str(tmp_path))
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           _UNPRIVILEGED], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **nobody_env(), "PORT": str(port)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["0", "reached unprivileged", "command-status 0",
                                        "reached unprivileged", "relay-status 0"], (
        done.stdout + done.stderr)


def test_mtu_and_no_offload_apply_in_a_joined_namespace(netns: str) -> None:
    done = _run("--netns", netns, "-m", "1500", "--no-offload", "--stats", "--", "ip", "link",
                "show", "tap0")
    assert done.returncode == 0, done.stderr
    assert "mtu 1500" in done.stdout


def test_handover_of_a_joined_namespace_with_and_without_command(
        netns: str, sleeper: subprocess.Popen[bytes], start_peer, tmp_path: Path) -> None:
    """`relaynat ctl handover` moves the TAP of a joined namespace to a new relay: with
    CMD, the old process still exits with CMD's status; without, it exits at once and
    the new relay serves the namespace."""
    (tmp_path / "f.txt").write_text("still here\n")
    port = start_peer("http", "--root", str(tmp_path))
    url = f"http://10.0.2.2:{port}/f.txt"
    where = tempfile.mkdtemp(prefix="relaynat-netns-")
    for case, target, command in (
            ("cmd", netns, ["--", "sh", "-c", f"while [ ! -e {where}/cmd.go ]; do sleep 0.05; "
                                              f"done; curl -sS --fail {url}; exit 5"]),
            ("bare", str(sleeper.pid), [])):
        ctl, to = f"{where}/{case}.ctl", f"{where}/{case}.to"
        old = subprocess.Popen([*RELAYNAT, "run", "--netns", target, "--control-socket", ctl,
                                *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        new = subprocess.Popen([*RELAYNAT, "serve", "--receive-handover", to],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            _wait_for(lambda c=ctl, t=to: os.path.exists(c) and os.path.exists(t),
                      "both relays")
            handed = subprocess.run([*RELAYNAT, "ctl", "--socket", ctl, "handover", "--to", to],
                                    capture_output=True, text=True, timeout=30)
            assert handed.returncode == 0, handed.stderr
            if command:
                Path(f"{where}/cmd.go").touch()  # CMD's traffic now goes to the new relay
                out, err = old.communicate(timeout=30)
                assert old.returncode == 5, err
                assert out == "still here\n"
                new.communicate(timeout=15)  # ends with CMD
            else:
                _, err = old.communicate(timeout=15)
                assert old.returncode == 0, err
                got = subprocess.run(["nsenter", "-t", str(sleeper.pid), "-n", "curl", "-sS",
                                      "--fail", "--max-time", "10", url],
                                     capture_output=True, text=True, timeout=30)
                assert got.stdout == "still here\n", got.stderr
                new.send_signal(signal.SIGTERM)
                new.communicate(timeout=15)
            assert new.returncode == 0
        finally:
            for proc in (old, new):
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def test_an_interface_that_is_no_tap_is_refused_with_the_reason(netns: str) -> None:
    for command in (["--", "true"], []):
        done = _run("--netns", netns, "--tap-name", "lo", *command, timeout=30)
        assert done.returncode == 1
        assert "cannot make or open TAP 'lo' there" in done.stderr, done.stderr
        assert "not a TAP" in done.stderr
