"""A confined relay (relaynat.confinement, `--confine`): what /proc says of `serve` and
`run` started as root (ids, no_new_privs, seccomp, capabilities by feature, an empty
root), that ctl, a guest connection, transfers both ways, forwards added and a policy
replaced at run time, pcap and stats still work confined, and `--runas`; a forbidden
call killing the relay (SIGSYS) with every flow and the guest ending rather than
hanging; pings answered through raw ICMP sockets opened before the privileges go.
Checks of the confinement itself are also run with `--no-confine`, where they must
come out the other way (the protection, not the test, makes the difference).

The host peers are this process's sockets and tests/support/host_peers.py on the
suite's private namespace's 127.0.0.1, which the guest reaches as 10.0.2.2.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import SUPPORT
from support.dropin_kit import netns_sleeper
from support.faultkit import wait_until
from support.procfs import status, wait_confined
from support.relaynat_cli import parse_stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")
pytest_plugins = ["support.guest_fs"]

HOST_PEERS = str(SUPPORT / "host_peers.py")
NOBODY = 65534
#: CAP_NET_BIND_SERVICE (10) and CAP_NET_ADMIN (12): what a control socket keeps.
CONTROL_CAPS = (1 << 10) | (1 << 12)
CAP_KILL = 1 << 5
FORBIDDEN = "RELAYNAT_TEST_FORBIDDEN_CALL_S"
TRACE = "RELAYNAT_CONFINE_TRACE"
#: socket(2) on x86_64, the forbidden call the hook makes (a netlink socket).
SYS_SOCKET = 41


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
    # --socket: a confined relay refuses --unixgram (test_confinement_unixgram.py).
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "serve", "--confine", "--socket",
         str(tmp_path / "vm.sock"), "--stats"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        check_confined(proc, 0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    stats = parse_stats(err)  # printed on exit
    assert stats["tcp_flows"] == 0 and "icmp_sockets" in stats, err
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


# --- relaynat run --confine: a guest command's traffic, ctl, pcap, stats -------------

MIB = 1 << 20
GUEST_PORT = 8080


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def http_peer(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """host_peers.py http on 127.0.0.1 (the guest's 10.0.2.2): GET /NAME serves
    ROOT/NAME, PUT answers the body's sha256. Its port and ROOT."""
    root = tmp_path / "www"
    root.mkdir()
    port_file = tmp_path / "http.port"
    proc = subprocess.Popen([sys.executable, HOST_PEERS, "http", "--root", str(root),
                             "--port-file", str(port_file)])
    try:
        wait_until(lambda: port_file.exists() and port_file.read_text().strip() != "", 30,
                   "the http peer's port", proc)
        yield int(port_file.read_text()), root
    finally:
        proc.kill()
        proc.wait()


def _ctl(ctl: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaynat", "ctl", "--socket", str(ctl),
                           *args], capture_output=True, text=True, timeout=30)


#: The guest of the transfers test: a download and an upload through the relay, then a
#: service for a forward added at run time, then a fetch after the policy changed.
TRANSFERS = """
set -u
D=$0 P=$1 G=$2
curl -sS --fail -o - http://10.0.2.2:$P/down | sha256sum > $D/down.sha
curl -sS --fail -T $D/up http://10.0.2.2:$P/up > $D/up.sha
socat TCP-LISTEN:$G,reuseaddr,fork SYSTEM:'echo forwarded-by-ctl' &
SERVICE=$!
sleep 0.5
touch $D/listening
while [ ! -e $D/policy-set ]; do sleep 0.1; done
curl -sS --max-time 10 -o /dev/null http://10.0.2.2:$P/down
echo $? > $D/after-policy
kill $SERVICE
"""


@pytest.mark.parametrize(("confine", "splice"), [(True, True), (True, False), (False, True)],
                         ids=["confined", "confined-no-splice", "no-confine"])
