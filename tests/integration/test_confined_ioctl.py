"""The ioctl(2) requests a confined process may make (confinement/seccomp_filter.py's
IOCTLS): two that would reach past the confinement, made after `relaynat.confine()`.

- TIOCSTI on the terminal the relay was started from types into the shell that
  started it (as root, when `run` is started from a root shell): a process may do so
  on its controlling terminal without any capability (dev.tty.legacy_tiocsti).
- SIOCSIFFLAGS on an AF_INET socket, with CAP_NET_ADMIN kept (as a relay with a
  control socket keeps it for TCP_REPAIR), takes one of the host's interfaces down.

Each runs in a fresh process that confines itself through the public API, then makes
the call: confined, the seccomp filter kills it (SIGSYS) and nothing happened; the
same process unconfined makes it and it takes effect, which shows the test sees the
effect it checks for.
"""

from __future__ import annotations

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
        confine(keep=["CAP_NET_ADMIN"] if call == "ifdown" else [])
    print("ready", flush=True)
    if call == "tiocsti":
        # Typed into the controlling terminal (fd 0 is it), as if at its keyboard.
        for byte in b"typed\\n":
            fcntl.ioctl(0, termios.TIOCSTI, bytes([byte]))
    elif call == "ifdown":
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            fcntl.ioctl(sock.fileno(), 0x8914, struct.pack("16sH14x", b"probe0", 0))
    print("made", flush=True)
''')

SIGSYS = int(signal.SIGSYS)


def _probe(script: Path, confined: bool, call: str, prefix: tuple[str, ...] = (),
           **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, str(script), "1" if confined else "0",
                           call], capture_output=True, text=True, timeout=60,
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
