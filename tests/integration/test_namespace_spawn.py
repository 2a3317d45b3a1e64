"""What `NamespaceGuest.spawn` and `run_command` pass through to the guest's command:
its standard streams, environment and working directory, the user it runs as and the
capabilities it may hold; and the values they refuse.

Each command is a real process in a real namespace guest, behind a `Relay` in this
process; it reports on itself (tests/guests/report_identity.py) through a pipe or a
file. The echo server it reaches is a real one on this namespace's 127.0.0.1, through
the relay's gateway address.
"""

from __future__ import annotations

import asyncio
import io
import json
import pwd
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import GUESTS
from support.relaynat_cli import guest_python

from relaynat import ConfigError, RelayConfig, run_command
from relaynat.errors import Error
from relaynat.netns.guest import NamespaceGuest, NamespaceSetupError
from relaynat.netns.syscalls import CAPABILITIES, last_capability
from relaynat.relay import Relay

pytestmark = pytest.mark.integration
pytest_plugins = ["support.guest_fs"]

GATEWAY = "10.0.2.2"
REPORT = str(GUESTS / "report_identity.py")
NO_CAPS = f"{0:016x}"


def _caps(*names: str) -> str:
    """A capability set as /proc/PID/status prints it."""
    return f"{sum(1 << CAPABILITIES[name] for name in names):016x}"


ALL_CAPS = f"{(1 << (last_capability() + 1)) - 1:016x}"


async def _spawned(command: list[str], stdin: bytes | None = None,
                   **options: Any) -> tuple[int, bytes]:
    """Run `command` with `options` behind a relay; its status and its stdout (a pipe)."""
    config = RelayConfig()
    guest = await NamespaceGuest.spawn(
        config, command, stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin is not None else None, **options)
    try:
        async with Relay(config) as relay:
            relay.attach(guest.transport)
            guest.go()
            if stdin is not None:
                assert guest.stdin is not None
                guest.stdin.write(stdin)
                await guest.stdin.drain()
                guest.stdin.close()
            assert guest.stdout is not None
            out = await asyncio.wait_for(guest.stdout.read(), 60)
            return await asyncio.wait_for(guest.wait(), 60), out
    finally:
        guest.close()


def _report(**options: Any) -> dict[str, Any]:
    args = options.pop("args", ())
    code, out = asyncio.run(_spawned([guest_python(), REPORT, *args], **options))
    assert code == 0, out
    report: dict[str, Any] = json.loads(out)
    return report


def test_the_command_gets_the_env_and_cwd_given_and_writes_to_a_pipe(guest_dir: Path) -> None:
    # LC_ALL set: without a locale Python would add LC_CTYPE itself (PEP 538).
    env = {"LC_ALL": "C.UTF-8", "RELAYNAT_PROBE": "a=b c", "EMPTY": "", "ACCENT": "é"}
    report = _report(env=env, cwd=guest_dir)
    assert report["env"] == env
    assert report["cwd"] == str(guest_dir)
    # Nothing else asked for: root of its namespace with every capability, as before.
    assert report["uid"] == [0, 0, 0]
    assert report["status"]["CapEff"] == ALL_CAPS


def test_the_environment_given_is_not_on_a_command_line() -> None:
    # Any host user may read /proc/PID/cmdline (ps); a token in the environment must
    # not show there, as it does not for a process's own environment.
    async def main() -> bytes:
        guest = await NamespaceGuest.spawn(RelayConfig(), ["true"],
                                           env={"API_TOKEN": "s3cr3t-relaynat"})
        try:
            with open(f"/proc/{guest.proc.pid}/cmdline", "rb") as f:
                return f.read()
        finally:
            guest.close()
            await guest.proc.wait()

    cmdline = asyncio.run(main())
    assert b"relaynat.netns.child" in cmdline
    assert b"s3cr3t-relaynat" not in cmdline


def test_the_command_reads_a_pipe_on_stdin() -> None:
    code, out = asyncio.run(_spawned(["sh", "-c", "read line; echo got $line"],
                                     stdin=b"hello\n"))
    assert (code, out) == (0, b"got hello\n")


@pytest.mark.parametrize(("user", "capabilities", "bounding"),
                         [(65534, [], NO_CAPS), ("nobody", None, ALL_CAPS)],
                         ids=["uid-no-capabilities", "name-capabilities-untouched"])
def test_a_command_run_as_nobody_has_no_capability_and_still_the_network(
        start_peer, user: int | str, capabilities: list[str] | None, bounding: str) -> None:
    port = start_peer("echo")
    report = _report(user=user, capabilities=capabilities, args=(GATEWAY, str(port)))
    gid = pwd.getpwuid(65534).pw_gid
    assert report["uid"] == [65534] * 3
    assert report["gid"] == [gid] * 3
    assert report["groups"] == []
    status = report["status"]
    assert status["Uid"] == "65534 65534 65534 65534"
    assert status["Gid"] == f"{gid} {gid} {gid} {gid}"
    assert status["Groups"] == ""
    for key in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
        assert status[key] == NO_CAPS, (key, status)
    assert status["CapBnd"] == bounding
    assert status["NoNewPrivs"] == ("1" if capabilities is not None else "0")
    assert report["echo"] == "ping"  # a TCP connection through the relay, as nobody