def test_run_confined_transfers_ctl_pcap_and_stats(
        tmp_path: Path, guest_dir: Path, http_peer: tuple[int, Path], confine: bool,
        splice: bool) -> None:
    """`relaynat run --confine --control-socket --pcap` as root: the relay's /proc status
    is confined with the control socket's capabilities alone (its command's namespace
    is the relay's own user outside: signalled without CAP_KILL), and
    it still carries 16 MiB each way intact, a forward added with ctl, a policy
    replaced with ctl (the forward spliced, or through the relay's own TCP with
    --no-splice); the pcap file is written and the counters printed on exit.
    With --no-confine the same traffic passes and the /proc checks come out the other
    way."""
    port, www = http_peer
    down = os.urandom(16 * MIB)
    (www / "down").write_bytes(down)
    (guest_dir / "up").write_bytes(os.urandom(16 * MIB))
    ctl, pcap = tmp_path / "ctl.sock", tmp_path / "guest.pcap"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--confine" if confine else "--no-confine",
         "--stats", "--control-socket", str(ctl), "--pcap", str(pcap),
         *([] if splice else ["--no-splice"]),
         "--", "sh", "-c", TRANSFERS, str(guest_dir), str(port), str(GUEST_PORT)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if confine:
            check_confined(proc, CONTROL_CAPS)
        else:
            check_unconfined(proc)
        wait_until((guest_dir / "listening").exists, 120, "the guest's transfers", proc)
        host_port = _free_port()
        added = _ctl(ctl, "add", "tcp", f"{host_port}:{GUEST_PORT}")
        assert added.returncode == 0, added
        with socket.create_connection(("127.0.0.1", host_port), timeout=30) as conn:
            assert conn.makefile().readline() == "forwarded-by-ctl\n"
        replaced = _ctl(ctl, "policy", "set", "sandbox")
        assert replaced.returncode == 0, replaced
        shown = _ctl(ctl, "--json", "policy", "show")
        assert json.loads(shown.stdout)["return"]["policy"] is not None, shown
        (guest_dir / "policy-set").touch()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (guest_dir / "down.sha").read_text().split()[0] == hashlib.sha256(down).hexdigest()
    assert (guest_dir / "up.sha").read_text().strip() == _sha256(guest_dir / "up")
    # The sandbox policy denies host loopback: the same fetch is refused now.
    assert (guest_dir / "after-policy").read_text().strip() != "0"
    assert pcap.stat().st_size > 32 * MIB  # both transfers captured
    stats = parse_stats(err)  # printed on exit
    assert stats["tcp_flows_opened"] == 2, err  # the download and the upload
    assert stats["tcp_bytes_to_guest"] > 16 * MIB and stats["tcp_bytes_from_guest"] > 16 * MIB
    # The forward added through ctl: spliced, or through the relay's TCP (--no-splice).
    assert stats.get("splice_opened" if splice else "tcp_inbound_opened", 0) == 1, err
    assert stats["policy_denied"] == 1, err  # the fetch after the policy was replaced


# --- a forbidden call: the filter kills the relay, and everything ends cleanly --------

#: The guest of the forbidden-call test: a TCP connection and a UDP flow to the host's
#: peers, each opened with a line and then held by a `sleep` that would outlast the test.
HOLDER = """
(echo tcp; exec sleep 300) | socat - TCP:10.0.2.2:$0 &
(echo udp; exec sleep 300) | socat - UDP:10.0.2.2:$1 &
wait
"""


