"""Nothing of a namespace guest outlives it, and a terminal's job control still works.

Every process a command of `relaynat run` or `NamespaceGuest` starts is in the guest's
PID namespace, whatever it does to leave its parent: jobs in the background, daemons
that fork twice, processes in a session of their own. Each test records that namespace
(`/proc/PID/ns/pid` of the namespace's outer process's children) while the guest runs,
and once the guest has ended scans `/proc` for any process still in it.

The terminal tests run a real interactive bash on a pseudo-terminal whose controlling
terminal it is (`setsid --ctty`), either around `relaynat run` or as its command, and
press ^Z, ^C and ^\\ as a user would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.faultkit import wait_until

from relaynat import RelayConfig
from relaynat.netns.guest import NamespaceGuest
from relaynat.relay import Relay

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

RELAYNAT = [sys.executable, "-m", "relaynat", "run"]

#: The issue's command, and one whose daemon forks twice into a session of its own.
BACKGROUND_JOBS = "sleep 300 & sleep 300 & wait"
SETSID_DAEMON = ("sleep 300 & (setsid sh -c 'sleep 300 & exec sleep 300' &); "
                 "while :; do sleep 1; done")


def _stat(pid: int) -> tuple[str, int] | None:
    """The state letter and parent of process `pid`, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and (_stat(int(entry)) or ("", 0))[1] == pid]


def _pid_namespace(pid: int) -> str | None:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/{pid}/ns/pid")
    return None


