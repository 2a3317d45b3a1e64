"""Calls that would reach past the confinement, made after `relaynat.confine()`: the
ioctl(2) requests and socket options a confined process may use are listed
(confinement/seccomp_filter.py's IOCTLS and SOCKOPTS), and these are not.

- With CAP_KILL kept (as `run --netns TARGET -- CMD` keeps it for its command),
  kill(2) of a process group, or of -1 (every process of the host), which is not
  made here: the group of a `sleep` of the test's own stands for it.
- A unix socket made after confinement, bound to an abstract name (one a host daemon
  expects would be squatted) or connected to one: none is needed after setup.
- TIOCSTI on the terminal the relay was started from types into the shell that
  started it (as root, when `run` is started from a root shell): a process may do so
  on its controlling terminal without any capability (dev.tty.legacy_tiocsti).
- With CAP_NET_ADMIN kept (as a relay with a control socket keeps it for TCP_REPAIR):
  SIOCSIFFLAGS on an AF_INET socket takes one of the host's interfaces down;
  IP_TRANSPARENT lets a socket bind to an address the host does not have (a spoofed
  source); SO_MARK marks its packets for the host's mark-based routing and firewall
  rules; IPT_SO_SET_REPLACE on any IPv4 socket replaces a firewall table.

Each runs in a fresh process that confines itself through the public API, then makes
the call: confined, the seccomp filter kills it (SIGSYS) and nothing happened; the
same process unconfined makes it and it takes effect (the firewall table's
replacement, given a malformed table, is answered by netfilter instead), which shows
the test sees the effect it checks for.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import tty
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confinement starts as root")

#: The process under test: argv[1] "1" to confine first, argv[2] the call to make.
PROBE = textwrap.dedent('''
    import fcntl, os, socket, struct, sys, termios
    from relaynat import confine

    confined, call = sys.argv[1] == "1", sys.argv[2]
    if confined:
        keep = {"tiocsti": [], "killgroup": ["CAP_KILL"]}.get(call, ["CAP_NET_ADMIN"])
        confine(keep=keep)
    print("ready", flush=True)
    if call == "tiocsti":
        # Typed into the controlling terminal (fd 0 is it), as if at its keyboard.
        for byte in b"typed\\n":
            fcntl.ioctl(0, termios.TIOCSTI, bytes([byte]))
    elif call == "ifdown":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), 0x8914, struct.pack("16sH14x", b"probe0", 0))
    elif call == "killgroup":
        os.kill(-int(sys.argv[3]), 15)  # the process group given, SIGTERM
    elif call == "abstract":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("\\0relaynat-test-squat-" + sys.argv[3])
            print(sock.getsockname()[1:].decode(), flush=True)
    elif call == "transparent":
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            sock.bind(("198.51.100.7", 0))  # no interface of the host has it
            print(sock.getsockname()[0], flush=True)
    elif call == "mark":
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 7)
            print(sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK), flush=True)
    elif call == "iptables":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:  # IPT_SO_SET_REPLACE with a struct ipt_replace of zeros
                sock.setsockopt(socket.SOL_IP, 64, bytes(96))
            except OSError as exc:
                print(exc.errno, flush=True)
    print("made", flush=True)
''')

SIGSYS = int(signal.SIGSYS)


def _probe(script: Path, confined: bool, call: str, prefix: tuple[str, ...] = (),
           args: tuple[str, ...] = (), **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, str(script), "1" if confined else "0",
                           call, *args], capture_output=True, text=True, timeout=60,
                          **kwargs)  # type: ignore[call-overload]


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "probe.py"
    path.write_text(PROBE)
    return path


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_a_confined_process_cannot_type_into_its_terminal(script: Path,
                                                          confined: bool) -> None:
    primary, secondary = os.openpty()
    tty.setraw(secondary)  # what is typed is readable at once, no line to end
    try:
        def controlling_terminal() -> None:
            os.setsid()  # a session without a terminal: opening one makes it its own
            os.close(os.open(os.ttyname(secondary), os.O_RDWR))

        done = _probe(script, confined, "tiocsti", stdin=secondary,
                      preexec_fn=controlling_terminal)
        typed = b""
        while select.select([secondary], [], [], 0.5)[0]:
            typed += os.read(secondary, 100)
    finally:
        os.close(primary)
        os.close(secondary)
    if confined:
        assert done.returncode == -SIGSYS, done
        assert done.stdout == "ready\n", done
        assert typed == b"", typed
    else:
        assert done.returncode == 0 and done.stdout == "ready\nmade\n", done
        assert typed == b"typed\n", typed


@pytest.fixture
def netns() -> Iterator[str]:
    """A namespace of the test's own with an interface `probe0` (a veth), up."""
    name = f"ioctl-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for argv in (["ip", "link", "add", "probe0", "type", "veth", "peer", "name", "probe1"],
                     ["ip", "link", "set", "probe0", "up"]):
            subprocess.run(["ip", "netns", "exec", name, *argv], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _is_up(netns: str) -> bool:
    out = subprocess.run(["ip", "netns", "exec", netns, "ip", "-o", "link", "show",
                          "probe0"], capture_output=True, text=True, check=True).stdout
    flags = out.split("<", 1)[1].split(">", 1)[0].split(",")
    return "UP" in flags


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_a_confined_process_keeping_net_admin_cannot_take_an_interface_down(
        script: Path, netns: str, confined: bool) -> None:
    assert _is_up(netns)
    done = _probe(script, confined, "ifdown", ("ip", "netns", "exec", netns))
    if confined:
        assert done.returncode == -SIGSYS, done
        assert done.stdout == "ready\n", done
        assert _is_up(netns)
    else:
        assert done.returncode == 0 and done.stdout == "ready\nmade\n", done
        assert not _is_up(netns)


#: What each socket option's call prints unconfined: its effect, or netfilter's answer
#: to a malformed table (EINVAL, or ENOPROTOOPT without the ip_tables module).
EFFECTS = {"transparent": {"198.51.100.7"}, "mark": {"7"}, "iptables": {"22", "92"}}


@pytest.mark.parametrize("call", sorted(EFFECTS))
@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_a_confined_process_keeping_net_admin_cannot_set_host_reaching_options(
        script: Path, netns: str, call: str, confined: bool) -> None:
    done = _probe(script, confined, call, ("ip", "netns", "exec", netns))
    if confined:
        assert done.returncode == -SIGSYS, done
        assert done.stdout == "ready\n", done
    else:
        assert done.returncode == 0, done
        ready, effect, made = done.stdout.splitlines()
        assert (ready, made) == ("ready", "made"), done
        assert effect in EFFECTS[call], done


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_a_confined_process_keeping_cap_kill_cannot_signal_a_process_group(
        script: Path, confined: bool) -> None:
    target = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        done = _probe(script, confined, "killgroup", args=(str(target.pid),))
        with contextlib.suppress(subprocess.TimeoutExpired):
            target.wait(timeout=2)
    finally:
        target.kill()
        target.wait()
    if confined:
        assert done.returncode == -SIGSYS, done
        assert done.stdout == "ready\n", done
        assert target.returncode == -signal.SIGKILL  # alive until the test ended it
    else:
        assert done.returncode == 0 and done.stdout == "ready\nmade\n", done
        assert target.returncode == -signal.SIGTERM


@pytest.mark.parametrize("confined", [True, False], ids=["confined", "not-confined"])
def test_a_confined_process_cannot_make_a_unix_socket(script: Path, confined: bool) -> None:
    tag = uuid.uuid4().hex[:8]
    done = _probe(script, confined, "abstract", args=(tag,))
    if confined:
        assert done.returncode == -SIGSYS, done
        assert done.stdout == "ready\n", done
    else:
        assert done.returncode == 0, done
        assert done.stdout.splitlines() == ["ready", f"relaynat-test-squat-{tag}", "made"]
