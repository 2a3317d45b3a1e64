"""`relaynat-slirp4netns`: slirp4netns 1.2's command line and API socket, against
namespaces made here (`unshare -n sleep`), and compared with the real slirp4netns
(/usr/bin/slirp4netns) on the same API requests.

The pytest process runs in a private network namespace (conftest.py): host servers
listen on its 127.0.0.1, which the guest reaches through 10.0.2.2. These tests pass
rootlesskit's and podman's argv shapes by hand; the real rootlesskit and podman start it
in test_rootlesskit.py and test_podman.py.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.dropin_kit import (
    NOBODY_NETNS,
    SCRATCH,
    TUN_0666,
    free_port,
    greeting_through,
    netns_sleeper,
    nobody_env,
)
from support.procfs import status

pytestmark = pytest.mark.integration

SCRIPT = str(Path(sys.executable).parent / "relaynat-slirp4netns")
PY = sys.executable


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    with netns_sleeper() as proc:
        yield proc


class Slirp:
    """A slirp4netns-shaped process (ours or the real one), started with a ready pipe
    and an exit pipe; stopped by closing the exit pipe's writing end."""

    def __init__(self, binary: str, pid: int, api: str, *extra: str) -> None:
        ready_r, ready_w = os.pipe()
        self.exit_r, self.exit_w = os.pipe()
        self.proc = subprocess.Popen(
            [binary, "--configure", "--mtu", "65520", "--api-socket", api,
             "--ready-fd", str(ready_w), "--exit-fd", str(self.exit_r), *extra,
             str(pid), "tap0"], pass_fds=(ready_w, self.exit_r),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        os.close(ready_w)
        os.close(self.exit_r)
        try:
            readable, _, _ = select.select([ready_r], [], [], 20)
            self.ready = os.read(ready_r, 16) if readable else b""
        finally:
            os.close(ready_r)

    def stop(self) -> int:
        with_w = self.exit_w
        if with_w >= 0:
            os.close(with_w)
            self.exit_w = -1
        try:
            return self.proc.wait(timeout=15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            assert self.proc.stderr is not None
            self.proc.stderr.close()


def _api(path: str, request: bytes, half_close: bool = True) -> Any:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(request)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        data = b""
        for _ in range(64):  # bounded: an answer is one small object
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def _inside(pid: int, code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", "-t", str(pid), "-n", PY, "-c", code],
                          capture_output=True, text=True, timeout=timeout)


def _host_server(port: int, accepted: list[bytes]) -> threading.Thread:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(1)
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                return
            with conn:
                accepted.append(conn.recv(100))
                conn.sendall(b"from host loopback")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


_CONNECT = ("import socket,sys\n"
            "s=socket.create_connection(('10.0.2.2',{port}),timeout=5)\n"
            "s.sendall(b'hello');print(s.recv(100).decode())\n")


def _host_loopback_and_hostfwd(pid: int, api: str) -> None:
    """The guest in `pid`'s namespace reaches a server on host loopback through
    10.0.2.2, and a forward added through the API socket reaches a server inside."""
    port = free_port()
    accepted: list[bytes] = []
    server = _host_server(port, accepted)
    out = _inside(pid, _CONNECT.format(port=port))
    server.join(15)
    assert out.stdout.strip() == "from host loopback", out.stderr
    assert accepted == [b"hello"]

    # add_hostfwd reaches a server inside the namespace.
    inner = subprocess.Popen(
        ["nsenter", "-t", str(pid), "-n", PY, "-c",
         "import socket\nl=socket.create_server(('0.0.0.0',8080))\nprint('up',flush=True)\n"
         "l.settimeout(15)\nc,_=l.accept();c.sendall(b'from inside');c.close()\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert inner.stdout is not None and inner.stdout.readline().strip() == "up"
        host_port = free_port()
        reply = _api(api, json.dumps({"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": host_port,
            "guest_port": 8080}}).encode())
        assert set(reply) == {"return"} and set(reply["return"]) == {"id"}
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as c:
            c.settimeout(10)
            assert c.recv(100) == b"from inside"
        assert inner.wait(timeout=15) == 0
    finally:
        inner.kill()
        inner.wait()
        inner.stdout.close() if inner.stdout else None


def test_configure_ready_host_loopback_hostfwd_and_exit_fd(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    pid = sleeper.pid
    api = str(tmp_path / "api.sock")
    slirp = Slirp(SCRIPT, pid, api)
    try:
        assert slirp.ready == b"1"
        addr = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "-4", "-o", "addr",
                               "show", "tap0"], capture_output=True, text=True, check=True)
        assert "10.0.2.100/24" in addr.stdout
        assert "mtu 65520" in subprocess.run(
            ["nsenter", "-t", str(pid), "-n", "ip", "link", "show", "tap0"],
            capture_output=True, text=True, check=True).stdout
        route = subprocess.run(["nsenter", "-t", str(pid), "-n", "ip", "route", "show",
                                "default"], capture_output=True, text=True, check=True)
        assert "default via 10.0.2.2 dev tap0" in route.stdout

        _host_loopback_and_hostfwd(pid, api)
    finally:
        code = slirp.stop()
    assert code == 0  # the exit fd closing ended it
    assert not os.path.exists(api)


def test_disable_host_loopback_refuses_the_gateway(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    slirp = Slirp(SCRIPT, sleeper.pid, str(tmp_path / "api.sock"), "--disable-host-loopback")
    try:
        assert slirp.ready == b"1"
        port = free_port()
        accepted: list[bytes] = []
        server = _host_server(port, accepted)
        out = _inside(sleeper.pid, _CONNECT.format(port=port))
        assert out.returncode != 0
        assert "from host loopback" not in out.stdout
        server.join(15)
        assert accepted == []
    finally:
        assert slirp.stop() == 0


@pytest.mark.parametrize(("option", "says"), [
    (["--no-confine", "--enable-seccomp"], "not with --enable-sandbox or --enable-seccomp"),
    (["--disable-dns"], "always serves DNS"),
    (["--outbound-addr=10.1.2.3"], "--outbound-addr"),
    (["--macaddress=02:00:00:00:00:01"], "MAC"),
    (["--target-type=bess"], "bess"),
    (["--mtu", "65521"], "65520"),
    (["--cidr", "10.9.0.0/26"], "1 to 25"),
    (["--cidr", "0.0.0.0/0"], "1 to 25"),
    (["--netns-type=pid"], "not a PID"),
    (["--netns-type=path"], "notapid: "),
])
def test_unsupported_options_are_refused_at_start(option: list[str], says: str) -> None:
    done = subprocess.run([SCRIPT, *option, "notapid", "tap0"] if option[0].startswith(
        "--netns") else [SCRIPT, *option, "1", "tap0"], capture_output=True, text=True,
        timeout=30)
    assert done.returncode == 2
    assert says in done.stderr
    assert "--netns " not in done.stderr  # relaynat run's option, not this command's


def test_help_lists_no_refused_option() -> None:
    """rootlesskit reads --help to see what the binary supports (--enable-sandbox,
    --enable-seccomp, --disable-host-loopback): a refused option must not show, and
    the confinement options, which it and podman then pass, must."""
    out = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True,
                         timeout=30).stdout
    assert "--disable-host-loopback" in out and "--api-socket" in out
    assert "--enable-sandbox" in out and "--enable-seccomp" in out
    for refused in ("--disable-dns", "--outbound-addr", "--macaddress"):
        assert refused not in out


#: CAP_NET_BIND_SERVICE: what a confined relay started as root keeps for the API's
#: add_hostfwd (a port below net.ipv4.ip_unprivileged_port_start).
_BIND_SERVICE = 1 << 10


@pytest.mark.parametrize("flags", [["--enable-sandbox", "--enable-seccomp"],
                                   ["--enable-sandbox"], ["--enable-seccomp"],
                                   ["--no-confine"]],
                         ids=["both", "sandbox", "seccomp", "no-confine"])
def test_sandbox_and_seccomp_confine_the_relay(
        sleeper: subprocess.Popen[bytes], tmp_path: Path, flags: list[str]) -> None:
    """--enable-sandbox and --enable-seccomp (podman's and rootlesskit's flags; either
    or both: relaynat confines as one unit): once ready, the relay is nobody with a
    seccomp filter, no_new_privs, CAP_NET_BIND_SERVICE alone (for the API) and an
    empty root, and the guest still reaches host loopback and is reached through a
    forward the API adds; at the end the API socket's file is gone all the same (the
    janitor). --no-confine: none of it, the checks come out the other way."""
    api = str(tmp_path / "api.sock")
    slirp = Slirp(SCRIPT, sleeper.pid, api, *flags)
    try:
        assert slirp.ready == b"1"
        st = status(slirp.proc.pid)  # ready is written once confined
        root = os.listdir(f"/proc/{slirp.proc.pid}/root")
        if flags == ["--no-confine"]:
            assert st["Seccomp"] == "0" and st["Uid"].split()[0] == "0"
            assert int(st["CapEff"], 16) > _BIND_SERVICE and "etc" in root
        else:
            assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1"
            assert st["Uid"].split() == ["65534"] * 4, st["Uid"]
            assert int(st["CapEff"], 16) == _BIND_SERVICE, st["CapEff"]
            assert int(st["CapBnd"], 16) == _BIND_SERVICE, st["CapBnd"]
            assert root == []
        _host_loopback_and_hostfwd(sleeper.pid, api)
    finally:
        code = slirp.stop()
    assert code == 0
    assert not os.path.exists(api)


def test_cidr_moves_the_addresses(sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    slirp = Slirp(SCRIPT, sleeper.pid, str(tmp_path / "api.sock"), "--cidr", "10.9.0.0/25")
    try:
        assert slirp.ready == b"1"
        show = subprocess.run(["nsenter", "-t", str(sleeper.pid), "-n", "ip", "-4", "-o",
                               "addr", "show", "tap0"], capture_output=True, text=True)
        assert "10.9.0.100/25" in show.stdout
        route = subprocess.run(["nsenter", "-t", str(sleeper.pid), "-n", "ip", "route",
                                "show", "default"], capture_output=True, text=True)
        assert "default via 10.9.0.2" in route.stdout
    finally:
        assert slirp.stop() == 0


def _shape(value: Any) -> Any:
    """An answer with the values that may differ between two relays (ids, host ports
    chosen apart so the two do not collide) blanked, keys and the rest kept."""
    if isinstance(value, dict):
        return {k: "*" if k in ("id", "host_port") else _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


def _requests(port_a: int, port_b: int, first_id: int) -> list[bytes]:
    add = {"execute": "add_hostfwd"}
    return [json.dumps(r).encode() for r in [
        {**add, "arguments": {"proto": "tcp", "host_addr": "127.0.0.1", "host_port": port_a,
                              "guest_port": 80}},
        {**add, "arguments": {"proto": "udp", "host_port": port_b, "guest_port": 53}},
        {"execute": "list_hostfwd"},
        {**add, "arguments": {"proto": "sctp", "host_port": port_a + 1, "guest_port": 80}},
        {**add, "arguments": {"proto": "tcp", "host_port": 0, "guest_port": 80}},
        {**add, "arguments": {"proto": "tcp", "host_addr": "::1", "host_port": port_a + 1,
                              "guest_port": 80}},
        {**add, "arguments": {"proto": "tcp", "host_port": port_a + 1, "guest_addr": "x",
                              "guest_port": 80}},
        {**add, "arguments": {"proto": "tcp", "host_port": port_a + 1}},
        {"execute": "remove_hostfwd", "arguments": {"id": first_id}},
        {"execute": "remove_hostfwd", "arguments": {"id": 99999}},
        {"execute": "list_hostfwd"},
        {"execute": "no_such_command"},
        {"arguments": {}},
        [1, 2],
    ]] + [b"{not json"]


@pytest.mark.skipif(shutil.which("slirp4netns") is None, reason="no slirp4netns here")
def test_api_answers_match_the_real_slirp4netns(tmp_path: Path) -> None:
    answers: list[list[Any]] = []
    for binary in (shutil.which("slirp4netns") or "", SCRIPT):
        with netns_sleeper() as target:
            api = str(tmp_path / f"api-{len(answers)}.sock")
            slirp = Slirp(binary, target.pid, api)
            try:
                assert slirp.ready == b"1", binary
                first = _api(api, b'{"execute": "list_hostfwd"}')
                # slirp4netns 1.2 answers list_hostfwd without a "return" around it.
                assert first == {"entries": []}
                got = []
                first_id = None
                for i, request in enumerate(_requests(free_port(), free_port(), 0)):
                    if i == 8:  # remove the first forward, by the id it was given
                        request = json.dumps({"execute": "remove_hostfwd", "arguments": {
                            "id": first_id}}).encode()
                    got.append(_api(api, request))
                    if i == 0:
                        first_id = got[0]["return"]["id"]
                # A client that keeps its writing side open is answered as well (the
                # real one answers after one read): well within _api's 10 s timeout.
                started = time.monotonic()
                got.append(_api(api, b'{"execute": "list_hostfwd"}', half_close=False))
                assert time.monotonic() - started < 5, binary
                answers.append(got)
            finally:
                assert slirp.stop() == 0, binary
    real, ours = answers
    requests = [*_requests(1, 2, 0), b"list_hostfwd, writing side open"]
    for request, want, have in zip(requests, real, ours, strict=True):
        assert _shape(have) == _shape(want), request


_UNPRIVILEGED = SCRATCH + TUN_0666 + r"""
chmod 777 "$dev"
""" + NOBODY_NETNS + r"""
cd /
# exec: the background job is the relay itself, which SIGTERM then reaches.
s4n() {
    exec $as_nobody env PYTHONPATH="$RELAYNAT_PATH" "$GUEST_PYTHON" -m relaynat.cli.slirp4netns "$@"
}
wait_ready() {
    for _ in $(seq 200); do
        [ "$(cat "$1" 2>/dev/null)" = 1 ] && return 0
        sleep 0.05
    done
    echo "never ready" >&2; return 1
}
fetch() {
    nsenter -t $target -U -n --preserve-credentials curl -sS --fail --max-time 10 \
        http://10.0.2.2:$PORT/f.txt
}
# By PID, as rootlesskit passes it; stopped by SIGTERM.
s4n -c -m 65520 -r 3 $target tap0 3>"$dev/ready1" &
relay=$!
wait_ready "$dev/ready1"
fetch
kill -TERM $relay
set +e
wait $relay
echo "relay-status $?"
set -e
# By path, with the user namespace named (--netns-type=path --userns-path), confined
# as rootlesskit asks when --help names the flags.
s4n -c -r 3 --netns-type=path --userns-path=/proc/$target/ns/user --enable-sandbox \
    --enable-seccomp /proc/$target/ns/net tap0 3>"$dev/ready2" &
relay=$!
wait_ready "$dev/ready2"
echo "confined $(grep -E '^(Seccomp|NoNewPrivs):' /proc/$relay/status | tr -s '\t' ' ' \
    | tr '\n' ' ')root $(ls -A /proc/$relay/root | wc -l)"
fetch
kill $target
kill -TERM $relay
set +e
wait $relay
echo "relay-status $?"
"""


def test_unprivileged_as_rootlesskit_runs_it(start_peer, tmp_path: Path) -> None:
    """As `nobody`, against a network namespace a user namespace of nobody's owns: by
    PID, and by path with --userns-path and confined (--enable-sandbox
    --enable-seccomp: a user and mount namespace of its own with an empty root, the
    seccomp filter); the guest reaches host loopback."""
    tmp_path.chmod(0o755)
    (tmp_path / "f.txt").write_text("reached unprivileged\n")
    (tmp_path / "f.txt").chmod(0o644)
    port = start_peer("http", "--root", str(tmp_path))
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           _UNPRIVILEGED], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **nobody_env(), "PORT": str(port)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == ["reached unprivileged", "relay-status 0",
                                        "confined NoNewPrivs: 1 Seccomp: 2 root 0",
                                        "reached unprivileged", "relay-status 0"], (
        done.stdout + done.stderr)


def test_enable_ipv6_reaches_host_loopback_through_fd00_2(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    slirp = Slirp(SCRIPT, sleeper.pid, str(tmp_path / "api.sock"), "--enable-ipv6")
    listener = socket.socket(socket.AF_INET6)
    try:
        assert slirp.ready == b"1"
        listener.bind(("::1", 0))
        listener.listen(1)
        listener.settimeout(10)
        assert greeting_through(["nsenter", "-t", str(sleeper.pid), "-n"], "fd00::2",
                                listener, b"from host ::1") == "from host ::1"
    finally:
        listener.close()
        assert slirp.stop() == 0


def test_ends_when_the_target_process_does(tmp_path: Path) -> None:
    with netns_sleeper() as target:
        slirp = Slirp(SCRIPT, target.pid, str(tmp_path / "api.sock"))
        assert slirp.ready == b"1"
    assert slirp.proc.wait(timeout=15) == 0  # the exit fd is still open
    slirp.stop()


def test_rootlesskit_shape_prepared_tap_without_configure(
        sleeper: subprocess.Popen[bytes], tmp_path: Path) -> None:
    """What rootlesskit 1.x's slirp4netns network driver does (pkg/network/slirp4netns):
    it checks `--help` names --netns-type (and --cidr, --disable-host-loopback,
    --api-socket), makes a persistent tap0 in the child's namespace and sets it up, runs
    `BINARY --mtu 65520 -r 3 [--cidr ...] --api-socket PATH PID tap0` (no -c) with the
    ready pipe as fd 3, and the child addresses tap0 itself."""
    helptext = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True,
                              timeout=30).stdout
    for feature in ("--netns-type", "--cidr", "--disable-host-loopback", "--api-socket"):
        assert feature in helptext
    ns = ["nsenter", "-t", str(sleeper.pid), "-n"]
    subprocess.run([*ns, "ip", "tuntap", "add", "tap0", "mode", "tap"], check=True)
    subprocess.run([*ns, "ip", "link", "set", "tap0", "up"], check=True)
    api = str(tmp_path / "api.sock")
    ready_r, ready_w = os.pipe()
    # bash, not sh: dash takes no descriptor above 9 in a redirection.
    proc = subprocess.Popen(
        ["bash", "-c", f'exec "$0" --mtu 65520 -r 3 --api-socket {api} {sleeper.pid} tap0 '
         f'3>&{ready_w}', SCRIPT], pass_fds=(ready_w,), stderr=subprocess.PIPE)
    os.close(ready_w)
    try:
        readable, _, _ = select.select([ready_r], [], [], 20)
        assert readable and os.read(ready_r, 16) == b"1"
        # No -c: the TAP is left as rootlesskit made it, unaddressed.
        assert "inet " not in subprocess.run([*ns, "ip", "-4", "addr", "show", "tap0"],
                                             capture_output=True, text=True).stdout
        for cmd in (["ip", "link", "set", "tap0", "mtu", "65520"],
                    ["ip", "addr", "add", "10.0.2.100/24", "dev", "tap0"],
                    ["ip", "route", "add", "default", "via", "10.0.2.2", "dev", "tap0"]):
            subprocess.run([*ns, *cmd], check=True)
        port = free_port()
        accepted: list[bytes] = []
        server = _host_server(port, accepted)
        out = _inside(sleeper.pid, _CONNECT.format(port=port))
        server.join(15)
        assert out.stdout.strip() == "from host loopback", out.stderr
        reply = _api(api, json.dumps({"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": free_port(),
            "guest_addr": "10.0.2.100", "guest_port": 80}}).encode())
        assert set(reply["return"]) == {"id"}
    finally:
        os.close(ready_r)
        proc.terminate()
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        proc.stderr.close()
    # The TAP rootlesskit made stays: it was there before.
    assert subprocess.run([*ns, "ip", "link", "show", "tap0"],
                          capture_output=True).returncode == 0


def test_podman_argv_and_port_request(tmp_path: Path) -> None:
    """podman 4.3's setupSlirp4netns argv for a namespace it bind-mounted (an `ip netns
    add` one here), with --enable-sandbox/--enable-seccomp left out as podman leaves
    them out when --help does not name them; and its add_hostfwd request as it sends it
    (empty guest_addr, a newline, then shutting down its writing side)."""
    name = f"s4n-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    api = str(tmp_path / "ctr.net")
    exit_r, exit_w = os.pipe()
    ready_r, ready_w = os.pipe()
    try:
        proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" --disable-host-loopback --mtu=65520 -c -e 3 -r 4 '
             f'--api-socket {api} --netns-type=path /run/netns/{name} tap0 '
             f'3<&{exit_r} 4>&{ready_w}', SCRIPT], pass_fds=(exit_r, ready_w),
            stderr=subprocess.PIPE)
        os.close(exit_r)
        os.close(ready_w)
        try:
            readable, _, _ = select.select([ready_r], [], [], 20)
            assert readable and os.read(ready_r, 16) == b"1"
            show = subprocess.run(["ip", "-n", name, "-4", "-o", "addr", "show", "tap0"],
                                  capture_output=True, text=True)
            assert "10.0.2.100/24" in show.stdout
            port = free_port()
            request = json.dumps({"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "0.0.0.0", "host_port": port,
                "guest_addr": "", "guest_port": 80}}).encode() + b"\n"
            reply = _api(api, request)
            assert "error" not in reply and set(reply["return"]) == {"id"}
            listing = _api(api, b'{"execute":"list_hostfwd"}')
            assert listing["entries"][0]["guest_addr"] == "10.0.2.100"
            assert listing["entries"][0]["host_port"] == port
        finally:
            os.close(exit_w)  # conmon's end of the exit pipe going away
            code = proc.wait(timeout=15)
            assert proc.stderr is not None
            proc.stderr.close()
        assert code == 0
    finally:
        os.close(ready_r)
        subprocess.run(["ip", "netns", "del", name], check=False)