def _in_namespace(namespace: str) -> dict[int, str]:
    """Every process of PID namespace `namespace`, by host pid, with its command line
    (empty for a zombie)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pid_namespace(int(entry)) == namespace:
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                found[int(entry)] = b" ".join(argv).decode(errors="replace").strip()
    return found


def _guest_namespace(outer: int) -> str | None:
    """The PID namespace of the guest whose outer process is `outer` (its init's),
    None until that init exists."""
    for child in _children(outer):
        namespace = _pid_namespace(child)
        if namespace is not None and namespace != _pid_namespace(outer):
            return namespace
    return None


def _relaynat_namespace(relaynat: int) -> str | None:
    """The guest PID namespace of the `relaynat run` process `relaynat`."""
    for outer in _children(relaynat):
        namespace = _guest_namespace(outer)
        if namespace is not None:
            return namespace
    return None


def _sleeps(namespace: str) -> list[int]:
    """The `sleep 300`s of the namespace."""
    return [pid for pid, argv in _in_namespace(namespace).items() if argv == "sleep 300"]


@pytest.fixture
def reaper() -> Iterator[list[str]]:
    """The namespaces a test records; whatever is left in them at its end is killed,
    so that a failing test leaves nothing behind either."""
    namespaces: list[str] = []
    yield namespaces
    for namespace in namespaces:
        for pid in _in_namespace(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _start_run(script: str) -> subprocess.Popen[str]:
    """`relaynat run -- sh -c SCRIPT` in a session of its own (no controlling terminal)."""
    return subprocess.Popen([*RELAYNAT, "--", "sh", "-c", script], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _namespace_once(find: Callable[[], str | None], proc: subprocess.Popen[Any]) -> str:
    found: list[str] = []

    def seen() -> bool:
        namespace = find()
        if namespace is not None:
            found.append(namespace)
        return bool(found)

    wait_until(seen, 30, "the guest's PID namespace", proc)
    return found[0]


@pytest.mark.parametrize(("script", "sleeps"), [(BACKGROUND_JOBS, 2), (SETSID_DAEMON, 3)],
                         ids=["background-jobs", "setsid-daemon"])
def test_sigterm_to_relaynat_run_leaves_no_process_of_the_guest(
        script: str, sleeps: int, reaper: list[str]) -> None:
    proc = _start_run(script)
    try:
        namespace = _namespace_once(lambda: _relaynat_namespace(proc.pid), proc)
        reaper.append(namespace)
        wait_until(lambda: len(_sleeps(namespace)) >= sleeps, 30, "the command's sleeps", proc)
        running = _in_namespace(namespace)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert _in_namespace(namespace) == {}, running
    assert all(_pid_namespace(pid) != namespace for pid in running)


async def _close_guest(script: str, stop_first: bool) -> tuple[str, dict[int, str],
                                                             dict[int, str], int | None]:
    """Spawn `sh -c SCRIPT`, wait for its sleeps, close it and wait for its outer
    process; its namespace, its processes before close and those left right after."""
    config = RelayConfig()
    guest = await NamespaceGuest.spawn(config, ["sh", "-c", script], stdin=subprocess.DEVNULL)
    try:
        async with Relay(config) as relay:
            relay.attach(guest.transport)
            guest.go()
            deadline = time.monotonic() + 30
            namespace = None
            while namespace is None or len(_sleeps(namespace)) < 3:
                assert time.monotonic() < deadline, "the command's sleeps did not start"
                await asyncio.sleep(0.02)
                namespace = namespace or _guest_namespace(guest.proc.pid)
            running = _in_namespace(namespace)
            if stop_first:  # as a terminal's ^Z would leave it
                guest.proc.send_signal(signal.SIGSTOP)
            guest.close()
            await asyncio.wait_for(guest.proc.wait(), 30)
            return namespace, running, _in_namespace(namespace), guest.proc.returncode
    finally:
        guest.close()


@pytest.mark.parametrize("stop_first", [False, True], ids=["running", "stopped"])
def test_close_ends_every_process_of_the_guest_before_its_process_exits(
        stop_first: bool, reaper: list[str]) -> None:
    namespace, running, left, returncode = asyncio.run(_close_guest(SETSID_DAEMON, stop_first))
    reaper.append(namespace)
    assert len(running) >= 5, running  # init, sh, three sleep 300s (and a sleep 1)
    assert left == {}, (running, left)
    assert returncode == -signal.SIGKILL


async def _release_then_close() -> tuple[str, dict[int, str], dict[int, str]]:
    config = RelayConfig()
    guest = await NamespaceGuest.spawn(config, ["sh", "-c", BACKGROUND_JOBS],
                                       stdin=subprocess.DEVNULL)
    async with Relay(config) as relay:
        relay.attach(guest.transport)
        guest.go()
        deadline = time.monotonic() + 30
        namespace = None
        while namespace is None or len(_sleeps(namespace)) < 2:
            assert time.monotonic() < deadline, "the command's sleeps did not start"
            await asyncio.sleep(0.02)
            namespace = namespace or _guest_namespace(guest.proc.pid)
        running = _in_namespace(namespace)
        guest.release()  # a handover gave it to another relay
        guest.close()
        assert await guest.wait() == 0
    await asyncio.sleep(0.5)
    after = _in_namespace(namespace)
    guest.proc.kill()  # this test's own cleanup: the namespace dies with its outer process
    await guest.proc.wait()
    return namespace, running, after


def test_close_leaves_a_released_guest_running(reaper: list[str]) -> None:
    namespace, running, after = asyncio.run(_release_then_close())
    reaper.append(namespace)
    assert after == running


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGQUIT], ids=["SIGINT", "SIGQUIT"])
def test_sigint_and_sigquit_from_a_process_are_passed_on(
        signum: int, guest_dir: Path, reaper: list[str]) -> None:
    ready = guest_dir / "ready"
    proc = _start_run(f"trap 'exit 46' INT QUIT; touch {ready}; while :; do sleep 0.1; done")
    try:
        namespace = _namespace_once(lambda: _relaynat_namespace(proc.pid), proc)
        reaper.append(namespace)
        wait_until(ready.exists, 30, "the command", proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 46, err
    assert _in_namespace(namespace) == {}


class _Terminal:
    """An interactive bash whose controlling terminal is a new pseudo-terminal."""

    def __init__(self, argv: list[str]) -> None:
        self._master, slave = os.openpty()
        env = {**os.environ, "TERM": "dumb", "PS1": "$ ", "HISTFILE": "/dev/null"}
        try:
            # Not a process group leader, so setsid makes the session without a fork:
            # `proc` is argv's own process.
            self.proc = subprocess.Popen(["setsid", "--ctty", *argv], stdin=slave,
                                         stdout=slave, stderr=slave, env=env)
        finally:
            os.close(slave)
        self.seen = ""
        self._unread = ""

    def send(self, text: str) -> None:
        os.write(self._master, text.encode())

    def expect(self, pattern: str, timeout_s: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while (match := re.search(pattern, self._unread)) is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._master], [], [], left)[0]:
                raise AssertionError(f"{pattern!r} not within {timeout_s} s: {self.seen!r}")
            try:
                data = os.read(self._master, 4096).decode(errors="replace")
            except OSError:  # EIO: every process holding the terminal is gone
                raise AssertionError(f"{pattern!r}: the terminal closed: {self.seen!r}") from None
            self.seen += data
            self._unread += data
        self._unread = self._unread[match.end():]
        return match

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self._master)


BASH = ["bash", "--norc", "--noprofile", "-i"]


@pytest.fixture
def terminal() -> Iterator[Callable[[list[str]], _Terminal]]:
    made: list[_Terminal] = []

    def make(argv: list[str]) -> _Terminal:
        made.append(_Terminal(argv))
        return made[-1]

    yield make
    for each in made:
        each.close()


def _only_child(pid: int, what: str) -> int:
    found: list[int] = []

    def one() -> bool:
        found[:] = _children(pid)
        return len(found) == 1

    wait_until(one, 30, what)
    return found[0]


def _state(pid: int) -> str:
    return (_stat(pid) or ("gone", 0))[0]


def test_relaynat_run_is_a_job_of_an_interactive_shell(
        terminal: Callable[[list[str]], _Terminal], reaper: list[str]) -> None:
    term = terminal(BASH)
    term.expect(r"\$ ")
    term.send(f"{' '.join(RELAYNAT)} -- sleep 300\n")
    relaynat = _only_child(term.proc.pid, "relaynat run")
    namespace = _namespace_once(lambda: _relaynat_namespace(relaynat), term.proc)
    reaper.append(namespace)
    wait_until(lambda: len(_sleeps(namespace)) == 1, 30, "the command", term.proc)
    [sleep] = _sleeps(namespace)
    term.send("\x1a")  # ^Z: the foreground job stops, the shell has the terminal again
    term.expect(r"Stopped")
    wait_until(lambda: _state(relaynat) == "T" and _state(sleep) == "T", 10, "stopped")
    term.send("fg\n")
    wait_until(lambda: _state(relaynat) in "SR" and _state(sleep) == "S", 10, "continued")
    term.send("\x03")  # ^C: the command ends of it and relaynat with its status
    term.expect(r"\$ ")
    term.send("echo status-$?\n")
    assert term.expect(r"status-(\d+)").group(1) == "130", term.seen
    assert "Traceback" not in term.seen
    assert _in_namespace(namespace) == {}


def test_a_command_that_handles_ctrl_c_and_ctrl_backslash_goes_on(
        terminal: Callable[[list[str]], _Terminal], reaper: list[str]) -> None:
    term = terminal(BASH)
    term.expect(r"\$ ")
    script = ("ulimit -c 0; trap 'echo caught-$((20+1))' INT; trap 'echo caught-$((20+3))' QUIT; "
              "trap 'exit 47' TERM; while :; do sleep 0.1; done")
    term.send(f"{' '.join(RELAYNAT)} -- sh -c \"{script}\"\n")
    relaynat = _only_child(term.proc.pid, "relaynat run")
    namespace = _namespace_once(lambda: _relaynat_namespace(relaynat), term.proc)
    reaper.append(namespace)
    wait_until(lambda: "sleep 0.1" in _in_namespace(namespace).values(), 30, "the command",
               term.proc)
    term.send("\x03")
    term.expect(r"caught-21")
    term.send("\x1c")
    term.expect(r"caught-23")
    time.sleep(0.5)
    assert _state(relaynat) in "SR", term.seen
    os.kill(relaynat, signal.SIGTERM)
    term.expect(r"\$ ")
    term.send("echo status-$?\n")
    assert term.expect(r"status-(\d+)").group(1) == "47", term.seen
    assert "Traceback" not in term.seen
    assert _in_namespace(namespace) == {}


def test_job_control_of_a_shell_run_as_the_command(
        terminal: Callable[[list[str]], _Terminal], reaper: list[str]) -> None:
    term = terminal([*RELAYNAT, "--", *BASH])
    relaynat = term.proc.pid
    namespace = _namespace_once(lambda: _relaynat_namespace(relaynat), term.proc)
    reaper.append(namespace)
    term.expect(r"\$ ")
    term.send("sleep 300\n")
    wait_until(lambda: len(_sleeps(namespace)) == 1, 30, "the job", term.proc)
    [sleep] = _sleeps(namespace)
    term.send("\x1a")  # ^Z: the job stops, the command's shell has the terminal again
    term.expect(r"Stopped")
    wait_until(lambda: _state(sleep) == "T", 10, "the job stopped")
    term.send("fg\n")
    wait_until(lambda: _state(sleep) == "S", 10, "the job continued")
    term.send("\x03")
    term.expect(r"\$ ")
    term.send("echo status-$?\n")
    assert term.expect(r"status-(\d+)").group(1) == "130", term.seen
    term.send("sleep 300 &\n")
    wait_until(lambda: len(_sleeps(namespace)) == 1, 30, "the background job", term.proc)
    term.send("exit 5\n")
    assert term.proc.wait(30) == 5, term.seen
    assert _in_namespace(namespace) == {}