class _TcpPeer:
    """A TCP server on 127.0.0.1 for one client: `greeted` once its first line came,
    then `ended` ("eof" or the error's name, and when) once its connection ends."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.greeted = threading.Event()
        self.ended: tuple[str, float] | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            try:
                while data := conn.recv(65536):
                    if b"tcp\n" in data:
                        self.greeted.set()
                self.ended = ("eof", time.monotonic())
            except OSError as exc:
                self.ended = (type(exc).__name__, time.monotonic())

    def close(self) -> None:
        self.listener.close()


def _children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc/PID/task/*/children."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task"):
            with contextlib.suppress(OSError), \
                    open(f"/proc/{parent}/task/{task}/children") as f:
                kids = [int(k) for k in f.read().split()]
            found += kids
            todo += kids
    return found


def _alive(pid: int) -> bool:
    """`pid` exists and is no zombie."""
    try:
        return status(pid).get("State", "").split()[0] != "Z"
    except OSError:
        return False


def _kernel_log_kill(pid: int) -> str | None:
    """The kernel log's seccomp record (audit type 1326) of `pid` for socket(2), the
    call the test hook makes, if any."""
    log_text = subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout
    for line in log_text.splitlines():
        if "type=1326" in line and f" pid={pid} " in line and f" syscall={SYS_SOCKET} " in line:
            return line
    return None


def _start_holder(delay: str, confine: bool,
                  trace: bool = False) -> tuple[subprocess.Popen[str], _TcpPeer, socket.socket]:
    tcp = _TcpPeer()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    env = {**os.environ, FORBIDDEN: delay}
    env.pop(TRACE, None)
    if trace:
        env[TRACE] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaynat", "run", "--confine" if confine else "--no-confine",
         "--", "sh", "-c", HOLDER, str(tcp.port), str(udp.getsockname()[1])],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    return proc, tcp, udp


def _flows_up(proc: subprocess.Popen[str], tcp: _TcpPeer,
              udp: socket.socket) -> tuple[str, int]:
    """Wait for the guest's two flows; the relay's UDP source address."""
    udp.settimeout(30)
    data, relay_addr = udp.recvfrom(100)
    assert data == b"udp\n"
    assert tcp.greeted.wait(30), "the guest's TCP connection never greeted"
    assert proc.poll() is None, "the relay died before the guest's flows were up"
    return str(relay_addr[0]), int(relay_addr[1])


def test_a_forbidden_call_kills_the_relay_and_everything_ends_cleanly() -> None:
    """A confined relay that makes a call outside its list (a netlink socket, here by
    the test hook) is killed by SIGSYS, logged by the kernel; then nothing hangs: the
    host peer of the guest's TCP connection sees it end, the UDP peer's next datagram
    is refused (the relay's socket is gone), the guest's processes end with the relay,
    and the relay's output pipes close."""
    # The call comes 6 s after confinement: the command's flows are up long before.
    proc, tcp, udp = _start_holder("6", confine=True)
    guest: list[int] = []
    try:
        wait_confined(proc)
        relay_addr = _flows_up(proc, tcp, udp)
        guest += _children(proc.pid)
        assert len(guest) >= 4, guest  # the namespace's processes, socat and sleep among them
        proc.wait(timeout=30)
        died = time.monotonic()
        assert proc.returncode == -signal.SIGSYS, proc.returncode
        record = _kernel_log_kill(proc.pid)
        assert record is not None and " sig=31 " in record, record
        assert f" syscall={SYS_SOCKET} " in record, record
        # The host side of the TCP connection ends: the kernel closed the relay's socket.
        wait_until(lambda: tcp.ended is not None, 5, "the host peer's connection end")
        assert tcp.ended is not None and tcp.ended[0] in ("eof", "ConnectionResetError")
        assert tcp.ended[1] - died < 5
        # The UDP flow's host socket is gone: the peer's next datagram is refused.
        udp.connect(relay_addr)
        udp.send(b"still there?")
        udp.settimeout(5)
        with pytest.raises(ConnectionRefusedError):
            udp.recv(100)
        # The guest's namespace ends with the relay: nothing of it runs on with a link
        # nobody serves, and the relay's stdout and stderr are closed by all.
        wait_until(lambda: not any(_alive(pid) for pid in guest), 5,
                   "the guest's processes' end")
        _, err = proc.communicate(timeout=5)
        assert FORBIDDEN in err
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in guest:  # whatever outlived the relay (it must not)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=10)
        tcp.close()
        udp.close()


def test_the_forbidden_call_hook_acts_only_on_a_confined_relay() -> None:
    """Unconfined (--no-confine), the hook makes no call: the relay outlives its delay
    and serves on, and ends with its command as usual."""
    proc, tcp, udp = _start_holder("1", confine=False)
    try:
        _flows_up(proc, tcp, udp)
        time.sleep(3)
        assert proc.poll() is None and tcp.ended is None
        assert status(proc.pid)["Seccomp"] == "0"
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        assert FORBIDDEN not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        tcp.close()
        udp.close()


def test_traced_the_forbidden_call_is_logged_and_the_relay_goes_on() -> None:
    """RELAYNAT_CONFINE_TRACE: the filter logs the call (sig=0) and lets it run; the
    relay is not killed (how the list is traced; not a confinement)."""
    proc, tcp, udp = _start_holder("1", confine=True, trace=True)
    try:
        wait_confined(proc)
        _flows_up(proc, tcp, udp)
        wait_until(lambda: _kernel_log_kill(proc.pid) is not None, 10,
                   "the kernel's record of the call", proc)
        record = _kernel_log_kill(proc.pid)
        assert record is not None and " sig=0 " in record and f" syscall={SYS_SOCKET} " in record
        assert proc.poll() is None and tcp.ended is None
        proc.terminate()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        tcp.close()
        udp.close()


# --- pings of a confined relay where ping sockets are refused -----------------------

#: In a namespace made for it (net.ipv4.ping_group_range as the kernel sets it, "1 0":
#: no group may open ping sockets), `relaynat run --confine` as root, whose command
#: waits for the relay's confinement to be looked at, then pings both gateways.
CONFINED_PING = ('ip link set lo up && cat /proc/sys/net/ipv4/ping_group_range && '
                 'exec "$0" -m relaynat run --confine --stats --log-level info -- sh -c '
                 '"sleep 1; ping -c 3 -i 0.2 -W 2 10.0.2.2; '
                 'ping -6 -c 3 -i 0.2 -W 2 fd00::2"')


def test_confined_pings_answered_with_the_default_ping_group_range() -> None:
    """Ping sockets are refused to nobody (the range is "1 0"), so a confined relay
    opens raw ICMP sockets while it still holds CAP_NET_RAW, before dropping every
    capability: the command's pings to 10.0.2.2 and fd00::2 (the gateways) are answered."""
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", CONFINED_PING, sys.executable],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        st = wait_confined(proc)  # `unshare` and `sh` exec'd: this pid is the relay
        assert st["Uid"].split()[0] == str(NOBODY) and int(st["CapEff"], 16) == 0
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert out.split("\n", 1)[0].split() == ["1", "0"], out  # the kernel's default
    assert proc.returncode == 0, out + err
    assert "confined: uid 65534" in err, err
    assert out.count("3 packets transmitted, 3 received") == 2, out + err
    stats = parse_stats(err)
    assert stats["icmp_raw_sockets_opened"] == 2  # one per family
    assert stats["icmp_echo_replies"] == 6 and "drop_icmp_not_permitted" not in stats


@pytest.mark.parametrize("joined", [False, True], ids=["own-namespace", "netns"])
def test_run_keeps_cap_kill_only_for_a_command_it_cannot_signal_otherwise(
        joined: bool) -> None:
    """`run -- CMD` drops every capability: its command's namespace is the relay's own
    user outside (nobody), which kill(2) lets it signal. `run --netns TARGET -- CMD`
    keeps CAP_KILL: the command has the ids of whoever started the relay (root). Either
    way a SIGTERM to the relay reaches the command, which ends, and the relay with it."""
    with netns_sleeper() as target:
        where = ["--netns", str(target.pid)] if joined else []
        proc = subprocess.Popen([sys.executable, "-m", "relaynat", "run", *where, "--",
                                 "sleep", "300"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            check_confined(proc, CAP_KILL if joined else 0)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, err