def test_a_root_command_keeps_only_the_capabilities_given(start_peer) -> None:
    port = start_peer("echo")
    report = _report(capabilities=["CAP_NET_RAW", "net_bind_service"],
                     args=(GATEWAY, str(port)))
    assert report["uid"] == [0, 0, 0]
    kept = _caps("CAP_NET_RAW", "CAP_NET_BIND_SERVICE")
    status = report["status"]
    assert (status["CapEff"], status["CapPrm"], status["CapBnd"]) == (kept, kept, kept)
    assert (status["CapInh"], status["CapAmb"], status["NoNewPrivs"]) == (NO_CAPS, NO_CAPS, "1")
    assert report["echo"] == "ping"


def test_a_root_command_without_capabilities_cannot_change_its_network() -> None:
    code, out = asyncio.run(_spawned(
        ["sh", "-c", "ip link set lo down 2>&1; echo status $?"], capabilities=[]))
    assert code == 0
    assert out.decode().strip().endswith("status 2"), out  # ip: Operation not permitted
    assert b"not permitted" in out, out


def test_run_command_passes_user_and_a_file_for_stdout_through(tmp_path: Path) -> None:
    out_path = tmp_path / "report.json"
    with open(out_path, "w") as out:
        code = asyncio.run(run_command(RelayConfig(), [guest_python(), REPORT], stdout=out,
                                       user="nobody", group=65534, capabilities=[]))
    assert code == 0
    report = json.loads(out_path.read_text())
    assert report["uid"] == [65534] * 3
    assert report["gid"] == [65534] * 3
    assert report["status"]["CapBnd"] == NO_CAPS


@pytest.mark.parametrize(("options", "message"), [
    ({"user": "no-such-user-relaynat"},
     "user: no user named 'no-such-user-relaynat' in the user database"),
    ({"user": 65534, "group": "no-such-group-relaynat"},
     "group: no group named 'no-such-group-relaynat' in the group database"),
    ({"user": -1}, "user: -1 is not a user id"),
    ({"user": 4000000}, "user 4000000: the user database has no entry to take the group from"),
    ({"group": 65534}, "group: give user too"),
    ({"user": "root", "group": 65534}, "group: a command that stays root keeps group root"),
    ({"capabilities": "CAP_NET_RAW"}, "capabilities: give a collection of names"),
    ({"capabilities": ["CAP_FLY"]}, "capabilities: unknown capability 'CAP_FLY'"),
    ({"user": 65534, "capabilities": ["CAP_NET_RAW"]},
     "capabilities: a command run as a user other than root holds no capability"),
    ({"env": {"A=B": "x"}}, "env: 'A=B' is not a variable name"),
    ({"env": {"A": "x\0y"}}, "env: the value of A has a NUL character"),
    ({"stdout": "out.txt"}, "stdout: 'out.txt' is none of None, subprocess.PIPE"),
    ({"stdin": io.BytesIO()}, "stdin: <_io.BytesIO"),
    ({"stderr": 987}, "stderr: file descriptor 987: Bad file descriptor"),
    ({"stdin": subprocess.STDOUT}, "stdin: -2 is none of"),
], ids=lambda value: "" if isinstance(value, str) else "-".join(map(str, value)))
def test_bad_values_are_refused_before_anything_starts(
        monkeypatch: pytest.MonkeyPatch, options: dict[str, Any], message: str) -> None:
    async def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the namespace child was started")

    async def spawn() -> None:
        await NamespaceGuest.spawn(RelayConfig(), ["true"], **options)

    monkeypatch.setattr(asyncio, "create_subprocess_exec", never)
    with pytest.raises(ConfigError) as caught:
        asyncio.run(spawn())
    assert str(caught.value).startswith(message), caught.value
    assert isinstance(caught.value, Error) and isinstance(caught.value, ValueError)


@pytest.mark.parametrize("which", ["missing", "closed-to-the-command"])
def test_a_cwd_the_command_may_not_enter_fails_the_setup(tmp_path: Path, which: str) -> None:
    # pytest's tmp_path is root's, mode 0700: the command's id outside (nobody) may
    # not enter it, though this process may.
    cwd = Path("/nonexistent-relaynat-cwd") if which == "missing" else tmp_path
    reason = "No such file or directory" if which == "missing" else "Permission denied"

    async def spawn() -> None:
        await NamespaceGuest.spawn(RelayConfig(), ["true"], cwd=cwd)

    with pytest.raises(NamespaceSetupError) as caught:
        asyncio.run(spawn())
    assert str(caught.value) == f"cannot set up the guest namespace: cwd {cwd}: {reason}"
    assert isinstance(caught.value, Error) and isinstance(caught.value, RuntimeError)
